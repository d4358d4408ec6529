// EMSA forward and backward for CPU tensors: the `cpu` backend (ops rest_kernels_C::emsa_fwd / emsa_bwd,
// CPU dispatch key, which run these kernels through csrc/cpu_dispatch.cpp; built once per instruction
// set, see kernels.h). Contract: rest_kernels/backends/base.py; math: docs/emsa_math.md.
//
// Design
// ------
// Grid. Work is split into tasks of one batch b and one block of BN query rows (BN a multiple of the
// 6-row GEMM micro-tile, chosen from the shapes alone so that the per-task buffers, BN x M x h values
// a few times over, stay in L2). The threads of at::parallel_for take tasks from an atomic counter
// (parallel.h), so a thread slowed down by another process does not hold the others up. The light
// passes (packing k and v, per-(b, g) sums, the normalisation scale, the chunk reduction) run inline
// unless they are large, so a call has a single thread rendezvous in the common case.
// All products are one register-blocked tile GEMM (tile_gemm.h: 6 rows x 4 vectors of 16 floats with
// AVX-512, 6 rows x 2 vectors of 8 floats with AVX2; the bfloat16 forward of the avx512bf16 build:
// bf16_dot_gemm.h, forward_bf16_dot); softmax uses a vectorised exp (simd.h).
//
// Forward task: packs the block's q rows of every head, computes all heads' logits
// L_j = q_j (scale k_j)^T (BN x M each) with the register-blocked tile GEMM, mixes them across heads
// (S_g = sum_j W[g,j] L_j), takes each row's softmax (max, exp, sum: lse), subtracts the InstanceNorm
// mean, which is exactly 1/M because every row of P sums to one, accumulates the row's centred sum of
// squares c_i = sum_m (P_im - 1/M)^2 in the same pass, and multiplies (P - 1/M) by v. Without the mix it is plain softmax
// attention (P v). K^T * scale and V are packed once per call, zero padded to the vector width,
// from any strides of k and v (q is read through its strides while packing a block).
//
// Normalisation is exact: InstanceNorm over the (b, g) map is (P - mean) * rstd with mean = 1/M
// (rows sum to one) and var = sum_i c_i / (N M) (biased variance of a map whose mean is known), so
// out = rstd * ((P - 1/M) v). The tasks leave (P - 1/M) v in `out` and c_i per row; a per-(b, g)
// serial sum of c_i gives rstd, and one light pass scales each (b, g) slice of `out`. Saved for the
// backward (rest_kernels/backends/stats.py): lse, rc_i = c_i and rstd, in T (float64 for float64).
//
// Backward (per task: b and a fixed chunk of query blocks) recomputes L and S of each block like the
// forward and P = exp(S - lse) from the saved lse (no max or sum pass), then per output head g:
// Y = (P - 1/M) rstd, dv_g += Y^T dO_g, dP = rstd (dO_g v_g^T - a_g - Y c_g) with the per-(b, g) scalars
// a_g = mean(dO v^T), c_g = mean(dO v^T * Y) computed beforehand from sums over rows, D_i = sum_m P dP,
// dS = P (dP - D_i); then dW[g,j] += sum dS_g L_j, dL_j = sum_g W[g,j] dS_g, dq_j = dL_j (scale k_j),
// dk_j += dL_j^T q_j * scale. Nothing of size N x M exists outside the per-thread block buffers.
// The saved rsq is not needed here: D_i = sum_m P dP is summed from the block's full rows.
//
// Determinism. Every value is computed in an order fixed by the shapes alone: each row's sums run
// over keys in increasing order with fixed vector lanes; the GEMM sums over k in increasing order;
// the sums over query rows (c_i -> rstd, a_g, c_g) are serial per (b, g); dk, dv and dW, which sum
// over query blocks, are accumulated per (b, chunk) where the chunks are a partition of the blocks
// fixed by the shapes (not by the thread count: min(blocks, ceil(32 / B)) chunks per batch) and then
// added chunk after chunk. No atomic accumulation (the only atomic hands out task indices) and no
// per-thread accumulators: outputs and gradients are bitwise identical for any number of threads.
//
// Dtypes: float32 and float64 natively; bfloat16 / float16 inputs are computed in float32 and
// rounded once at the end: the forward reads them in place (widened as loaded), the backward works
// on float32 copies. Except the bfloat16 forward of the build with AVX512-BF16 (REST_CPU_HAS_BF16_DOT,
// the "avx512bf16" build): its products run on bfloat16 operands, forward_bf16_dot below.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "bf16_dot_gemm.h"
#include "simd.h"
#include "tile_gemm.h"

