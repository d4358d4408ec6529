// The 16-bit EMSA forward on tensor cores: QK^T and P V as mma.sync m16n8k16 (csrc/cuda/mma.cuh)
// with fp32 accumulation. Same statistics, same outputs (to rounding) as the SIMT kernels of
// emsa_kernels.cuh, which keep float32 inputs and include this file after their common helpers
// (EmsaArgs, quad_sum, quad_max, centred_tile_update).
//
// Block: 4 warps, 64 query rows (warp w owns rows 16 w .. 16 w + 15), key tiles of 32 keys. A
// warp's 16 x 32 logit tile is four m16n8 accumulator fragments: the lane with groupID gid and
// t = lane % 4 holds rows gid and gid + 8, columns 8 n + 2 t + {0, 1} of n-tile n. So a row's 32
// logits sit in the 4 lanes of a quad, and row max / row sum are two xor-shuffles, as in the SIMT
// kernels. The accumulator layout of two adjacent n-tiles is the A-operand layout of a 16 x 16
// chunk (PTX ISA fragment tables), so P goes from the logits into the P V product without leaving
// registers: only Q, K and V tiles pass through shared memory, stored in the input dtype.
//
// Rounding: the products take 16-bit operands, so P (or Y = (P - 1/M) rstd with the mix) is rounded
// to the input dtype before P V, as flash-attention and the Triton kernels do; every sum (the dot
// products, the row statistics, the output) accumulates in float32. The backward's float32 rebuild of
// O (TO = float) takes P V in two 16-bit halves instead (see emsa_fwd_mma_kernel).
#pragma once

#include "cuda/mma.cuh"

