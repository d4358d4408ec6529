// PA (pixel attention gate) forward and backward for CPU tensors: the `cpu` backend's
// rest_kernels_C::pa_fwd / pa_bwd.  out = x * sigmoid(depthwise3x3(x) + bias), zero padding 1.
//
// One task per (batch, channel) plane (at::parallel_for). The plane is copied once into a buffer
// with a one-pixel zero border, so the 3x3 taps are branch-free loops over contiguous columns that
// the compiler vectorises; the conv, the sigmoid (vectorised exp) and the product happen in one
// pass. The backward recomputes the gate for the plane, forms dz = dout * x * s (1 - s) into a
// bordered buffer and gives dx = dout * s + (3x3 correlation of dz with the flipped taps); dweight
// and dbias are summed per plane (in double) and then over the batch in batch order for each channel:
// deterministic whatever the thread count. Inputs of any layout (channels_last included) are made
// NCHW-contiguous once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "parallel.h"
#include "simd.h"

namespace rest_cpu {
namespace {

// s[x] = sigmoid(z[x]) for n values.
template <typename T>
inline void sigmoid_row(const T* z, T* s, int64_t n) {
  constexpr int Wd = Simd<T>::W;
  int64_t x = 0;
  for (; x + Wd <= n; x += Wd) vstore(s + x, T(1) / (vexp(-vload(z + x)) + T(1)));
  for (; x < n; ++x) s[x] = T(1) / (sexp<T>(-z[x]) + T(1));
}

// Copy an H x W plane into the interior of a zeroed (H+2) x (W+2) buffer.
template <typename T>
inline void fill_bordered(const T* src, int64_t H, int64_t W, T* pad) {
  const int64_t Wp = W + 2;
  std::fill(pad, pad + (H + 2) * Wp, T(0));
  for (int64_t y = 0; y < H; ++y) std::copy(src + y * W, src + (y + 1) * W, pad + (y + 1) * Wp + 1);
}

// z (H x W) = bias + 3x3 correlation of the bordered plane with taps w[9].
template <typename T>
inline void conv_plane(const T* pad, int64_t H, int64_t W, const T* w, T bias, T* z) {
  const int64_t Wp = W + 2;
  for (int64_t y = 0; y < H; ++y) {
    T* zr = z + y * W;
    for (int64_t x = 0; x < W; ++x) zr[x] = bias;
    for (int ky = 0; ky < 3; ++ky) {
      const T* r = pad + (y + ky) * Wp;
      const T w0 = w[ky * 3], w1 = w[ky * 3 + 1], w2 = w[ky * 3 + 2];
      for (int64_t x = 0; x < W; ++x) zr[x] += w0 * r[x] + w1 * r[x + 1] + w2 * r[x + 2];
    }
  }
}

template <typename T>
at::Tensor pa_fwd_impl(const at::Tensor& x_in, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const at::Tensor w = weight.to(x.scalar_type()).contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::zeros({C}, x.options());
  at::Tensor out = at::empty({B, C, H, W}, x.options());
  const T* xp = x.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t HW = H * W;
  struct Buffers {
    std::vector<T> pad, z, s;
  };
  auto make = [&] { return Buffers{std::vector<T>((H + 2) * (W + 2)), std::vector<T>(HW), std::vector<T>(HW)}; };
  parallel_tasks(B * C, make, [&](int64_t bc, Buffers& buf) {
    auto& pad = buf.pad;
    auto& z = buf.z;
    auto& s = buf.s;
    {
      const int64_t c = bc % C;
      const T* xs = xp + bc * HW;
      fill_bordered(xs, H, W, pad.data());
      conv_plane(pad.data(), H, W, wp + c * 9, bp[c], z.data());
      sigmoid_row(z.data(), s.data(), HW);
      T* o = op + bc * HW;
      for (int64_t t = 0; t < HW; ++t) o[t] = xs[t] * s[t];
    }
  });
  return out;
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pa_bwd_impl(const at::Tensor& dout_in, const at::Tensor& x_in,
                                                           const at::Tensor& weight,
                                                           const c10::optional<at::Tensor>& bias) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor g = dout_in.to(x.scalar_type()).contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const at::Tensor w = weight.to(x.scalar_type()).contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::zeros({C}, x.options());
  at::Tensor dx = at::empty({B, C, H, W}, x.options());
  const T* xp = x.data_ptr<T>();
  const T* gp = g.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* bp = b.data_ptr<T>();
  T* dxp = dx.data_ptr<T>();
  const int64_t HW = H * W, Wp = W + 2;
  // Per plane: 9 dweight sums and the dbias sum, in double.
  std::vector<double> part(B * C * 10, 0.0);
  struct Buffers {
    std::vector<T> pad, dzpad, z, s;
  };
  auto make = [&] {
    return Buffers{std::vector<T>((H + 2) * Wp), std::vector<T>((H + 2) * Wp), std::vector<T>(HW),
                   std::vector<T>(HW)};
  };
  parallel_tasks(B * C, make, [&](int64_t bc, Buffers& buf) {
    auto& pad = buf.pad;
    auto& dzpad = buf.dzpad;
    auto& z = buf.z;
    auto& s = buf.s;
    {
      const int64_t c = bc % C;
      const T* xs = xp + bc * HW;
      const T* gs = gp + bc * HW;
      const T* wc = wp + c * 9;
      fill_bordered(xs, H, W, pad.data());
      conv_plane(pad.data(), H, W, wc, bp[c], z.data());
      sigmoid_row(z.data(), s.data(), HW);
      std::fill(dzpad.begin(), dzpad.end(), T(0));
      double* pp = part.data() + bc * 10;
      for (int64_t y = 0; y < H; ++y) {
        T* dzr = dzpad.data() + (y + 1) * Wp + 1;
        const T* sr = s.data() + y * W;
        const T* xr = xs + y * W;
        const T* gr = gs + y * W;
        T dbs = 0;
        for (int64_t t = 0; t < W; ++t) {
          dzr[t] = gr[t] * xr[t] * sr[t] * (T(1) - sr[t]);
          dbs += dzr[t];
        }
        pp[9] += double(dbs);
      }
      // dweight[ky][kx] = sum_y,x dz[y][x] * x[y+ky-1][x+kx-1]
      for (int t = 0; t < 9; ++t) {
        const int ky = t / 3, kx = t % 3;
        double acc = 0;
        for (int64_t y = 0; y < H; ++y) {
          const T* dzr = dzpad.data() + (y + 1) * Wp + 1;
          const T* xr = pad.data() + (y + ky) * Wp + kx;
          T rs = 0;
          for (int64_t u = 0; u < W; ++u) rs += dzr[u] * xr[u];
          acc += double(rs);
        }
        pp[t] = acc;
      }
      // dx = dout * s + sum_taps w[ky][kx] * dz[y - ky + 1][x - kx + 1]
      T* dxs = dxp + bc * HW;
      for (int64_t y = 0; y < H; ++y) {
        T* o = dxs + y * W;
        const T* sr = s.data() + y * W;
        const T* gr = gs + y * W;
        for (int64_t u = 0; u < W; ++u) o[u] = gr[u] * sr[u];
        for (int ky = 0; ky < 3; ++ky) {
          const T* r = dzpad.data() + (y + 2 - ky) * Wp;
          const T w0 = wc[ky * 3], w1 = wc[ky * 3 + 1], w2 = wc[ky * 3 + 2];
          for (int64_t u = 0; u < W; ++u) o[u] += w0 * r[u + 2] + w1 * r[u + 1] + w2 * r[u];
        }
      }
    }
  });
  at::Tensor dw = at::empty({C, 1, 3, 3}, weight.options());
  at::Tensor db = at::empty({C}, bias.has_value() ? bias->options() : weight.options());
  at::Tensor dw64 = at::zeros({C, 9}, x.options().dtype(at::kDouble)), db64 = at::zeros({C}, dw64.options());
  double* dwo = dw64.data_ptr<double>();
  double* dbo = db64.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t bb = 0; bb < B; ++bb) {  // batch order: fixed
      const double* pp = part.data() + (bb * C + c) * 10;
      for (int t = 0; t < 9; ++t) dwo[c * 9 + t] += pp[t];
      dbo[c] += pp[9];
    }
  dw.copy_(dw64.view({C, 1, 3, 3}));
  db.copy_(db64);
  return {dx, dw, db};
}

void check_pa(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4, "pa: x must be (B, C, H, W)");
  TORCH_CHECK(weight.numel() == x.size(1) * 9, "pa: weight must be (C, 1, 3, 3)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "pa (cpu backend): float32 or float64 only, got ", x.scalar_type());
}

at::Tensor pa_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_pa(x, weight);
  if (x.scalar_type() == at::kDouble) return pa_fwd_impl<double>(x, weight, bias);
  return pa_fwd_impl<float>(x, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pa_bwd_cpu(const at::Tensor& dout, const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          const c10::optional<at::Tensor>& bias) {
  check_pa(x, weight);
  TORCH_CHECK(dout.sizes() == x.sizes(), "pa_bwd: dout must match x");
  if (x.scalar_type() == at::kDouble) return pa_bwd_impl<double>(dout, x, weight, bias);
  return pa_bwd_impl<float>(dout, x, weight, bias);
}

}  // namespace
}  // namespace rest_cpu

TORCH_LIBRARY_IMPL(rest_kernels_C, CPU, m) {
  m.impl("pa_fwd", &rest_cpu::pa_fwd_cpu);
  m.impl("pa_bwd", &rest_cpu::pa_bwd_cpu);
}
