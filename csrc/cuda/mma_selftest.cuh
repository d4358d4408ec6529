// A self-test of csrc/cuda/mma.cuh, compiled into both builds (the `cuda` ops and the `cuda-emu`
// ops): one warp loads a 16 x 16 A and a 16 x 8 B into mma.sync fragments with rk::frag_a / frag_b,
// multiplies them with rk::mma_16816 and stores D by rk::frag_c. On a GPU it checks the loaders
// against the hardware's layout; under the emulation, lane_shift != 0 (each lane loads the
// fragments of lane (lane + lane_shift) % 32) must give a wrong D: the emulation sees the layout.
#pragma once

#include "mma.cuh"

namespace REST_NS {

template <class T>
__global__ void mma_selftest_kernel(const T* A, const T* B, float* D, int lane_shift) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int src = (lane + lane_shift) % 32;  // the lane whose fragments this one loads
  uint32_t a[4], b[2];
  for (int r = 0; r < 4; ++r) {
    const rk::FragCoord lo = rk::frag_a(src, 2 * r), hi = rk::frag_a(src, 2 * r + 1);
    a[r] = rk::pack2(A[lo.row * 16 + lo.col], A[hi.row * 16 + hi.col]);
  }
  for (int r = 0; r < 2; ++r) {
    const rk::FragCoord lo = rk::frag_b(src, 2 * r), hi = rk::frag_b(src, 2 * r + 1);
    b[r] = rk::pack2(B[lo.row * 8 + lo.col], B[hi.row * 8 + hi.col]);
  }
  const float c[4] = {0.f, 0.f, 0.f, 0.f};
  float d[4];
  rk::mma_16816<T>(d, a, b, c);
  for (int i = 0; i < 4; ++i) {
    const rk::FragCoord o = rk::frag_c(lane, i);
    D[o.row * 8 + o.col] = d[i];
  }
}

// D = A B (fp32) by one warp's mma.sync: a (16, 16) and b (16, 8), both bf16 or both fp16.
inline at::Tensor mma_selftest(const at::Tensor& a, const at::Tensor& b, int64_t lane_shift) {
  TORCH_CHECK(a.dim() == 2 && a.size(0) == 16 && a.size(1) == 16, "mma_selftest: a must be (16, 16), got ", a.sizes());
  TORCH_CHECK(b.dim() == 2 && b.size(0) == 16 && b.size(1) == 8, "mma_selftest: b must be (16, 8), got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kHalf),
              "mma_selftest: a and b must both be bfloat16 or both float16");
  TORCH_CHECK(a.device() == b.device() && a.device().type() == rk::kDevice, "mma_selftest: a and b must be on ",
              rk::kDevice);
  TORCH_CHECK(lane_shift >= 0 && lane_shift < 32, "mma_selftest: lane_shift must be in [0, 32)");
  rk::DeviceGuard guard(a);
  at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor d = at::empty({16, 8}, a.options().dtype(at::kFloat));
  const int shift = static_cast<int>(lane_shift);
  if (a.scalar_type() == at::kBFloat16) {
    rk::launch(mma_selftest_kernel<c10::BFloat16>, dim3(1), dim3(32), rk::current_stream(),
               ac.data_ptr<c10::BFloat16>(), bc.data_ptr<c10::BFloat16>(), d.data_ptr<float>(), shift);
  } else {
    rk::launch(mma_selftest_kernel<c10::Half>, dim3(1), dim3(32), rk::current_stream(),
               ac.data_ptr<c10::Half>(), bc.data_ptr<c10::Half>(), d.data_ptr<float>(), shift);
  }
  return d;
}

}  // namespace REST_NS
