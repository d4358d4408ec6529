// Argument checks of the compiled ops, shared by every backend's registration (cpu, cuda, cuda-emu):
// the one check layer of the raw ops; below it the kernels hold internal asserts only.
//
// The Python layer validates the public API before any backend is chosen, but the raw ops
// (torch.ops.rest_kernels_C.*) are callable directly: each one checks ranks, shapes, dtypes and
// devices here, raising a Python exception (RuntimeError / ValueError) instead of reading out of
// bounds. Found by tests/fuzz/raw_ops_fuzz.py. Kernels are registered through the checked_* wrappers.
#pragma once
#include <cmath>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/kernels.h"

namespace rest_checks {

inline void same_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref.device(), " like q/x, got ",
                    t.device());
}

inline void floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined() && at::isFloatingType(t.scalar_type()), op, ": ", name,
                    " must be a floating tensor");
}

inline void shape_is(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

// The statistics' dtype (rest_kernels/backends/stats.py): float32, float64 for float64 inputs.
inline at::ScalarType stat_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void stats_tensor(const at::Tensor& q, const at::Tensor& t, at::IntArrayRef expected, const char* op,
                         const char* name) {
  shape_is(t, expected, op, name);
  TORCH_CHECK_VALUE(t.scalar_type() == stat_dtype(q), op, ": ", name, " must be ",
                    stat_dtype(q) == at::kDouble ? "float64" : "float32", ", got ", t.scalar_type());
  same_device(q, t, op, name);
}

inline void emsa_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const c10::optional<at::Tensor>& mix_weight, double scale, double eps, const char* op) {
  for (auto [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    floating(*t, op, name);
    TORCH_CHECK_VALUE(t->dim() == 4, op, ": ", name, " must be 4-dimensional (B, h, tokens, d), got ", t->sizes());
    TORCH_CHECK_VALUE(t->scalar_type() == q.scalar_type(), op, ": q, k and v must share one dtype");
    same_device(q, *t, op, name);
  }
  const auto B = q.size(0), h = q.size(1), N = q.size(2), d = q.size(3), M = k.size(2);
  shape_is(k, {B, h, M, d}, op, "k");
  shape_is(v, {B, h, M, d}, op, "v");
  TORCH_CHECK_VALUE(M >= 1 || B * h * N == 0, op, ": k and v need at least one key token");
  if (mix_weight.has_value()) {
    floating(*mix_weight, op, "mix_weight");
    shape_is(*mix_weight, {h, h}, op, "mix_weight");
    same_device(q, *mix_weight, op, "mix_weight");
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0");
}

inline void emsa_backward_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& mix_weight, const at::Tensor& out,
                                 const at::Tensor& lse, const at::Tensor& rsq, const at::Tensor& rstd, double scale,
                                 double eps) {
  const char* op = "emsa_bwd";
  emsa_inputs(q, k, v, mix_weight, scale, eps, op);
  for (auto [t, name] : {std::pair{&dout, "dout"}, {&out, "out"}}) {
    floating(*t, op, name);
    shape_is(*t, q.sizes(), op, name);
    TORCH_CHECK_VALUE(t->scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype");
    same_device(q, *t, op, name);
  }
  const auto B = q.size(0), h = q.size(1), N = q.size(2);
  // rsq and rstd belong to the InstanceNorm: empty without the mix (rest_kernels/backends/stats.py)
  const bool mix = mix_weight.has_value();
  stats_tensor(q, lse, {B, h, N}, op, "lse");
  if (mix) {
    stats_tensor(q, rsq, {B, h, N}, op, "rsq");
    stats_tensor(q, rstd, {B, h}, op, "rstd");
  } else {  // empty; the (B,h,N) / (B,h) tensors of the contract before stats.py are accepted, unread
    const std::vector<int64_t> rows = rsq.dim() == 3 ? std::vector<int64_t>{B, h, N} : std::vector<int64_t>{0};
    const std::vector<int64_t> heads = rstd.dim() == 2 ? std::vector<int64_t>{B, h} : std::vector<int64_t>{0};
    stats_tensor(q, rsq, rows, op, "rsq");
    stats_tensor(q, rstd, heads, op, "rstd");
  }
}

inline void pa_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                      const char* op) {
  floating(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-dimensional (B, C, H, W), got ", x.sizes());
  const auto C = x.size(1);
  floating(weight, op, "weight");
  shape_is(weight, {C, 1, 3, 3}, op, "weight");
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype");
  same_device(x, weight, op, "weight");
  if (bias.has_value()) {
    floating(*bias, op, "bias");
    shape_is(*bias, {C}, op, "bias");
    TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype");
    same_device(x, *bias, op, "bias");
  }
}

using T4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using T3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Opt = c10::optional<at::Tensor>;

// Empty problems (B, h, N or d is 0) are answered here for every compiled backend, so no kernel
// sees a zero-sized grid or buffer; the same answers as rest_kernels/backends/stats.py:empty_stats
// (tests/test_stats_contract.py compares them). With d = 0 every logit is 0: uniform attention, so
// lse (the log-mean-exp) = 0, rsq = 0 and rstd = eps^-1/2 exactly.
inline bool emsa_is_empty(const at::Tensor& q) { return q.numel() == 0; }

inline T4 empty_emsa_fwd(const at::Tensor& q, bool mix, double eps) {
  const auto B = q.size(0), h = q.size(1), N = q.size(2), d = q.size(3);
  const auto st = q.options().dtype(stat_dtype(q));
  at::Tensor out = at::empty({B, N, h, d}, q.options()).transpose(1, 2);
  at::Tensor lse = at::zeros({B, h, N}, st);  // log-mean-exp of a row of zeros
  if (!mix) return {out, lse, at::empty({0}, st), at::empty({0}, st)};
  const double rstd = eps > 0 ? 1.0 / std::sqrt(eps) : INFINITY;
  return {out, lse, at::zeros({B, h, N}, st), at::full({B, h}, rstd, st)};
}

inline T4 empty_emsa_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool mix) {
  at::Tensor dmix = mix ? at::zeros({q.size(1), q.size(1)}, q.options().dtype(stat_dtype(q)))
                        : at::empty({0}, q.options().dtype(at::kFloat));
  return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()), at::zeros(v.sizes(), v.options()),
          dmix};
}