namespace rest_cpu {
namespace {

constexpr int64_t kFwdBufferBytes = 384 * 1024;
constexpr int64_t kBwdBufferBytes = 640 * 1024;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Grain (items per thread) for the light, memory-bound passes (packing, sums, the normalisation):
// they run inline unless each thread gets at least ~1M elements. Every parallel region costs a
// rendezvous of all threads, which on a shared machine can wait a whole scheduler slice for a
// descheduled thread; the light passes are not worth that.
inline int64_t light_grain(int64_t elements_per_item) {
  return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(elements_per_item, 1));
}

// Rows per block: a multiple of the micro-tile height such that the block buffers take about
// `budget` bytes; depends on shapes only.
inline int64_t block_rows(int64_t bytes_per_row, int64_t budget, int64_t N) {
  int64_t bn = budget / std::max<int64_t>(bytes_per_row, 1);
  bn = std::clamp<int64_t>(bn / GEMM_MR * GEMM_MR, GEMM_MR, 96);
  return std::min(bn, round_up(N, GEMM_MR));
}

// Rows per block of the forward: block_rows, made smaller where that gives fewer than
// kMinForwardTasks tasks (batch x blocks), down to one micro-tile: at batch 1 a small stage (49
// query rows at rest_lite's stage 4, 196 at stage 3) was one or three tasks for two threads. Each
// row's results depend on that row alone (the products sum over k in a fixed order whatever the
// block, tile_gemm.h), so the block size changes no result; it depends on the shapes only.
constexpr int64_t kMinForwardTasks = 8;

inline int64_t forward_block_rows(int64_t bytes_per_row, int64_t B, int64_t N) {
  const int64_t bn = block_rows(bytes_per_row, kFwdBufferBytes, N);
  const int64_t blocks = (kMinForwardTasks + B - 1) / B;  // per batch element
  if (blocks <= 1) return bn;
  return std::min(bn, std::max<int64_t>(GEMM_MR, round_up((N + blocks - 1) / blocks, GEMM_MR)));
}

// A 4-d tensor read through its strides.
template <typename T>
struct View4 {
  const T* p;
  int64_t s0, s1, s2, s3;
  explicit View4(const at::Tensor& t)
      : p(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  const T* row(int64_t b, int64_t j, int64_t i) const { return p + b * s0 + j * s1 + i * s2; }
};

// dst[(b*h + j)][c][m] = scale * src[b, j, m, c], zero padded to Mp columns (the transposed pack).
// S: the source's element type (T, or bfloat16 / float16 read and widened to T on the way).
template <typename T, typename S = T>
void pack_transposed(const at::Tensor& src, T scale, int64_t Mp, T* dst) {
  const int64_t B = src.size(0), h = src.size(1), M = src.size(2), d = src.size(3);
  View4<S> s(src);
  at::parallel_for(0, B * h, light_grain(M * d), [&](int64_t lo, int64_t hi) {
    for (int64_t bj = lo; bj < hi; ++bj) {
      const int64_t b = bj / h, j = bj % h;
      T* o = dst + bj * d * Mp;
      for (int64_t c = 0; c < d; ++c) std::fill(o + c * Mp + M, o + (c + 1) * Mp, T(0));
      for (int64_t m = 0; m < M; ++m) {
        const S* r = s.row(b, j, m);
        for (int64_t c = 0; c < d; ++c) o[c * Mp + m] = T(r[c * s.s3]) * scale;
      }
    }
  });
}

// dst[(b*h + j)][m][c] = scale * src[b, j, m, c], zero padded to dp columns (the row-major pack).
template <typename T, typename S = T>
void pack_rows(const at::Tensor& src, T scale, int64_t dp, T* dst) {
  const int64_t B = src.size(0), h = src.size(1), M = src.size(2), d = src.size(3);
  View4<S> s(src);
  at::parallel_for(0, B * h, light_grain(M * d), [&](int64_t lo, int64_t hi) {
    for (int64_t bj = lo; bj < hi; ++bj) {
      const int64_t b = bj / h, j = bj % h;
      T* o = dst + bj * M * dp;
      for (int64_t m = 0; m < M; ++m) {
        const S* r = s.row(b, j, m);
        for (int64_t c = 0; c < d; ++c) o[m * dp + c] = T(r[c * s.s3]) * scale;
        std::fill(o + m * dp + d, o + (m + 1) * dp, T(0));
      }
    }
  });
}

// Copy rows i0..i0+nr of head j of a strided (B,h,N,d) tensor into a dense (nr x dp) block; the
// padding columns of the block are zero from its allocation and never written.
// S: the source's element type (widened to T on the way, as the packs).
template <typename T, typename S>
inline void load_block(const View4<S>& s, int64_t b, int64_t j, int64_t i0, int64_t nr, int64_t d, T* dst,
                       int64_t dp) {
  for (int64_t r = 0; r < nr; ++r) {
    const S* src = s.row(b, j, i0 + r);
    T* o = dst + r * dp;
    if (s.s3 == 1)
      for (int64_t c = 0; c < d; ++c) o[c] = T(src[c]);
    else
      for (int64_t c = 0; c < d; ++c) o[c] = T(src[c * s.s3]);
  }
}

// S_g = sum_j W[g, j] L_j over the block (all nr x Mp entries; Mp is a multiple of the vector width).
template <typename T>
void mix_heads(const T* W, int64_t h, const T* L, T* S, int64_t plane, int64_t n) {
  constexpr int Wd = Simd<T>::W;
  for (int64_t g = 0; g < h; ++g) {
    T* s = S + g * plane;
    for (int64_t x = 0; x < n; x += Wd) {
      vec_t<T> acc = vload(L + x) * W[g * h + 0];
      for (int64_t j = 1; j < h; ++j) acc += vload(L + j * plane + x) * W[g * h + j];
      vstore(s + x, acc);
    }
  }
}

// Softmax of one row of M logits times `scale`, over whole vectors: the row buffer is padded to a
// multiple of the vector width and the last vector is masked (padding lanes become P = 0), so there is
// no scalar tail. Writes P - shift to `out` (the row itself, or a row of another element type, such as
// the bfloat16 operand of P v, rounded as it is written; the row then holds exp(scale x - max)). Returns
// (max of the scaled logits, sum of exp) and, when `rsq` is non-null, the centred sum
// sum_m (P - shift)^2; `shift` is 1/M under InstanceNorm, else 0. Centred because sum_m P^2 is 1/M plus
// the part the variance needs: for near-uniform rows that part is far below 1/M and float32 would keep
// only its leading digits (found by tests/test_reliability.py). scale = 1 leaves every value as it is.
template <typename T, typename Out = T>
inline void softmax_row(T* row, int64_t M, T scale, T shift, Out* out, T* mx_out, T* sum_out, T* rsq) {
  constexpr int Wd = Simd<T>::W;
  const int64_t last = (M - 1) / Wd * Wd;  // start of the last (possibly partial) vector
  const auto keep = lanes_below<T>(M - last);
  const vec_t<T> ninf = vset<T>(-std::numeric_limits<T>::infinity());
  vec_t<T> vm = ninf;
  for (int64_t m = 0; m < last; m += Wd) vm = vmax<T>(vm, vload(row + m) * scale);
  vm = vmax<T>(vm, keep ? vload(row + last) * scale : ninf);
  const T mx = hmax(vm);
  vec_t<T> vs = vset<T>(T(0));
  for (int64_t m = 0; m < last; m += Wd) {
    vec_t<T> e = vexp(vload(row + m) * scale - mx);
    vstore(row + m, e);
    vs += e;
  }
  {
    vec_t<T> e = keep ? vexp(vload(row + last) * scale - mx) : vset<T>(T(0));
    vstore(row + last, e);
    vs += e;
  }
  const T sum = hsum(vs);
  const T inv = T(1) / sum;
  auto write = [&](int64_t m, vec_t<T> c) {
    if constexpr (std::is_same_v<Out, T>)
      vstore(out + m, c);
    else
      store_narrowed<Out>(out + m, c);
  };
  vec_t<T> vq = vset<T>(T(0));
  for (int64_t m = 0; m < last; m += Wd) {
    vec_t<T> c = vload(row + m) * inv - shift;
    vq += c * c;
    write(m, c);
  }
  {
    vec_t<T> c = keep ? vload(row + last) * inv - shift : vset<T>(T(0));  // padding lanes add nothing
    vq += c * c;
    write(last, c);
  }
  *mx_out = mx;
  *sum_out = sum;
  if (rsq) *rsq = hsum(vq);
}

// P = exp(S - lse) / M of one row in place (the backward; lse, the log-mean-exp, saved by the
// forward); padding lanes 0.
// One key: P = 1 exactly, whatever the logit. Recomputing it from lse would give exp(S - lse) with
// S rounded differently from the forward's wherever the forward formed its logits otherwise (the
// bfloat16-product forward of the avx512bf16 build), 1 +- a few ulps, and gradients that are exactly
// zero with one key (dq, dk) would pick up that difference times rstd (1/sqrt(eps) for a one-key map).
template <typename T>
inline void probs_from_lse(T* row, int64_t M, T lse) {
  constexpr int Wd = Simd<T>::W;
  if (M == 1) {
    vstore(row, vset<T>(T(0)));
    row[0] = T(1);
    return;
  }
  const int64_t last = (M - 1) / Wd * Wd;
  const auto keep = lanes_below<T>(M - last);
  const vec_t<T> vl = vset<T>(lse);
  const T inv = T(1) / T(M);
  for (int64_t m = 0; m < last; m += Wd) vstore(row + m, vexp(vload(row + m) - vl) * inv);
  vstore(row + last, keep ? vexp(vload(row + last) - vl) * inv : vset<T>(T(0)));
}

// mix weight as a dense h x h array of T (float32 or float64 input).
template <typename T>
std::vector<T> mix_as(const c10::optional<at::Tensor>& w, int64_t h) {
  std::vector<T> out;
  if (!w.has_value()) return out;
  at::Tensor wd = w->to(at::kDouble).contiguous().reshape({h, h});
  const double* p = wd.data_ptr<double>();
  out.assign(h * h, T(0));
  for (int64_t x = 0; x < h * h; ++x) out[x] = T(p[x]);
  return out;
}

struct Shapes {
  int64_t B, h, N, M, d, Mp, dp;
};

inline Shapes shapes_of(const at::Tensor& q, const at::Tensor& k, int W) {
  Shapes s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), 0, 0};
  s.Mp = round_up(std::max<int64_t>(s.M, 1), W);
  s.dp = round_up(std::max<int64_t>(s.d, 1), W);
  return s;
}