namespace REST_NS {

constexpr int kMmaRows = 64;              // query rows per block: 4 warps x 16
constexpr int kMmaKeys = 32;              // keys per tile
constexpr int kMmaNT = kMmaKeys / 8;      // m16n8 tiles per key tile

// The forward's staged tiles, in the input dtype. `own`: the 64 query rows the block owns; `other`:
// the 32 keys of the current tile; `v`: their values. Pitch DPAD + 8: a fragment load touches 8 rows
// at the same column; 16 extra bytes per row put those rows on distinct banks.
template <class T, int DPAD>
struct alignas(16) MmaTiles {
  static constexpr int kPitch = DPAD + 8;
  T own[kMmaRows][kPitch];
  T other[kMmaKeys][kPitch];
  T v[kMmaKeys][kPitch];
};

// dst[r][c] = X[row0 + r, c] - shift[c] for c < DPAD (zero outside the matrix: rows past nrows,
// columns past d). shift (optional, float32) is subtracted in float32 before the rounding to T.
template <class T, int R, int P>
REST_DEVICE void stage_tile(T (&dst)[R][P], const T* __restrict__ X, int64_t srow, int64_t scol, int row0,
                            int nrows, int d, const float* __restrict__ shift = nullptr) {
  constexpr int W = P - 8;
  for (int e = threadIdx.x; e < R * W; e += kThreads) {
    const int r = e / W, c = e % W, gr = row0 + r;
    const bool in = gr < nrows && c < d;
    if (shift)
      dst[r][c] = in ? T(rk::to_f(X[gr * srow + c * scol]) - shift[c]) : T(0.f);
    else
      dst[r][c] = in ? X[gr * srow + c * scol] : T(0.f);
  }
}

// Rows row0.. of head x of q (keys = false) or k (keys = true).
template <class T, int R, int P>
REST_DEVICE void stage_head(T (&dst)[R][P], const EmsaArgs<T>& a, bool keys, int b, int x, int row0) {
  if (keys)
    stage_tile(dst, a.k + b * a.ks[0] + x * a.ks[1], a.ks[2], a.ks[3], row0, a.M, a.d);
  else
    stage_tile(dst, a.q + b * a.qs[0] + x * a.qs[1], a.qs[2], a.qs[3], row0, a.N, a.d);
}

// Two consecutive 16-bit elements (row[col], row[col + 1]) as one mma operand register.
template <class T, int P>
REST_DEVICE uint32_t pair_at(const T (&row)[P], int col) {
#ifdef REST_EMU
  return rk::pack2(row[col], row[col + 1]);
#else
  return *reinterpret_cast<const uint32_t*>(&row[col]);  // col even, pitch even, tiles 16-byte aligned
#endif
}

// acc[n] += X[16 rows of this warp] . Y[8 n .. 8 n + 7]^T over the head dim: the warp's 16 x 8 NTK
// tile of X Y^T, X and Y staged (both rows of head-dim vectors; B fragments of Y^T are pairs of
// consecutive elements of a Y row). Whole 16-wide chunks of zero padding are skipped.
template <class T, int NTK, int P, int R>
REST_DEVICE void warp_xyt(float (&acc)[NTK][4], const T (&X)[kMmaRows][P], const T (&Y)[R][P], int d) {
  static_assert(R == 8 * NTK, "one n-tile per 8 rows of Y");
  const int lane = static_cast<int>(threadIdx.x % 32), gid = lane / 4, t = lane % 4;
  const int r0 = 16 * static_cast<int>(threadIdx.x / 32) + gid;
  // two chunks per step: fully unrolled, ptxas schedules every chunk's fragment loads ahead, in
  // registers the backward's logit tiles need (measured while writing the head-group backward: plain
  // dk / dv kernel at d_pad 128 on sm_90, 174 -> 164 registers)
REST_UNROLL_BY(2)
  for (int kc = 0; kc < P - 8; kc += 16) {
    if (kc < d) {  // uniform over the block
      const uint32_t af[4] = {pair_at(X[r0], kc + 2 * t), pair_at(X[r0 + 8], kc + 2 * t),
                              pair_at(X[r0], kc + 8 + 2 * t), pair_at(X[r0 + 8], kc + 8 + 2 * t)};
REST_UNROLL
      for (int n = 0; n < NTK; ++n) {
        const uint32_t bf[2] = {pair_at(Y[8 * n + gid], kc + 2 * t), pair_at(Y[8 * n + gid], kc + 8 + 2 * t)};
        rk::mma_16816<T>(acc[n], af, bf, acc[n]);
      }
    }
  }
}

// acc[n] += A . Z[:, 8 m .. 8 m + 7], m = N0 + n, for n < NT with 8 m < d: A the warp's 16 x 8 NTK tile in
// accumulator layout (fp32, rounded here to T), Z a staged 8 NTK x DPAD tile. The accumulator layout
// of n-tiles 2 ks, 2 ks + 1 is the A-operand layout of columns 16 ks .. 16 ks + 15 (PTX ISA fragment
// tables), so A goes from one product into the next without leaving registers.
template <int N0 = 0, class T, int NT, int NTK, int P, int R>
REST_DEVICE void warp_az(float (&acc)[NT][4], const float (&A)[NTK][4], const T (&Z)[R][P], int d) {
  static_assert(R == 8 * NTK && NTK % 2 == 0, "the contraction runs over whole 16-row steps of Z");
  const int lane = static_cast<int>(threadIdx.x % 32), gid = lane / 4, t = lane % 4;
REST_UNROLL
  for (int ks = 0; ks < NTK / 2; ++ks) {
    const uint32_t af[4] = {rk::pack2(T(A[2 * ks][0]), T(A[2 * ks][1])), rk::pack2(T(A[2 * ks][2]), T(A[2 * ks][3])),
                            rk::pack2(T(A[2 * ks + 1][0]), T(A[2 * ks + 1][1])),
                            rk::pack2(T(A[2 * ks + 1][2]), T(A[2 * ks + 1][3]))};
    const int k0 = 16 * ks + 2 * t;
REST_UNROLL
    for (int n = 0; n < NT; ++n) {
      if (8 * (N0 + n) < d) {
        const int col = 8 * (N0 + n) + gid;
        const uint32_t bf[2] = {rk::pack2(Z[k0][col], Z[k0 + 1][col]), rk::pack2(Z[k0 + 8][col], Z[k0 + 9][col])};
        rk::mma_16816<T>(acc[n], af, bf, acc[n]);
      }
    }
  }
}

// Zero a warp's accumulator fragments (a 16 x 8 NT tile of logits; rows by head dim: NT = d_pad / 8).
template <int NT>
REST_DEVICE void zero_tile(float (&x)[NT][4]) {
REST_UNROLL
  for (int n = 0; n < NT; ++n)
REST_UNROLL
    for (int e = 0; e < 4; ++e) x[n][e] = 0.f;
}

// dst[r, col] = f * acc for the lane's two rows r (< nrows) and columns col < d of n-tiles N0..: dst is
// a contiguous (rows, d) matrix.
template <int N0 = 0, class T, int NT>
REST_DEVICE void store_rows(const float (&acc)[NT][4], T* __restrict__ dst, const int (&rows)[2], int nrows, int d,
                            float f) {
  const int t = static_cast<int>(threadIdx.x % 4);
REST_UNROLL
  for (int hr = 0; hr < 2; ++hr) {
    if (rows[hr] >= nrows) continue;
    T* o = dst + int64_t(rows[hr]) * d;
REST_UNROLL
    for (int n = 0; n < NT; ++n)
REST_UNROLL
      for (int e = 0; e < 2; ++e) {
        const int col = 8 * (N0 + n) + 2 * t + e;
        if (col < d) o[col] = rk::from_f<T>(acc[n][2 * hr + e] * f);
      }
  }
}

// The forward's logits: the warp's 16 x 32 tile of output head g, S = scale * sum_j W[g, j] q_j k_j^T
// (j = g alone, weight 1, without the mix), rows queries own0.., columns keys other0... Each head's
// product accumulates in fp32 fragments and is added with its weight (h FMAs per logit:
// element-wise work; the backward's mixed_logits repeats these terms in this order). own_staged:
// s.own already holds the rows of head g (no mix: they never change over the tiles). Ends with a
// barrier.
template <class T, int DPAD>
REST_DEVICE void warp_logits(float (&S)[kMmaNT][4], const EmsaArgs<T>& a, MmaTiles<T, DPAD>& s, int b, int g,
                             int own0, int other0, bool own_staged) {
  zero_tile(S);
  const bool mix = a.w != nullptr;
  const int jb = mix ? 0 : g, je = mix ? a.h : g + 1;
  for (int j = jb; j < je; ++j) {
    if (!own_staged) stage_head(s.own, a, false, b, j, own0);
    stage_head(s.other, a, true, b, j, other0);
    __syncthreads();
    float L[kMmaNT][4];
    zero_tile(L);
    warp_xyt(L, s.own, s.other, a.d);
    const float f = (mix ? a.w[g * a.h + j] : 1.f) * a.scale;
REST_UNROLL
    for (int n = 0; n < kMmaNT; ++n)
REST_UNROLL
      for (int e = 0; e < 4; ++e) S[n][e] += f * L[n][e];
    __syncthreads();
  }
}

// One row's 8 logits of a key tile (the lane's share of row half hr: element 2 hr + e of n-tile n,
// key m0 + 8 n + 2 t + e), with keys past M set to -inf, and their validity.
REST_DEVICE void row_share(const float (&S)[kMmaNT][4], int hr, int m0, int M, float (&x)[8], bool (&ok)[8]) {
  const int t = static_cast<int>(threadIdx.x % 4);
REST_UNROLL
  for (int n = 0; n < kMmaNT; ++n)
REST_UNROLL
    for (int e = 0; e < 2; ++e) {
      const int s = 2 * n + e;
      ok[s] = m0 + 8 * n + 2 * t + e < M;
      x[s] = ok[s] ? S[n][2 * hr + e] : -INFINITY;
    }
}

// Mix only. Grid (ceil(N / 64), B h): lse and the centred rsq of every row, as emsa_stats_kernel.
template <class T, int DPAD>
__global__ void __launch_bounds__(kThreads) emsa_stats_mma_kernel(EmsaArgs<T> a, float* __restrict__ lse,
                                                                 float* __restrict__ rsq) {
  using Tiles = MmaTiles<T, DPAD>;
  REST_SHARED(Tiles, s);
  const int lane = static_cast<int>(threadIdx.x % 32), gid = lane / 4, t = lane % 4;
  const int i0 = blockIdx.x * kMmaRows, bg = blockIdx.y, b = bg / a.h, g = bg % a.h;
  float mrow[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, c[2] = {0.f, 0.f};
  for (int m0 = 0; m0 < a.M; m0 += kMmaKeys) {
    float S[kMmaNT][4];
    warp_logits(S, a, s, b, g, i0, m0, false);
REST_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      float x[8];
      bool ok[8];
      row_share(S, hr, m0, a.M, x, ok);
      centred_tile_update(x, ok, m0, a.M, kMmaKeys, mrow[hr], l[hr], c[hr]);
    }
  }
  if (t == 0) {
REST_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      const int i = i0 + 16 * static_cast<int>(threadIdx.x / 32) + gid + 8 * hr;
      if (i < a.N) {
        lse[int64_t(bg) * a.N + i] = mrow[hr] + logf(l[hr] / a.M);  // log-mean-exp
        rsq[int64_t(bg) * a.N + i] = c[hr] / (l[hr] * l[hr]);
      }
    }
  }
}

