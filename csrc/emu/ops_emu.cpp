// The `cuda-emu` backend: csrc/cuda's kernel and launch source compiled by the host compiler
// against the CPU emulation of CUDA's execution model (csrc/emu/cuda_emu.h), registered as the
// *_emu ops on the CPU key.
#include <torch/library.h>

#include "op_checks.h"

#define REST_EMU 1
#define REST_NS rest_emu
#include "cuda/emsa_kernels.cuh"
#include "cuda/pa_kernels.cuh"
#include "cuda/mma_selftest.cuh"

TORCH_LIBRARY_IMPL(rest_kernels_C, CPU, m) {
  m.impl("emsa_fwd_emu", &rest_checks::checked_emsa_fwd<&rest_emu::emsa_fwd>);
  m.impl("emsa_bwd_emu", &rest_checks::checked_emsa_bwd<&rest_emu::emsa_bwd>);
  m.impl("pa_fwd_emu", &rest_checks::checked_pa_fwd<&rest_emu::pa_fwd>);
  m.impl("pa_bwd_emu", &rest_checks::checked_pa_bwd<&rest_emu::pa_bwd>);
}

TORCH_LIBRARY_IMPL(rest_kernels_selftest, CPU, m) {
  m.impl("mma_fragments", &rest_emu::mma_selftest);
}
