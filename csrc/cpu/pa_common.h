// Pieces shared by the cpu backend's two PA layouts (pa_cpu.cpp: NCHW planes; pa_cpu_nhwc.cpp:
// channels-last rows).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "simd.h"

namespace rest_cpu {

// s[x] = sigmoid(z[x]) for n values (in place allowed).
template <typename T>
inline void sigmoid_row(const T* z, T* s, int64_t n) {
  constexpr int Wd = Simd<T>::W;
  int64_t x = 0;
  for (; x + Wd <= n; x += Wd) vstore(s + x, T(1) / (vexp(-vload(z + x)) + T(1)));
  if (x < n) {  // the tail as one zero-padded vector
    T t[Wd] = {};
    std::copy(z + x, z + n, t);
    vstore(t, T(1) / (vexp(-vload(t)) + T(1)));
    std::copy(t, t + (n - x), s + x);
  }
}

// Channels-last (NHWC-contiguous) kernels of pa_cpu_nhwc.cpp, instantiated for float and double.
// x is channels-last contiguous; w9c is the (9, C) tap-major weight, b the (C) bias, both contiguous
// in T. Outputs are channels-last; dweight (C,1,3,3) and dbias (C) come back in T. The forward also
// reads and writes bfloat16 / float16 maps in place (S), computing in T = float.
template <typename T, typename S = T>
at::Tensor pa_fwd_nhwc(const at::Tensor& x, const at::Tensor& w9c, const at::Tensor& b);
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pa_bwd_nhwc(const at::Tensor& dout, const at::Tensor& x,
                                                           const at::Tensor& w9c, const at::Tensor& b);

}  // namespace rest_cpu