// Grid (ceil(N / 64), B h). As emsa_fwd_kernel: MIX: P final from the saved lse, acc += Y v with
// Y = (P - 1/M) rstd; !MIX: online softmax with a rescaled accumulator, out = acc / l, and lse.
template <class T, class TO, int DPAD, bool MIX>
__global__ void __launch_bounds__(kThreads) emsa_fwd_mma_kernel(EmsaArgs<T> a, TO* __restrict__ out,
                                                               float* __restrict__ lse_io,
                                                               const float* __restrict__ rstd) {
  using Tiles = MmaTiles<T, DPAD>;
  REST_SHARED(Tiles, s);
  constexpr int NT = DPAD / 8;  // output n-tiles
  const int lane = static_cast<int>(threadIdx.x % 32), gid = lane / 4, t = lane % 4;
  const int i0 = blockIdx.x * kMmaRows, bg = blockIdx.y, b = bg / a.h, g = bg % a.h;
  const int r0 = i0 + 16 * static_cast<int>(threadIdx.x / 32) + gid, row[2] = {r0, r0 + 8};
  const T* v = a.v + b * a.vs[0] + g * a.vs[1];
  const float invM = 1.f / a.M;
  const float rs = MIX ? rstd[bg] : 1.f;
  float lse_r[2] = {0.f, 0.f};
  if (MIX)
REST_UNROLL
    for (int hr = 0; hr < 2; ++hr) lse_r[hr] = row[hr] < a.N ? lse_io[int64_t(bg) * a.N + row[hr]] : 0.f;

  float acc[NT][4];
  zero_tile(acc);
  float mrow[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // !MIX: running max and sum of exp

  if (!MIX) stage_head(s.own, a, false, b, g, i0);  // warp_logits syncs
  for (int m0 = 0; m0 < a.M; m0 += kMmaKeys) {
    float S[kMmaNT][4];
    warp_logits(S, a, s, b, g, i0, m0, !MIX);
    stage_tile(s.v, v, a.vs[2], a.vs[3], m0, a.M, a.d);
    float P[kMmaNT][4];  // P (no mix) or Y (mix) of this tile, fp32
REST_UNROLL
    for (int hr = 0; hr < 2; ++hr) {
      float x[8];
      bool ok[8];
      row_share(S, hr, m0, a.M, x, ok);
      float alpha = 1.f, p[8];
      if (MIX) {
REST_UNROLL
        for (int u = 0; u < 8; ++u) p[u] = ok[u] ? (expf(x[u] - lse_r[hr]) - 1.f) * invM * rs : 0.f;  // exactly centred
      } else {
        float mloc = -INFINITY;
REST_UNROLL
        for (int u = 0; u < 8; ++u) mloc = fmaxf(mloc, x[u]);
        const float mnew = fmaxf(mrow[hr], quad_max(mloc));  // finite: every key tile holds a valid key
        alpha = expf(mrow[hr] - mnew);
        float ls = 0.f;
REST_UNROLL
        for (int u = 0; u < 8; ++u) {
          p[u] = ok[u] ? expf(x[u] - mnew) : 0.f;
          ls += p[u];
        }
        l[hr] = l[hr] * alpha + quad_sum(ls);
        mrow[hr] = mnew;
REST_UNROLL
        for (int n = 0; n < NT; ++n) {
          acc[n][2 * hr] *= alpha;
          acc[n][2 * hr + 1] *= alpha;
        }
      }
REST_UNROLL
      for (int n = 0; n < kMmaNT; ++n) {
        P[n][2 * hr] = p[2 * n];
        P[n][2 * hr + 1] = p[2 * n + 1];
      }
    }
    __syncthreads();  // the v tile is staged
    warp_az(acc, P, s.v, a.d);
    if constexpr (!std::is_same_v<T, TO>) {
      // float32 output: the backward's rebuild of O, which exists to keep u_i = dO . O free of 16-bit
      // rounding (emsa_bwd). P = hi + lo with hi = P rounded to T (the product above) and lo the
      // rest, rounded to T in its turn: P is carried to about 2^-17 of itself (two halves of 8 bits
      // each for bf16), v is exact in T, the sums are float32.
      float Plo[kMmaNT][4];
REST_UNROLL
      for (int n = 0; n < kMmaNT; ++n)
REST_UNROLL
        for (int e = 0; e < 4; ++e) Plo[n][e] = P[n][e] - rk::to_f(T(P[n][e]));
      warp_az(acc, Plo, s.v, a.d);
    }
    __syncthreads();  // before the next tile restages v (and, with the mix, q and k)
  }

REST_UNROLL
  for (int hr = 0; hr < 2; ++hr) {
    const int i = row[hr];
    if (i < a.N) {
      TO* o = out + ((int64_t(b) * a.N + i) * a.h + g) * a.d;
      const float inv_l = MIX ? 1.f : 1.f / l[hr];
REST_UNROLL
      for (int n = 0; n < NT; ++n)
REST_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * n + 2 * t + e;
          if (col < a.d) o[col] = rk::from_f<TO>(acc[n][2 * hr + e] * inv_l);
        }
      if (!MIX && t == 0) lse_io[int64_t(bg) * a.N + i] = mrow[hr] + logf(l[hr] / a.M);  // log-mean-exp
    }
  }
}

