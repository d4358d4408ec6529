// EMSA kernels (forward and backward) and their host launchers; SIMT design, see docs/cuda_design.md.
//
// Same source for nvcc (csrc/cuda/ops.cu) and for the CPU emulation (csrc/emu/ops_emu.cpp).
//
// Math (docs/emsa_math.md): per batch b and output head g
//   S_g = scale * sum_j W[g, j] q_j k_j^T   (only j = g with weight 1 when there is no mix)
//   P_g = softmax_keys(S_g);  out_g = ((P_g - 1/M) rstd_g) v_g  (plain P_g v_g without mix)
//   rstd_g = (sum_i rsq_i / (N M) + eps)^-1/2,  rsq_i = sum_m (P_im - 1/M)^2 (centred; the saved
//   statistics of rest_kernels/backends/stats.py, with lse).
// The N x M map never leaves the chip: a block owns a 32 x 32 tile of it at a time.
//
// Thread mapping of a 32 x 32 tile with 128 threads (4 warps): thread t owns row t / 4 and the 8
// columns (t % 4) + 4 s, s < 8. The 4 threads of a row are adjacent lanes of one warp, so row
// reductions are two xor-shuffles. Accumulators over the head dim (out, dq, dk, dv rows): thread t
// owns row t / 4 and a quarter of the columns, acc_col(t % 4, c) for c < DPAD / 4, in groups of 4
// consecutive columns (DPAD = 64 or 128; smaller and odd head dims are zero-padded on load and
// masked on store).
#pragma once

#include <cmath>
#include <type_traits>

#include "cuda/portability.cuh"

namespace REST_NS {

constexpr int kTile = 32;      // query rows and keys per tile
constexpr int kChunk = 32;     // head-dim chunk of the logits' dot products
constexpr int kThreads = 128;  // 4 warps
constexpr unsigned kFull = 0xffffffffu;

template <class T>
struct EmsaArgs {
  const T* q;
  const T* k;
  const T* v;
  int64_t qs[4], ks[4], vs[4];  // strides of (B, h, rows, d) in elements
  const float* w;               // mix weight (h, h) row-major, or nullptr
  int B, h, N, M, d;
  float scale;
};

using ChunkTile = float[kTile][kChunk + 1];  // +1: row-wise and column-wise reads hit distinct banks

// The dot products' staged operands: a kTile x kChunk slice per tile, rows of kChunk + 4 floats, so
// each row starts on 16 bytes (tile_dot reads 4 columns at once) and consecutive rows start 4 banks
// apart (the rows a warp's 16-byte loads touch together fall on distinct banks).
constexpr int kDotPitch = kChunk + 4;
struct alignas(16) DotTile {
  float v[kTile][kDotPitch];
};
struct alignas(16) Float4 {
  float x[4];
};

// dst[r][c] = f * (X[row0 + r, c0 + c] - shift[c0 + c]) (0 outside the matrix): a kTile x kChunk
// slice. shift (optional) is subtracted in float32 before any product (vbar, see the backward).
template <class T>
REST_DEVICE void load_chunk(DotTile& dst, const T* __restrict__ X, int64_t srow, int64_t scol, int row0, int nrows,
                            int c0, int d, float f, const float* __restrict__ shift = nullptr) {
  for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
    const int r = e / kChunk, c = e % kChunk, gr = row0 + r, gc = c0 + c;
    dst.v[r][c] = (gr < nrows && gc < d) ? f * (rk::to_f(X[gr * srow + gc * scol]) - (shift ? shift[gc] : 0.f)) : 0.f;
  }
}

// A kTile x DPAD block of head-dim rows (values, dO, q or k) for the P V-like products, on 16 bytes.
template <int DPAD>
struct alignas(16) RowTile {
  float v[kTile][DPAD];
};

// dst[r][c] = X[row0 + r, c] for c < DPAD (0 outside the matrix).
template <class T, int DPAD>
REST_DEVICE void load_rows(RowTile<DPAD>& dst, const T* __restrict__ X, int64_t srow, int64_t scol, int row0,
                           int nrows, int d) {
  for (int e = threadIdx.x; e < kTile * DPAD; e += kThreads) {
    const int r = e / DPAD, c = e % DPAD, gr = row0 + r;
    dst.v[r][c] = (gr < nrows && c < d) ? rk::to_f(X[gr * srow + c * scol]) : 0.f;
  }
}

// The head-dim column of a thread's accumulator slot c (rows of out, dq, dk, dv): groups of 4
// consecutive columns, the 4 threads of a row side by side, so one 16-byte shared load of a staged
// row feeds 4 accumulators and the 4 lanes' loads of a row are 64 consecutive bytes (no bank
// conflict; the 8 rows of a warp read the same row: broadcast).
REST_DEVICE int acc_col(int quad, int c) { return 16 * (c / 4) + 4 * quad + c % 4; }

// acc[c] += x * zrow[acc_col(quad, c)] for the thread's NC slots: one 16-byte load per 4 FMAs (one
// 4-byte load per FMA before 2026-12-06). Each slot's sum runs over the rows in the same order.
template <int NC, int DPAD>
REST_DEVICE void axpy_row(float (&acc)[NC], float x, const float (&zrow)[DPAD], int quad) {
  static_assert(4 * NC == DPAD, "a thread holds a quarter of the head dim");
REST_UNROLL
  for (int c4 = 0; c4 < NC / 4; ++c4) {
    const Float4 z = *reinterpret_cast<const Float4*>(&zrow[16 * c4 + 4 * quad]);
REST_UNROLL
    for (int u = 0; u < 4; ++u) acc[4 * c4 + u] += x * z.x[u];
  }
}

