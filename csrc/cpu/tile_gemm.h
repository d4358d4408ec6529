// Small dense GEMM on cache-resident tiles for the cpu backend's fused kernels.
//
//   C[r, 0:ncols] (+)= sum_k A[r*ars + k*aks] * B[k*ldb + 0:ncols]      r < rows, k < K
//
// One form serves every product of the EMSA kernels: A is read one scalar at a time (broadcast),
// so it may be row-major (ars = lda, aks = 1) or transposed (ars = 1, aks = lda); B rows are read
// as vectors, so ncols must be a multiple of the vector width and B, C padded to it.
// Register blocking: 6 rows x GEMM_NV vectors of accumulators with a K loop of FMAs: 6 x 4 = 24 of
// AVX-512's 32 registers (384 floats); 6 x 2 = 12 of AVX2's 16 (+ 2 for B and 1 broadcast), since a
// 6 x 4 block there would spill on every FMA. K is split in panels of KC so the B panel stays in
// L1/L2. Every C element is a sum over k in increasing order, whatever rows / ncols / the tile position: results never depend on how
// callers block the rows, which keeps the kernels bitwise deterministic.
#pragma once

#include <algorithm>
#include <cstdint>

#include "simd.h"

namespace rest_cpu {

constexpr int GEMM_MR = 6;
constexpr int GEMM_NV = REST_CPU_VEC_BYTES == 64 ? 4 : 2;
constexpr int64_t GEMM_KC = 256;

// What micro() applies to each accumulator vector on its way to C: epi(acc, v) with v the vector's
// index within the tile's columns. The default stores the sums as they are; packed_linear.cpp passes
// its bias + GELU, so that epilogue costs no second pass over C.
struct NoEpilogue {
  template <typename Vec>
  Vec operator()(Vec x, int) const { return x; }
};

// B's V vectors of a row k: groups of VPP vectors side by side (B + k * ldb + 0:VPP*W), the groups ps
// elements apart. The default (VPP = V) is one row of V vectors; packed_linear.cpp runs several of
// its 16-column weight panels (ps apart in the packed weight) as one tile on AVX-512.
template <typename T, int R, int V, bool ACC, typename Epi = NoEpilogue, int VPP = V>
inline void micro(int64_t K, const T* __restrict A, int64_t ars, int64_t aks, const T* __restrict B,
                  int64_t ldb, T* __restrict C, int64_t ldc, const Epi& epi = Epi(), int64_t ps = 0) {
  constexpr int W = Simd<T>::W;
  vec_t<T> acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = ACC ? vload(C + r * ldc + v * W) : vset<T>(T(0));
  for (int64_t k = 0; k < K; ++k) {
    vec_t<T> b[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) b[v] = vload(B + (v / VPP) * ps + k * ldb + (v % VPP) * W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const T a = A[r * ars + k * aks];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) vstore(C + r * ldc + v * W, epi(acc[r][v], v));
}

template <typename T, int R, bool ACC>
inline void micro_v(int v, int64_t K, const T* A, int64_t ars, int64_t aks, const T* B, int64_t ldb, T* C,
                    int64_t ldc) {
  switch (v) {
    case 4: micro<T, R, 4, ACC>(K, A, ars, aks, B, ldb, C, ldc); break;
    case 3: micro<T, R, 3, ACC>(K, A, ars, aks, B, ldb, C, ldc); break;
    case 2: micro<T, R, 2, ACC>(K, A, ars, aks, B, ldb, C, ldc); break;
    default: micro<T, R, 1, ACC>(K, A, ars, aks, B, ldb, C, ldc); break;
  }
}

template <typename T, bool ACC>
inline void micro_rv(int r, int v, int64_t K, const T* A, int64_t ars, int64_t aks, const T* B, int64_t ldb,
                     T* C, int64_t ldc) {
  switch (r) {
    case 6: micro_v<T, 6, ACC>(v, K, A, ars, aks, B, ldb, C, ldc); break;
    case 5: micro_v<T, 5, ACC>(v, K, A, ars, aks, B, ldb, C, ldc); break;
    case 4: micro_v<T, 4, ACC>(v, K, A, ars, aks, B, ldb, C, ldc); break;
    case 3: micro_v<T, 3, ACC>(v, K, A, ars, aks, B, ldb, C, ldc); break;
    case 2: micro_v<T, 2, ACC>(v, K, A, ars, aks, B, ldb, C, ldc); break;
    default: micro_v<T, 1, ACC>(v, K, A, ars, aks, B, ldb, C, ldc); break;
  }
}

// C (rows x ncols, leading dim ldc) = or += A (rows x K) * B (K x ncols). ncols % W == 0.
// K == 0 with accumulate=false writes zeros.
template <typename T>
void tile_gemm(int64_t rows, int64_t ncols, int64_t K, const T* A, int64_t ars, int64_t aks, const T* B,
               int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int W = Simd<T>::W;
  const int64_t nvec = ncols / W;
  if (K == 0 && !accumulate) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < ncols; ++c) C[r * ldc + c] = T(0);
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += GEMM_KC) {
    const int64_t kc = std::min(GEMM_KC, K - k0);
    const bool acc = accumulate || k0 > 0;
    const T* Ak = A + k0 * aks;
    const T* Bk = B + k0 * ldb;
    for (int64_t v0 = 0; v0 < nvec; v0 += GEMM_NV) {
      const int v = (int)std::min<int64_t>(GEMM_NV, nvec - v0);
      for (int64_t r0 = 0; r0 < rows; r0 += GEMM_MR) {
        const int r = (int)std::min<int64_t>(GEMM_MR, rows - r0);
        const T* Ar = Ak + r0 * ars;
        const T* Bv = Bk + v0 * W;
        T* Cr = C + r0 * ldc + v0 * W;
        if (acc)
          micro_rv<T, true>(r, v, kc, Ar, ars, aks, Bv, ldb, Cr, ldc);
        else
          micro_rv<T, false>(r, v, kc, Ar, ars, aks, Bv, ldb, Cr, ldc);
      }
    }
  }
}

}  // namespace rest_cpu