// ------------------------------------------------------------------------------------ backward
// The backward's main kernels on tensor cores, as emsa_bwd_kernel (same math, same launches around
// them). KEYS: grid (ceil(M / 64), B h), the block owns 64 keys of input head j and walks every
// query tile twice: first dv_j (Y_j^T dO_j), then dk_j and the dW partials (every output head). Two
// walks because dk and dv accumulators together (2 x d_pad / 2 floats per lane) push the kernel past
// 255 registers at d_pad 128. !KEYS: grid (ceil(N / 64), B h), the block owns 64 query rows of
// input head j and walks every key tile: dq_j.
//
// Head group: the mixed logits of every output head g, S_g = scale sum_x W[g, x] q_x k_x^T, need
// every head's product q_x k_x^T. The kernels compute each head's product ONCE per tile pair and
// keep the h unmixed tiles in registers (`L`, up to kMmaMixHeads heads: 8 x 8 floats per lane on
// 16-column tiles), then form each S_g from them with h FMAs per logit. Per tile pair and kernel
// that is h (logits) + h (dO_g V_g^T) + 1 (dS Q / dS K) products, against h (h + 1) + 1 when each
// output head's logits were recomputed from q and k (h^3 per tile over the grid's h blocks); the
// mix is element-wise work on the CUDA cores, as in the forward. Without the mix the group is the
// block's own head (32-column tiles). Mixed calls with more than kMmaMixHeads heads run the SIMT
// kernels (emsa_bwd, host side).
//
// Every product is one of the two warp products, in the block's orientation (rows = what the block
// owns): X Y^T of staged tiles (each head's logits; dO_g (v_g - vbar_g)^T) and an fp32 register
// tile times a staged tile (dq += dL k_j, dk += dL^T q_j, dv += Y_j^T dO_j). In the KEYS
// orientation the per-query statistics (lse_i, E_i) belong to the tile's columns and are staged in
// shared memory (qstat); in the !KEYS one they belong to the lane's two rows.
constexpr int kMmaMixHeads = 8;  // the head group's size: ResT mixes at most 8 heads