// acc[s] += f * A[i0 + row, :] . B[m0 + quad + 4 s, :] over the head dim, through shared chunks.
// Register-blocked over the head dim: each step reads 4 columns of the thread's A row and of each of
// its 8 B rows as one 16-byte shared load apiece (9 loads feed 32 FMAs; one column at a time it was
// 9 loads per 8 FMAs, bound by shared memory). The sums run column by column as before (the same
// float32 result); columns past d are zero in both slices (load_chunk), so whole steps are exact.
template <class T>
REST_DEVICE void tile_dot(float (&acc)[8], const T* __restrict__ A, int64_t sa_row, int64_t sa_col, int nA, int i0,
                          const T* __restrict__ Bm, int64_t sb_row, int64_t sb_col, int nB, int m0, int d, float f,
                          DotTile& Ac, DotTile& Bc, const float* __restrict__ b_shift = nullptr) {
  const int row = threadIdx.x >> 2, quad = threadIdx.x & 3;
  for (int c0 = 0; c0 < d; c0 += kChunk) {
    load_chunk(Ac, A, sa_row, sa_col, i0, nA, c0, d, 1.f);
    load_chunk(Bc, Bm, sb_row, sb_col, m0, nB, c0, d, f, b_shift);
    __syncthreads();
    const int cend = d - c0 < kChunk ? d - c0 : kChunk;
    for (int c = 0; c < cend; c += 4) {
      const Float4 a4 = *reinterpret_cast<const Float4*>(&Ac.v[row][c]);
REST_UNROLL
      for (int s = 0; s < 8; ++s) {
        const Float4 b4 = *reinterpret_cast<const Float4*>(&Bc.v[quad + 4 * s][c]);
REST_UNROLL
        for (int u = 0; u < 4; ++u) acc[s] += a4.x[u] * b4.x[u];
      }
    }
    __syncthreads();
  }
}

// Mixed, scaled logits of output head g for the tile (i0.., m0..).
template <class T>
REST_DEVICE void tile_logits(float (&S)[8], const EmsaArgs<T>& a, int b, int g, int i0, int m0, DotTile& Ac,
                             DotTile& Bc) {
REST_UNROLL
  for (int s = 0; s < 8; ++s) S[s] = 0.f;
  const bool mix = a.w != nullptr;
  const int jb = mix ? 0 : g, je = mix ? a.h : g + 1;
  for (int j = jb; j < je; ++j) {
    const float f = (mix ? a.w[g * a.h + j] : 1.f) * a.scale;
    tile_dot(S, a.q + b * a.qs[0] + j * a.qs[1], a.qs[2], a.qs[3], a.N, i0,
             a.k + b * a.ks[0] + j * a.ks[1], a.ks[2], a.ks[3], a.M, m0, a.d, f, Ac, Bc);
  }
}

