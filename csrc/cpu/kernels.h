// The cpu backend's kernels as one table of functions.
//
// Why a table: the kernels of csrc/cpu are built once per x86 instruction-set level (AVX-512 as
// x86-64-v4, AVX2 as x86-64-v3; one generic build elsewhere), each into a shared library of its own
// (rest_kernels/_cpu_kernels_<isa>.so, compiled with that -march and hidden symbols, so no inline
// function compiled for AVX-512 can be picked by code that runs on an AVX2 CPU). The extension
// rest_kernels._C, compiled for the baseline of the architecture, checks the CPU's features, loads
// the best build this CPU can run and calls its kernels through this table (csrc/cpu_dispatch.cpp),
// as PyTorch's own CPU kernels are chosen at load time. A build is never loaded on a CPU that lacks
// one of its instructions, so the extension cannot die of SIGILL on the machine it is loaded on.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace rest_cpu {

using OptTensor = c10::optional<at::Tensor>;
using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The kernels (emsa_cpu.cpp, pa_cpu.cpp, layer_norm_cpu.cpp, packed_linear.cpp, depthwise_conv.cpp);
// arguments already
// checked by csrc/op_checks.h.
Tensors4 emsa_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& mix_weight,
                      double scale, double eps);
Tensors4 emsa_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const OptTensor& mix_weight, const at::Tensor& out, const at::Tensor& lse,
                      const at::Tensor& rsq, const at::Tensor& rstd, double scale, double eps);
at::Tensor pa_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias);
Tensors3 pa_bwd_cpu(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias);
// (out, sum): out = LayerNorm of x (+ residual) over the last dimension; sum = x + residual, or (0,).
Tensors2 add_layer_norm_cpu(const at::Tensor& x, const OptTensor& residual, const OptTensor& weight,
                            const OptTensor& bias, double eps);
// packed_linear.cpp: a float32 (N, K) weight as panels of kPackedLinearPanel output columns,
// (ceil(N / panel), K, panel), zero past N; and x (..., K) @ weight^T + bias (then the exact GELU)
// on it, (..., out_features).
constexpr int64_t kPackedLinearPanel = 16;
at::Tensor pack_linear_weight_cpu(const at::Tensor& weight);
at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const OptTensor& bias,
                             int64_t out_features, bool gelu);
// depthwise_conv.cpp: conv2d with one (kh, kw) filter per channel given as taps (kh * kw, C),
// channels-last (B, C, Ho, Wo).
at::Tensor depthwise_conv2d_cpu(const at::Tensor& x, const at::Tensor& taps, const OptTensor& bias,
                                at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding);

// Bumped whenever the table's layout or a kernel's signature changes.
constexpr int kKernelTableVersion = 4;

struct KernelTable {
  int version;       // kKernelTableVersion of the build
  const char* isa;   // "avx512bf16", "avx512", "avx2" or "generic": what the build's code needs (REST_CPU_ISA below)
  const char* march;  // the target it was compiled for: -march, + extra features ("x86-64-v4+avx512bf16")
  decltype(&emsa_fwd_cpu) emsa_fwd;
  decltype(&emsa_bwd_cpu) emsa_bwd;
  decltype(&pa_fwd_cpu) pa_fwd;
  decltype(&pa_bwd_cpu) pa_bwd;
  decltype(&add_layer_norm_cpu) add_layer_norm;
  decltype(&pack_linear_weight_cpu) pack_linear_weight;
  decltype(&packed_linear_cpu) packed_linear;
  decltype(&depthwise_conv2d_cpu) depthwise_conv2d;
};

}  // namespace rest_cpu

// The one symbol a kernel build exports.
extern "C" const rest_cpu::KernelTable* rest_cpu_kernel_table();

// The instruction-set level this translation unit is compiled for, from the compiler's own macros.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512CD__) && defined(__AVX512BF16__)
#define REST_CPU_ISA "avx512bf16"
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512CD__)
#define REST_CPU_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define REST_CPU_ISA "avx2"
#else
#define REST_CPU_ISA "generic"
#endif