// Columns of the other side per tile: 16 with the mix (the group's tiles, 8 per lane per head, fit
// in registers beside a d_pad 128 accumulator), 32 without.
constexpr int bwd_tile_cols(bool mix) { return mix ? 16 : 32; }

// Blocks per key block of the dk / dv kernel (gridDim.z), each walking an equal share of the query
// tiles into float32 partials: when the key blocks alone are fewer than kSplitTarget (batch 1 at
// detection size: 15 key blocks at stage 1) most SMs would sit idle. At least 4 tiles per share. A
// function of the shapes only, so the partials are summed in the same order on every GPU.
constexpr int64_t kSplitTarget = 256;
inline int bwd_key_splits(int64_t key_blocks, int64_t tiles) {
  if (key_blocks >= kSplitTarget) return 1;
  const int64_t want = (kSplitTarget + key_blocks - 1) / key_blocks, most = (tiles + 3) / 4;
  return static_cast<int>(std::max<int64_t>(1, std::min(want, most)));
}

template <class T, int DPAD, int KT, int HC, int NHI>
struct alignas(16) MmaBwdTiles {
  static constexpr int kPitch = DPAD + 8;
  T own[kMmaRows][kPitch];
  T other[KT][kPitch];
  float qstat[2][KT];  // KEYS: lse and E of the tile's queries
  float red[kThreads / 32];
  float wf[HC][HC];  // wf[g][c]: the weight of head hb + c in the logits of output head g, times scale
  float hi[kThreads / 32][NHI > 0 ? NHI : 1][4][32];  // the accumulators' upper n-tiles (see NHI), per lane
  static constexpr int kUpper = NHI;
};

// acc_hi += A . Z over n-tiles N0..: the upper n-tiles of a warp's accumulator, kept in shared memory
// (each lane its own words: no barrier, no bank conflict), brought into registers for the product.
template <int N0, class T, int NHI, int NTK, int P, int R>
REST_DEVICE void shared_az(float (&hi)[kThreads / 32][NHI][4][32], const float (&A)[NTK][4], const T (&Z)[R][P], int d) {
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  float x[NHI][4];
REST_UNROLL
  for (int n = 0; n < NHI; ++n)
REST_UNROLL
    for (int e = 0; e < 4; ++e) x[n][e] = hi[warp][n][e][lane];
  warp_az<N0>(x, A, Z, d);
REST_UNROLL
  for (int n = 0; n < NHI; ++n)
REST_UNROLL
    for (int e = 0; e < 4; ++e) hi[warp][n][e][lane] = x[n][e];
}

