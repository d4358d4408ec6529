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
// products, the row statistics, the output) accumulates in float32.
#pragma once

#include "cuda/mma.cuh"

namespace REST_NS {

constexpr int kMmaRows = 64;              // query rows per block: 4 warps x 16
constexpr int kMmaKeys = 32;              // keys per tile
constexpr int kMmaNT = kMmaKeys / 8;      // m16n8 tiles per key tile

// The block's staged tiles, in the input dtype. Pitch DPAD + 8: a fragment load touches 8 rows at
// the same column; 16 extra bytes per row put those rows on distinct banks.
template <class T, int DPAD>
struct alignas(16) MmaTiles {
  static constexpr int kPitch = DPAD + 8;
  T q[kMmaRows][kPitch];
  T k[kMmaKeys][kPitch];
  T v[kMmaKeys][kPitch];
};

// dst[r][c] = X[row0 + r, c] for c < DPAD (zero outside the matrix: rows past nrows, columns past d).
template <class T, int R, int P>
REST_DEVICE void stage_tile(T (&dst)[R][P], const T* __restrict__ X, int64_t srow, int64_t scol, int row0,
                            int nrows, int d) {
  constexpr int W = P - 8;
  for (int e = threadIdx.x; e < R * W; e += kThreads) {
    const int r = e / W, c = e % W, gr = row0 + r;
    dst[r][c] = (gr < nrows && c < d) ? X[gr * srow + c * scol] : T(0.f);
  }
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

// The warp's 16 x 32 logits of output head g for query rows i0.. and keys m0..:
// S = scale * sum_j W[g, j] q_j k_j^T (j = g alone, weight 1, without the mix). Each head's product
// is accumulated in fp32 fragments, then added with its weight (h FMAs per logit: element-wise
// work). q_staged: the block's q tile already holds head g (no mix: it never changes over key tiles).
// Ends with a barrier, so the caller may restage the tiles.
template <class T, int DPAD>
REST_DEVICE void warp_logits(float (&S)[kMmaNT][4], const EmsaArgs<T>& a, MmaTiles<T, DPAD>& s, int b, int g,
                             int i0, int m0, bool q_staged) {
  const int lane = static_cast<int>(threadIdx.x % 32), gid = lane / 4, t = lane % 4, r0 = 16 * static_cast<int>(threadIdx.x / 32) + gid;
REST_UNROLL
  for (int n = 0; n < kMmaNT; ++n)
REST_UNROLL
    for (int e = 0; e < 4; ++e) S[n][e] = 0.f;
  const bool mix = a.w != nullptr;
  const int jb = mix ? 0 : g, je = mix ? a.h : g + 1;
  for (int j = jb; j < je; ++j) {
    if (!q_staged) stage_tile(s.q, a.q + b * a.qs[0] + j * a.qs[1], a.qs[2], a.qs[3], i0, a.N, a.d);
    stage_tile(s.k, a.k + b * a.ks[0] + j * a.ks[1], a.ks[2], a.ks[3], m0, a.M, a.d);
    __syncthreads();
    float L[kMmaNT][4];
REST_UNROLL
    for (int n = 0; n < kMmaNT; ++n)
REST_UNROLL
      for (int e = 0; e < 4; ++e) L[n][e] = 0.f;
REST_UNROLL
    for (int kc = 0; kc < DPAD; kc += 16) {
      if (kc < a.d) {  // uniform over the block: whole 16-wide chunks of zero padding skipped
        const uint32_t af[4] = {pair_at(s.q[r0], kc + 2 * t), pair_at(s.q[r0 + 8], kc + 2 * t),
                                pair_at(s.q[r0], kc + 8 + 2 * t), pair_at(s.q[r0 + 8], kc + 8 + 2 * t)};
REST_UNROLL
        for (int n = 0; n < kMmaNT; ++n) {
          const uint32_t bf[2] = {pair_at(s.k[8 * n + gid], kc + 2 * t), pair_at(s.k[8 * n + gid], kc + 8 + 2 * t)};
          rk::mma_16816<T>(L[n], af, bf, L[n]);
        }
      }
    }
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
REST_UNROLL
  for (int n = 0; n < NT; ++n)
REST_UNROLL
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // !MIX: running max and sum of exp

  if (!MIX) stage_tile(s.q, a.q + b * a.qs[0] + g * a.qs[1], a.qs[2], a.qs[3], i0, a.N, a.d);  // warp_logits syncs
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
REST_UNROLL
    for (int ks = 0; ks < kMmaKeys / 16; ++ks) {
      // accumulator fragments of n-tiles 2 ks, 2 ks + 1 = the A fragment of keys 16 ks .. 16 ks + 15
      const uint32_t af[4] = {rk::pack2(T(P[2 * ks][0]), T(P[2 * ks][1])), rk::pack2(T(P[2 * ks][2]), T(P[2 * ks][3])),
                              rk::pack2(T(P[2 * ks + 1][0]), T(P[2 * ks + 1][1])),
                              rk::pack2(T(P[2 * ks + 1][2]), T(P[2 * ks + 1][3]))};
      const int k0 = 16 * ks + 2 * t;
REST_UNROLL
      for (int n = 0; n < NT; ++n) {
        if (8 * n < a.d) {
          const int col = 8 * n + gid;
          const uint32_t bf[2] = {rk::pack2(s.v[k0][col], s.v[k0 + 1][col]),
                                  rk::pack2(s.v[k0 + 8][col], s.v[k0 + 9][col])};
          rk::mma_16816<T>(acc[n], af, bf, acc[n]);
        }
      }
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

}  // namespace REST_NS
