"""The public ops, `emsa_attention` and `pa_gate`, and the custom ops behind them.

Each fused call goes through one torch.library custom op per direction:
  rest_kernels::emsa_fwd / emsa_bwd     rest_kernels::pa_fwd / pa_bwd
with the backend's name as a string argument. The custom op is what autograd, torch.compile
(one node, no graph break) and torch.export see; its implementation hands the tensors to the
chosen backend (rest_kernels/backends). The `reference` and `sdpa` backends are called directly
instead: the official math and PyTorch's scaled_dot_product_attention are ordinary PyTorch, so
autograd, compile, export and ONNX take them as they are.

Saved for backward by emsa_fwd: q, k, v, mix_weight, out and the statistics of
rest_kernels/backends/stats.py (lse (B,h,N); with the mix rsq (B,h,N) and rstd (B,h)): nothing of
size N x M.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from ._validation import (check_emsa_backward_args, check_pa_backward_args, check_same_device, emsa_problem,
                          handing_off, pa_problem, validate_emsa, validate_pa, validate_pa_args)
from .backends.base import pa_layout
from .backends.reference import attention_map, emsa_export_form, emsa_reference, pa_reference
from .backends.registry import check_name, select
from .backends.sdpa import sdpa_attention
from .backends.stats import stat_dtype, stat_shapes


# --------------------------------------------------------------------------- EMSA custom ops
def _kernel_backend(op: str, backend, tensors, unsupported):
    """The backend a custom op was asked for, checked like a named backend of the public API.

    The custom ops are public too (torch.ops.rest_kernels.*): called directly they get no validation
    from emsa_attention / pa_gate, so each implementation checks its own arguments and its backend
    (a concrete name, available, able to serve these inputs) before any kernel runs. The checks run
    in the eager implementation only; torch.compile and torch.export trace the fake implementations,
    so they add nothing to a compiled graph."""
    check_name(backend, allow_auto=False)
    return select(op, backend, tensors, unsupported)


@torch.library.custom_op("rest_kernels::emsa_fwd", mutates_args=())
def emsa_fwd(q: Tensor, k: Tensor, v: Tensor, mix_weight: Optional[Tensor], mix_bias: Optional[Tensor],
             scale: float, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused EMSA forward on `backend`: (out, lse, rsq, rstd), the statistics of backends/stats.py.
    mix_bias cannot change the result."""
    p = emsa_problem(q, k, v, mix_weight, mix_bias, scale, eps)
    chosen = _kernel_backend("emsa_fwd", backend, (q, k, v), lambda b: b.emsa_unsupported_reason(q, k, v, p.mix_weight))
    return chosen.run_emsa_forward(p)


# The fake implementations also serve real calls in which one tensor is on the meta device (the
# dispatcher picks the Meta key for the whole call): a mix of devices is refused there as well.
@emsa_fwd.register_fake
def _emsa_fwd_fake(q, k, v, mix_weight, mix_bias, scale, eps, backend):
    check_same_device((("q", q), ("k", k), ("v", v), ("mix_weight", mix_weight), ("mix_bias", mix_bias)))
    B, h, N, d = q.shape
    out = q.new_empty(B, N, h, d).transpose(1, 2)
    opts = dict(dtype=stat_dtype(q.dtype), device=q.device)
    return (out,) + tuple(q.new_empty(shape, **opts) for shape in stat_shapes(B, h, N, mix_weight is not None))


