// PA (pixel attention) kernels: out = x * sigmoid(depthwise_conv3x3(x, pad 1) + bias).
//
// Same source for nvcc (csrc/cuda) and for the CPU emulation (csrc/emu); see portability.cuh.
//   forward   one thread per output element (grid-stride), the 9 taps read through x's strides.
//   backward  (1) one thread per element: dz = dout * x * s (1 - s) into a float32 buffer and
//                 the direct term dout * s into dx's float32 accumulator;
//             (2) one thread per element: dx += sum of the 9 mirrored taps of dz (the transposed
//                 depthwise conv), written in x's dtype;
//             (3) blocks (channel, slice of B x H x W): dweight (9 taps) and dbias partials in a
//                 fixed order (per-thread strided sums, then a fixed tree), summed over the
//                 slices by the host code: deterministic, and C x slices blocks, not C.
#pragma once

#include "cuda/portability.cuh"

namespace REST_NS {

struct PaShape {
  int64_t B, C, H, W;
  int64_t sb, sc, sh, sw;  // strides of x, in elements
};

template <class T>
REST_DEVICE float pa_logit(const T* __restrict__ x, const PaShape& s, const float* __restrict__ w,
                           const float* __restrict__ bias, int64_t b, int64_t c, int64_t y, int64_t xx) {
  const T* base = x + b * s.sb + c * s.sc;
  float z = bias ? bias[c] : 0.f;
  for (int ky = 0; ky < 3; ++ky) {
    const int64_t yy = y + ky - 1;
    if (yy < 0 || yy >= s.H) continue;
    for (int kx = 0; kx < 3; ++kx) {
      const int64_t xs = xx + kx - 1;
      if (xs < 0 || xs >= s.W) continue;
      z += w[c * 9 + ky * 3 + kx] * rk::to_f(base[yy * s.sh + xs * s.sw]);
    }
  }
  return z;
}

REST_DEVICE float sigmoidf_(float z) { return 1.f / (1.f + expf(-z)); }

// Output and all float32 buffers are contiguous (B, C, H, W); `e` is the linear index there.
template <class T>
__global__ void __launch_bounds__(256) pa_fwd_kernel(const T* __restrict__ x, PaShape s, const float* __restrict__ w,
                                                     const float* __restrict__ bias, T* __restrict__ out) {
  const int64_t total = s.B * s.C * s.H * s.W;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t xx = e % s.W, y = (e / s.W) % s.H, c = (e / (s.W * s.H)) % s.C, b = e / (s.W * s.H * s.C);
    const float z = pa_logit(x, s, w, bias, b, c, y, xx);
    const float xv = rk::to_f(x[b * s.sb + c * s.sc + y * s.sh + xx * s.sw]);
    out[e] = rk::from_f<T>(xv * sigmoidf_(z));
  }
}

template <class T>
__global__ void __launch_bounds__(256) pa_bwd_dz_kernel(const T* __restrict__ dout, PaShape ds, const T* __restrict__ x,
                                                        PaShape s, const float* __restrict__ w,
                                                        const float* __restrict__ bias, float* __restrict__ dz,
                                                        float* __restrict__ dx_direct) {
  const int64_t total = s.B * s.C * s.H * s.W;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t xx = e % s.W, y = (e / s.W) % s.H, c = (e / (s.W * s.H)) % s.C, b = e / (s.W * s.H * s.C);
    const float sg = sigmoidf_(pa_logit(x, s, w, bias, b, c, y, xx));
    const float xv = rk::to_f(x[b * s.sb + c * s.sc + y * s.sh + xx * s.sw]);
    const float g = rk::to_f(dout[b * ds.sb + c * ds.sc + y * ds.sh + xx * ds.sw]);
    dz[e] = g * xv * sg * (1.f - sg);
    dx_direct[e] = g * sg;
  }
}

