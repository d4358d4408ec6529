// LayerNorm over the last dimension, with an optional residual added first, for the models'
// inference on the CPU (rest/norms.py decides when it runs): out = LN(x + residual), and the sum
// x + residual itself, which the block keeps as its residual stream.
//
// Why a kernel of our own: at ResT's token maps PyTorch's CPU LayerNorm is far from the memory
// bound, most of all in bfloat16. Measured 2026-12-05 (2-core AMD EPYC Zen 4, AVX-512, 2 threads,
// torch 2.14.1, median of 30): F.layer_norm on a (16, 3136, 64) bfloat16 map took 1.98 ms where a
// copy of the map took 0.105 ms (float32: 1.61 against 0.45), and the residual add before it another
// pass (0.39 ms). In a bfloat16 rest_lite at batch 16, LayerNorm and the adds were 8% of the time,
// where OpenVINO's fused normalisation of the same graph spends about half as long.
//
// The arithmetic is aten's: every value widened exactly to T (float32; float64 for float64 maps),
// the sum x + residual rounded once to the maps' dtype (what `x + residual` gives) and normalised from
// that rounded value, so the residual stream is the same bits as the unfused block's; the mean and
// the variance of the centred values (two passes over the row, held widened in a buffer: no
// E[x^2] - E[x]^2 cancellation), rstd = (var + eps)^-1/2, out = (s - mean) * rstd * w + b rounded once.
// Sums run over SIMD lanes then halve (simd.h), so a row's result depends on the vector width (the
// build) but not on the thread count: tasks are blocks of whole rows.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "simd.h"

namespace rest_cpu {
namespace {

// Rows normalised together: a row's two reductions and its rstd form a chain of dependent
// latencies (about 100 cycles at C = 64, more than the row's arithmetic), so a group of rows runs
// each step for all of its rows in one loop and their chains overlap. Measured on the Zen 4 EPYC,
// one thread, a (16, 3136, 64) bfloat16 map: 2.6 ms one row at a time, 1.5 ms four at a time.
constexpr int kRowGroup = 4;

// Sums over c of v[g][c] (G rows of n widened values, row stride n): vector accumulators per row,
// then the halving sum, then the tail, in that order for every row whatever G is.
template <int G, typename T>
inline void group_sums(const T* v, int64_t n, T* out) {
  constexpr int Wd = Simd<T>::W;
  vec_t<T> acc[G] = {};
  int64_t i = 0;
  for (; i + Wd <= n; i += Wd)
    for (int g = 0; g < G; ++g) acc[g] += vload<T>(v + g * n + i);
  for (int g = 0; g < G; ++g) {
    T s = hsum(acc[g]);
    for (int64_t j = i; j < n; ++j) s += v[g * n + j];
    out[g] = s;
  }
}

template <int G, typename T>
inline void group_centred_squares(const T* v, int64_t n, const T* mean, T* out) {
  constexpr int Wd = Simd<T>::W;
  vec_t<T> acc[G] = {}, m[G];
  for (int g = 0; g < G; ++g) m[g] = vset<T>(mean[g]);
  int64_t i = 0;
  for (; i + Wd <= n; i += Wd)
    for (int g = 0; g < G; ++g) {
      const vec_t<T> d = vload<T>(v + g * n + i) - m[g];
      acc[g] += d * d;
    }
  for (int g = 0; g < G; ++g) {
    T s = hsum(acc[g]);
    for (int64_t j = i; j < n; ++j) s += (v[g * n + j] - mean[g]) * (v[g * n + j] - mean[g]);
    out[g] = s;
  }
}

// Loads / stores of W values of the maps' type S as T vectors (simd.h: exact widening, c10's rounding).
template <typename T, typename S>
inline __attribute__((always_inline)) vec_t<T> load_row(const S* p) {
  if constexpr (std::is_same_v<T, S>) return vload<T>(p);
  else return load_widened<S>(p);  // T is float here
}
template <typename T, typename S>
inline __attribute__((always_inline)) void store_row(S* p, vec_t<T> v) {
  if constexpr (std::is_same_v<T, S>) vstore<T>(p, v);
  else store_narrowed<S>(p, v);
}

// v = the row widened to T; with a residual, sum = S(x + r) (one rounding) and v = that sum widened.
template <typename T, typename S>
inline void widen_row(const S* x, const S* r, S* sum, T* v, int64_t C) {
  constexpr int Wd = Simd<T>::W;
  int64_t c = 0;
  if (r != nullptr) {
    for (; c + Wd <= C; c += Wd) {
      store_row<T, S>(sum + c, load_row<T, S>(x + c) + load_row<T, S>(r + c));
      vstore<T>(v + c, load_row<T, S>(sum + c));  // the rounded sum, as the unfused block reads it
    }
    for (; c < C; ++c) {
      sum[c] = S(T(x[c]) + T(r[c]));
      v[c] = T(sum[c]);
    }
  } else {
    for (; c + Wd <= C; c += Wd) vstore<T>(v + c, load_row<T, S>(x + c));
    for (; c < C; ++c) v[c] = T(x[c]);
  }
}

// out = (v - mean) * rstd * w + b, rounded once to S.
template <typename T, typename S>
inline void normalise_row(const T* v, const T* w, const T* b, T mean, T rstd, S* out, int64_t C) {
  constexpr int Wd = Simd<T>::W;
  const vec_t<T> m = vset<T>(mean), s = vset<T>(rstd);
  int64_t c = 0;
  for (; c + Wd <= C; c += Wd)
    store_row<T, S>(out + c, (vload<T>(v + c) - m) * s * vload<T>(w + c) + vload<T>(b + c));
  for (; c < C; ++c) out[c] = S((v[c] - mean) * rstd * w[c] + b[c]);
}

// T: the arithmetic type; S: the maps' element type (T, or bfloat16 / float16 widened to T).
template <typename T, typename S>
void add_layer_norm_rows(const S* x, const S* r, const S* w, const S* b, S* out, S* sum, int64_t rows, int64_t C,
                         double eps) {
  // About 16K values per task (at least one row): enough work to amortise the task hand-out.
  const int64_t per_task = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, C));
  const int64_t tasks = (rows + per_task - 1) / per_task;
  std::vector<T> wt(C, T(1)), bt(C, T(0));  // the affine parameters widened once
  for (int64_t c = 0; c < C; ++c) {
    if (w != nullptr) wt[c] = T(w[c]);
    if (b != nullptr) bt[c] = T(b[c]);
  }
  const T eps_t = T(eps);
  const T* wp = wt.data();
  const T* bp = bt.data();
  parallel_tasks(tasks, [&] { return std::vector<T>(kRowGroup * C); }, [&](int64_t task, std::vector<T>& buf) {
    T* v = buf.data();
    const int64_t r0 = task * per_task, r1 = std::min(rows, r0 + per_task);
    // G rows at a time (the last group of a task may be shorter; a row's value does not depend on
    // its group: every step is per row).
    auto group = [&](auto G_, int64_t row) {
      constexpr int G = decltype(G_)::value;
      T mean[G], var[G];
      for (int g = 0; g < G; ++g) {
        const int64_t o = (row + g) * C;
        widen_row<T, S>(x + o, r != nullptr ? r + o : nullptr, sum != nullptr ? sum + o : nullptr, v + g * C, C);
      }
      group_sums<G>(v, C, mean);
      for (int g = 0; g < G; ++g) mean[g] /= T(C);  // a division: one rounding, not two
      group_centred_squares<G>(v, C, mean, var);
      for (int g = 0; g < G; ++g)
        normalise_row<T, S>(v + g * C, wp, bp, mean[g], T(1) / std::sqrt(var[g] / T(C) + eps_t), out + (row + g) * C, C);
    };
    int64_t row = r0;
    for (; row + kRowGroup <= r1; row += kRowGroup) group(std::integral_constant<int, kRowGroup>{}, row);
    for (; row < r1; ++row) group(std::integral_constant<int, 1>{}, row);
  });
}

