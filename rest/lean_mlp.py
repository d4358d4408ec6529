"""A block's MLP branch, fc2(GELU(fc1(LayerNorm(x)))), as one autograd function that keeps less for
the backward than the four modules do.

Why: with the N x M attention maps gone (the fused EMSA), what a training step keeps for the backward
is mostly the MLP's: autograd saves the LayerNorm's input, fc1's input (the LayerNorm output), the
GELU's input (fc1's output, 4C wide) and fc2's input (the GELU output, 4C wide) - 10 token-widths of
the 14 a ResT block keeps. Measured on rest_lite's detection backbone at 800 x 1216 (batch 1, the
`cpu` backend, saved-tensor hooks counting each storage once): 558 of its 1,132 MiB.

What each mode keeps (`mlp_recompute`, a model option; "auto" picks "hidden" for a CPU model, "gelu"
for others, and "none" on the reference backend, whose models stay the official eager modules):
- "none": the modules as they are (autograd's own saves, 10 widths).
- "gelu": the LayerNorm's input x and its per-token statistics, and fc1's output h (5 widths); the
  backward recomputes the LayerNorm output and GELU(h), two element-wise passes.
- "hidden": x and the statistics only (1 width); the backward recomputes fc1 too (one more product of
  the three) - the memory-lean option.

Why "auto" differs by device: recomputing fc1 adds 8 C^2 of a block's ~60 C^2 multiply-adds per token
in a training step (q 2, kv ~0, proj 2, fc1 8, fc2 8 per pass, times 3 for the backward), about 13%
more linear-layer work, which a GEMM-bound GPU step at 224 px would pay nearly in full (an estimate:
no GPU here). At detection sizes the attention (4 M C per token and pass, M ~ 950 keys at 800 x 1216)
and the FPN dominate and the same recompute is ~3-6% of the step's multiply-adds; there "hidden" is
worth setting on a GPU too (rest_lite's backbone: 631 instead of 854 MiB).
On the CPU it does not show: rest_lite's detection backbone at 800 x 1216 (batch 1, fwd+bwd, `cpu`
backend, 2 threads, 2-core AMD EPYC Zen 4, 2026-12-05; 4 interleaved repeats) took 4.68 s ("none"),
4.59 s ("gelu") and 4.49 s ("hidden") - within the run's spread - while keeping 1,132 / 854 / 631 MiB
for the backward (eager: 2,756 MiB).

The gradients are the modules' own: the recomputed LayerNorm is aten's native_layer_norm on the same
input (its output bitwise the forward's), the GELU backward is aten's gelu_backward, and the products
are the ones the layers use (oneDNN where rest.dense picks it, F.linear / mm otherwise). Under autocast
the products run in the autocast dtype on cast copies, as autocast's F.linear does, and the LayerNorm
in the input's dtype (autocast's rule for layer_norm). The function has a first backward only
(once_differentiable, like the fused attention ops); whether a double backward will be asked for is
not known at the forward, so a model that needs one uses "none" (the reference backend's "auto").

`eligible` is the one place deciding whether a call may take the function: while gradients are
recorded, not while torch.compile or torch.fx traces (AOTAutograd's partitioner chooses its own
recomputation; fx records the modules), no dropout in training, no hooks on the modules (the function
would skip them), nn.LayerNorm with weight and bias, the exact GELU, and rest.dense.Linear layers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import _checks
from .dense import Linear, _has_hooks, _onednn_mm, on_reference_backend, onednn_linear, uses_onednn

__all__ = ["MLP_RECOMPUTE", "check_mlp_recompute", "resolve_mlp_recompute", "eligible", "norm_mlp"]

#: the values of the mlp_recompute option ("auto" is the default)
MLP_RECOMPUTE = ("auto", "none", "gelu", "hidden")


def check_mlp_recompute(mode) -> str:
    """mode if it is one of MLP_RECOMPUTE, else TypeError / ValueError naming the argument."""
    return _checks.choice("mlp_recompute", mode, MLP_RECOMPUTE)


def resolve_mlp_recompute(mode: str, fc1: nn.Module) -> str:
    """The mode a block runs: "auto" is "none" on the reference backend (the official eager modules,
    the benchmarks' baseline), "hidden" for a CPU model and "gelu" for others (module docstring)."""
    if mode != "auto":
        return mode
    if on_reference_backend(getattr(fc1, "backend", None)):
        return "none"
    return "hidden" if fc1.weight.device.type == "cpu" else "gelu"


def eligible(x: torch.Tensor, norm: nn.Module, mlp: nn.Module) -> bool:
    """Whether this call of the MLP branch may run as norm_mlp (see the module docstring)."""
    if not torch.is_grad_enabled() or isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling():
        return False
    fc1, act, fc2 = mlp.fc1, mlp.act, mlp.fc2
    if not (type(norm) is nn.LayerNorm and norm.weight is not None and norm.bias is not None
            and type(fc1) is Linear and type(fc2) is Linear and type(act) is nn.GELU and act.approximate == "none"):
        return False
    if mlp.training and mlp.drop.p > 0:
        return False
    if any(_has_hooks(m) for m in (norm, mlp, fc1, act, fc2, mlp.drop)):
        return False
    return x.requires_grad or any(p.requires_grad for m in (norm, fc1, fc2) for p in m.parameters())


def _product(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    return onednn_linear(a, weight, bias) if onednn else F.linear(a, weight, bias)


def _mm_t(a: torch.Tensor, b_t: torch.Tensor, onednn: bool) -> torch.Tensor:
    """a @ b_t.T (2-D)."""
    return _onednn_mm(a, b_t) if onednn else a @ b_t.t()


class _NormMlp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, eps, w1, b1, w2, b2, keep_hidden, onednn, compute_dtype):
        C = x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            y, mean, rstd = torch.native_layer_norm(x, (C,), ln_w, ln_b, eps)
            cast = _caster(compute_dtype)
            h = _product(cast(y), cast(w1), cast(b1), onednn)
            out = _product(F.gelu(h), cast(w2), cast(b2), onednn)
        # fc1's bias only where fc1 is recomputed (a parameter: alive anyway, but then not counted as kept)
        ctx.save_for_backward(x, mean, rstd, ln_w, ln_b, w1, None if keep_hidden else b1, w2, h if keep_hidden else None)
        ctx.eps, ctx.onednn, ctx.compute_dtype, ctx.has_b1 = eps, onednn, compute_dtype, b1 is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, mean, rstd, ln_w, ln_b, w1, b1, w2, h = ctx.saved_tensors
        need_x, need_lnw, need_lnb, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:8]
        onednn, cast = ctx.onednn, _caster(ctx.compute_dtype)
        C = x.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            # the LayerNorm output again: the same op on the same input, so bitwise the forward's
            y = torch.native_layer_norm(x, (C,), ln_w, ln_b, ctx.eps)[0]
            yc = cast(y).reshape(-1, y.shape[-1])
            if h is None:
                h = _product(yc, cast(w1), cast(b1), onednn)
            h2 = h.reshape(-1, h.shape[-1])
            g2 = dout.reshape(-1, dout.shape[-1]).to(h.dtype)
            dw2 = _mm_t(g2.t(), F.gelu(h2).t(), onednn).to(w2.dtype) if need_w2 else None
            db2 = g2.sum(0).to(w2.dtype) if need_b2 else None  # None when fc2 has no bias
            dh = torch.ops.aten.gelu_backward(_mm_t(g2, cast(w2).t(), onednn), h2)
            dw1 = _mm_t(dh.t(), yc.t(), onednn).to(w1.dtype) if need_w1 else None
            db1 = dh.sum(0).to(w1.dtype) if need_b1 and ctx.has_b1 else None
            dx = dlnw = dlnb = None
            if need_x or need_lnw or need_lnb:
                dy = _mm_t(dh, cast(w1).t(), onednn).to(y.dtype).reshape(y.shape)
                dx, dlnw, dlnb = torch.ops.aten.native_layer_norm_backward(
                    dy, x, (C,), mean, rstd, ln_w, ln_b, [need_x, need_lnw, need_lnb])
        return dx, dlnw, dlnb, None, dw1, db1, dw2, db2, None, None, None


def _caster(dtype: torch.dtype | None):
    """Tensor -> its copy in dtype (autocast's cast of a product's inputs); identity when dtype is None."""
    if dtype is None:
        return lambda t: t
    return lambda t: t if t is None or t.dtype == dtype else t.to(dtype)


def norm_mlp(x: torch.Tensor, norm: nn.LayerNorm, mlp: nn.Module, mode: str) -> torch.Tensor:
    """mlp(norm(x)) keeping for the backward what `mode` ("gelu" or "hidden") says (module docstring);
    callers check eligible() first. The output is the MLP's (its dropout, p = 0 or eval, is identity)."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    device = x.device.type
    compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    onednn = compute_dtype is None and uses_onednn(fc1.weight, fc1.linear_impl, fc1.backend)
    return _NormMlp.apply(x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
                          mode == "gelu", onednn, compute_dtype)