// Store the upper n-tiles N0.. (shared_az) as store_rows does, and zero them.
template <int N0, class T, int NHI>
REST_DEVICE void store_shared_rows(float (&hi)[kThreads / 32][NHI][4][32], T* __restrict__ dst, const int (&rows)[2],
                                   int nrows, int d, float f) {
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  float x[NHI][4];
REST_UNROLL
  for (int n = 0; n < NHI; ++n)
REST_UNROLL
    for (int e = 0; e < 4; ++e) {
      x[n][e] = hi[warp][n][e][lane];
      hi[warp][n][e][lane] = 0.f;
    }
  store_rows<N0>(x, dst, rows, nrows, d, f);
}

// L[c] = q_x k_x^T (unscaled, fp32) for heads x = hb + c, c < nh: the warp's 16 x 8 NTK tile of each
// head's logits in the block's orientation (own_keys: rows are keys), each product once. Tiles of
// c >= nh are zero. Ends with a barrier.
template <class T, int DPAD, int KT, int HC, int NHI, int NTK>
REST_DEVICE void warp_head_logits(float (&L)[HC][NTK][4], const EmsaArgs<T>& a, MmaBwdTiles<T, DPAD, KT, HC, NHI>& s, int b,
                                  int hb, int nh, int own0, int other0, bool own_keys) {
REST_UNROLL
  for (int c = 0; c < HC; ++c) {
    zero_tile(L[c]);
    if (c < nh) {  // uniform over the block
      const int x = rk::opaque(hb + c);
      stage_head(s.own, a, own_keys, b, x, own0);
      stage_head(s.other, a, !own_keys, b, x, other0);
      __syncthreads();
      warp_xyt(L[c], s.own, s.other, a.d);
      __syncthreads();
    }
  }
}

// S = sum_c f[c] L[c] over c < nh, f[c] = W[g, hb + c] scale (scale without the mix; s.wf): the
// forward's warp_logits, term for term and in its order, so the backward recomputes the forward's
// logits (bit for bit under the emulation; on a GPU up to the order inside one mma of the transposed
// product, for the dk / dv kernel).
template <int HC, int NTK>
REST_DEVICE void mixed_logits(float (&S)[NTK][4], const float (&L)[HC][NTK][4], const float (&f)[HC], int nh) {
  zero_tile(S);
REST_UNROLL
  for (int c = 0; c < HC; ++c) {
    if (c < nh) {
REST_UNROLL
      for (int n = 0; n < NTK; ++n)
REST_UNROLL
        for (int e = 0; e < 4; ++e) S[n][e] += f[c] * L[c][n][e];
    }
  }
}

// f * the block's rows of a gradient (registers, and the upper n-tiles from s.hi), for head bj of a
// contiguous (B, h, rows, d) tensor: into grad (type T) or, in a split walk, into this block's float32
// partial (part, one (B h, rows, d) slice per blockIdx.z).
template <int NLO, class T, class Tiles>
REST_DEVICE void store_grads(const float (&acc)[NLO][4], Tiles& s, T* __restrict__ grad, float* __restrict__ part,
                             int bj, int n_own, const int (&r_own)[2], int d, float f) {
  constexpr int NHI = Tiles::kUpper;
  const int64_t head = int64_t(bj) * n_own * d;
  if (gridDim.z > 1) {
    float* dst = part + int64_t(blockIdx.z) * gridDim.y * n_own * d + head;
    store_rows(acc, dst, r_own, n_own, d, f);
    if constexpr (NHI > 0) store_shared_rows<NLO>(s.hi, dst, r_own, n_own, d, f);
  } else {
    store_rows(acc, grad + head, r_own, n_own, d, f);
    if constexpr (NHI > 0) store_shared_rows<NLO>(s.hi, grad + head, r_own, n_own, d, f);
  }
}

