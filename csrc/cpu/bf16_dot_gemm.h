// Small dense GEMM on bfloat16 operands with float32 accumulation, on AVX512-BF16's VDPBF16PS, for
// the builds compiled with it (__AVX512BF16__: the "avx512bf16" build, loaded only on CPUs that have
// the instructions, csrc/cpu_dispatch.cpp).
//
//   C[r, 0:ncols] = sum_k A[r, k] * B[k, 0:ncols]      r < rows, k < 2 * K2
//
// VDPBF16PS multiplies pairs of bfloat16 and adds both products into one float32 lane:
//   acc[i] += a[2i] * b[2i] + a[2i + 1] * b[2i + 1]
// so it does twice the multiply-adds of a float32 FMA in the same issue slot (Zen 4 and Intel cores
// with AVX512-BF16 run both at one 512-bit instruction per cycle and port pair). The products of two
// bfloat16 are exact in float32 (8 + 8 significant bits); the accumulation is float32, rounded to
// nearest even, with denormal inputs and results flushed to zero (Intel SDM, VDPBF16PS). So a logit
// computed here from bfloat16 q and k is as accurate as the float32 kernel's on widened copies, up to
// the order of the additions.
//
// Layouts (both zero padded, so no lane needs a mask):
//   A: rows of 2 * K2 bfloat16, leading dimension lda (elements): a row's pair k is read as one
//      32-bit broadcast.
//   B: "pair-interleaved" (oneDNN calls it VNNI): B2[k2][c][t] = B[2 k2 + t, c], ldb2 elements
//      between consecutive k2 (2 * ncols or more); one 64-byte load is 16 columns x one pair.
// Register blocking as tile_gemm.h: 6 rows x 4 vectors of 16 float32 accumulators (24 of the 32
// zmm registers, + 4 for B and 1 broadcast). Every C element is a sum over k in increasing pair order
// whatever the row block, so results do not depend on how callers block the rows.
#pragma once

#if defined(__AVX512BF16__)
#define REST_CPU_HAS_BF16_DOT 1

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>

namespace rest_cpu {

constexpr int BF16_MR = 6;
constexpr int BF16_NV = 4;
constexpr int BF16_W = 16;  // float32 lanes (= column pairs) per vector

template <int R, int V>
inline void bf16_micro(int64_t K2, const c10::BFloat16* __restrict A, int64_t lda,
                       const c10::BFloat16* __restrict B2, int64_t ldb2, float* __restrict C, int64_t ldc) {
  __m512 acc[R][V];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    __m512bh b[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) b[v] = (__m512bh)_mm512_loadu_si512(B2 + k2 * ldb2 + v * 2 * BF16_W);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, A + r * lda + 2 * k2, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(C + r * ldc + v * BF16_W, acc[r][v]);
}

template <int R>
inline void bf16_micro_v(int v, int64_t K2, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B2,
                         int64_t ldb2, float* C, int64_t ldc) {
  switch (v) {
    case 4: bf16_micro<R, 4>(K2, A, lda, B2, ldb2, C, ldc); break;
    case 3: bf16_micro<R, 3>(K2, A, lda, B2, ldb2, C, ldc); break;
    case 2: bf16_micro<R, 2>(K2, A, lda, B2, ldb2, C, ldc); break;
    default: bf16_micro<R, 1>(K2, A, lda, B2, ldb2, C, ldc); break;
  }
}

// C (rows x ncols float32, leading dimension ldc) = A (rows x 2 K2) * B (2 K2 x ncols), B given
// pair-interleaved; ncols a multiple of 16, K2 >= 1.
inline void bf16_dot_gemm(int64_t rows, int64_t ncols, int64_t K2, const c10::BFloat16* A, int64_t lda,
                          const c10::BFloat16* B2, int64_t ldb2, float* C, int64_t ldc) {
  const int64_t nvec = ncols / BF16_W;
  for (int64_t v0 = 0; v0 < nvec; v0 += BF16_NV) {
    const int v = (int)std::min<int64_t>(BF16_NV, nvec - v0);
    for (int64_t r0 = 0; r0 < rows; r0 += BF16_MR) {
      const int r = (int)std::min<int64_t>(BF16_MR, rows - r0);
      const c10::BFloat16* Ar = A + r0 * lda;
      const c10::BFloat16* Bv = B2 + v0 * 2 * BF16_W;
      float* Cr = C + r0 * ldc + v0 * BF16_W;
      switch (r) {
        case 6: bf16_micro_v<6>(v, K2, Ar, lda, Bv, ldb2, Cr, ldc); break;
        case 5: bf16_micro_v<5>(v, K2, Ar, lda, Bv, ldb2, Cr, ldc); break;
        case 4: bf16_micro_v<4>(v, K2, Ar, lda, Bv, ldb2, Cr, ldc); break;
        case 3: bf16_micro_v<3>(v, K2, Ar, lda, Bv, ldb2, Cr, ldc); break;
        case 2: bf16_micro_v<2>(v, K2, Ar, lda, Bv, ldb2, Cr, ldc); break;
        default: bf16_micro_v<1>(v, K2, Ar, lda, Bv, ldb2, Cr, ldc); break;
      }
    }
  }
}

}  // namespace rest_cpu

#endif  // __AVX512BF16__