template <T4 (*Kernel)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&, double, double)>
T4 checked_emsa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Opt& w, double scale,
                    double eps) {
  emsa_inputs(q, k, v, w, scale, eps, "emsa_fwd");
  if (emsa_is_empty(q)) return empty_emsa_fwd(q, w.has_value(), eps);
  return Kernel(q, k, v, w, scale, eps);
}

template <T4 (*Kernel)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&,
                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double)>
T4 checked_emsa_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const Opt& w, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rsq,
                    const at::Tensor& rstd, double scale, double eps) {
  emsa_backward_inputs(dout, q, k, v, w, out, lse, rsq, rstd, scale, eps);
  if (emsa_is_empty(q)) return empty_emsa_bwd(q, k, v, w.has_value());
  return Kernel(dout, q, k, v, w, out, lse, rsq, rstd, scale, eps);
}

template <at::Tensor (*Kernel)(const at::Tensor&, const at::Tensor&, const Opt&)>
at::Tensor checked_pa_fwd(const at::Tensor& x, const at::Tensor& weight, const Opt& bias) {
  pa_inputs(x, weight, bias, "pa_fwd");
  return Kernel(x, weight, bias);
}

template <T3 (*Kernel)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const Opt&)>
T3 checked_pa_bwd(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight, const Opt& bias) {
  pa_inputs(x, weight, bias, "pa_bwd");
  floating(dout, "pa_bwd", "dout");
  shape_is(dout, x.sizes(), "pa_bwd", "dout");
  TORCH_CHECK_VALUE(dout.scalar_type() == x.scalar_type(), "pa_bwd: dout must have x's dtype");
  same_device(x, dout, "pa_bwd", "dout");
  return Kernel(dout, x, weight, bias);
}

// add_layer_norm (csrc/cpu/layer_norm_cpu.cpp): x of rank >= 1 normalised over its last dimension C;
// residual, when given, x's shape and dtype; weight and bias (C,) of x's dtype; eps finite and >= 0.
// Any strides: the kernel gets contiguous tensors (a copy only where one is not).
inline void add_layer_norm_inputs(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                  const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                                  double eps) {
  const char* op = "add_layer_norm";
  floating(x, op, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension (the normalised one)");
  const auto C = x.size(-1);
  if (residual.has_value()) {
    shape_is(*residual, x.sizes(), op, "residual");
    TORCH_CHECK_VALUE(residual->scalar_type() == x.scalar_type(), op, ": residual must have x's dtype ",
                      x.scalar_type(), ", got ", residual->scalar_type());
    same_device(x, *residual, op, "residual");
  }
  for (auto [t, name] : {std::pair{&weight, "weight"}, {&bias, "bias"}}) {
    if (!t->has_value()) continue;
    shape_is(**t, {C}, op, name);
    TORCH_CHECK_VALUE((*t)->scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
                      x.scalar_type(), ", got ", (*t)->scalar_type());
    same_device(x, **t, op, name);
  }
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
}

inline c10::optional<at::Tensor> contiguous(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? c10::optional<at::Tensor>(t->contiguous()) : c10::nullopt;
}

template <std::tuple<at::Tensor, at::Tensor> (*Kernel)(const at::Tensor&, const Opt&, const Opt&, const Opt&, double)>
std::tuple<at::Tensor, at::Tensor> checked_add_layer_norm(const at::Tensor& x, const Opt& residual, const Opt& weight,
                                                          const Opt& bias, double eps) {
  add_layer_norm_inputs(x, residual, weight, bias, eps);
  return Kernel(x.contiguous(), contiguous(residual), contiguous(weight), contiguous(bias), eps);
}

// pack_linear_weight / packed_linear (csrc/cpu/packed_linear.cpp): float32 only (the models' other
// dtypes stay on oneDNN / F.linear). weight (N, K); packed (ceil(N / 16), K, 16) as pack_linear_weight
// makes it; x (..., K); bias (out_features,); out_features within the packed panels' columns.
using rest_cpu::kPackedLinearPanel;  // csrc/cpu/kernels.h: the panel width is the kernels' decision

inline void float32_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined() && t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                    t.defined() ? c10::toString(t.scalar_type()) : "an undefined tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
}