@torch.library.custom_op("rest_kernels::emsa_bwd", mutates_args=())
def emsa_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mix_weight: Optional[Tensor], out: Tensor,
             lse: Tensor, rsq: Tensor, rstd: Tensor, scale: float, eps: float,
             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused EMSA backward on `backend`: (dq, dk, dv, dmix); dmix is empty without a mix."""
    p = emsa_problem(q, k, v, mix_weight, None, scale, eps)
    check_emsa_backward_args(dout, q, out, lse, rsq, rstd, p.mix)
    chosen = _kernel_backend("emsa_bwd", backend, (q, k, v),
                             lambda b: b.emsa_unsupported_reason(q, k, v, p.mix_weight, needs_backward=True))
    return chosen.run_emsa_backward(p, dout, out, lse, rsq, rstd)


@emsa_bwd.register_fake
def _emsa_bwd_fake(dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale, eps, backend):
    check_same_device((("dout", dout), ("q", q), ("k", k), ("v", v), ("mix_weight", mix_weight), ("out", out),
                       ("lse", lse), ("rsq", rsq), ("rstd", rstd)))
    h = q.shape[1]
    dmix = q.new_empty((h, h), dtype=stat_dtype(q.dtype)) if mix_weight is not None else q.new_empty(0, dtype=torch.float32)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmix)


def _emsa_setup_context(ctx, inputs, output):
    q, k, v, mix_weight, mix_bias, scale, eps, backend = inputs
    out, lse, rsq, rstd = output
    ctx.save_for_backward(q, k, v, mix_weight, out, lse, rsq, rstd)
    ctx.scale, ctx.eps, ctx.backend = scale, eps, backend
    ctx.bias_like = (mix_bias.shape, mix_bias.dtype) if mix_bias is not None else None
    ctx.mark_non_differentiable(lse, rsq, rstd)


def _emsa_backward(ctx, dout, _dlse, _drsq, _drstd):
    q, k, v, mix_weight, out, lse, rsq, rstd = ctx.saved_tensors
    dq, dk, dv, dmix = emsa_bwd(dout, q, k, v, mix_weight, out, lse, rsq, rstd, ctx.scale, ctx.eps, ctx.backend)
    dweight = dmix.reshape(mix_weight.shape).to(mix_weight.dtype) if mix_weight is not None else None
    # Softmax ignores a per-row constant, so the mix bias has an exactly zero gradient.
    dbias = q.new_zeros(ctx.bias_like[0], dtype=ctx.bias_like[1]) if ctx.bias_like is not None else None
    return dq, dk, dv, dweight, dbias, None, None, None


emsa_fwd.register_autograd(_emsa_backward, setup_context=_emsa_setup_context)


# --------------------------------------------------------------------------- PA custom ops
@torch.library.custom_op("rest_kernels::pa_fwd", mutates_args=())
def pa_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    """Fused PA forward on `backend`: x * sigmoid(depthwise 3x3 conv(x)), in x's memory format."""
    p = pa_problem(x, weight, bias)
    chosen = _kernel_backend("pa_fwd", backend, (x, weight), lambda b: b.pa_unsupported_reason(x, weight, bias))
    return chosen.run_pa_forward(p)


@pa_fwd.register_fake
def _pa_fwd_fake(x, weight, bias, backend):
    check_same_device((("x", x), ("weight", weight), ("bias", bias)))
    return torch.empty_like(x, memory_format=pa_layout(x))


