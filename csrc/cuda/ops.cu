// The `cuda` backend: csrc/cuda's kernels registered for the CUDA dispatch key.
// The same kernel and launch source is compiled by g++ into csrc/emu/ops_emu.cpp (backend cuda-emu).
#include <torch/library.h>

#include "op_checks.h"

#define REST_NS rest_cuda
#include "cuda/emsa_kernels.cuh"
#include "cuda/pa_kernels.cuh"
#include "cuda/mma_selftest.cuh"

TORCH_LIBRARY_IMPL(rest_kernels_C, CUDA, m) {
  m.impl("emsa_fwd", &rest_checks::checked_emsa_fwd<&rest_cuda::emsa_fwd>);
  m.impl("emsa_bwd", &rest_checks::checked_emsa_bwd<&rest_cuda::emsa_bwd>);
  m.impl("pa_fwd", &rest_checks::checked_pa_fwd<&rest_cuda::pa_fwd>);
  m.impl("pa_bwd", &rest_checks::checked_pa_bwd<&rest_cuda::pa_bwd>);
}

TORCH_LIBRARY_IMPL(rest_kernels_selftest, CUDA, m) {
  m.impl("mma_fragments", &rest_cuda::mma_selftest);
}
