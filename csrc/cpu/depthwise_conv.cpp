// y = conv2d(x, weight, bias, groups = channels) (one filter per channel, dilation 1, zero padding) for
// the models' float32 CPU inference: EMSA's key/value reduction, the depthwise strided convolution of
// kernel sr + 1, stride sr (rest/packed_conv.py decides when it runs, by the rule of rest/dense.py
// PACKED_KERNEL_ON).
//
// Why: at ResT's batch-1 shapes oneDNN's depthwise convolution costs more than its work (rest_lite's
// stage 1: 64 channels, 9 x 9 taps, 56 x 56 -> 7 x 7 is 0.25 M multiply-adds). Measured 2026-12-07 on
// a 2-core AMD EPYC with AVX2 only, 2 threads, channels-last, each call after a 10 ms pause (as in a
// model), alternating, medians of 21 (ms; oneDNN with its weight reordered once for the shape):
//   (batch, channels, input size, sr)   oneDNN   this kernel
//   (1, 64, 56, 8)                      0.374     0.246
//   (1, 128, 28, 4)                     0.401     0.274
//   (1, 256, 14, 2)                     0.290     0.154
//   (1, 96, 56, 8)  (rest_base)         0.306     0.197
//   (16, 64, 56, 8)                     1.285     1.253
//   (16, 128, 28, 4)                    0.701     0.730
//   (16, 96, 56, 8)                     1.344     1.497
// and inside the compiled rest_lite at batch 1 (torch.profiler, 20 calls): its six reductions 0.81 ms
// a call on oneDNN, 0.29 on this kernel. At batch 16 the two are within 12% either way (memory-bound:
// the input map is read once by both).
//
// Layout: x channels-last, so a pixel's channels are contiguous and every loop vectorises over them;
// the weight as taps (kh * kw, C), tap-major (the PA kernels' layout), made once (packed by the
// caller, a constant under torch.compile's freezing). Each output is the sum over its valid taps in
// increasing (row, column) order (taps over the zero padding skipped: the same as adding zero
// products), then + bias, whatever the tiling or thread count.
#include <ATen/ATen.h>

#include <algorithm>

#include "kernels.h"
#include "parallel.h"
#include "simd.h"

namespace rest_cpu {
namespace {

// One output pixel's channels [c, c + width of V): V = vec_t<float> (vload / vstore) or float.
template <typename V, typename Load, typename Store>
inline void pixel_channels(int64_t c, const float* img, int64_t iy, int64_t ix, int64_t Wd, int64_t C, int64_t ky0,
                           int64_t ky1, int64_t kx0, int64_t kx1, int64_t kw, const float* taps, const float* bias,
                           float* out, Load load, Store store) {
  V acc{};  // zeros
  for (int64_t ky = ky0; ky < ky1; ++ky)
    for (int64_t kx = kx0; kx < kx1; ++kx)
      acc += load(img + ((iy + ky) * Wd + ix + kx) * C + c) * load(taps + (ky * kw + kx) * C + c);
  if (bias != nullptr) acc += load(bias + c);
  store(out + c, acc);
}

}  // namespace

at::Tensor depthwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& taps, const OptTensor& bias,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), Wd = x.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1];
  const int64_t Ho = (H + 2 * ph - kh) / sh + 1, Wo = (Wd + 2 * pw - kw) / sw + 1;
  const at::Tensor xc = x.permute({0, 2, 3, 1}).contiguous();  // no copy for a channels-last x
  at::Tensor y = at::empty({B, Ho, Wo, C}, x.options());
  if (y.numel() == 0) return y.permute({0, 3, 1, 2});
  const float* X = xc.data_ptr<float>();
  const float* Tp = taps.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
  constexpr int Wv = Simd<float>::W;
  const auto vec_load = [](const float* p) { return vload<float>(p); };
  const auto vec_store = [](float* p, vec_t<float> v) { vstore<float>(p, v); };
  const auto load = [](const float* p) { return *p; };
  const auto store = [](float* p, float v) { *p = v; };
  // a task: one output row of one image (its Wo pixels x C channels x the taps)
  parallel_tasks(B * Ho, [] { return 0; }, [&](int64_t task, int&) {
    const int64_t bi = task / Ho, oh = task % Ho;
    const float* img = X + bi * H * Wd * C;
    const int64_t iy = oh * sh - ph;  // the window's top row, maybe above the image
    const int64_t ky0 = std::max<int64_t>(0, -iy), ky1 = std::min<int64_t>(kh, H - iy);
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const int64_t ix = ow * sw - pw;
      const int64_t kx0 = std::max<int64_t>(0, -ix), kx1 = std::min<int64_t>(kw, Wd - ix);
      float* out = Y + ((bi * Ho + oh) * Wo + ow) * C;
      int64_t c = 0;
      for (; c + Wv <= C; c += Wv)
        pixel_channels<vec_t<float>>(c, img, iy, ix, Wd, C, ky0, ky1, kx0, kx1, kw, Tp, bp, out, vec_load, vec_store);
      for (; c < C; ++c) pixel_channels<float>(c, img, iy, ix, Wd, C, ky0, ky1, kx0, kx1, kw, Tp, bp, out, load, store);
    }
  });
  return y.permute({0, 3, 1, 2});
}

}  // namespace rest_cpu