// The forward pass over all tasks.
// float64 backward to get rstd in float64). rsq (B,h,N) receives c_i (with the mix).
// S: the element type of q (T, or bfloat16 / float16: widened to T as it is loaded); O: out's (S, or
// T where a later pass still scales out, the mix's rstd; rounded once as it is written); everything
// between is T.
template <typename T, typename S = T, typename O = S>
void forward_tasks(const Shapes& sh, const at::Tensor& q, const T* kt, const T* vp, const std::vector<T>& W,
                   O* out, T* lse, T* rsq) {
  const int64_t B = sh.B, h = sh.h, N = sh.N, M = sh.M, d = sh.d, Mp = sh.Mp, dp = sh.dp;
  const bool mix = !W.empty();
  const int64_t row_bytes = (int64_t)sizeof(T) * ((mix ? 2 : 1) * h * Mp + h * dp + dp);
  const int64_t BN = forward_block_rows(row_bytes, B, N);
  const int64_t nblk = (N + BN - 1) / BN;
  const T shift = mix ? T(1) / T(M) : T(0);
  View4<S> qv(q);
  const int64_t plane = BN * Mp;
  struct Buffers {
    std::vector<T> Qb, Lb, Sb, Ob;
  };
  auto make = [&] {
    return Buffers{std::vector<T>(h * BN * dp, T(0)), std::vector<T>(h * plane, T(0)),
                   std::vector<T>(mix ? h * plane : 0, T(0)), std::vector<T>(BN * dp)};
  };
  parallel_tasks(B * nblk, make, [&](int64_t task, Buffers& buf) {
    auto& Qb = buf.Qb;
    auto& Lb = buf.Lb;
    auto& Ob = buf.Ob;
    T* P = mix ? buf.Sb.data() : Lb.data();
    {
      const int64_t b = task / nblk, i0 = (task % nblk) * BN, nr = std::min(BN, N - i0);
      for (int64_t j = 0; j < h; ++j) {
        load_block(qv, b, j, i0, nr, d, Qb.data() + j * BN * dp, dp);
        tile_gemm<T>(nr, Mp, d, Qb.data() + j * BN * dp, dp, 1, kt + (b * h + j) * d * Mp, Mp,
                     Lb.data() + j * plane, Mp, false);
      }
      if (mix) mix_heads<T>(W.data(), h, Lb.data(), buf.Sb.data(), plane, nr * Mp);
      for (int64_t g = 0; g < h; ++g) {
        for (int64_t r = 0; r < nr; ++r) {
          T mx, sum, q2;
          T* prow = P + g * plane + r * Mp;
          softmax_row<T>(prow, M, T(1), shift, prow, &mx, &sum, &q2);
          const int64_t row = (b * h + g) * N + i0 + r;
          // log-mean-exp (rest_kernels/backends/stats.py), formed in double: sum / M is near 1 for
          // near-uniform rows, where a log-sum-exp would round at the size of log M
          lse[row] = T(double(mx) + std::log(double(sum) / double(M)));
          if (rsq) rsq[row] = q2;
        }
        tile_gemm<T>(nr, dp, M, P + g * plane, Mp, 1, vp + (b * h + g) * M * dp, dp, Ob.data(), dp, false);
        for (int64_t r = 0; r < nr; ++r) {  // out is (B, N, h, d) in memory
          O* dst = out + ((b * N + i0 + r) * h + g) * d;
          for (int64_t c = 0; c < d; ++c) dst[c] = O(Ob[r * dp + c]);
        }
      }
    }
  });
}