REST_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(kFull, x, 1);
  return x + __shfl_xor_sync(kFull, x, 2);
}
REST_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFull, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFull, x, 2));
}
REST_DEVICE float warp_sum(float x) {
REST_UNROLL
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

// One key tile merged into a row's online statistics (running max mrow, l = sum e with
// e = exp(S - mrow), centred c = sum (e - l/n)^2 over the n keys seen): the tile is centred at its
// own mean and merged by Chan's pairwise update, l and c rescaled by alpha, alpha^2 when the max
// grows. x: the calling thread's 8 logits of the row (-inf where !ok, keys past M); the row's other
// values sit in the 3 other lanes of its quad. tile: keys per tile (the last may be shorter).
REST_DEVICE void centred_tile_update(const float (&x)[8], const bool (&ok)[8], int m0, int M, int tile, float& mrow,
                                     float& l, float& c) {
  float mloc = -INFINITY;
REST_UNROLL
  for (int s = 0; s < 8; ++s) mloc = fmaxf(mloc, x[s]);
  const float mnew = fmaxf(mrow, quad_max(mloc));  // finite: every key tile holds a valid key
  const float alpha = expf(mrow - mnew);
  float e[8], ls = 0.f;
REST_UNROLL
  for (int s = 0; s < 8; ++s) {
    e[s] = ok[s] ? expf(x[s] - mnew) : 0.f;
    ls += e[s];
  }
  const float lb = quad_sum(ls);
  const float nb = float(M - m0 < tile ? M - m0 : tile), na = float(m0);
  const float mean_b = lb / nb;
  float cs = 0.f;
REST_UNROLL
  for (int s = 0; s < 8; ++s) {
    const float dev = ok[s] ? e[s] - mean_b : 0.f;
    cs += dev * dev;
  }
  const float la = l * alpha, delta = mean_b - la / fmaxf(na, 1.f);
  c = c * (alpha * alpha) + quad_sum(cs) + delta * delta * (na * nb / (na + nb));
  l = la + lb;
  mrow = mnew;
}

// vbar[b, g, :] = mean over keys of v[b, g]; one block per (b, g), fixed summation order.
template <class T>
__global__ void __launch_bounds__(kThreads) emsa_vbar_kernel(EmsaArgs<T> a, float* __restrict__ vbar) {
  const int bg = blockIdx.x, b = bg / a.h, g = bg % a.h;
  const T* v = a.v + b * a.vs[0] + g * a.vs[1];
  for (int c = threadIdx.x; c < a.d; c += kThreads) {
    float s = 0.f;
    for (int m = 0; m < a.M; ++m) s += rk::to_f(v[m * a.vs[2] + c * a.vs[3]]);
    vbar[int64_t(bg) * a.d + c] = s / a.M;
  }
}

// ---------------------------------------------------------------------------------- forward
// The statistics are those of rest_kernels/backends/stats.py: lse, and with the mix the centred row
// sums rsq_i = sum_m (P_im - 1/M)^2 and rstd per (b, g). With the mix the forward is two passes over
// the logits: emsa_stats_kernel (lse, rsq), emsa_rstd_kernel (rstd), then emsa_fwd_kernel with P final
// (P = exp(S - lse) / M, lse the log-mean-exp) forms Y = (P - 1/M) rstd before the product with v
// and writes out once.

// Grid (ceil(N / 32), B h). Online softmax over key tiles with the centred sum of squares: per row
// the running max m, l = sum e (e = exp(S - m)) and c = sum (e - l/n)^2 over the n keys seen, each
// tile merged with Chan's pairwise update (the tile centred at its own mean, then the squared
// difference of the means); when m grows, l scales by alpha = exp(m_old - m_new) and c by alpha^2.
// At the end sum_m (P - 1/M)^2 = c / l^2 with no difference of two nearly equal numbers, so
// near-uniform rows (variance far below 1/M^2) keep their digits.
template <class T>
__global__ void __launch_bounds__(kThreads, 1) emsa_stats_kernel(EmsaArgs<T> a, float* __restrict__ lse,
                                                              float* __restrict__ rsq) {
  REST_SHARED(DotTile, Ac);
  REST_SHARED(DotTile, Bc);
  const int row = threadIdx.x >> 2, quad = threadIdx.x & 3;
  const int i0 = blockIdx.x * kTile, bg = blockIdx.y, b = bg / a.h, g = bg % a.h, i = i0 + row;
  float mrow = -INFINITY, l = 0.f, c = 0.f;
  for (int m0 = 0; m0 < a.M; m0 += kTile) {
    float S[8];
    tile_logits(S, a, b, g, i0, m0, Ac, Bc);
    float x[8];
    bool ok[8];
REST_UNROLL
    for (int s = 0; s < 8; ++s) {
      ok[s] = m0 + quad + 4 * s < a.M;
      x[s] = ok[s] ? S[s] : -INFINITY;
    }
    centred_tile_update(x, ok, m0, a.M, kTile, mrow, l, c);
  }
  if (i < a.N && quad == 0) {
    lse[int64_t(bg) * a.N + i] = mrow + logf(l / a.M);  // log-mean-exp: rest_kernels/backends/stats.py
    rsq[int64_t(bg) * a.N + i] = c / (l * l);
  }
}

// Grid (ceil(N / 32), B h). MIX: P = exp(S - lse) / M is final on every tile, so the block accumulates
// sum_m (P_im - 1/M) rstd v_m (the mean 1/M subtracted before the product, as every backend does)
// and writes out once. !MIX: classic online softmax (rescaled accumulator), out = acc / l, and lse.
// TO is the output type: T, or float for the backward's float32 rebuild of O (see emsa_bwd).
template <class T, class TO, int DPAD, bool MIX>
__global__ void __launch_bounds__(kThreads, 1) emsa_fwd_kernel(EmsaArgs<T> a, TO* __restrict__ out,
                                                            float* __restrict__ lse_io,
                                                            const float* __restrict__ rstd) {
  using Rows = RowTile<DPAD>;
  REST_SHARED(DotTile, Ac);
  REST_SHARED(DotTile, Bc);
  REST_SHARED(ChunkTile, Ps);
  REST_SHARED(Rows, Vs);
  constexpr int NC = DPAD / 4;
  const int row = threadIdx.x >> 2, quad = threadIdx.x & 3;
  const int i0 = blockIdx.x * kTile, bg = blockIdx.y, b = bg / a.h, g = bg % a.h, i = i0 + row;
  const T* v = a.v + b * a.vs[0] + g * a.vs[1];
  const float invM = 1.f / a.M;
  const float lse_i = (MIX && i < a.N) ? lse_io[int64_t(bg) * a.N + i] : 0.f;
  const float rs = MIX ? rstd[bg] : 1.f;

  float acc[NC];
REST_UNROLL
  for (int c = 0; c < NC; ++c) acc[c] = 0.f;
  float mrow = -INFINITY, l = 0.f;  // !MIX: running max and sum of exp

  for (int m0 = 0; m0 < a.M; m0 += kTile) {
    float S[8];
    tile_logits(S, a, b, g, i0, m0, Ac, Bc);
    float alpha = 1.f;
    if (MIX) {
REST_UNROLL
      for (int s = 0; s < 8; ++s) {
        const bool ok = m0 + quad + 4 * s < a.M;
        // P - 1/M = (exp(S - lse) - 1) / M with lse the log-mean-exp: exactly centred in float32
        Ps[row][quad + 4 * s] = ok ? (expf(S[s] - lse_i) - 1.f) * invM * rs : 0.f;
      }
    } else {
      float mloc = -INFINITY;
REST_UNROLL
      for (int s = 0; s < 8; ++s) {
        if (m0 + quad + 4 * s >= a.M) S[s] = -INFINITY;
        mloc = fmaxf(mloc, S[s]);
      }
      // every key tile holds at least one valid key, so mnew is finite and alpha well defined
      const float mnew = fmaxf(mrow, quad_max(mloc));
      alpha = expf(mrow - mnew);
      float ls = 0.f;
REST_UNROLL
      for (int s = 0; s < 8; ++s) {
        const float p = (m0 + quad + 4 * s < a.M) ? expf(S[s] - mnew) : 0.f;
        Ps[row][quad + 4 * s] = p;
        ls += p;
      }
      l = l * alpha + quad_sum(ls);
      mrow = mnew;
    }
    load_rows<T, DPAD>(Vs, v, a.vs[2], a.vs[3], m0, a.M, a.d);
    __syncthreads();
REST_UNROLL
    for (int c = 0; c < NC; ++c) acc[c] *= alpha;
    for (int mm = 0; mm < kTile; ++mm) {
      const float p = Ps[row][mm];
      axpy_row(acc, p, Vs.v[mm], quad);
    }
    __syncthreads();
  }

  if (i < a.N) {
    TO* o = out + ((int64_t(b) * a.N + i) * a.h + g) * a.d;
REST_UNROLL
    for (int c = 0; c < NC; ++c) {
      const int col = acc_col(quad, c);
      if (col < a.d) o[col] = rk::from_f<TO>(MIX ? acc[c] : acc[c] / l);
    }
    if (!MIX && quad == 0) lse_io[int64_t(bg) * a.N + i] = mrow + logf(l / a.M);  // log-mean-exp
  }
}

// Sum of a head's rsq over its N rows, in one fixed order.
REST_DEVICE float head_rc_sum(const float* __restrict__ rc_bg, int N, float (&red)[kThreads]) {
  float s = 0.f;
  for (int i = threadIdx.x; i < N; i += kThreads) s += rc_bg[i];
  red[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (int(threadIdx.x) < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  const float total = red[0];
  __syncthreads();
  return total;
}

REST_DEVICE float head_rstd(float rc_total, int N, int M, float eps) {
  const double var = double(rc_total) / (double(N) * M);
  return static_cast<float>(1.0 / sqrt(var + eps));
}

// One block per (b, g): rstd = (sum_i rsq_i / (N M) + eps)^-1/2, the sum in one fixed order.
__global__ void __launch_bounds__(kThreads) emsa_rstd_kernel(const float* __restrict__ rsq, int N, int M, float eps,
                                                             float* __restrict__ rstd) {
  using Red = float[kThreads];
  REST_SHARED(Red, red);
  const int bg = blockIdx.x;
  const float rs = head_rstd(head_rc_sum(rsq + int64_t(bg) * N, N, red), N, M, eps);
  if (threadIdx.x == 0) rstd[bg] = rs;
}

// --------------------------------------------------------------------------------- backward
struct BwdRowArgs {
  int64_t os[4], dos[4];  // strides of out and dout
};

// Per row i of head (b, g): u_i = dO_i . O_i. One warp per row. out is the saved output (TO = T),
// or for fp16 / bf16 with the mix the float32 rows rebuilt by emsa_fwd_kernel (see emsa_bwd).
template <class T, class TO>
__global__ void __launch_bounds__(kThreads) emsa_bwd_rowdot_kernel(const T* __restrict__ dout, const TO* __restrict__ out,
                                                                   const float* __restrict__ oscale, BwdRowArgs s,
                                                                   int h, int N, int d, float* __restrict__ u_out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int i = blockIdx.x * (kThreads / 32) + warp, bg = blockIdx.y, b = bg / h, g = bg % h;
  if (i >= N) return;  // whole warp: the shuffles below stay converged
  const TO* o = out + b * s.os[0] + g * s.os[1] + i * s.os[2];
  const T* dO = dout + b * s.dos[0] + g * s.dos[1] + i * s.dos[2];
  float u = 0.f;
  for (int c = lane; c < d; c += 32) u += rk::to_f(dO[c * s.dos[3]]) * rk::to_f(o[c * s.os[3]]);
  u = warp_sum(u);
  if (lane == 0) u_out[int64_t(bg) * N + i] = oscale ? oscale[bg] * u : u;
}

// One block per (b, g): c_g = sum_i u_i / (N M) in a fixed order, then per row
//   E_i = u_i - c_g rstd_g^2 rsq_i       (mix; E_i = u_i without it; sum_m P_im Y_im = rstd rsq_i)
// With the mix, dP - D_i (notes: dP = rstd (dO v^T - a - Y c), D_i = sum_m P dP) simplifies to
//   dP_im - D_i = rstd (dO_i . (v_m - vbar) - c Y_im) - E_i:
// the scalar a cancels, and v - vbar is formed in float32 before the dot product, so nothing
// large (rstd ~ eps^-1/2 times dO . v) is subtracted from something large.
__global__ void __launch_bounds__(kThreads) emsa_bwd_rowstat_kernel(const float* __restrict__ u,
                                                                    const float* __restrict__ rsq,
                                                                    const float* __restrict__ rstd, int N, int M,
                                                                    bool mix, float* __restrict__ E,
                                                                    float* __restrict__ cg) {
  using Red = float[kThreads];
  REST_SHARED(Red, red);
  const int bg = blockIdx.x;
  const float* ub = u + int64_t(bg) * N;
  float* Eb = E + int64_t(bg) * N;
  if (!mix) {
    for (int i = threadIdx.x; i < N; i += kThreads) Eb[i] = ub[i];
    return;
  }
  float su = 0.f;
  for (int i = threadIdx.x; i < N; i += kThreads) su += ub[i];
  red[threadIdx.x] = su;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (int(threadIdx.x) < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  const float c = static_cast<float>(double(red[0]) / (double(N) * M));
  const float rs = rstd[bg];
  if (threadIdx.x == 0) cg[bg] = c;
  for (int i = threadIdx.x; i < N; i += kThreads) Eb[i] = ub[i] - c * rs * rs * rsq[int64_t(bg) * N + i];
}

template <class T>
struct BwdArgs {
  EmsaArgs<T> a;
  const T* dout;
  int64_t dos[4];
  const float* lse;
  const float* E;     // (B h, N): see emsa_bwd_rowstat_kernel
  const float* cg;    // (B h): c_g (mix only)
  const float* rstd;  // (B h) (mix only)
  const float* vbar;  // (B h, d) (mix only)
  // tensor-core dk / dv kernel with its query walk split over gridDim.z blocks (bwd_key_splits):
  // float32 partials (splits, B h, M, d) of dk (part_a) and dv (part_b), summed by
  // emsa_bwd_split_sum_kernel; nullptr when unsplit
  float* part_a = nullptr;
  float* part_b = nullptr;
};

// The backward's main kernel. KEYS: grid (ceil(M / 32), B h), a block owns key tile m0 of input
// head j and walks every query tile: dk_j, dv_j and the dW partials. !KEYS: grid (ceil(N / 32), B h),
// a block owns query tile i0 of input head j and walks every key tile: dq_j. Both recompute
// dL_j = sum_g W[g, j] dS_g for each 32 x 32 tile; the two-kernel split keeps every sum
// deterministic (no atomics).
template <class T, int DPAD, bool KEYS>
__global__ void __launch_bounds__(kThreads, 1) emsa_bwd_kernel(BwdArgs<T> p, T* __restrict__ grad_a,
                                                            T* __restrict__ grad_b, float* __restrict__ dw_part) {
  using Rows = RowTile<DPAD>;
  REST_SHARED(DotTile, Ac);
  REST_SHARED(DotTile, Bc);
  REST_SHARED(ChunkTile, Ts);  // Y tile (for dv) then the dL tile
  REST_SHARED(Rows, Fs);       // dO rows (for dv), then q rows (dk) or k rows (dq)
  using Red = float[kThreads / 32];
  REST_SHARED(Red, red);
  constexpr int NC = DPAD / 4;
  const EmsaArgs<T>& a = p.a;
  const int row = threadIdx.x >> 2, quad = threadIdx.x & 3, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bj = blockIdx.y, b = bj / a.h, j = bj % a.h;
  const bool mix = a.w != nullptr;
  const float invM = 1.f / a.M;
  const int own0 = blockIdx.x * kTile;  // first key (KEYS) or query row (!KEYS) of this block
  const int walk_end = KEYS ? a.N : a.M;

  float acc1[NC], acc2[NC];  // KEYS: dk, dv rows of key own0 + row; !KEYS: dq row own0 + row
REST_UNROLL
  for (int c = 0; c < NC; ++c) acc1[c] = acc2[c] = 0.f;

  for (int t0 = 0; t0 < walk_end; t0 += kTile) {
    const int i0 = KEYS ? t0 : own0, m0 = KEYS ? own0 : t0;
    const int i = i0 + row;
    float dL[8], Lj[8];
REST_UNROLL
    for (int s = 0; s < 8; ++s) dL[s] = Lj[s] = 0.f;
    if (KEYS && mix)
      tile_dot(Lj, a.q + b * a.qs[0] + j * a.qs[1], a.qs[2], a.qs[3], a.N, i0,
               a.k + b * a.ks[0] + j * a.ks[1], a.ks[2], a.ks[3], a.M, m0, a.d, a.scale, Ac, Bc);
    const int gb = mix ? 0 : j, ge = mix ? a.h : j + 1;
    for (int g = gb; g < ge; ++g) {
      const int bg = b * a.h + g;
      float S[8], dOv[8];
      tile_logits(S, a, b, g, i0, m0, Ac, Bc);
REST_UNROLL
      for (int s = 0; s < 8; ++s) dOv[s] = 0.f;
      const T* dO = p.dout + b * p.dos[0] + g * p.dos[1];
      // dOv = dO_g (v_g - vbar_g)^T with the mix, dO_g v_g^T without
      tile_dot(dOv, dO, p.dos[2], p.dos[3], a.N, i0, a.v + b * a.vs[0] + g * a.vs[1], a.vs[2], a.vs[3], a.M, m0,
               a.d, 1.f, Ac, Bc, mix ? p.vbar + int64_t(bg) * a.d : nullptr);
      const bool row_ok = i < a.N;
      const float lse_i = row_ok ? p.lse[int64_t(bg) * a.N + i] : 0.f;
      const float E_i = row_ok ? p.E[int64_t(bg) * a.N + i] : 0.f;
      const float rs = mix ? p.rstd[bg] : 1.f;
      const float cg = mix ? p.cg[bg] : 0.f;
      const float wgj = mix ? a.w[g * a.h + j] : 1.f;
      // a softmax over a single key is the constant 1: P exactly 1 and dS exactly 0 (the
      // recomputed terms below would cancel only to rounding)
      const bool one_key = a.M == 1;
      float dwp = 0.f;
REST_UNROLL
      for (int s = 0; s < 8; ++s) {
        const bool ok = row_ok && (m0 + quad + 4 * s < a.M);
        const float e = ok ? (one_key ? 1.f : expf(S[s] - lse_i)) : 0.f;  // lse: log-mean-exp
        const float P = e * invM;
        const float Y = mix ? (ok ? (e - 1.f) * invM * rs : 0.f) : P;  // (P - 1/M) rstd, exactly centred
        const float dPmD = mix ? rs * (dOv[s] - cg * Y) - E_i : dOv[s] - E_i;  // dP - D_i
        const float dS = one_key ? 0.f : P * dPmD;
        dL[s] += wgj * dS;
        dwp += dS * Lj[s];
        if (KEYS && g == j) Ts[row][quad + 4 * s] = Y;
      }
      if (KEYS && mix) {  // dW[g, j] partial of this tile: warp tree, then the 4 warps in order
        dwp = warp_sum(dwp);
        if (lane == 0) red[warp] = dwp;
        __syncthreads();
        if (threadIdx.x == 0) {
          float* dst = dw_part + (int64_t(bj) * gridDim.x + blockIdx.x) * a.h + g;
          *dst += (red[0] + red[1]) + (red[2] + red[3]);
        }
        __syncthreads();
      }
      if (KEYS && g == j) {  // dv_j += Y_j^T dO_j
        load_rows<T, DPAD>(Fs, dO, p.dos[2], p.dos[3], i0, a.N, a.d);
        __syncthreads();
        for (int ii = 0; ii < kTile; ++ii) {
          const float y = Ts[ii][row];
          axpy_row(acc2, y, Fs.v[ii], quad);
        }
        __syncthreads();
      }
    }
    // dL tile -> shared, then dk_j += dL^T q_j (KEYS) or dq_j += dL k_j (!KEYS)
REST_UNROLL
    for (int s = 0; s < 8; ++s) Ts[row][quad + 4 * s] = dL[s];
    if (KEYS)
      load_rows<T, DPAD>(Fs, a.q + b * a.qs[0] + j * a.qs[1], a.qs[2], a.qs[3], i0, a.N, a.d);
    else
      load_rows<T, DPAD>(Fs, a.k + b * a.ks[0] + j * a.ks[1], a.ks[2], a.ks[3], m0, a.M, a.d);
    __syncthreads();
    for (int x = 0; x < kTile; ++x) {
      const float t = KEYS ? Ts[x][row] : Ts[row][x];
      axpy_row(acc1, t, Fs.v[x], quad);
    }
    __syncthreads();
  }

  // grads are contiguous (B, h, rows, d)
  const int r = own0 + row, nrows = KEYS ? a.M : a.N;
  if (r < nrows) {
    T* g1 = grad_a + (int64_t(bj) * nrows + r) * a.d;
    T* g2 = KEYS ? grad_b + (int64_t(bj) * nrows + r) * a.d : nullptr;
REST_UNROLL
    for (int c = 0; c < NC; ++c) {
      const int col = acc_col(quad, c);
      if (col < a.d) {
        g1[col] = rk::from_f<T>(acc1[c] * a.scale);
        if (KEYS) g2[col] = rk::from_f<T>(acc2[c]);
      }
    }
  }
}

// dmix[g, j] = sum over (b, key tile) of the partials, in a fixed order. One thread per (g, j).
__global__ void __launch_bounds__(kThreads) emsa_dmix_kernel(const float* __restrict__ dw_part, int B, int h,
                                                             int ntiles, float* __restrict__ dmix) {
  const int e = blockIdx.x * kThreads + threadIdx.x;
  if (e >= h * h) return;
  const int g = e / h, j = e % h;
  float s = 0.f;
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < ntiles; ++t) s += dw_part[((int64_t(b) * h + j) * ntiles + t) * h + g];
  dmix[e] = s;
}

// out[i] = the sum over the split walks z of part[z][i], in order (the same bits on every GPU),
// rounded once to T.
template <class T>
__global__ void __launch_bounds__(kThreads) emsa_bwd_split_sum_kernel(const float* __restrict__ part, int splits,
                                                                     int64_t n, T* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= n) return;
  float s = 0.f;
  for (int z = 0; z < splits; ++z) s += part[z * n + i];
  out[i] = rk::from_f<T>(s);
}

}  // namespace REST_NS

// fp16 / bf16 forward on tensor cores: uses EmsaArgs, quad_sum, quad_max, centred_tile_update above
#include "cuda/emsa_mma.cuh"

namespace REST_NS {

// ----------------------------------------------------------------------------------- host side
// Arguments, dtypes and empty problems are checked and answered once by csrc/op_checks.h; what is
// left here are the limits of these kernels (declared in Python as CudaBackend / CudaEmuBackend's
// max_head_dim and max_batch_heads, and refused there before a call gets here) and internal asserts.
inline void emsa_kernel_limits(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK_VALUE(q.size(3) <= 128, "emsa (cuda kernels): head dim ", q.size(3), " > 128");
  TORCH_CHECK_VALUE(q.size(2) < (int64_t(1) << 31) && k.size(2) < (int64_t(1) << 31),
                    "emsa (cuda kernels): more than 2^31 - 1 rows");
  TORCH_CHECK_VALUE(q.size(0) * q.size(1) <= 65535, "emsa (cuda kernels): batch x heads = ", q.size(0) * q.size(1),
                    " exceeds the grid's y dimension (65535); split the batch");
  TORCH_INTERNAL_ASSERT(q.numel() > 0 && k.size(2) > 0, "empty problems are answered by csrc/op_checks.h");
  TORCH_INTERNAL_ASSERT(q.device().type() == rk::kDevice);
}

// The kernels read the mix weight as a dense float32 (h, h) array. csrc/op_checks.h accepts any
// floating dtype and strides (as the cpu kernels do), so the host side makes that copy here.
inline c10::optional<at::Tensor> dense_mix(const c10::optional<at::Tensor>& w) {
  if (!w) return c10::nullopt;
  return w->to(at::kFloat).contiguous();
}

template <class T>
EmsaArgs<T> emsa_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const c10::optional<at::Tensor>& w, double scale) {
  EmsaArgs<T> a;
  a.q = q.data_ptr<T>();
  a.k = k.data_ptr<T>();
  a.v = v.data_ptr<T>();
  for (int i = 0; i < 4; ++i) {
    a.qs[i] = q.stride(i);
    a.ks[i] = k.stride(i);
    a.vs[i] = v.stride(i);
  }
  a.w = w ? w->data_ptr<float>() : nullptr;
  a.B = static_cast<int>(q.size(0));
  a.h = static_cast<int>(q.size(1));
  a.N = static_cast<int>(q.size(2));
  a.M = static_cast<int>(k.size(2));
  a.d = static_cast<int>(q.size(3));
  a.scale = static_cast<float>(scale);
  return a;
}

// The forward's kernels run on tensor cores (emsa_mma.cuh) for 16-bit inputs, written out in their
// own dtype or, for the backward's float32 rebuild of O (TO = float), in float32 with P V taken in
// two 16-bit halves (emsa_fwd_mma_kernel: P is not rounded to 16 bits there). float32 inputs run the
// SIMT kernels.
template <class T, class TO>
constexpr bool kFwdOnTensorCores = !std::is_same_v<T, float>;

template <class T, class TO>
constexpr int fwd_rows_per_block() {
  return kFwdOnTensorCores<T, TO> ? kMmaRows : kTile;
}

// The forward kernel for head dim d, output type TO.
template <class T, class TO, bool MIX>
auto fwd_kernel_for(int64_t d) {
  if constexpr (kFwdOnTensorCores<T, TO>)
    return d <= 64 ? &emsa_fwd_mma_kernel<T, TO, 64, MIX> : &emsa_fwd_mma_kernel<T, TO, 128, MIX>;
  else
    return d <= 64 ? &emsa_fwd_kernel<T, TO, 64, MIX> : &emsa_fwd_kernel<T, TO, 128, MIX>;
}

// With the mix: stats (lse, rsq) -> rstd -> out (rest_kernels/backends/stats.py).
template <class T, class TO>
void launch_mixed_forward(const EmsaArgs<T>& a, TO* out, float* lse, float* rsq, float* rstd, float eps,
                          bool stats, rk::Stream stream) {
  const dim3 grid(rk::ceil_div(a.N, fwd_rows_per_block<T, TO>()), static_cast<unsigned>(a.B * a.h));
  if (stats) {
    if constexpr (kFwdOnTensorCores<T, TO>)
      rk::launch(a.d <= 64 ? &emsa_stats_mma_kernel<T, 64> : &emsa_stats_mma_kernel<T, 128>, grid, dim3(kThreads),
                 stream, a, lse, rsq);
    else
      rk::launch(emsa_stats_kernel<T>, grid, dim3(kThreads), stream, a, lse, rsq);
    rk::launch(emsa_rstd_kernel, dim3(static_cast<unsigned>(a.B * a.h)), dim3(kThreads), stream,
               static_cast<const float*>(rsq), a.N, a.M, eps, rstd);
  }
  rk::launch(fwd_kernel_for<T, TO, true>(a.d), grid, dim3(kThreads), stream, a, out, lse,
             static_cast<const float*>(rstd));
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emsa_fwd(const at::Tensor& q, const at::Tensor& k,
                                                                          const at::Tensor& v,
                                                                          const c10::optional<at::Tensor>& w_in,
                                                                          double scale, double eps) {
  const c10::optional<at::Tensor> w = dense_mix(w_in);
  emsa_kernel_limits(q, k);
  rk::DeviceGuard guard(q);
  const int64_t B = q.size(0), h = q.size(1), N = q.size(2), d = q.size(3);
  const bool mix = w.has_value();
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({B, N, h, d}, q.options());
  at::Tensor lse = at::empty({B, h, N}, f32);
  at::Tensor rsq = mix ? at::empty({B, h, N}, f32) : at::empty({0}, f32);
  at::Tensor rstd = mix ? at::empty({B, h}, f32) : at::empty({0}, f32);
  REST_DISPATCH_DTYPES(q.scalar_type(), "emsa_fwd", [&] {
    const EmsaArgs<scalar_t> a = emsa_args<scalar_t>(q, k, v, w, scale);
    auto stream = rk::current_stream();
    if (mix) {
      launch_mixed_forward<scalar_t, scalar_t>(a, out.data_ptr<scalar_t>(), lse.data_ptr<float>(),
                                               rsq.data_ptr<float>(), rstd.data_ptr<float>(),
                                               static_cast<float>(eps), true, stream);
    } else {
      const dim3 grid(rk::ceil_div(N, fwd_rows_per_block<scalar_t, scalar_t>()), static_cast<unsigned>(B * h));
      rk::launch(fwd_kernel_for<scalar_t, scalar_t, false>(d), grid, dim3(kThreads), stream, a,
                 out.data_ptr<scalar_t>(), lse.data_ptr<float>(), static_cast<const float*>(nullptr));
    }
  });
  return {out.transpose(1, 2), lse, rsq, rstd};
}

// The backward's main kernel (KEYS: dk / dv, else dq) for head dim d: tensor cores (emsa_mma.cuh)
// for fp16 / bf16 where on_tc, with or without the mix; else the SIMT kernel.
template <class T, bool KEYS>
auto bwd_kernel_for(int64_t d, bool mix, bool on_tc) {
  if constexpr (!std::is_same_v<T, float>) {
    if (on_tc && mix)
      return d <= 64 ? &emsa_bwd_mma_kernel<T, 64, KEYS, true> : &emsa_bwd_mma_kernel<T, 128, KEYS, true>;
    if (on_tc) return d <= 64 ? &emsa_bwd_mma_kernel<T, 64, KEYS, false> : &emsa_bwd_mma_kernel<T, 128, KEYS, false>;
  }
  return d <= 64 ? &emsa_bwd_kernel<T, 64, KEYS> : &emsa_bwd_kernel<T, 128, KEYS>;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emsa_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& w_in, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rsq,
    const at::Tensor& rstd, double scale, double eps) {
  const c10::optional<at::Tensor> w = dense_mix(w_in);
  emsa_kernel_limits(q, k);
  rk::DeviceGuard guard(q);
  const int64_t B = q.size(0), h = q.size(1), N = q.size(2), M = k.size(2), d = q.size(3);
  const bool mix = w.has_value();
  auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dmix = mix ? at::zeros({h, h}, f32) : at::empty({0}, f32);
  at::Tensor lse_c = lse.contiguous();
  at::Tensor rsq_c = rsq.contiguous();
  at::Tensor rstd_c = rstd.contiguous();
  at::Tensor vbar = mix ? at::empty({B, h, d}, f32) : at::Tensor();
  at::Tensor u = at::empty({B, h, N}, f32);
  at::Tensor E = at::empty({B, h, N}, f32);
  at::Tensor cg = at::zeros({B, h}, f32);
  // rows a block of the main backward kernels owns (keys or queries): 64 on tensor cores (fp16 /
  // bf16, up to kMmaMixHeads heads with the mix), 32 on SIMT (float32, and 16-bit calls mixing more
  // heads); nMt = key blocks of the dk / dv kernel (dW partials per block)
  const bool on_tc = q.scalar_type() != at::kFloat && !(mix && h > kMmaMixHeads);
  const int64_t block_rows = on_tc ? kMmaRows : kTile, nMt = (M + block_rows - 1) / block_rows;
  // the tensor-core kernels store every element of dq, dk, dv (or of their split partials): no fill.
  // The emulation fills them with NaN instead, so an element left unwritten fails the tests.
  auto unfilled = [&](at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef REST_EMU
    return at::full(sizes, std::numeric_limits<float>::quiet_NaN(), options);
#else
    return at::empty(sizes, options);
#endif
  };
  auto grad_like = [&](const at::Tensor& x) {
    return on_tc ? unfilled(x.sizes(), q.options()) : at::zeros(x.sizes(), q.options());
  };
  at::Tensor dq = grad_like(q), dk = grad_like(k), dv = grad_like(v);
  const int splits = on_tc ? bwd_key_splits(nMt * B * h, (N + bwd_tile_cols(mix) - 1) / bwd_tile_cols(mix)) : 1;
  at::Tensor part = splits > 1 ? unfilled({2, splits, B * h * M * d}, f32) : at::Tensor();  // dk, dv partials
  at::Tensor dw_part = mix ? at::zeros({B, h, nMt * splits, h}, f32) : at::Tensor();
  // float32 outputs are stored exactly as computed; only 16-bit ones need O rebuilt (see below)
  const bool recompute_out = mix && q.scalar_type() != at::kFloat;
  REST_DISPATCH_DTYPES(q.scalar_type(), "emsa_bwd", [&] {
    const EmsaArgs<scalar_t> a = emsa_args<scalar_t>(q, k, v, w, scale);
    auto stream = rk::current_stream();
    const unsigned BH = static_cast<unsigned>(B * h);
    if (mix) rk::launch(emsa_vbar_kernel<scalar_t>, dim3(BH), dim3(kThreads), stream, a, vbar.data_ptr<float>());
    BwdRowArgs rs;
    for (int i = 0; i < 4; ++i) rs.dos[i] = dout.stride(i);
    const dim3 rowdot_grid(rk::ceil_div(N, kThreads / 32), BH);
    if (recompute_out) {
      // u_i = dO_i . O_i enters dS through c_g and E_i, where rstd (up to eps^-1/2) amplifies the
      // fp16 / bf16 rounding of the saved O: rebuild O in float32 with the forward kernel from the
      // saved lse and rstd (same deterministic order) and take u_i from it. The buffer is
      // transient, never saved for backward.
      at::Tensor ws = at::empty({B, N, h, d}, f32);
      launch_mixed_forward<scalar_t, float>(a, ws.data_ptr<float>(), lse_c.data_ptr<float>(), nullptr,
                                            rstd_c.data_ptr<float>(), static_cast<float>(eps), false, stream);
      at::Tensor wsv = ws.transpose(1, 2);  // (B, h, N, d) view
      for (int i = 0; i < 4; ++i) rs.os[i] = wsv.stride(i);
      rk::launch(emsa_bwd_rowdot_kernel<scalar_t, float>, rowdot_grid, dim3(kThreads), stream,
                 dout.data_ptr<scalar_t>(), static_cast<const float*>(ws.data_ptr<float>()),
                 static_cast<const float*>(nullptr), rs, a.h, a.N, a.d, u.data_ptr<float>());
    } else {
      for (int i = 0; i < 4; ++i) rs.os[i] = out.stride(i);
      rk::launch(emsa_bwd_rowdot_kernel<scalar_t, scalar_t>, rowdot_grid, dim3(kThreads), stream,
                 dout.data_ptr<scalar_t>(), static_cast<const scalar_t*>(out.data_ptr<scalar_t>()),
                 static_cast<const float*>(nullptr), rs, a.h, a.N, a.d, u.data_ptr<float>());
    }
    rk::launch(emsa_bwd_rowstat_kernel, dim3(BH), dim3(kThreads), stream,
               static_cast<const float*>(u.data_ptr<float>()),
               mix ? static_cast<const float*>(rsq_c.data_ptr<float>()) : nullptr,
               mix ? static_cast<const float*>(rstd_c.data_ptr<float>()) : nullptr, a.N, a.M, mix, E.data_ptr<float>(),
               cg.data_ptr<float>());
    BwdArgs<scalar_t> p;
    p.a = a;
    p.dout = dout.data_ptr<scalar_t>();
    for (int i = 0; i < 4; ++i) p.dos[i] = dout.stride(i);
    p.lse = lse_c.data_ptr<float>();
    p.E = E.data_ptr<float>();
    p.cg = cg.data_ptr<float>();
    p.rstd = rstd_c.data_ptr<float>();
    p.vbar = mix ? vbar.data_ptr<float>() : nullptr;
    float* dwp = mix ? dw_part.data_ptr<float>() : nullptr;
    const auto keys = bwd_kernel_for<scalar_t, true>(d, mix, on_tc);
    const auto rows = bwd_kernel_for<scalar_t, false>(d, mix, on_tc);
    const int64_t kv_elems = B * h * M * d;
    if (splits > 1) {
      p.part_a = part.data_ptr<float>();
      p.part_b = part.data_ptr<float>() + splits * kv_elems;
    }
    rk::launch(keys, dim3(static_cast<unsigned>(nMt), BH, static_cast<unsigned>(splits)), dim3(kThreads), stream, p,
               dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), dwp);
    if (splits > 1) {
      const dim3 sum_grid(rk::ceil_div(kv_elems, kThreads));
      rk::launch(emsa_bwd_split_sum_kernel<scalar_t>, sum_grid, dim3(kThreads), stream,
                 static_cast<const float*>(p.part_a), splits, kv_elems, dk.data_ptr<scalar_t>());
      rk::launch(emsa_bwd_split_sum_kernel<scalar_t>, sum_grid, dim3(kThreads), stream,
                 static_cast<const float*>(p.part_b), splits, kv_elems, dv.data_ptr<scalar_t>());
    }
    rk::launch(rows, dim3(rk::ceil_div(N, block_rows), BH), dim3(kThreads), stream, p, dq.data_ptr<scalar_t>(),
               static_cast<scalar_t*>(nullptr), static_cast<float*>(nullptr));
    if (mix)
      rk::launch(emsa_dmix_kernel, dim3(rk::ceil_div(h * h, kThreads)), dim3(kThreads), stream,
                 static_cast<const float*>(dw_part.data_ptr<float>()), a.B, a.h, static_cast<int>(nMt * splits),
                 dmix.data_ptr<float>());
  });
  return {dq, dk, dv, dmix};
}

}  // namespace REST_NS