template <typename T, typename S>
Tensors2 run(const at::Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
             double eps) {
  const int64_t C = x.size(-1), rows = C == 0 ? 0 : x.numel() / C;
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor sum = residual.has_value() ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  if (rows == 0) return {out, sum};
  add_layer_norm_rows<T, S>(x.data_ptr<S>(), residual.has_value() ? residual->data_ptr<S>() : nullptr,
                            weight.has_value() ? weight->data_ptr<S>() : nullptr,
                            bias.has_value() ? bias->data_ptr<S>() : nullptr, out.data_ptr<S>(),
                            residual.has_value() ? sum.data_ptr<S>() : nullptr, rows, C, eps);
  return {out, sum};
}

}  // namespace

// Arguments checked by csrc/op_checks.h (add_layer_norm_inputs): x, residual contiguous and of one dtype,
// weight and bias (C,) of that dtype.
Tensors2 add_layer_norm_cpu(const at::Tensor& x, const OptTensor& residual, const OptTensor& weight,
                            const OptTensor& bias, double eps) {
  switch (x.scalar_type()) {
    case at::kFloat: return run<float, float>(x, residual, weight, bias, eps);
    case at::kDouble: return run<double, double>(x, residual, weight, bias, eps);
    case at::kBFloat16: return run<float, at::BFloat16>(x, residual, weight, bias, eps);
    case at::kHalf: return run<float, at::Half>(x, residual, weight, bias, eps);
    default: TORCH_CHECK_VALUE(false, "add_layer_norm: x must be float32, float64, bfloat16 or float16, got ",
                               x.scalar_type());
  }
}

}  // namespace rest_cpu
