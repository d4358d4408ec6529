"""The backends served by the compiled extension: `cpu`, `cuda` and `cuda-emu`.

They differ only in which ops of torch.ops.rest_kernels_C they call and what they accept:
  cpu       rest_kernels_C.emsa_fwd & co. on CPU tensors (csrc/cpu)
  cuda      the same ops on CUDA tensors (csrc/cuda), dispatched by the CUDA key
  cuda-emu  rest_kernels_C.*_emu on CPU tensors: csrc/cuda's kernel source run by the CPU
            emulation of CUDA's execution model (csrc/emu); for tests, never chosen by "auto"
"""
from __future__ import annotations

import torch

from .. import _extension
from .base import Backend
from .preference import load_rules


class CompiledBackend(Backend):
    #: suffix of the op names in torch.ops.rest_kernels_C ("" or "_emu")
    op_suffix = ""

    #: dispatch key the kernels are registered under in the extension
    dispatch_key = "CPU"

    def unavailable_reason(self):
        reason = _extension.unavailable_reason()
        if reason is not None:
            return reason
        missing = [op for op in ("emsa_fwd", "emsa_bwd", "pa_fwd", "pa_bwd")
                   if not torch._C._dispatch_has_kernel_for_dispatch_key(
                       f"rest_kernels_C::{op}{self.op_suffix}", self.dispatch_key)]
        if missing:
            return (f"the compiled extension has no {self.dispatch_key} kernel for "
                    + ", ".join(m + self.op_suffix for m in missing))
        return None

    def _op(self, name):
        return getattr(torch.ops.rest_kernels_C, name + self.op_suffix)

    def _emsa_forward(self, p):
        return tuple(self._op("emsa_fwd")(p.q, p.k, p.v, p.kernel_weight, p.scale, p.eps))

    def _emsa_backward(self, p, dout, out, lse, rsq, rstd):
        dq, dk, dv, dmix = self._op("emsa_bwd")(dout, p.q, p.k, p.v, p.kernel_weight, out, lse, rsq, rstd,
                                                p.scale, p.eps)
        return dq, dk, dv, (dmix if p.mix else None)

    def _pa_forward(self, p):
        return self._op("pa_fwd")(p.x, p.weight, p.bias)

    def _pa_backward(self, p, dout):
        dx, dw, db = self._op("pa_bwd")(dout, p.x, p.weight, p.bias)
        return dx, dw, (db if p.bias is not None else None)


class CpuBackend(CompiledBackend):
    name = "cpu"
    device_type = "cpu"
    auto_device_type = "cpu"
    # bfloat16 / float16 are computed in float32 by the kernels and rounded once at the end
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    # measured by bench/crossover.py (data/cpu_crossover.json says where, when and on what)
    reference_rules = load_rules("cpu")
    # rest.CompiledInference's graphs call rest_kernels_C::emsa_fwd / pa_fwd themselves (the cuda
    # backend's ops could be called the same way; not switched on where no GPU has run it)
    graph_ops = True

    def unavailable_reason(self):
        # the ops are registered whatever the CPU; the kernels need a build this CPU can run
        return super().unavailable_reason() or _extension.cpu_kernels_unavailable_reason()


class CudaBackend(CompiledBackend):
    name = "cuda"
    device_type = "cuda"
    auto_device_type = "cuda"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    max_head_dim = 128  # a row of d is kept in registers / on chip
    max_batch_heads = 65535  # batch x heads is the grid's y dimension
    dispatch_key = "CUDA"
    # where the performance model says eager is faster, per GPU arch (scripts/model_crossover.py;
    # data/cuda_crossover.json says how they were made): fp32 on SIMT cores, the 16-bit mixed
    # backward at stage 4 on sm_90
    reference_rules = load_rules("cuda")

    def unavailable_reason(self):
        if _extension.unavailable_reason() is None and not _extension.build_info().get("with_cuda"):
            return "the compiled extension was built without its CUDA part (see `python -m rest_kernels info`)"
        reason = super().unavailable_reason()
        if reason is not None:
            return reason
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None


class CudaEmuBackend(CompiledBackend):
    name = "cuda-emu"
    op_suffix = "_emu"
    device_type = "cpu"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    max_head_dim = 128  # the CUDA kernels' limits (same source)
    max_batch_heads = 65535
