// PA (pixel attention gate) forward and backward for CPU tensors: the `cpu` backend's
// rest_kernels_C::pa_fwd / pa_bwd (through csrc/cpu_dispatch.cpp; built once per instruction set, see
// kernels.h).  out = x * sigmoid(depthwise3x3(x) + bias), zero padding 1.
//
// One task per (batch, channel) plane (dynamic tasks over at::parallel_for's threads). The plane is
// copied once into a buffer with a one-pixel zero border and the 3x3 conv runs as one contiguous
// loop over the flattened padded rows (see FlatPlane), which the compiler vectorises even for 7x7
// planes; the conv, the sigmoid (vectorised exp) and the product happen in one pass. The backward recomputes the gate for the plane, forms dz = dout * x * s (1 - s) into a
// bordered buffer and gives dx = dout * s + (3x3 correlation of dz with the flipped taps); dweight
// and dbias are summed per plane (in double) and then over the batch in batch order for each channel:
// deterministic whatever the thread count. Channels-last inputs go to pa_cpu_nhwc.cpp (results stay
// channels-last); inputs of any other layout are made NCHW-contiguous once. bfloat16 / float16 are
// computed in float32: the channels-last forward reads and writes them in place (the same bits as
// on a float32 copy), the NCHW forward and the backward on float32 copies.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "kernels.h"
#include "pa_common.h"
#include "parallel.h"
#include "simd.h"