template <class T, int DPAD, bool KEYS, bool MIX>
__global__ void __launch_bounds__(kThreads, 1) emsa_bwd_mma_kernel(BwdArgs<T> p, T* __restrict__ grad_a,
                                                               T* __restrict__ grad_b, float* __restrict__ dw_part) {
  constexpr int KT = bwd_tile_cols(MIX), NTK = KT / 8, HC = MIX ? kMmaMixHeads : 1, NT = DPAD / 8;
  // NHI: upper n-tiles of the dk / dv accumulator kept in shared memory (shared_az) by the mixed dk /
  // dv kernel at d_pad 128, whose registers (the group's logit tiles, a 64-float accumulator) would
  // otherwise spill on sm_80; they join the product once per tile, not once per output head.
  constexpr int NHI = (KEYS && MIX && DPAD == 128) ? NT / 2 : 0, NLO = NT - NHI;
  using Tiles = MmaBwdTiles<T, DPAD, KT, HC, NHI>;
  REST_SHARED(Tiles, s);
  const EmsaArgs<T>& a = p.a;
  const int lane = static_cast<int>(threadIdx.x % 32), gid = lane / 4, t = lane % 4;
  const int warp = static_cast<int>(threadIdx.x / 32);
  const int bj = blockIdx.y, b = bj / a.h, j = bj % a.h;
  const float invM = 1.f / a.M;
  const int own0 = blockIdx.x * kMmaRows;
  const int n_own = KEYS ? a.M : a.N, n_other = KEYS ? a.N : a.M;
  const int r_own[2] = {own0 + 16 * warp + gid, own0 + 16 * warp + gid + 8};  // rows of the lane's halves
  // a softmax over a single key is the constant 1: P exactly 1 and dS exactly 0 (the recomputed
  // terms would cancel only to rounding)
  const bool one_key = a.M == 1;
  const int hb = MIX ? 0 : j, nh = MIX ? a.h : 1;  // the heads whose logits a tile needs
  // the tiles of the other side this block walks: all, or share blockIdx.z of a split walk (KEYS)
  const int n_tiles = (n_other + KT - 1) / KT, per = (n_tiles + gridDim.z - 1) / gridDim.z;
  const int t_begin = blockIdx.z * per * KT, t_end = std::min(n_other, (static_cast<int>(blockIdx.z) + 1) * per * KT);

  for (int e = threadIdx.x; e < HC * HC; e += kThreads) {  // read after warp_head_logits' barriers
    const int g = e / HC, c = e % HC;
    s.wf[g][c] = MIX ? (g < a.h && c < a.h ? a.w[g * a.h + c] * a.scale : 0.f) : a.scale;
  }
  float L[HC][NTK][4];  // the group's unmixed logit tiles of the current tile pair
  float acc[NLO][4];    // rows of dv (KEYS, first walk), dk (KEYS) or dq (!KEYS); n-tiles NLO.. in s.hi
  zero_tile(acc);
  if constexpr (NHI > 0)
REST_UNROLL
    for (int n = 0; n < NHI; ++n)
REST_UNROLL
      for (int e = 0; e < 4; ++e) s.hi[warp][n][e][lane] = 0.f;

  if (KEYS) {  // dv_j = sum over query tiles of Y_j^T dO_j
    const int bg = b * a.h + j;
    const T* dO = p.dout + b * p.dos[0] + j * p.dos[1];
    const float rs = MIX ? p.rstd[bg] : 1.f;
    for (int t0 = t_begin; t0 < t_end; t0 += KT) {
      warp_head_logits(L, a, s, b, hb, nh, own0, t0, true);
      float S[NTK][4];
      mixed_logits(S, L, s.wf[MIX ? j : 0], nh);
      stage_tile(s.other, dO, p.dos[2], p.dos[3], t0, a.N, a.d);
      for (int e = threadIdx.x; e < KT; e += kThreads)
        s.qstat[0][e] = t0 + e < a.N ? p.lse[int64_t(bg) * a.N + t0 + e] : 0.f;
      __syncthreads();
REST_UNROLL
      for (int n = 0; n < NTK; ++n)
REST_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int col = 8 * n + 2 * t + (e & 1), i = t0 + col, m = r_own[e >> 1];
          const bool ok = i < a.N && m < a.M;
          const float ex = ok ? (one_key ? 1.f : expf(S[n][e] - s.qstat[0][col])) : 0.f;
          S[n][e] = MIX ? (ok ? (ex - 1.f) * invM * rs : 0.f) : ex * invM;  // Y_j (P without the mix)
        }
      warp_az(acc, S, s.other, a.d);
      if constexpr (NHI > 0) shared_az<NLO>(s.hi, S, s.other, a.d);
      __syncthreads();
    }
    store_grads(acc, s, grad_b, p.part_b, bj, n_own, r_own, a.d, 1.f);
    zero_tile(acc);
  }

  for (int t0 = t_begin; t0 < t_end; t0 += KT) {
    warp_head_logits(L, a, s, b, hb, nh, own0, t0, KEYS);
    float dL[NTK][4];
    zero_tile(dL);
    const int gb = MIX ? 0 : j, ge = MIX ? a.h : j + 1;
    for (int g = gb; g < ge; ++g) {
      const int bg = b * a.h + g;
      float S[NTK][4], dOv[NTK][4];
      mixed_logits(S, L, s.wf[MIX ? g : 0], nh);
      // dOv = dO_g (v_g - vbar_g)^T with the mix (centred in float32 before the rounding), dO_g v_g^T
      // without; KEYS stages it transposed (v own, dO other) and the tile's query statistics
      const T* dO = p.dout + b * p.dos[0] + g * p.dos[1];
      const T* v = a.v + b * a.vs[0] + g * a.vs[1];
      const float* vbar = MIX ? p.vbar + int64_t(bg) * a.d : nullptr;
      if (KEYS) {
        stage_tile(s.own, v, a.vs[2], a.vs[3], own0, a.M, a.d, vbar);
        stage_tile(s.other, dO, p.dos[2], p.dos[3], t0, a.N, a.d);
        for (int e = threadIdx.x; e < KT; e += kThreads) {
          const int i = t0 + e;
          s.qstat[0][e] = i < a.N ? p.lse[int64_t(bg) * a.N + i] : 0.f;
          s.qstat[1][e] = i < a.N ? p.E[int64_t(bg) * a.N + i] : 0.f;
        }
      } else {
        stage_tile(s.own, dO, p.dos[2], p.dos[3], own0, a.N, a.d);
        stage_tile(s.other, v, a.vs[2], a.vs[3], t0, a.M, a.d, vbar);
      }
      __syncthreads();
      zero_tile(dOv);
      warp_xyt(dOv, s.own, s.other, a.d);
      const float rs = MIX ? p.rstd[bg] : 1.f;
      const float cg = MIX ? p.cg[bg] : 0.f;
      const float wgj = MIX ? a.w[g * a.h + j] : 1.f;
      float rstat[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // !KEYS: lse, E of the lane's two query rows
      if (!KEYS)
REST_UNROLL
        for (int hr = 0; hr < 2; ++hr)
          if (r_own[hr] < a.N) {
            rstat[hr][0] = p.lse[int64_t(bg) * a.N + r_own[hr]];
            rstat[hr][1] = p.E[int64_t(bg) * a.N + r_own[hr]];
          }
      float dwp = 0.f;
REST_UNROLL
      for (int n = 0; n < NTK; ++n)
REST_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int hr = e >> 1, col = 8 * n + 2 * t + (e & 1);
          const int i = KEYS ? t0 + col : r_own[hr], m = KEYS ? r_own[hr] : t0 + col;
          const bool ok = i < a.N && m < a.M;
          const float lse_i = KEYS ? s.qstat[0][col] : rstat[hr][0];
          const float E_i = KEYS ? s.qstat[1][col] : rstat[hr][1];
          const float ex = ok ? (one_key ? 1.f : expf(S[n][e] - lse_i)) : 0.f;  // lse: log-mean-exp
          const float P = ex * invM;
          const float y = MIX ? (ok ? (ex - 1.f) * invM * rs : 0.f) : P;  // (P - 1/M) rstd, exactly centred
          const float dPmD = MIX ? rs * (dOv[n][e] - cg * y) - E_i : dOv[n][e] - E_i;  // dP - D_i
          const float dS = (one_key || !ok) ? 0.f : P * dPmD;
          dL[n][e] += wgj * dS;
          if (KEYS && MIX) {  // head j's unmixed logit (for dW), picked by constant indices: no copy held
            float lj = 0.f;
REST_UNROLL
            for (int c = 0; c < HC; ++c) lj = c == j - hb ? L[c][n][e] : lj;
            dwp += dS * (lj * a.scale);
          }
        }
      if (KEYS && MIX) {  // dW[g, j] partial of this tile: warp tree, then the 4 warps in order
        dwp = warp_sum(dwp);
        if (lane == 0) s.red[warp] = dwp;
      }
      __syncthreads();  // before the tiles are restaged
      if (KEYS && MIX && threadIdx.x == 0) {
        float* dst = dw_part + ((int64_t(bj) * gridDim.z + blockIdx.z) * gridDim.x + blockIdx.x) * a.h + g;
        *dst += (s.red[0] + s.red[1]) + (s.red[2] + s.red[3]);
      }
    }
    // dk_j += dL^T q_j (KEYS: dL is already keys x queries) or dq_j += dL k_j
    stage_head(s.other, a, !KEYS, b, j, t0);
    __syncthreads();
    warp_az(acc, dL, s.other, a.d);
    if constexpr (NHI > 0) shared_az<NLO>(s.hi, dL, s.other, a.d);
    __syncthreads();
  }
  store_grads(acc, s, grad_a, p.part_a, bj, n_own, r_own, a.d, a.scale);
}

}  // namespace REST_NS