#if defined(REST_CPU_HAS_BF16_DOT)
// lse (the log-mean-exp, rest_kernels/backends/stats.py) of n rows from their max and mean exp, a vector
// of rows at a time; mean is in (1/M, 1], so its log is formed without cancellation. The buffers are
// padded to whole vectors (padding mean 1: log 0).
inline void lse_rows(int64_t n, const float* mx, const float* mean, float* lse) {
  constexpr int Wd = Simd<float>::W;
  for (int64_t r = 0; r < n; r += Wd) {
    float t[Wd];
    vstore(t, vload(mx + r) + vlog(vload(mean + r)));
    std::copy(t, t + std::min<int64_t>(Wd, n - r), lse + r);
  }
}

// The bfloat16 forward on VDPBF16PS (bf16_dot_gemm.h): both products on bfloat16 operands, twice
// the multiply-adds per instruction of the float32 path (rest_lite's stage-1 attention at batch 16:
// 3.4 against 4.9 ms per call).
//   L_j = q_j k_j^T from the bfloat16 inputs as they are (exact products, float32 sums), scaled in
//   float32 (with the mix, the scale is folded into the mix weights, S_g = sum_j (W[g,j] scale) L_j);
//   softmax in float32 (lse by lse_rows);
//   the left operand of the second product rounded to bfloat16: the one rounding the float32 path
//   does not have, a relative 2^-9 per element, which sums in the product to about the rounding of
//   out itself. Without the mix that operand is P, rounded as PyTorch's own bfloat16 attention rounds
//   its softmax output. With the mix it is the centred map P - 1/M (the InstanceNorm mean is exactly
//   1/M): InstanceNorm scales it by rstd, so an error relative to the centred values is the same
//   relative error after normalisation. Rounding P itself there would not be: for near-uniform maps
//   P - 1/M is far below 1/M, and an error of 2^-9 P, divided by the map's standard deviation, was
//   up to 316 times the normalised values' rounding.
// Operands: q rows copied as they are (pairs along d), k and v packed pair-interleaved once per call.
// O: out's element type (bfloat16 without the mix; float32 with it, scaled by rstd afterwards, as
// forward_tasks). rsq: c_i per row with the mix (as forward_tasks), else null.
template <typename O>
void forward_bf16_dot(const Shapes& sh, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const std::vector<float>& W, float scale, O* out, float* lse, float* rsq) {
  using BF = c10::BFloat16;
  const int64_t B = sh.B, h = sh.h, N = sh.N, M = sh.M, d = sh.d, Mp = sh.Mp, dp = sh.dp;
  const int64_t d2 = (d + 1) / 2, M2 = (M + 1) / 2;
  const bool mix = !W.empty();
  const BF zero(0.0f);
  std::vector<float> Ws(W);
  for (float& w : Ws) w *= scale;
  // kp[bj][c2][m][t] = k[b, j, m, 2 c2 + t] (the B operand of q k^T, Mp columns);
  // vp[bj][m2][c][t] = v[b, j, 2 m2 + t, c] (the B operand of P v, dp columns); zero padded.
  // at::zeros: a memset (a vector of c10::BFloat16 filled with a value is stored element by element,
  // which took longer than the packing itself)
  at::Tensor kp_t = at::zeros({B * h * d2 * Mp * 2}, q.options()), vp_t = at::zeros({B * h * M2 * dp * 2}, q.options());
  BF* const kpp = kp_t.data_ptr<BF>();
  BF* const vpp = vp_t.data_ptr<BF>();
  View4<BF> kv(k), vv(v), qv(q);
  // A pair of bfloat16 is moved as one 32-bit word: kp is the transpose of k's rows read as d2 pairs,
  // vp interleaves two rows of v. Rows with unit stride and an even d are read as words directly
  // (the case of every model: these packs are as large as q at stage 4, where N = M).
  const bool k_words = kv.s3 == 1 && d % 2 == 0, v_rows = vv.s3 == 1;
  at::parallel_for(0, B * h, light_grain(M * d), [&](int64_t lo, int64_t hi) {
    for (int64_t bj = lo; bj < hi; ++bj) {
      const int64_t b = bj / h, j = bj % h;
      BF* ko = kpp + bj * d2 * Mp * 2;
      BF* vo = vpp + bj * M2 * dp * 2;
      for (int64_t m = 0; m < M; ++m) {
        const BF* kr = kv.row(b, j, m);
        if (k_words) {
          for (int64_t c2 = 0; c2 < d2; ++c2) std::memcpy(ko + (c2 * Mp + m) * 2, kr + 2 * c2, 2 * sizeof(BF));
        } else {
          for (int64_t c = 0; c < d; ++c) ko[((c / 2) * Mp + m) * 2 + c % 2] = kr[c * kv.s3];
        }
      }
      for (int64_t m2 = 0; m2 < M2; ++m2) {
        const BF* r0 = vv.row(b, j, 2 * m2);
        const bool second = 2 * m2 + 1 < M;  // else the pair's second row stays zero
        const BF* r1 = second ? vv.row(b, j, 2 * m2 + 1) : r0;
        uint16_t* o = reinterpret_cast<uint16_t*>(vo + m2 * dp * 2);
        if (v_rows && second) {
          const uint16_t* a = reinterpret_cast<const uint16_t*>(r0);
          const uint16_t* c1 = reinterpret_cast<const uint16_t*>(r1);
          for (int64_t c = 0; c < d; ++c) {  // vectorised by the compiler: one word per column
            const uint32_t w = uint32_t(a[c]) | (uint32_t(c1[c]) << 16);
            std::memcpy(o + 2 * c, &w, sizeof(w));
          }
        } else {
          for (int64_t c = 0; c < d; ++c) {
            vo[(m2 * dp + c) * 2] = r0[c * vv.s3];
            if (second) vo[(m2 * dp + c) * 2 + 1] = r1[c * vv.s3];
          }
        }
      }
    }
  });
  constexpr int Wd = Simd<float>::W;
  const int64_t lh = mix ? h : 1;  // logit planes per task: every head's with the mix, else one
  const int64_t row_bytes = 4 * Mp * (mix ? 2 * h : 1) + 2 * Mp + 2 * 2 * d2 + 4 * dp;
  const int64_t BN = forward_block_rows(row_bytes, B, N);
  const int64_t nblk = (N + BN - 1) / BN;
  const int64_t plane = BN * Mp;
  const float shift = mix ? 1.0f / float(M) : 0.0f;
  struct Buffers {
    std::vector<BF> Qb, Pb;
    std::vector<float> Lb, Sb, Ob, mx, mean;  // mx, mean: each row's max and mean exp, for its lse
  };
  auto make = [&] {
    return Buffers{std::vector<BF>(BN * 2 * d2, zero), std::vector<BF>(BN * Mp, zero),
                   std::vector<float>(lh * plane), std::vector<float>(mix ? h * plane : 0),
                   std::vector<float>(BN * dp), std::vector<float>(round_up(BN, Wd)),
                   std::vector<float>(round_up(BN, Wd), 1.0f)};
  };
  parallel_tasks(B * nblk, make, [&](int64_t task, Buffers& buf) {
    const int64_t b = task / nblk, i0 = (task % nblk) * BN, nr = std::min(BN, N - i0);
    auto logits = [&](int64_t j, float* L) {
      for (int64_t r = 0; r < nr; ++r) {  // q rows as they are; an odd d's last column stays zero
        const BF* src = qv.row(b, j, i0 + r);
        BF* dst = buf.Qb.data() + r * 2 * d2;
        if (qv.s3 == 1)
          std::memcpy(dst, src, d * sizeof(BF));
        else
          for (int64_t c = 0; c < d; ++c) dst[c] = src[c * qv.s3];
      }
      bf16_dot_gemm(nr, Mp, d2, buf.Qb.data(), 2 * d2, kpp + (b * h + j) * d2 * Mp * 2, 2 * Mp, L, Mp);
    };
    if (mix) {
      for (int64_t j = 0; j < h; ++j) logits(j, buf.Lb.data() + j * plane);
      mix_heads<float>(Ws.data(), h, buf.Lb.data(), buf.Sb.data(), plane, nr * Mp);
    }
    for (int64_t g = 0; g < h; ++g) {
      const int64_t row0 = (b * h + g) * N + i0;
      // the mixed logits carry the scale (Ws); the plain ones get it in the softmax
      float* L = mix ? buf.Sb.data() + g * plane : buf.Lb.data();
      if (!mix) logits(g, L);
      for (int64_t r = 0; r < nr; ++r) {
        float sum;
        softmax_row<float, BF>(L + r * Mp, M, mix ? 1.0f : scale, shift, buf.Pb.data() + r * Mp, &buf.mx[r], &sum,
                               mix ? &rsq[row0 + r] : nullptr);
        buf.mean[r] = sum / float(M);
      }
      lse_rows(nr, buf.mx.data(), buf.mean.data(), lse + row0);
      bf16_dot_gemm(nr, dp, M2, buf.Pb.data(), Mp, vpp + (b * h + g) * M2 * dp * 2, 2 * dp, buf.Ob.data(),
                    dp);
      for (int64_t r = 0; r < nr; ++r) {  // out is (B, N, h, d) in memory
        O* dst = out + ((b * N + i0 + r) * h + g) * d;
        const float* src = buf.Ob.data() + r * dp;
        int64_t c = 0;
        for (; c + Wd <= d; c += Wd) store_narrowed<O>(dst + c, vload(src + c));
        for (; c < d; ++c) dst[c] = O(src[c]);
      }
    }
  });
}
#endif