namespace rest_cpu {
namespace {

// sum_i a[i] * b[i] with fixed vector lanes (deterministic, vectorised).
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int Wd = Simd<T>::W;
  vec_t<T> acc = vset<T>(T(0));
  int64_t i = 0;
  for (; i + Wd <= n; i += Wd) acc += vload(a + i) * vload(b + i);
  T r = hsum(acc);
  for (; i < n; ++i) r += a[i] * b[i];
  return r;
}

// A plane in "flat padded" form: (H+2) x (W+2) with a zero border, stored with one spare zero before
// and after, so that every 3x3 neighbour of an interior-row position p (p in [Wp, (H+1) Wp)), border
// columns included, is base[p + off] with off in {-Wp-1, ..., Wp+1}. The conv then runs as one long
// contiguous loop over the H x Wp interior rows whatever W is (small planes vectorise too); values
// computed at the border columns are never used.
struct FlatPlane {
  int64_t H, W, Wp, n;  // n = H * Wp positions computed
  int64_t off[9];
  FlatPlane(int64_t H_, int64_t W_) : H(H_), W(W_), Wp(W_ + 2), n(H_ * (W_ + 2)) {
    for (int t = 0; t < 9; ++t) off[t] = (t / 3 - 1) * Wp + (t % 3 - 1);
  }
  int64_t size() const { return (H + 2) * Wp + 2; }
  int64_t p0() const { return Wp; }  // first interior-row position (relative to base)
};

// Copy the H x W plane src into the interior of buf (size fp.size()); returns base = buf + 1. The
// border and spares are never written, so a buffer zeroed once at allocation stays zero-bordered.
template <typename T>
inline T* fill_flat(const FlatPlane& fp, const T* src, T* buf) {
  T* base = buf + 1;
  for (int64_t y = 0; y < fp.H; ++y) std::copy(src + y * fp.W, src + (y + 1) * fp.W, base + (y + 1) * fp.Wp + 1);
  return base;
}

// z[i] = bias + sum_t w[t] x[p0 + i + off[t]] for i < n; sign = -1 correlates with the flipped taps.
template <typename T>
inline void conv_flat(const FlatPlane& fp, const T* base, const T* w, T bias, int sign, T* z) {
  const T* x = base + fp.p0();
  int64_t o[9];
  for (int t = 0; t < 9; ++t) o[t] = sign * fp.off[t];
  const T w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
  const T *x0 = x + o[0], *x1 = x + o[1], *x2 = x + o[2], *x3 = x + o[3], *x4 = x + o[4], *x5 = x + o[5],
          *x6 = x + o[6], *x7 = x + o[7], *x8 = x + o[8];
  for (int64_t i = 0; i < fp.n; ++i)
    z[i] = bias + w0 * x0[i] + w1 * x1[i] + w2 * x2[i] + w3 * x3[i] + w4 * x4[i] + w5 * x5[i] + w6 * x6[i] +
           w7 * x7[i] + w8 * x8[i];
}

// Small planes are grouped so that a task holds at least ~4K pixels (task hand-out costs little then).
inline int64_t planes_per_task(int64_t HW) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(HW, 1)); }

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
  const FlatPlane fp(H, W);
  struct Buffers {
    std::vector<T> pad, z;
  };
  auto make = [&] { return Buffers{std::vector<T>(fp.size(), T(0)), std::vector<T>(fp.n)}; };
  const int64_t per_task = planes_per_task(HW), planes = B * C;
  parallel_tasks((planes + per_task - 1) / per_task, make, [&](int64_t task, Buffers& buf) {
    for (int64_t bc = task * per_task; bc < std::min(planes, (task + 1) * per_task); ++bc) {
      const int64_t c = bc % C;
      const T* base = fill_flat(fp, xp + bc * HW, buf.pad.data());
      T* z = buf.z.data();
      conv_flat(fp, base, wp + c * 9, bp[c], 1, z);
      sigmoid_row(z, z, fp.n);
      T* o = op + bc * HW;
      const T* xin = base + fp.p0() + 1;
      for (int64_t y = 0; y < H; ++y)
        for (int64_t u = 0; u < W; ++u) o[y * W + u] = xin[y * fp.Wp + u] * z[y * fp.Wp + u + 1];
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
  const int64_t HW = H * W;
  const FlatPlane fp(H, W);
  // Per plane: 9 dweight sums and the dbias sum, in double.
  std::vector<double> part(B * C * 10, 0.0);
  struct Buffers {
    std::vector<T> xpad, gpad, dzpad, s, t;
  };
  auto make = [&] {
    return Buffers{std::vector<T>(fp.size(), T(0)), std::vector<T>(fp.size(), T(0)), std::vector<T>(fp.size(), T(0)),
                   std::vector<T>(fp.n), std::vector<T>(fp.n)};
  };
  const int64_t per_task = planes_per_task(HW), planes = B * C;
  parallel_tasks((planes + per_task - 1) / per_task, make, [&](int64_t task, Buffers& buf) {
    for (int64_t bc = task * per_task; bc < std::min(planes, (task + 1) * per_task); ++bc) {
      const int64_t c = bc % C;
      const T* wc = wp + c * 9;
      const T* xb = fill_flat(fp, xp + bc * HW, buf.xpad.data());
      const T* gb = fill_flat(fp, gp + bc * HW, buf.gpad.data());
      T* s = buf.s.data();
      conv_flat(fp, xb, wc, bp[c], 1, s);
      sigmoid_row(s, s, fp.n);
      // dz = dout * x * s (1 - s): zero on the border columns because dout is zero there; the border
      // rows and spares of dzpad stay zero from its allocation.
      T* dzb = buf.dzpad.data() + 1;
      T* dz = dzb + fp.p0();
      const T* xi = xb + fp.p0();
      const T* gi = gb + fp.p0();
      for (int64_t i = 0; i < fp.n; ++i) dz[i] = gi[i] * xi[i] * s[i] * (T(1) - s[i]);
      double* pp = part.data() + bc * 10;
      for (int t = 0; t < 9; ++t) pp[t] = double(dot(dz, xi + fp.off[t], fp.n));
      {
        vec_t<T> acc = vset<T>(T(0));
        int64_t i = 0;
        constexpr int Wd = Simd<T>::W;
        for (; i + Wd <= fp.n; i += Wd) acc += vload(dz + i);
        T r = hsum(acc);
        for (; i < fp.n; ++i) r += dz[i];
        pp[9] = double(r);
      }
      // dx = dout * s + correlation of dz with the flipped taps
      T* t = buf.t.data();
      conv_flat(fp, dzb, wc, T(0), -1, t);
      T* o = dxp + bc * HW;
      for (int64_t y = 0; y < H; ++y)
        for (int64_t u = 0; u < W; ++u) {
          const int64_t i = y * fp.Wp + u + 1;
          o[y * W + u] = gi[i] * s[i] + t[i];
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

// Shapes, dtypes and devices of every argument are checked by csrc/op_checks.h before these entry
// points run; what is particular to this backend is the dtypes it computes in.
void check_cpu_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "pa (cpu backend): float32, float64, bfloat16 or float16, got ", x.scalar_type());
}

// Channels-last inputs (and only those: a tensor that is both, C == 1 or H = W = 1, is NCHW) take the
// NHWC kernels of pa_cpu_nhwc.cpp and get channels-last results.
bool channels_last_only(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The NHWC kernels' weight and bias: (9, C) tap-major and (C), contiguous in T.
template <typename T>
std::pair<at::Tensor, at::Tensor> nhwc_params(const at::Tensor& x, const at::Tensor& weight,
                                              const c10::optional<at::Tensor>& bias) {
  const auto st = c10::CppTypeToScalarType<T>::value;
  const int64_t C = x.size(1);
  at::Tensor w9c = weight.to(st).reshape({C, 9}).t().contiguous();
  at::Tensor b = bias.has_value() ? bias->to(st).contiguous() : at::zeros({C}, x.options().dtype(st));
  return {w9c, b};
}

// S: x's element type; T: the one computed in (S, or float for bfloat16 / float16). Channels-last
// 16-bit maps are read and written in place (pa_fwd_nhwc widens a task's rows); NCHW ones are
// computed on a float32 copy: widening each plane into its bordered buffer instead was measured
// faster at 56 x 56 and 28 x 28 but slower at 14 x 14 and 7 x 7 (batch 16, scalar conversions per
// small plane), and the models run their CPU maps channels-last.
template <typename T, typename S = T>
at::Tensor pa_fwd_any(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  if (!channels_last_only(x)) {
    if constexpr (std::is_same_v<S, T>) return pa_fwd_impl<T>(x, weight, bias);
    else return pa_fwd_impl<T>(x.to(c10::CppTypeToScalarType<T>::value), weight, bias).to(x.scalar_type());
  }
  auto [w9c, b] = nhwc_params<T>(x, weight, bias);
  return pa_fwd_nhwc<T, S>(x, w9c, b);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> pa_bwd_any(const at::Tensor& dout, const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          const c10::optional<at::Tensor>& bias) {
  if (!channels_last_only(x)) return pa_bwd_impl<T>(dout, x, weight, bias);
  auto [w9c, b] = nhwc_params<T>(x, weight, bias);
  auto [dx, dw, db] = pa_bwd_nhwc<T>(dout, x, w9c, b);
  return {dx, dw.to(weight.scalar_type()), db.to(bias.has_value() ? bias->scalar_type() : weight.scalar_type())};
}

}  // namespace

at::Tensor pa_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_cpu_dtype(x);
  if (x.scalar_type() == at::kDouble) return pa_fwd_any<double>(x, weight, bias);
  // bfloat16 / float16: computed in float32, out rounded once at the end (see pa_fwd_any)
  if (x.scalar_type() == at::kBFloat16) return pa_fwd_any<float, at::BFloat16>(x, weight, bias);
  if (x.scalar_type() == at::kHalf) return pa_fwd_any<float, at::Half>(x, weight, bias);
  return pa_fwd_any<float>(x, weight, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pa_bwd_cpu(const at::Tensor& dout, const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          const c10::optional<at::Tensor>& bias) {
  check_cpu_dtype(x);
  if (x.scalar_type() == at::kDouble) return pa_bwd_any<double>(dout, x, weight, bias);
  if (x.scalar_type() != at::kFloat) {  // bfloat16 / float16: in float32, rounded once at the end
    auto r = pa_bwd_any<float>(dout.to(at::kFloat), x.to(at::kFloat), weight, bias);
    return {std::get<0>(r).to(x.scalar_type()), std::get<1>(r), std::get<2>(r)};
  }
  return pa_bwd_any<float>(dout, x, weight, bias);
}

}  // namespace rest_cpu