template <class T>
__global__ void __launch_bounds__(256) pa_bwd_dx_kernel(PaShape s, const float* __restrict__ w,
                                                        const float* __restrict__ dz,
                                                        const float* __restrict__ dx_direct, T* __restrict__ dx) {
  const int64_t total = s.B * s.C * s.H * s.W;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t xx = e % s.W, y = (e / s.W) % s.H, c = (e / (s.W * s.H)) % s.C;
    const int64_t plane = e - y * s.W - xx;  // start of this (b, c) plane
    float acc = dx_direct[e];
    // x[y', x'] fed z[y' - ky + 1, x' - kx + 1] through tap (ky, kx)
    for (int ky = 0; ky < 3; ++ky) {
      const int64_t yz = y - ky + 1;
      if (yz < 0 || yz >= s.H) continue;
      for (int kx = 0; kx < 3; ++kx) {
        const int64_t xz = xx - kx + 1;
        if (xz < 0 || xz >= s.W) continue;
        acc += w[c * 9 + ky * 3 + kx] * dz[plane + yz * s.W + xz];
      }
    }
    dx[e] = rk::from_f<T>(acc);
  }
}

constexpr int kPaReduceThreads = 256;

// One block per channel: out[c*10 + t] = sum over (b, y, x) of dz * x[tap t] (t < 9) and of dz (t = 9).
template <class T>
__global__ void __launch_bounds__(kPaReduceThreads) pa_bwd_dw_kernel(const T* __restrict__ x, PaShape s,
                                                                     const float* __restrict__ dz,
                                                                     int64_t slice_len,
                                                                     float* __restrict__ part) {
  // block (c, slice): the (B, H, W) elements [slice * slice_len, (slice + 1) * slice_len) of channel c;
  // part (C, 10, slices) is then summed over the slices in a fixed order by the host code
  using Partials = float[10][kPaReduceThreads];
  REST_SHARED(Partials, red);
  const int64_t c = blockIdx.x, slice = blockIdx.y, slices = gridDim.y;
  const int tid = threadIdx.x;
  float acc[10];
  for (int t = 0; t < 10; ++t) acc[t] = 0.f;
  const int64_t per_plane = s.H * s.W, total = s.B * per_plane;
  const int64_t lo = slice * slice_len, hi = lo + slice_len < total ? lo + slice_len : total;
  for (int64_t e = lo + tid; e < hi; e += kPaReduceThreads) {
    const int64_t b = e / per_plane, y = (e % per_plane) / s.W, xx = e % s.W;
    const float g = dz[(b * s.C + c) * per_plane + y * s.W + xx];
    const T* base = x + b * s.sb + c * s.sc;
    for (int ky = 0; ky < 3; ++ky) {
      const int64_t yy = y + ky - 1;
      for (int kx = 0; kx < 3; ++kx) {
        const int64_t xs = xx + kx - 1;
        if (yy >= 0 && yy < s.H && xs >= 0 && xs < s.W) acc[ky * 3 + kx] += g * rk::to_f(base[yy * s.sh + xs * s.sw]);
      }
    }
    acc[9] += g;
  }
  for (int t = 0; t < 10; ++t) red[t][tid] = acc[t];
  __syncthreads();
  for (int stride = kPaReduceThreads / 2; stride > 0; stride /= 2) {
    if (tid < stride)
      for (int t = 0; t < 10; ++t) red[t][tid] += red[t][tid + stride];
    __syncthreads();
  }
  if (tid < 10) part[(c * 10 + tid) * slices + slice] = red[tid][0];
}

// Elements of (B, H, W) one dweight block reduces: enough blocks (C x slices) to fill a GPU when C
// is small (ResT stage 1: 64 channels), a function of the shape only (the same sums on every GPU).
constexpr int64_t kPaDwSliceTarget = 8192;
constexpr int64_t kPaDwMaxSlices = 256;