// rstd[b, g] from the rows' centred sums c_i: a serial sum per (b, g), in double.
template <typename T>
void rstd_from_rsq(const Shapes& sh, const T* rsq, double eps, double* rstd) {
  const int64_t N = sh.N, M = sh.M;
  for (int64_t bg = 0; bg < sh.B * sh.h; ++bg) {
    double s = 0;
    for (int64_t i = 0; i < N; ++i) s += double(rsq[bg * N + i]);
    const double var = s / (double(N) * double(M));
    rstd[bg] = 1.0 / std::sqrt(var + eps);
  }
}

// S: the element type of q, k, v and out (T, or bfloat16 / float16 without the mix: read and written
// in place of float32 copies, computed in T; the mix's rstd pass needs out in T, see emsa_fwd_cpu).
template <typename T, typename S = T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emsa_fwd_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mix_weight,
    double scale, double eps) {
  const Shapes sh = shapes_of(q, k, Simd<T>::W);
  const int64_t B = sh.B, h = sh.h, N = sh.N, M = sh.M, d = sh.d;
  const std::vector<T> W = mix_as<T>(mix_weight, h);
  const bool mix = !W.empty();
  at::Tensor out = at::empty({B, N, h, d}, q.options());
  auto st = q.options().dtype(c10::CppTypeToScalarType<T>::value);  // statistics in T: float32, float64 for float64
  at::Tensor lse = at::empty({B, h, N}, st);
  at::Tensor rsq = mix ? at::empty({B, h, N}, st) : at::empty({0}, st);
  at::Tensor rstd = mix ? at::empty({B, h}, st) : at::empty({0}, st);
  // empty problems are answered by csrc/op_checks.h before any kernel runs
  TORCH_INTERNAL_ASSERT(B * h * N > 0 && d > 0 && M > 0);

  S* o = out.data_ptr<S>();
  // With the mix, out is scaled by rstd once every row is done: the rows go to a T buffer (out itself
  // when S is T), and the scaling pass rounds them once into out (the same arithmetic as the float32
  // kernel on float32 copies followed by one rounding, which 16-bit inputs had before).
  at::Tensor out_t = !mix ? at::Tensor() : std::is_same_v<T, S> ? out : at::empty({B, N, h, d}, st);
  T* ot = mix ? out_t.data_ptr<T>() : nullptr;
  T* rsq_p = mix ? rsq.data_ptr<T>() : nullptr;
#if defined(REST_CPU_HAS_BF16_DOT)
  if constexpr (std::is_same_v<S, at::BFloat16>) {  // bfloat16 products: forward_bf16_dot says why
    if (mix)
      forward_bf16_dot<float>(sh, q, k, v, W, float(scale), ot, lse.data_ptr<float>(), rsq_p);
    else
      forward_bf16_dot<S>(sh, q, k, v, W, float(scale), o, lse.data_ptr<float>(), nullptr);
  } else
#endif
  {
    at::Tensor kt = at::empty({B * h * d * sh.Mp}, st), vp = at::empty({B * h * M * sh.dp}, st);
    pack_transposed<T, S>(k, T(scale), sh.Mp, kt.data_ptr<T>());
    pack_rows<T, S>(v, T(1), sh.dp, vp.data_ptr<T>());
    if (mix)
      forward_tasks<T, S, T>(sh, q, kt.data_ptr<T>(), vp.data_ptr<T>(), W, ot, lse.data_ptr<T>(), rsq_p);
    else
      forward_tasks<T, S>(sh, q, kt.data_ptr<T>(), vp.data_ptr<T>(), W, o, lse.data_ptr<T>(), nullptr);
  }
  if (!mix) return {out.transpose(1, 2), lse, rsq, rstd};
  std::vector<double> rs(B * h);
  rstd_from_rsq<T>(sh, rsq.data_ptr<T>(), eps, rs.data());
  T* rstd_t = rstd.data_ptr<T>();
  for (int64_t x = 0; x < B * h; ++x) rstd_t[x] = T(rs[x]);
  // The one extra pass: scale each (b, g) slice of out by rstd (the shift was applied to P).
  at::parallel_for(0, B * N, light_grain(h * d), [&](int64_t lo, int64_t hi) {
    for (int64_t bi = lo; bi < hi; ++bi) {
      const int64_t b = bi / N;
      for (int64_t g = 0; g < h; ++g) {
        const T s = T(rs[b * h + g]);
        const T* src = ot + (bi * h + g) * d;
        S* row = o + (bi * h + g) * d;
        int64_t c = 0;
        if constexpr (std::is_same_v<T, float>)  // whole vectors, rounded as S(float) (simd.h)
          for (; c + Simd<float>::W <= d; c += Simd<float>::W) store_narrowed<S>(row + c, vload(src + c) * s);
        for (; c < d; ++c) row[c] = S(src[c] * s);
      }
    }
  });
  return {out.transpose(1, 2), lse, rsq, rstd};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emsa_bwd_impl(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& mix_weight, const at::Tensor& out, const at::Tensor& lse_in,
    const at::Tensor& rstd_in, double scale) {
  constexpr int Wd = Simd<T>::W;
  const Shapes sh = shapes_of(q, k, Wd);
  const int64_t B = sh.B, h = sh.h, N = sh.N, M = sh.M, d = sh.d, Mp = sh.Mp, dp = sh.dp;
  const std::vector<T> W = mix_as<T>(mix_weight, h);
  const bool mix = !W.empty();
  auto opt = q.options();
  // dq: every row is written by its block; dk, dv: by the reduction of the chunks' partials.
  at::Tensor dq = at::empty({B, h, N, d}, opt), dk = at::empty({B, h, M, d}, opt), dv = at::empty({B, h, M, d}, opt);
  at::Tensor dmix = mix ? at::zeros({h, h}, opt.dtype(std::is_same_v<T, double> ? at::kDouble : at::kFloat))
                        : at::empty({0}, opt.dtype(at::kFloat));
  TORCH_INTERNAL_ASSERT(B * h * N > 0 && M > 0 && d > 0);  // empty problems: csrc/op_checks.h

  // Packed operands: scale*K^T (logits), V^T (dO v^T), scale*K rows (dq).
  at::Tensor kt = at::empty({B * h * d * Mp}, opt), vt = at::empty({B * h * d * Mp}, opt),
             ks = at::empty({B * h * M * dp}, opt);
  pack_transposed<T>(k, T(scale), Mp, kt.data_ptr<T>());
  pack_transposed<T>(v, T(1), Mp, vt.data_ptr<T>());
  pack_rows<T>(k, T(scale), dp, ks.data_ptr<T>());

  // Per-(b, g) scalars: rstd, a_g = mean(dO v^T), c_g = mean(dO v^T * Y) = sum_i dO_i . O_i / (N M).
  std::vector<double> rs(B * h, 0.0), a(B * h, 0.0), c(B * h, 0.0);
  View4<T> dov(dout), ov(out), vv(v);
  const at::Tensor lse_t = lse_in.to(q.scalar_type()).contiguous();  // T: the dtype the kernels compute in
  const T* lse = lse_t.data_ptr<T>();
  if (mix) {
    const at::Tensor r = rstd_in.to(at::kDouble).contiguous();
    for (int64_t x = 0; x < B * h; ++x) rs[x] = r.data_ptr<double>()[x];
    at::parallel_for(0, B * h, light_grain((N + M) * d), [&](int64_t lo, int64_t hi) {
      std::vector<double> sdo(d), sv(d);
      for (int64_t bg = lo; bg < hi; ++bg) {
        const int64_t b = bg / h, g = bg % h;
        std::fill(sdo.begin(), sdo.end(), 0.0);
        std::fill(sv.begin(), sv.end(), 0.0);
        double cs = 0;
        for (int64_t i = 0; i < N; ++i) {
          const T* x = dov.row(b, g, i);
          const T* y = ov.row(b, g, i);
          double dot = 0;
          for (int64_t t = 0; t < d; ++t) {
            const double dx = x[t * dov.s3];
            sdo[t] += dx;
            dot += dx * double(y[t * ov.s3]);
          }
          cs += dot;
        }
        for (int64_t m = 0; m < M; ++m) {
          const T* x = vv.row(b, g, m);
          for (int64_t t = 0; t < d; ++t) sv[t] += double(x[t * vv.s3]);
        }
        double as = 0;
        for (int64_t t = 0; t < d; ++t) as += sdo[t] * sv[t];
        const double nm = double(N) * double(M);
        a[bg] = as / nm;
        c[bg] = cs / nm;
      }
    });
  }

  const int64_t row_bytes = (int64_t)sizeof(T) * ((mix ? 3 : 2) * h * Mp + (mix ? Mp : 0) + 2 * h * dp + dp);
  const int64_t BN = block_rows(row_bytes, kBwdBufferBytes, N);
  const int64_t nblk = (N + BN - 1) / BN;
  // Fixed partition of each batch's blocks into chunks (shapes only): enough tasks for parallelism.
  const int64_t nchunk = std::min<int64_t>(nblk, std::max<int64_t>(1, (32 + B - 1) / B));
  const int64_t per_chunk = (nblk + nchunk - 1) / nchunk;
  const int64_t part = h * M * dp;
  at::Tensor dk_part = at::empty({B * nchunk * part}, opt), dv_part = at::empty({B * nchunk * part}, opt);
  std::vector<double> dw_part(mix ? B * nchunk * h * h : 0, 0.0);
  View4<T> qv(q);
  const T shift = mix ? T(1) / T(M) : T(0);
  const int64_t plane = BN * Mp;
  T* dkp = dk_part.data_ptr<T>();
  T* dvp = dv_part.data_ptr<T>();
  T* dqo = dq.data_ptr<T>();
  const T* ktp = kt.data_ptr<T>();
  const T* vtp = vt.data_ptr<T>();
  const T* ksp = ks.data_ptr<T>();

  struct Buffers {
    std::vector<T> Qb, dOb, Lb, Pb, dSb, Yb, Dq;
  };
  auto make = [&] {
    return Buffers{std::vector<T>(h * BN * dp, T(0)), std::vector<T>(h * BN * dp, T(0)),
                   std::vector<T>(h * plane, T(0)),   std::vector<T>(mix ? h * plane : 0, T(0)),
                   std::vector<T>(h * plane, T(0)),   std::vector<T>(mix ? plane : 0, T(0)),
                   std::vector<T>(BN * dp)};
  };
  parallel_tasks(B * nchunk, make, [&](int64_t task, Buffers& buf) {
    auto& Qb = buf.Qb;
    auto& dOb = buf.dOb;
    auto& Lb = buf.Lb;
    auto& Pb = buf.Pb;
    auto& dSb = buf.dSb;
    auto& Yb = buf.Yb;
    auto& Dq = buf.Dq;
    T* P = mix ? Pb.data() : Lb.data();
    {
      const int64_t b = task / nchunk, ch = task % nchunk;
      T* dK = dkp + task * part;
      T* dV = dvp + task * part;
      std::fill(dK, dK + part, T(0));  // each task owns (and zeroes) its partials
      std::fill(dV, dV + part, T(0));
      double* dW = mix ? dw_part.data() + task * h * h : nullptr;
      for (int64_t blk = ch * per_chunk; blk < std::min(nblk, (ch + 1) * per_chunk); ++blk) {
        const int64_t i0 = blk * BN, nr = std::min(BN, N - i0);
        for (int64_t j = 0; j < h; ++j) {
          load_block(qv, b, j, i0, nr, d, Qb.data() + j * BN * dp, dp);
          load_block(dov, b, j, i0, nr, d, dOb.data() + j * BN * dp, dp);
          tile_gemm<T>(nr, Mp, d, Qb.data() + j * BN * dp, dp, 1, ktp + (b * h + j) * d * Mp, Mp,
                       Lb.data() + j * plane, Mp, false);
        }
        if (mix) mix_heads<T>(W.data(), h, Lb.data(), Pb.data(), plane, nr * Mp);
        for (int64_t g = 0; g < h; ++g) {
          T* Pg = P + g * plane;
          T* dSg = dSb.data() + g * plane;
          const T* dOg = dOb.data() + g * BN * dp;
          for (int64_t r = 0; r < nr; ++r) probs_from_lse<T>(Pg + r * Mp, M, lse[(b * h + g) * N + i0 + r]);
          const T rstd = T(rs[b * h + g]), ag = T(a[b * h + g]), cg = T(c[b * h + g]);
          const T* Y = Pg;
          if (mix) {  // Y = (P - 1/M) rstd, the normalised map
            for (int64_t r = 0; r < nr; ++r)
              for (int64_t m = 0; m < M; ++m) Yb[r * Mp + m] = (Pg[r * Mp + m] - shift) * rstd;
            Y = Yb.data();
          }
          // dv_g += Y^T dO_g (rows m of dV, reduction over the block's query rows)
          tile_gemm<T>(M, dp, nr, Y, 1, Mp, dOg, dp, dV + g * M * dp, dp, true);
          // dP = dO_g v_g^T, then through InstanceNorm and softmax to dS, row by row
          tile_gemm<T>(nr, Mp, d, dOg, dp, 1, vtp + (b * h + g) * d * Mp, Mp, dSg, Mp, false);
          const int64_t Mv = M / Wd * Wd;
          for (int64_t r = 0; r < nr; ++r) {
            T* dp_row = dSg + r * Mp;
            const T* p_row = Pg + r * Mp;
            const T* y_row = Y + r * Mp;
            vec_t<T> vD = vset<T>(T(0));
            for (int64_t m = 0; m < Mv; m += Wd) {
              vec_t<T> x = vload(dp_row + m);
              if (mix) {
                x = (x - ag - vload(y_row + m) * cg) * rstd;
                vstore(dp_row + m, x);
              }
              vD += vload(p_row + m) * x;
            }
            T D = hsum(vD);
            for (int64_t m = Mv; m < M; ++m) {
              T x = dp_row[m];
              if (mix) {
                x = (x - ag - y_row[m] * cg) * rstd;
                dp_row[m] = x;
              }
              D += p_row[m] * x;
            }
            for (int64_t m = 0; m < Mv; m += Wd)
              vstore(dp_row + m, vload(p_row + m) * (vload(dp_row + m) - D));
            for (int64_t m = Mv; m < M; ++m) dp_row[m] = p_row[m] * (dp_row[m] - D);
          }
        }
        T* dL = dSb.data();
        if (mix) {
          // dW[g, j] += sum dS_g * L_j; then dL_j = sum_g W[g, j] dS_g, written over L_j.
          // Each row's M products are summed in T (ceil(M / vector width) terms per lane), the rows in
          // double: the sum over N x M terms cancels (every row of dS sums to zero), and a T
          // accumulator per lane over a whole block of rows would chain up to 96 M / width terms
          // (~11,000 per lane at M = 950 with AVX2), an error that grows with the block and the
          // vector width instead of with the row.
          const int64_t Mv = M / Wd * Wd;
          for (int64_t g = 0; g < h; ++g)
            for (int64_t j = 0; j < h; ++j) {
              const T* s = dSb.data() + g * plane;
              const T* l = Lb.data() + j * plane;
              double acc = 0;
              for (int64_t r = 0; r < nr; ++r) {
                vec_t<T> row = vset<T>(T(0));
                for (int64_t m = 0; m < Mv; m += Wd) row += vload(s + r * Mp + m) * vload(l + r * Mp + m);
                T tail = 0;
                for (int64_t m = Mv; m < M; ++m) tail += s[r * Mp + m] * l[r * Mp + m];
                acc += double(hsum(row)) + double(tail);
              }
              dW[g * h + j] += acc;
            }
          for (int64_t j = 0; j < h; ++j) {
            T* l = Lb.data() + j * plane;
            for (int64_t x = 0; x < nr * Mp; x += Wd) {
              vec_t<T> acc = vload(dSb.data() + x) * W[0 * h + j];
              for (int64_t g = 1; g < h; ++g) acc += vload(dSb.data() + g * plane + x) * W[g * h + j];
              vstore(l + x, acc);
            }
          }
          dL = Lb.data();
        }
        for (int64_t j = 0; j < h; ++j) {
          const T* dLj = dL + j * plane;
          tile_gemm<T>(nr, dp, M, dLj, Mp, 1, ksp + (b * h + j) * M * dp, dp, Dq.data(), dp, false);
          for (int64_t r = 0; r < nr; ++r)
            std::copy(Dq.data() + r * dp, Dq.data() + r * dp + d, dqo + ((b * h + j) * N + i0 + r) * d);
          tile_gemm<T>(M, dp, nr, dLj, 1, Mp, Qb.data() + j * BN * dp, dp, dK + j * M * dp, dp, true);
        }
      }
    }
  });

  // Sum the chunks' partials in chunk order.
  T* dko = dk.data_ptr<T>();
  T* dvo = dv.data_ptr<T>();
  const T sc = T(scale);
  at::parallel_for(0, B * h * M, light_grain(2 * nchunk * d), [&](int64_t lo, int64_t hi) {
    for (int64_t bjm = lo; bjm < hi; ++bjm) {
      const int64_t b = bjm / (h * M), jm = bjm % (h * M);
      T* ko = dko + bjm * d;
      T* vo = dvo + bjm * d;
      std::fill(ko, ko + d, T(0));
      std::fill(vo, vo + d, T(0));
      for (int64_t ch = 0; ch < nchunk; ++ch) {
        const T* kp = dkp + (b * nchunk + ch) * part + jm * dp;
        const T* vp2 = dvp + (b * nchunk + ch) * part + jm * dp;
        for (int64_t t = 0; t < d; ++t) {
          ko[t] += kp[t];
          vo[t] += vp2[t];
        }
      }
      for (int64_t t = 0; t < d; ++t) ko[t] *= sc;
    }
  });
  if (mix) {
    std::vector<double> acc(h * h, 0.0);
    for (int64_t x = 0; x < B * nchunk; ++x)
      for (int64_t y = 0; y < h * h; ++y) acc[y] += dw_part[x * h * h + y];
    if (dmix.scalar_type() == at::kDouble)
      for (int64_t y = 0; y < h * h; ++y) dmix.data_ptr<double>()[y] = acc[y];
    else
      for (int64_t y = 0; y < h * h; ++y) dmix.data_ptr<float>()[y] = float(acc[y]);
  }
  return {dq, dk, dv, dmix};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emsa_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mix_weight,
    double scale, double eps) {
  // dtypes, shapes, devices and empty problems: csrc/op_checks.h (the dtypes this backend declares)
  if (q.scalar_type() == at::kDouble) return emsa_fwd_impl<double>(q, k, v, mix_weight, scale, eps);
  if (q.scalar_type() != at::kFloat) {
    // bfloat16 / float16: q, k, v are widened to float32 as the kernel loads them (no fast 16-bit
    // FMAs; bfloat16 on the avx512bf16 build: bfloat16 dot products, forward_bf16_dot) and out is
    // rounded once as it is written (with the mix, by the rstd pass, from a float32 buffer of the
    // unscaled rows): the same arithmetic as on float32 copies (the widening is exact), without the
    // copies (rest_lite's stage 1 at batch 16 in bfloat16: 10.3 ms with the copies, more than
    // PyTorch's SDPA on the same call; with the mix the copies were about 3% of the bfloat16 model
    // at batch 16).
    if (q.scalar_type() == at::kBFloat16) return emsa_fwd_impl<float, at::BFloat16>(q, k, v, mix_weight, scale, eps);
    return emsa_fwd_impl<float, at::Half>(q, k, v, mix_weight, scale, eps);
  }
  return emsa_fwd_impl<float>(q, k, v, mix_weight, scale, eps);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emsa_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const c10::optional<at::Tensor>& mix_weight, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& rsq, const at::Tensor& rstd, double scale, double eps) {
  const at::Tensor dO = dout.scalar_type() == q.scalar_type() ? dout : dout.to(q.scalar_type());
  (void)rsq;  // D_i is summed from full rows here (see the design notes above)
  (void)eps;  // rstd is saved
  if (q.scalar_type() == at::kDouble) return emsa_bwd_impl<double>(dO, q, k, v, mix_weight, out, lse, rstd, scale);
  if (q.scalar_type() != at::kFloat) {  // bfloat16 / float16: in float32, gradients rounded at the end
    const auto f = at::kFloat;
    auto r = emsa_bwd_impl<float>(dO.to(f), q.to(f), k.to(f), v.to(f), mix_weight, out.to(f), lse, rstd, scale);
    const auto t = q.scalar_type();
    return {std::get<0>(r).to(t), std::get<1>(r).to(t), std::get<2>(r).to(t), std::get<3>(r)};
  }
  return emsa_bwd_impl<float>(dO, q, k, v, mix_weight, out, lse, rstd, scale);
}

}  // namespace rest_cpu
