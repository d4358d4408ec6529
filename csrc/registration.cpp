// Op schemas of the compiled extension and the record of how it was built.
//
// Every compiled kernel is an op of the `rest_kernels_C` namespace, defined here once and
// implemented per dispatch key by the backend sources:
//   csrc/cpu/   -> CPU key         (backend "cpu"; the kernels of the instruction-set build chosen at
//                                   load time, see csrc/cpu_dispatch.cpp)
//   csrc/cuda/  -> CUDA key        (backend "cuda")
//   csrc/emu/   -> the *_emu ops on the CPU key (backend "cuda-emu": the CUDA kernels' source run
//                  by the CPU emulation of CUDA's execution model)
// The Python layer (rest_kernels/ops.py) wraps them in the public custom ops with autograd and
// fake implementations; these ops themselves have no autograd.
//
// Conventions shared by every backend (see rest_kernels/backends/base.py and stats.py):
//   q (B,h,N,d), k/v (B,h,M,d), any strides. out is (B,h,N,d) with memory laid out as (B,N,h,d).
//   Statistics in float32, float64 when q is float64:
//   lse  (B,h,N): log-mean-exp of each row of the (mixed, scaled) logits, log(sum_m exp(S) / M).
//   rsq  (B,h,N): sum over keys of (P - 1/M)^2 for each row, centred; shape (0,) without the mix.
//   rstd (B,h)  : (var + eps)^-1/2 of each head map, var = sum_i rsq_i / (N M); (0,) without the mix.
//   mix_weight is (h,h) float32, float64 when q is float64; dmix is (h,h) of mix_weight's dtype, or an
//   empty tensor when mix_weight is None.
#include <torch/extension.h>
#include <torch/library.h>

#ifndef REST_BUILT_TORCH
#define REST_BUILT_TORCH "unknown"
#endif
#ifndef REST_BUILT_CUDA
#define REST_BUILT_CUDA ""
#endif
#ifndef REST_BUILT_ARCHS
#define REST_BUILT_ARCHS ""
#endif
#ifndef REST_CPU_KERNEL_BUILDS
#define REST_CPU_KERNEL_BUILDS ""
#endif
#ifndef REST_BUILT_CPU_MARCHES
#define REST_BUILT_CPU_MARCHES ""
#endif

namespace rest_cpu_dispatch {  // csrc/cpu_dispatch.cpp
py::dict cpu_kernels_status();
void select_cpu_kernels(const std::string& isa);
}  // namespace rest_cpu_dispatch

TORCH_LIBRARY(rest_kernels_C, m) {
  const char* emsa_fwd =
      "(Tensor q, Tensor k, Tensor v, Tensor? mix_weight, float scale, float eps)"
      " -> (Tensor out, Tensor lse, Tensor rsq, Tensor rstd)";
  const char* emsa_bwd =
      "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? mix_weight, Tensor out, Tensor lse,"
      " Tensor rsq, Tensor rstd, float scale, float eps)"
      " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmix)";
  const char* pa_fwd = "(Tensor x, Tensor weight, Tensor? bias) -> Tensor";
  const char* pa_bwd =
      "(Tensor dout, Tensor x, Tensor weight, Tensor? bias) -> (Tensor dx, Tensor dweight, Tensor dbias)";
  for (const char* suffix : {"", "_emu"}) {
    m.def((std::string("emsa_fwd") + suffix + emsa_fwd).c_str());
    m.def((std::string("emsa_bwd") + suffix + emsa_bwd).c_str());
    m.def((std::string("pa_fwd") + suffix + pa_fwd).c_str());
    m.def((std::string("pa_bwd") + suffix + pa_bwd).c_str());
  }
  // The models' CPU inference LayerNorm (csrc/cpu/layer_norm_cpu.cpp): CPU key only, no autograd.
  // sum = x + residual (an empty (0,) tensor without a residual), out = LayerNorm(sum or x).
  m.def("add_layer_norm(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps)"
        " -> (Tensor out, Tensor sum)");
  // The models' float32 CPU inference linear layers (csrc/cpu/packed_linear.cpp): CPU key only, no
  // autograd. packed = the weight as column panels, made once; y = x @ weight^T + bias (GELU'd).
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor packed_weight, Tensor? bias, int out_features, bool gelu) -> Tensor");
  // Their depthwise convolution, EMSA's key/value reduction (csrc/cpu/depthwise_conv.cpp): CPU key
  // only, no autograd, a channels-last output; taps = the weight (C, 1, kh, kw) as (kh * kw, C).
  m.def("depthwise_conv2d(Tensor x, Tensor taps, Tensor? bias, int[2] kernel_size, int[2] stride, "
        "int[2] padding) -> Tensor");
}

// Test machinery of the CUDA source, outside the ops the backends call: one warp's tensor-core
// product through the kernels' own fragment loaders (csrc/cuda/mma_selftest.cuh), on CUDA tensors
// by the GPU and on CPU tensors by the emulation.
TORCH_LIBRARY(rest_kernels_selftest, m) {
  m.def("mma_fragments(Tensor a, Tensor b, int lane_shift) -> Tensor");
}

static py::dict build_info() {
  py::dict d;
  d["torch"] = REST_BUILT_TORCH;
  d["cuda"] = REST_BUILT_CUDA;
  d["cuda_archs"] = REST_BUILT_ARCHS;
  d["cpu_kernel_builds"] = REST_CPU_KERNEL_BUILDS;  // instruction-set builds of csrc/cpu, best first
  d["cpu_marches"] = REST_BUILT_CPU_MARCHES;       // their -march values, in the same order
#ifdef REST_WITH_CUDA
  d["with_cuda"] = true;
#else
  d["with_cuda"] = false;
#endif
  d["compiler"] = __VERSION__;
  return d;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rest_kernels compiled ops (registered under torch.ops.rest_kernels_C)";
  m.def("build_info", &build_info, "How this extension was built");
  m.def("cpu_kernels_status", &rest_cpu_dispatch::cpu_kernels_status,
        "The cpu kernel builds, which one runs (or why none can) and which this CPU can run");
  m.def("select_cpu_kernels", &rest_cpu_dispatch::select_cpu_kernels,
        "Run the cpu ops on the kernels of this instruction-set build (raises if this CPU cannot)");
}
