// y = x @ weight^T + bias (then the exact GELU) for the models' float32 CPU inference, on a weight
// packed once into column panels: rest/dense.py decides when it runs (PACKED_KERNEL_ON, Linear.prepack).
//
// Why a product of our own: on AVX2-only CPUs the linear layers are most of a ResT's batch-1 time,
// and oneDNN's matmul there (brg_matmul:avx2) is 10-25% slower than ONNX Runtime's MLAS at ResT's
// shapes. Measured 2026-12-06 on a 2-core AMD EPYC with AVX2 only, 2 threads, each product timed in
// threes after the process went quiet, interleaved, medians of 11 (ms; ours = this kernel, in a first
// tiling of 48-row x 4-panel tasks; 48 x 24 measured the same at batch-1 shapes within the noise):
//   (rows, in, out)      ONNX Runtime  oneDNN (packed)  ours
//   (3136, 384, 96)         1.86          1.97          1.75
//   (784, 768, 192)         1.81          1.86          1.61
//   (196, 384, 1536)        1.73          1.85          1.69
//   (49, 3072, 768)         1.87          2.31          1.81
//   (49, 768, 3072)         2.12          2.37          2.18
// (docs/cpu_inference_profile.md has the whole-model effect). On AVX-512 oneDNN's matmul is not
// replaced (rest/dense.py PACKED_KERNEL_ON has the measurements): with tiles of four panels
// (kTilePanels below) this kernel runs ResT's products level with it, not faster.
//
// Layout: the weight (N, K) becomes panels of kPanel = 16 output columns, panel p holding
// weight[p*16 + j, k] at [p][k][j] (zero columns past N): the micro-kernel of tile_gemm.h streams a
// panel's rows as vectors while the input's rows are broadcast scalar by scalar, 6 rows x 16 columns
// of accumulators (12 of AVX2's 16 registers). The panel width is fixed, not the build's vector width,
// so a packed weight means the same on every CPU (AVX-512 runs it as one 16-lane vector per row, and
// four panels side by side per tile: 6 rows x 64 columns).
//
// Blocking: a task is a block of rows x a block of panels; within it K goes in slices of GEMM_KC
// (a panel slice of 16 KB stays in L1 while every row block passes over it; a four-panel tile's 64 KB
// on AVX-512 in L2: a 128-wide slice, 32 KB, measured slower on a Zen 5 EPYC), the C block (at most
// 64 rows x 384 columns, 96 KB) stays in L2 between slices, and the epilogue (bias, GELU) runs on the
// accumulators of the last slice, before their one store (BiasGelu below). Row blocks are split
// evenly (49 rows: 5 and 6, not 8 x 6 + 1). Every element is a sum over k in increasing order with the
// same grouping whatever the tile, so results do not depend on the thread count.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "parallel.h"
#include "simd.h"
#include "tile_gemm.h"

