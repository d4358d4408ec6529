"""The models' LayerNorms at inference on the CPU: the compiled kernel, with the block's residual add.

Why: at ResT's token maps PyTorch's CPU LayerNorm runs far below the memory bound (bfloat16 most of
all), and a pre-norm block adds its attention branch to the residual stream in a pass of its own
right before norm2 reads the sum. csrc/cpu/layer_norm_cpu.cpp does both in one pass over the rows
(its header has the measurements): `add_layer_norm(norm, x, residual)` returns (x + residual,
norm(x + residual)), the sum rounded to the maps' dtype exactly as `x + residual` and normalised
from that, so the residual stream keeps the same bits and the normalised values differ from
nn.LayerNorm's only by the order of float32 (float64) sums.

When the kernel runs (kernel_applies, the one place this is decided; otherwise nn.LayerNorm's own
forward and a plain add, so every result is the module's up to rounding):
- the norm is exactly an nn.LayerNorm over the last dimension (or LayerNorm2d below) without hooks (a hook must see its
  module called), on a CPU tensor of float32, float64, bfloat16 or float16 in the norm's dtype;
- no gradient is needed (the kernel has no backward: training keeps PyTorch's LayerNorm, whose
  backward the lean MLP path, rest/lean_mlp.py, builds on), and CPU autocast is off (autocast runs
  LayerNorm in float32 by its own rule);
- nothing traces or exports the call (torch.compile, torch.export, torch.jit, torch.fx, ONNX export:
  those get the standard op, as rest/dense.py's linear layers do);
- the module's backend (None: the current default) is not "reference": the reference models stay the
  official eager math, the benchmarks' baseline;
- the compiled cpu kernels are loaded (else the reason is logged once), and the environment variable
  REST_KERNELS_CPU_LAYER_NORM is not "0" (the switch for comparisons).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import rest_kernels

from .dense import _has_hooks, on_reference_backend

logger = logging.getLogger("rest_kernels")

#: set to "0" to keep every LayerNorm on nn.LayerNorm's own path
ENV_VAR = "REST_KERNELS_CPU_LAYER_NORM"

KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_unavailable: list[str | None] = []  # [reason or None], computed once


@torch.compiler.assume_constant_result
def kernel_unavailable_reason() -> str | None:
    """None when the compiled LayerNorm kernel can run in this process, else why not (logged once)."""
    if not _unavailable:
        _unavailable.append(rest_kernels.available_backends()["cpu"])  # the cpu backend's kernels
        if _unavailable[0] is None:
            _register_fake()
        else:
            logger.info("rest: LayerNorms use nn.LayerNorm's own CPU path: %s", _unavailable[0])
    return _unavailable[0]


def _register_fake() -> None:
    """The op's shape function, so that torch.library.opcheck and FakeTensor can reason about it."""
    @torch.library.register_fake("rest_kernels_C::add_layer_norm")
    def _fake(x, residual, weight, bias, eps):
        sum_ = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None \
            else x.new_empty((0,))
        return torch.empty_like(x, memory_format=torch.contiguous_format), sum_


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _module_allows(norm: nn.Module, in_own_forward: bool = False) -> bool:
    """The module's half of the rule: its configuration (type, shape, hooks), never the input. Hooks
    matter only where the kernel would replace the module's call; in its own forward they have run."""
    if type(norm) not in (nn.LayerNorm, LayerNorm2d) or len(norm.normalized_shape) != 1:
        return False
    return in_own_forward or not _has_hooks(norm)


def _call_allows(x: torch.Tensor, residual: torch.Tensor | None, weight, bias, backend: str | None) -> bool:
    """The call's half of the rule: the tensors, the backend in force and the process."""
    if on_reference_backend(backend):
        return False
    if isinstance(x, torch.fx.Proxy) or isinstance(residual, torch.fx.Proxy):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing() \
            or torch.onnx.is_in_onnx_export():
        return False
    if x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES or x.dim() < 1:
        return False
    if weight is not None and (weight.dtype != x.dtype or weight.shape != x.shape[-1:]):
        return False
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        return False  # broadcasting or promotion: the plain add decides
    if torch.is_autocast_enabled("cpu") or _needs_grad(x, residual, weight, bias):
        return False
    if os.environ.get(ENV_VAR, "1") == "0":
        return False
    return kernel_unavailable_reason() is None


def kernel_applies(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None,
                   backend: str | None = None) -> bool:
    """Whether this call of `norm` (after adding `residual` to x) runs the compiled kernel: the rule of
    the module docstring."""
    return _module_allows(norm) and _call_allows(x, residual, norm.weight, norm.bias, backend)


# A leaf function for torch.fx (torch.fx.wrap): whether the kernel runs depends on the tensors (dtype,
# gradients), which a symbolic trace cannot see; the trace records this call and the traced module
# chooses when it runs, so that it computes what the eager module does, bit for bit.
@torch.fx.wrap
def _layer_norm_last_dim(x: torch.Tensor, weight, bias, eps: float, backend: str | None) -> torch.Tensor:
    if _call_allows(x, None, weight, bias, backend):
        return torch.ops.rest_kernels_C.add_layer_norm(x, None, weight, bias, eps)[0]
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def layer_norm(norm: nn.Module, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """norm(x): the compiled kernel where kernel_applies, else the module itself."""
    if _module_allows(norm):
        return _layer_norm_last_dim(x, norm.weight, norm.bias, norm.eps, backend)
    return norm(x)


def add_layer_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor,
                   backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, norm(x + residual)), in one pass where kernel_applies."""
    if kernel_applies(norm, x, residual, backend):
        out, total = torch.ops.rest_kernels_C.add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)
        return total, out
    total = x + residual
    return total, norm(total)


class LayerNorm2d(nn.LayerNorm):
    """nn.LayerNorm over the channels of a (B, C, H, W) map, returning the map: the same parameters
    (state_dict keys weight, bias) and, on the channels-last maps the stages return, the same numbers
    as nn.LayerNorm over the map's (B, H*W, C) tokens (the compiled kernel where kernel_applies)."""

    def forward(self, x):
        rows = x.permute(0, 2, 3, 1)
        if _module_allows(self, in_own_forward=True):
            out = _layer_norm_last_dim(rows, self.weight, self.bias, self.eps, None)
        else:
            out = F.layer_norm(rows, self.normalized_shape, self.weight, self.bias, self.eps)
        return out.permute(0, 3, 1, 2)
