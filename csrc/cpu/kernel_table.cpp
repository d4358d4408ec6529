// The entry point of a cpu kernel build (see kernels.h): the table of its kernels.
#include "cpu/kernels.h"

#ifndef REST_CPU_MARCH
#define REST_CPU_MARCH ""
#endif

extern "C" __attribute__((visibility("default"))) const rest_cpu::KernelTable* rest_cpu_kernel_table() {
  // Constant-initialised: loading the library runs no code compiled for its instruction set.
  static constexpr rest_cpu::KernelTable table{
      rest_cpu::kKernelTableVersion, REST_CPU_ISA, REST_CPU_MARCH, &rest_cpu::emsa_fwd_cpu,
      &rest_cpu::emsa_bwd_cpu,       &rest_cpu::pa_fwd_cpu,        &rest_cpu::pa_bwd_cpu,
      &rest_cpu::add_layer_norm_cpu, &rest_cpu::pack_linear_weight_cpu,
      &rest_cpu::packed_linear_cpu,  &rest_cpu::depthwise_conv2d_cpu};
  return &table;
}