namespace rest_cpu {
namespace {

constexpr int64_t kPanel = kPackedLinearPanel;
constexpr int kPanelVecs = kPanel / Simd<float>::W;  // 2 with AVX2, 1 with AVX-512, 4 generic
static_assert(kPanel % Simd<float>::W == 0, "the panel must be whole vectors");
// Panels per micro-kernel tile. With AVX2 a panel is two vectors, so a 6-row tile holds 12
// accumulators (of 16 registers): one panel. With AVX-512 a panel is one vector, and a one-panel tile
// would hold 6 accumulators, fewer than the FMAs in flight that two FMA pipes of latency 4 need (8),
// with one B load per 6 FMAs; four panels give 6 x 4 = 24 of the 32 registers, as tile_gemm.h's
// GEMM_NV. The tile's vectors are then one per panel, each panel K * kPanel floats further on.
constexpr int kTilePanels = kPanelVecs == 1 ? 4 : 1;
// A task: at most kBlockRows rows (split evenly) x at most kMaxBlockPanels panels, fewer panels when
// that leaves under kTasksPerThread tasks per thread (batch 1 has 49-row products). Wide tasks keep
// the input rows' block read once from memory for 384 columns; measured on the AVX2 EPYC, 2 threads
// (ms; tasks of 96 rows x 4 panels against 48 x 24): (50176, 96, 384) 63.0 against 55.9 (oneDNN 55.6),
// (12544, 192, 768) 40.3 against 37.9 (oneDNN 42.5); at batch-1 shapes within the noise. 64 rows
// rather than 48 keeps a 49-row product in one row task, each weight panel read by one task, not
// two; the compiled rest_base at batch 1 measured the same with either (profiler, 10 calls: 608
// against 612 ms in the products), and the README's deployment table was measured with 64.
constexpr int64_t kBlockRows = 64;
constexpr int64_t kMaxBlockPanels = 24;
constexpr int64_t kTasksPerThread = 4;

// The exact GELU, x/2 (1 + erf(x / sqrt 2)), with erf by Abramowitz & Stegun 7.1.26 (absolute error
// at most 1.5e-7): erf(z) = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-z^2), t = 1 / (1 + p z)
// for z >= 0, odd. The same approximation as ATen's vectorised erf, so F.gelu and this agree to a
// few float32 ulps.
inline vec_t<float> vgelu(vec_t<float> x) {
  using V = vec_t<float>;
  const V z = x * 0.70710678118654752f;
  const V az = z < 0.f ? -z : z;
  const V t = 1.f / (1.f + 0.3275911f * az);
  V poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const V e = vexp(-az * az);
  const V erf_abs = 1.f - poly * e;
  const V erf = z < 0.f ? -erf_abs : erf_abs;
  return 0.5f * x * (1.f + erf);
}

// The epilogue on the accumulators of a tile's last K slice, before their one store: bias (read from
// a copy padded to whole panels), then GELU. The same operations in the same order as a pass over
// the finished block (sum + bias, then vgelu), so the same bits, without reading C back: measured
// on the AVX2 EPYC, 2 threads, alone, medians of 15, that pass cost (3136, 64 -> 256) 0.22 ms for
// the bias and 0.34 more for GELU over a 0.84 ms product.
template <bool BIAS, bool GELU>
struct BiasGelu {
  const float* bias;  // the tile's first column; nullptr without BIAS
  vec_t<float> operator()(vec_t<float> x, int v) const {
    if constexpr (BIAS) x += vload(bias + v * Simd<float>::W);
    if constexpr (GELU) x = vgelu(x);
    return x;
  }
};

template <bool ACC, int NP, typename Epi>
inline void micro_rows(int r, int64_t kc, const float* A, int64_t lda, const float* B, int64_t ps, float* C,
                       int64_t ldc, const Epi& epi) {
  constexpr int V = NP * kPanelVecs;
  switch (r) {
    case 6: micro<float, 6, V, ACC, Epi, kPanelVecs>(kc, A, lda, 1, B, kPanel, C, ldc, epi, ps); break;
    case 5: micro<float, 5, V, ACC, Epi, kPanelVecs>(kc, A, lda, 1, B, kPanel, C, ldc, epi, ps); break;
    case 4: micro<float, 4, V, ACC, Epi, kPanelVecs>(kc, A, lda, 1, B, kPanel, C, ldc, epi, ps); break;
    case 3: micro<float, 3, V, ACC, Epi, kPanelVecs>(kc, A, lda, 1, B, kPanel, C, ldc, epi, ps); break;
    case 2: micro<float, 2, V, ACC, Epi, kPanelVecs>(kc, A, lda, 1, B, kPanel, C, ldc, epi, ps); break;
    default: micro<float, 1, V, ACC, Epi, kPanelVecs>(kc, A, lda, 1, B, kPanel, C, ldc, epi, ps); break;
  }
}

// A tile of r rows x np panels (np <= kTilePanels), the panels ps floats apart.
template <bool ACC, typename Epi>
inline void micro_tile(int r, int np, int64_t kc, const float* A, int64_t lda, const float* B, int64_t ps,
                       float* C, int64_t ldc, const Epi& epi) {
  if constexpr (kTilePanels == 4) {
    switch (np) {
      case 4: return micro_rows<ACC, 4>(r, kc, A, lda, B, ps, C, ldc, epi);
      case 3: return micro_rows<ACC, 3>(r, kc, A, lda, B, ps, C, ldc, epi);
      case 2: return micro_rows<ACC, 2>(r, kc, A, lda, B, ps, C, ldc, epi);
      default: break;
    }
  }
  micro_rows<ACC, 1>(r, kc, A, lda, B, ps, C, ldc, epi);
}

// One tile's K slice: accumulate or not, and on the last slice the epilogue (bias may be null).
inline void slice_tile(int r, int np, int64_t kc, bool accumulate, bool last, const float* bias, bool gelu,
                       const float* A, int64_t lda, const float* B, int64_t ps, float* C, int64_t ldc) {
  auto run = [&](const auto& epi) {
    if (accumulate) micro_tile<true>(r, np, kc, A, lda, B, ps, C, ldc, epi);
    else micro_tile<false>(r, np, kc, A, lda, B, ps, C, ldc, epi);
  };
  if (!last || (bias == nullptr && !gelu)) run(NoEpilogue());
  else if (bias == nullptr) run(BiasGelu<false, true>{nullptr});
  else if (!gelu) run(BiasGelu<true, false>{bias});
  else run(BiasGelu<true, true>{bias});
}

// The first row of block i when `rows` are split in `blocks` near-equal parts.
inline int64_t split_at(int64_t rows, int64_t blocks, int64_t i) { return rows * i / blocks; }

}  // namespace

at::Tensor pack_linear_weight_cpu(const at::Tensor& weight) {
  const int64_t N = weight.size(0), K = weight.size(1), P = (N + kPanel - 1) / kPanel;
  auto packed = at::empty({P, K, kPanel}, weight.options());
  const float* w = weight.data_ptr<float>();
  float* out = packed.data_ptr<float>();
  parallel_tasks(P, [] { return 0; }, [&](int64_t p, int&) {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t n = p * kPanel + j;
        out[(p * K + k) * kPanel + j] = n < N ? w[n * K + k] : 0.f;
      }
  });
  return packed;
}