template <at::Tensor (*Kernel)(const at::Tensor&)>
at::Tensor checked_pack_linear_weight(const at::Tensor& weight) {
  const char* op = "pack_linear_weight";
  float32_cpu(weight, op, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-dimensional (out_features, in_features), got ",
                    weight.sizes());
  return Kernel(weight.contiguous());
}

template <at::Tensor (*Kernel)(const at::Tensor&, const at::Tensor&, const Opt&, int64_t, bool)>
at::Tensor checked_packed_linear(const at::Tensor& x, const at::Tensor& packed, const Opt& bias,
                                 int64_t out_features, bool gelu) {
  const char* op = "packed_linear";
  float32_cpu(x, op, "x");
  float32_cpu(packed, op, "packed_weight");
  TORCH_CHECK_VALUE(packed.dim() == 3 && packed.size(2) == kPackedLinearPanel, op,
                    ": packed_weight must be (panels, in_features, ", kPackedLinearPanel,
                    ") as pack_linear_weight makes it, got ", packed.sizes());
  const auto P = packed.size(0), K = packed.size(1);
  TORCH_CHECK_VALUE(out_features > (P - 1) * kPackedLinearPanel && out_features <= P * kPackedLinearPanel, op,
                    ": out_features must be in (", (P - 1) * kPackedLinearPanel, ", ", P * kPackedLinearPanel,
                    "] for ", P, " panels, got ", out_features);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, op, ": x must be (..., ", K,
                    ") for packed_weight's in_features, got ", x.sizes());
  if (bias.has_value()) {
    float32_cpu(*bias, op, "bias");
    shape_is(*bias, {out_features}, op, "bias");
  }
  return Kernel(x.contiguous(), packed.contiguous(), contiguous(bias), out_features, gelu);
}

// depthwise_conv2d (csrc/cpu/depthwise_conv.cpp): float32 only, like packed_linear. x (B, C, H, W) in
// any layout; taps (kh * kw, C); stride >= 1; padding >= 0; the padded input at least one kernel
// window in each dimension.
inline void conv_geometry(const at::Tensor& x, int64_t kh, int64_t kw, at::IntArrayRef stride,
                          at::IntArrayRef padding, const char* op) {
  TORCH_CHECK_VALUE(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, op,
                    ": stride must be two integers >= 1, got ", stride);
  TORCH_CHECK_VALUE(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, op,
                    ": padding must be two integers >= 0, got ", padding);
  TORCH_CHECK_VALUE(x.size(2) + 2 * padding[0] >= kh && x.size(3) + 2 * padding[1] >= kw, op,
                    ": x's padded size (", x.size(2) + 2 * padding[0], ", ", x.size(3) + 2 * padding[1],
                    ") must be at least the kernel's (", kh, ", ", kw, ")");
}

template <at::Tensor (*Kernel)(const at::Tensor&, const at::Tensor&, const Opt&, at::IntArrayRef, at::IntArrayRef,
                               at::IntArrayRef)>
at::Tensor checked_depthwise_conv2d(const at::Tensor& x, const at::Tensor& taps, const Opt& bias,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  const char* op = "depthwise_conv2d";
  float32_cpu(x, op, "x");
  float32_cpu(taps, op, "taps");
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be (batch, channels, height, width), got ", x.sizes());
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && kernel_size[0] >= 1 && kernel_size[1] >= 1, op,
                    ": kernel_size must be two integers >= 1, got ", kernel_size);
  shape_is(taps, {kernel_size[0] * kernel_size[1], x.size(1)}, op, "taps");
  conv_geometry(x, kernel_size[0], kernel_size[1], stride, padding, op);
  if (bias.has_value()) {
    float32_cpu(*bias, op, "bias");
    shape_is(*bias, {x.size(1)}, op, "bias");
  }
  return Kernel(x, taps.contiguous(), contiguous(bias), kernel_size, stride, padding);
}

}  // namespace rest_checks