@torch.library.custom_op("rest_kernels::pa_bwd", mutates_args=())
def pa_bwd(dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Fused PA backward on `backend`: (dx, dweight, dbias); dbias is empty without a bias."""
    p = pa_problem(x, weight, bias)
    check_pa_backward_args(dout, x)
    chosen = _kernel_backend("pa_bwd", backend, (x, weight),
                             lambda b: b.pa_unsupported_reason(x, weight, bias, needs_backward=True))
    return chosen.run_pa_backward(p, dout)


@pa_bwd.register_fake
def _pa_bwd_fake(dout, x, weight, bias, backend):
    check_same_device((("dout", dout), ("x", x), ("weight", weight), ("bias", bias)))
    return torch.empty_like(x, memory_format=pa_layout(x)), weight.new_empty(weight.shape), (
        bias.new_empty(bias.shape) if bias is not None else x.new_empty(0))


def _pa_setup_context(ctx, inputs, output):
    x, weight, bias, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.backend = backend


def _pa_backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = pa_bwd(dout, x, weight, bias, ctx.backend)
    return dx, dw, (db if bias is not None else None), None


pa_fwd.register_autograd(_pa_backward, setup_context=_pa_setup_context)


# --------------------------------------------------------------------------- public API
def _autocast_dtype(t: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype when torch.autocast is on for t's device type, else None."""
    device_type = t.device.type
    if device_type not in ("cuda", "cpu", "xpu", "mps") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _amp_cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # autocast's own eligibility rule: floating tensors other than float64 are cast
    if t is None or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def emsa_attention(q, k, v, mix_weight=None, mix_bias=None, *, scale=None, eps=1e-5, backend=None):
    """ResT's EMSA core: softmax(mix(q k^T * scale)) [-> InstanceNorm] @ v.

    q (B,h,N,d); k, v (B,h,M,d), any strides. mix_weight (h,h) or (h,h,1,1) turns on the head mix
    and the InstanceNorm (no affine, biased variance, eps); None gives plain softmax attention.
    Returns (B,h,N,d) laid out in memory as (B,N,h,d). See docs/api.md.
    """
    p = validate_emsa(q, k, v, mix_weight, mix_bias, scale, eps)
    amp = _autocast_dtype(q)
    if amp is not None:
        # Like a matmul under autocast: q, k, v in the autocast dtype; the mix weight stays float32
        # (every backend applies it in float32). Autocast is then switched off so that the official
        # math keeps its float32 logits, softmax and InstanceNorm statistics instead of having its
        # matmul and conv cast back down; the fused kernels keep theirs in float32 anyway.
        p = p.with_tensors(*(_amp_cast(t, amp) for t in (q, k, v)))
        with torch.autocast(q.device.type, enabled=False):
            return _emsa_attention(p, backend)
    return _emsa_attention(p, backend)


def _validated_call(problem, op, *args):
    """op(*args), where op's implementation takes `problem` instead of validating the call again.
    Under torch.compile the graph calls the op later, without this frame: it validates then (once),
    and tracing never sees the hand-off's thread-local state."""
    if torch.compiler.is_compiling():
        return op(*args)
    with handing_off(problem):
        return op(*args)


#: read while torch.compile traces (Dynamo guards on its value): see direct_kernels_in_traces
_direct_kernels = False


@contextlib.contextmanager
def direct_kernels_in_traces():
    """Within the block, a graph that torch.compile traces for inference (no gradient to record,
    not torch.export) calls a backend's compiled kernel op itself (torch.ops.rest_kernels_C.emsa_fwd /
    pa_fwd, where the backend declares `graph_ops`) instead of the custom op rest_kernels::emsa_fwd /
    pa_fwd. Why: the custom op's implementation is Python (validation, backend selection, dispatch
    back into Python), 50-90 us a call measured at ResT's batch-1 shapes (AMD EPYC Zen 4, bfloat16:
    raw op 127 us, custom op 217 us at 49 queries, 8 heads), about 1 ms of rest_base's 40 ms call;
    a graph calling the extension's op runs no Python between its kernels (inductor's C++ wrapper).
    The call was validated and its backend chosen here, at trace time, on the traced tensors; the
    kernel's own checks (csrc/op_checks.h) still run on every call. What an inference graph does not
    need is what the custom op adds: autograd, and one node that export and ONNX keep. Used by
    rest.CompiledInference; not for several threads tracing at once (a process-wide switch)."""
    global _direct_kernels
    from ._extension import load
    load()  # registers the ops' fakes, outside any trace
    previous, _direct_kernels = _direct_kernels, True
    try:
        yield
    finally:
        _direct_kernels = previous


def _calls_kernel_directly(chosen, needs_backward: bool) -> bool:
    return (_direct_kernels and chosen.graph_ops and not needs_backward and torch.compiler.is_compiling()
            and not torch.compiler.is_exporting())


def _needs_backward(*tensors) -> bool:
    """Will autograd call the backward of this call? Then the chosen backend must serve it too."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _emsa_attention(p, backend):
    q, k, v = p.q, p.k, p.v
    # The backend is chosen even for empty inputs: a named backend that cannot serve these tensors
    # says so whatever their size.
    needs_backward = _needs_backward(q, k, v, p.mix_weight)
    chosen = select("emsa_attention", backend, (q, k, v),
                    lambda b: b.emsa_unsupported_reason(q, k, v, p.mix_weight, needs_backward),
                    lambda b: b.emsa_route_preference(q, k, p.mix_weight, needs_backward))
    if p.empty:  # nothing to compute (B, h, N or d is 0): an empty (B,N,h,d)-laid-out result
        return (q * 0).transpose(1, 2).contiguous().transpose(1, 2)
    if chosen.name == "reference":
        # an ONNX export writes the same math in the form the engines evaluate accurately and fast
        official = emsa_export_form if torch.onnx.is_in_onnx_export() else emsa_reference
        return official(q, k, v, p.mix_weight, p.mix_bias, p.scale, p.eps)
    if chosen.name == "sdpa":  # PyTorch's SDPA as it is (backends/sdpa.py): aten's op for autograd and tracing
        return sdpa_attention(q, k, v, p.scale)
    if _calls_kernel_directly(chosen, needs_backward):
        return chosen.run_emsa_forward(p)[0]
    return _validated_call(p, emsa_fwd, q, k, v, p.mix_weight, p.mix_bias, p.scale, p.eps, chosen.name)[0]


def emsa_attention_map(q, k, mix_weight=None, mix_bias=None, *, scale=None, eps=1e-5):
    """The N x M attention map of emsa_attention, materialised: (B, h, N, M), so that
    emsa_attention(q, k, v, ...) equals emsa_attention_map(q, k, ...) @ v up to rounding.

    For what needs the map itself, such as dropout on it (ResT's EMSA with attn_drop > 0 in
    training). Always the official eager math of the reference backend (no fused backend forms the
    map); differentiable in q, k, mix_weight and mix_bias. Arguments, their checks and autocast as in
    emsa_attention; float16 / bfloat16 maps are computed in float32 and returned in q's dtype.
    """
    # v plays no part: k stands in for it in the checks shared with emsa_attention (v is k-shaped)
    p = validate_emsa(q, k, k, mix_weight, mix_bias, scale, eps)
    amp = _autocast_dtype(q)
    if amp is not None:
        p = p.with_tensors(*(_amp_cast(t, amp) for t in (q, k, k)))
        with torch.autocast(q.device.type, enabled=False):
            return _attention_map(p)
    return _attention_map(p)


def _attention_map(p):
    q, k = p.q, p.k
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:  # no (batch, head, query) row: an empty map
        return q.new_zeros(*q.shape[:3], k.shape[2])
    return attention_map(q, k, p.mix_weight, p.mix_bias, p.scale, p.eps)


def pa_gate(x, weight, bias=None, *, backend=None):
    """ResT's PA: x * sigmoid(conv2d(x, weight, bias, padding=1, groups=C)), x (B,C,H,W). The result
    (and the gradient of x) has x's memory format: channels-last for a channels-last x."""
    validate_pa_args(x, weight, bias)
    amp = _autocast_dtype(x)
    if amp is not None:
        # Like the depthwise conv2d it contains under autocast: x, weight and bias in the autocast dtype.
        x, weight, bias = (_amp_cast(t, amp) for t in (x, weight, bias))
        with torch.autocast(x.device.type, enabled=False):
            return _pa_gate(x, weight, bias, backend)
    return _pa_gate(x, weight, bias, backend)


def _pa_gate(x, weight, bias, backend):
    p = validate_pa(x, weight, bias, args_checked=True)  # pa_gate checked the rest; dtypes after any cast
    needs_backward = _needs_backward(x, weight, bias)
    chosen = select("pa_gate", backend, (x, weight),
                    lambda b: b.pa_unsupported_reason(x, weight, bias, needs_backward),
                    lambda b: b.pa_route_preference(x, needs_backward))
    if p.empty:
        return x * 0
    if chosen.name == "reference":
        return pa_reference(x, weight, bias)
    if _calls_kernel_directly(chosen, needs_backward):
        return chosen.run_pa_forward(p)
    return _validated_call(p, pa_fwd, x, weight, bias, chosen.name)