at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const OptTensor& bias,
                             int64_t out_features, bool gelu) {
  const int64_t K = packed.size(1), P = packed.size(0), N = out_features;
  int64_t M = 1;  // rows: the product of x's leading sizes (not numel / K, which K = 0 would break)
  for (int64_t i = 0; i + 1 < x.dim(); ++i) M *= x.size(i);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  // The micro-kernel writes whole panels: when N is not a multiple of the panel, into a padded map.
  const bool padded = N % kPanel != 0;
  const int64_t ldc = padded ? P * kPanel : N;
  at::Tensor y = at::empty({M, ldc}, x.options());
  if (M == 0) return y.narrow(1, 0, N).reshape(out_sizes);
  const float* A = x.data_ptr<float>();
  const float* Bp = packed.data_ptr<float>();
  // The bias padded to whole panels, so that the epilogue reads whole vectors past N too.
  std::vector<float> bias_panels;
  const float* b = nullptr;
  if (bias.has_value()) {
    bias_panels.assign(P * kPanel, 0.f);
    std::copy_n(bias->data_ptr<float>(), N, bias_panels.begin());
    b = bias_panels.data();
  }
  float* C = y.data_ptr<float>();
  const int64_t row_tasks = (M + kBlockRows - 1) / kBlockRows;
  int64_t block_panels = std::min(P, kMaxBlockPanels);
  while (block_panels > 1 && row_tasks * ((P + block_panels - 1) / block_panels) < kTasksPerThread * at::get_num_threads())
    block_panels = (block_panels + 1) / 2;
  const int64_t panel_tasks = (P + block_panels - 1) / block_panels;
  parallel_tasks(row_tasks * panel_tasks, [] { return 0; }, [&](int64_t task, int&) {
    const int64_t rt = task % row_tasks, pt = task / row_tasks;
    const int64_t r0 = split_at(M, row_tasks, rt), r1 = split_at(M, row_tasks, rt + 1);
    const int64_t p0 = pt * block_panels, p1 = std::min(P, p0 + block_panels);
    const int64_t blocks = (r1 - r0 + GEMM_MR - 1) / GEMM_MR;
    // K = 0 runs as one empty slice: the micro-kernel stores the epilogue of zero sums.
    const int64_t slices = std::max<int64_t>(1, (K + GEMM_KC - 1) / GEMM_KC);
    for (int64_t s = 0; s < slices; ++s) {
      const int64_t k0 = s * GEMM_KC, kc = std::min(GEMM_KC, K - k0);
      const bool last = s + 1 == slices;
      for (int64_t p = p0; p < p1; p += kTilePanels) {
        const int np = (int)std::min<int64_t>(kTilePanels, p1 - p);
        const float* B = Bp + (p * K + k0) * kPanel;
        const float* bp = b != nullptr ? b + p * kPanel : nullptr;
        for (int64_t i = 0; i < blocks; ++i) {
          const int64_t ra = r0 + split_at(r1 - r0, blocks, i), rb = r0 + split_at(r1 - r0, blocks, i + 1);
          slice_tile((int)(rb - ra), np, kc, s > 0, last, bp, gelu, A + ra * K + k0, K, B, K * kPanel,
                     C + ra * ldc + p * kPanel, ldc);
        }
      }
    }
  });
  if (padded) return y.narrow(1, 0, N).contiguous().reshape(out_sizes);
  return y.reshape(out_sizes);
}

}  // namespace rest_cpu