// ----------------------------------------------------------------------------------- host side
inline PaShape pa_shape(const at::Tensor& t) {
  return PaShape{t.size(0), t.size(1), t.size(2), t.size(3), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

inline void pa_check(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().type() == rk::kDevice, "pa: x on ", x.device());
  TORCH_CHECK(x.dim() == 4, "pa: x must be (B, C, H, W)");
  TORCH_CHECK(weight.numel() == x.size(1) * 9, "pa: weight must be (C, 1, 3, 3)");
  TORCH_CHECK(weight.device() == x.device(), "pa: weight on another device");
  if (bias) TORCH_CHECK(bias->numel() == x.size(1) && bias->device() == x.device(), "pa: bias must be (C,)");
}

constexpr int kPaThreads = 256;

inline unsigned pa_grid(int64_t total) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((total + kPaThreads - 1) / kPaThreads, 65535 * 8)));
}

inline at::Tensor pa_fwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  pa_check(x, weight, bias);
  rk::DeviceGuard guard(x);
  at::Tensor out = at::empty(x.sizes(), x.options());  // contiguous, as the fake implementation says
  if (x.numel() == 0) return out;
  at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const PaShape s = pa_shape(x);
  REST_DISPATCH_DTYPES(x.scalar_type(), "pa_fwd", [&] {
    rk::launch(pa_fwd_kernel<scalar_t>, dim3(pa_grid(x.numel())), dim3(kPaThreads), rk::current_stream(),
               x.data_ptr<scalar_t>(), s, w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
               out.data_ptr<scalar_t>());
  });
  return out;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> pa_bwd(const at::Tensor& dout, const at::Tensor& x,
                                                             const at::Tensor& weight,
                                                             const c10::optional<at::Tensor>& bias) {
  pa_check(x, weight, bias);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type() && dout.device() == x.device(),
              "pa_bwd: dout must match x");
  rk::DeviceGuard guard(x);
  const int64_t C = x.size(1);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dwb = at::zeros({C, 10}, x.options().dtype(at::kFloat));
  if (x.numel() > 0) {
    const int64_t total = x.size(0) * x.size(2) * x.size(3);
    const int64_t slices = std::min<int64_t>(kPaDwMaxSlices, (total + kPaDwSliceTarget - 1) / kPaDwSliceTarget);
    const int64_t slice_len = (total + slices - 1) / slices;
    at::Tensor part = at::empty({C, 10, slices}, x.options().dtype(at::kFloat));
    at::Tensor w = weight.to(at::kFloat).contiguous();
    at::Tensor b = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor dz = at::empty(x.sizes(), x.options().dtype(at::kFloat));
    at::Tensor direct = at::empty(x.sizes(), x.options().dtype(at::kFloat));
    const PaShape s = pa_shape(x), ds = pa_shape(dout);
    const dim3 grid(pa_grid(x.numel()));
    REST_DISPATCH_DTYPES(x.scalar_type(), "pa_bwd", [&] {
      auto stream = rk::current_stream();
      rk::launch(pa_bwd_dz_kernel<scalar_t>, grid, dim3(kPaThreads), stream, dout.data_ptr<scalar_t>(), ds,
                 x.data_ptr<scalar_t>(), s, w.data_ptr<float>(), b.defined() ? b.data_ptr<float>() : nullptr,
                 dz.data_ptr<float>(), direct.data_ptr<float>());
      rk::launch(pa_bwd_dx_kernel<scalar_t>, grid, dim3(kPaThreads), stream, s, w.data_ptr<float>(),
                 dz.data_ptr<float>(), direct.data_ptr<float>(), dx.data_ptr<scalar_t>());
      rk::launch(pa_bwd_dw_kernel<scalar_t>, dim3(static_cast<unsigned>(C), static_cast<unsigned>(slices)),
                 dim3(kPaReduceThreads), stream, x.data_ptr<scalar_t>(), s, dz.data_ptr<float>(), slice_len,
                 part.data_ptr<float>());
    });
    dwb = part.sum(2);  // over the slices, in a fixed order (no atomics): deterministic
  }
  at::Tensor dweight = dwb.narrow(1, 0, 9).reshape(weight.sizes()).to(weight.scalar_type());
  at::Tensor dbias = bias ? dwb.select(1, 9).to(bias->scalar_type()).contiguous()
                          : at::empty({0}, x.options());
  return {dx, dweight, dbias};
}

}  // namespace REST_NS
