// Tensor-core products for the CUDA kernels: mma.sync m16n8k16 with fp16 / bf16 operands and fp32
// accumulation (sm_80 and later; sm_90 runs it too), one warp per product.
//
//   rk::mma_16816<T>(d, a, b, c)    D (16 x 8) = A (16 x 16) B (16 x 8) + C, T = c10::BFloat16 / c10::Half
//   rk::frag_a(lane, i) / frag_b / frag_c   where element i of a lane's fragment sits in the matrix
//   rk::pack2(lo, hi)               two 16-bit values in one register, as mma.sync takes them
//
// Fragment layout (PTX ISA, "Matrix fragments for mma.m16n8k16 with floating point type"), with
// groupID = lane / 4 and t = lane % 4: A's a0..a7 (four registers of two values) at row groupID
// (+8 for a2, a3, a6, a7), column 2t + (i & 1) (+8 for a4..a7); B's b0..b3 at row (k) 2t + (i & 1)
// (+8 for b2, b3), column groupID; C's / D's c0..c3 at row groupID (+8 for c2, c3), column
// 2t + (i & 1).
//
// On the GPU `mma_16816` is the PTX instruction (HMMA in the SASS). Under the CPU emulation
// (REST_EMU) it is emu::mma_m16n8k16, a warp collective that rebuilds A, B and C from every lane's
// registers with its own copy of the table above: the kernels that run under `cuda-emu` are the
// kernels that ship, and a fragment loaded into the wrong lane or slot gives a wrong product there.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "portability.cuh"

namespace REST_NS {
namespace rk {

struct FragCoord {
  int row, col;
};

REST_DEVICE FragCoord frag_a(int lane, int i) {
  return {lane / 4 + 8 * ((i >> 1) & 1), 2 * (lane % 4) + (i & 1) + 8 * (i >= 4)};
}
REST_DEVICE FragCoord frag_b(int lane, int i) {  // (k, n)
  return {2 * (lane % 4) + (i & 1) + 8 * (i >= 2), lane / 4};
}
REST_DEVICE FragCoord frag_c(int lane, int i) {
  return {lane / 4 + 8 * (i >= 2), 2 * (lane % 4) + (i & 1)};
}

template <class T>
REST_DEVICE uint32_t pack2(T lo, T hi) {
  static_assert(sizeof(T) == 2, "pack2 packs 16-bit values");
  uint16_t l, h;
  std::memcpy(&l, &lo, 2);
  std::memcpy(&h, &hi, 2);
  return uint32_t(l) | (uint32_t(h) << 16);
}

template <class T>
REST_DEVICE void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]
#ifdef REST_EMU
                           , const std::source_location loc = std::source_location::current()
#endif
) {
  static_assert(std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>,
                "mma_16816 takes bf16 or fp16 operands");
#ifdef REST_EMU
  ::emu::mma_m16n8k16<T>(d, a, b, c, loc);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // below sm_80 there is no m16n8k16 for these types; the build targets sm_80+
#endif
}

}  // namespace rk
}  // namespace REST_NS
