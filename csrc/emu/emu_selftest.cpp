// Controls and self-tests of the CUDA emulation, registered in a namespace of their own,
// torch.ops.rest_kernels_emu_test (test machinery, not part of the rest_kernels_C ops that the
// backends call):
//   emu_set_schedule(spec)   "forward" | "reverse" | "shuffle:<seed>": the order in which a block's
//                            threads run between barriers (also REST_KERNELS_EMU_SCHEDULE)
//   emu_get_schedule()       the current spec
//   emu_mma_count()          mma.sync instructions (warp-wide) the emulation has executed so far
//   emu_selftest_reduce(x, barrier)  per-row sum of x (rows of 128) by a shared-memory tree;
//                            barrier=False drops the __syncthreads between the stores and the tree:
//                            a race that the emulation must expose (NaN or a wrong sum)
//   emu_selftest_diverge(x)  a __syncthreads reached by half the block: must raise, not hang
//   emu_selftest_oversized_shared(x)  a block asking for more than 228 KiB of shared memory: the
//                            error raised inside a fiber must surface as a RuntimeError
#include <ATen/ATen.h>
#include <torch/library.h>

#include "emu/cuda_emu.h"

namespace rest_emu_selftest {

constexpr int kThreads = 128;

__global__ void reduce_kernel(const float* x, float* out, bool barrier) {
  using Red = float[kThreads];
  REST_SHARED(Red, red);
  const int t = threadIdx.x;
  red[t] = x[int64_t(blockIdx.x) * kThreads + t];
  if (barrier) __syncthreads();  // the barrier the racy variant forgets
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) red[t] += red[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = red[0];
}

__global__ void diverge_kernel(float* x) {
  if (threadIdx.x < kThreads / 2) __syncthreads();
  x[threadIdx.x] += 1.f;
}

__global__ void oversized_shared_kernel(float* x) {
  using Big = float[60 * 1024];  // 240 KiB
  REST_SHARED(Big, big);
  big[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  x[threadIdx.x] = big[(threadIdx.x + 1) % kThreads];
}

at::Tensor selftest_oversized_shared(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() == kThreads, "x must be 128 float32");
  at::Tensor y = x.contiguous().clone();
  float* p = y.data_ptr<float>();
  emu::launch_impl(dim3(1), dim3(kThreads), [&] { oversized_shared_kernel(p); });
  return y;
}

at::Tensor selftest_reduce(const at::Tensor& x, bool barrier) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == kThreads, "x must be float32 (rows, 128)");
  at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0)}, x.options());
  const float* xp = xc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  emu::launch_impl(dim3(static_cast<unsigned>(x.size(0))), dim3(kThreads), [&] { reduce_kernel(xp, op, barrier); });
  return out;
}

at::Tensor selftest_diverge(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.numel() == kThreads, "x must be 128 float32");
  at::Tensor y = x.contiguous().clone();
  float* p = y.data_ptr<float>();
  emu::launch_impl(dim3(1), dim3(kThreads), [&] { diverge_kernel(p); });
  return y;
}

void set_schedule(c10::string_view spec) { emu::set_schedule(std::string(spec)); }
std::string get_schedule() { return emu::get_schedule(); }
int64_t mma_count() { return static_cast<int64_t>(emu::mma_executed()); }

}  // namespace rest_emu_selftest

TORCH_LIBRARY(rest_kernels_emu_test, m) {
  m.def("emu_set_schedule(str spec) -> ()", &rest_emu_selftest::set_schedule);
  m.def("emu_get_schedule() -> str", &rest_emu_selftest::get_schedule);
  m.def("emu_mma_count() -> int", &rest_emu_selftest::mma_count);
  m.def("emu_selftest_reduce(Tensor x, bool barrier) -> Tensor");
  m.def("emu_selftest_diverge(Tensor x) -> Tensor");
  m.def("emu_selftest_oversized_shared(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(rest_kernels_emu_test, CPU, m) {
  m.impl("emu_selftest_reduce", &rest_emu_selftest::selftest_reduce);
  m.impl("emu_selftest_diverge", &rest_emu_selftest::selftest_diverge);
  m.impl("emu_selftest_oversized_shared", &rest_emu_selftest::selftest_oversized_shared);
}
