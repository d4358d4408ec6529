// The few lines that differ between the real CUDA build (nvcc) and the CPU emulation (g++).
//
// Kernel and host-launch source (emsa_kernels.cuh, pa_kernels.cuh) is written against this:
//   REST_SHARED(TYPE, NAME)      a block's shared-memory object (TYPE may be an array alias)
//   rk::launch(kernel, grid, block, stream, args...)   launch on `stream` and check the launch
//   rk::Stream, rk::current_stream(), rk::DeviceGuard, rk::kDevice
// The including translation unit defines REST_NS (the namespace everything lands in: the CUDA and
// the emulated copies of the same templates must not meet at link time) and, for the emulation,
// REST_EMU.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Half.h>
#include <c10/util/BFloat16.h>

#ifndef REST_NS
#error "define REST_NS before including the kernel headers"
#endif

#ifdef REST_EMU
#include "emu/cuda_emu.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#define REST_SHARED(TYPE, NAME) __shared__ TYPE NAME
#endif

#define REST_DEVICE __device__ __forceinline__
#ifdef REST_EMU
#define REST_UNROLL
#define REST_UNROLL_BY(N)
#else
#define REST_UNROLL _Pragma("unroll")
#define REST_PRAGMA(X) _Pragma(#X)
#define REST_UNROLL_BY(N) REST_PRAGMA(unroll N)
#endif

namespace REST_NS {
namespace rk {

#ifdef REST_EMU
using Stream = ::emu::Stream;
inline Stream current_stream() { return {}; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};
constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;

template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, Stream, Args... args) {
  ::emu::launch_impl(grid, block, [&] { kernel(args...); });
}
#else
using Stream = cudaStream_t;
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};
constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;

template <class... KArgs, class... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, Stream stream, Args... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

// Loads/stores of the storage dtypes with float math in between.
template <class T>
REST_DEVICE float to_f(T x) { return static_cast<float>(x); }
template <class T>
REST_DEVICE T from_f(float x) { return static_cast<T>(x); }

// x, hidden from the optimiser: address arithmetic on it stays where it is written. Used where
// hoisting per-head addresses out of a loop would hold them in registers for the whole loop.
REST_DEVICE int opaque(int x) {
#ifndef REST_EMU
  asm volatile("" : "+r"(x));
#endif
  return x;
}

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace rk
}  // namespace REST_NS

// Dispatch over the storage dtypes the CUDA kernels take (float32 accumulation for all).
#define REST_DISPATCH_DTYPES(DTYPE, NAME, ...)                                              \
  switch (DTYPE) {                                                                          \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }                     \
    case at::kHalf: { using scalar_t = c10::Half; __VA_ARGS__(); break; }                  \
    case at::kBFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__(); break; }          \
    default: TORCH_CHECK(false, NAME, ": unsupported dtype ", DTYPE,                        \
                         " (float32, float16, bfloat16)");                                 \
  }
