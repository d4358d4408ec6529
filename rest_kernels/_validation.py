"""Argument checks of the public ops, run before any backend is chosen or kernel launched.

Each failure raises TypeError or ValueError naming the argument and saying what was expected.
"""
from __future__ import annotations

import math
import numbers

import torch

from .backends.stats import stat_dtype, stat_shapes


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _check_tensor(name, t, ndim=None, optional=False):
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32 or float64), "
                        f"got {_dtype_name(t.dtype)}")
    if ndim is not None and t.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        ranks = str(ndim) if isinstance(ndim, int) else " or ".join(map(str, ndim))
        raise ValueError(f"{name} must be {ranks}-dimensional, got shape {tuple(t.shape)}")


def check_same_device(named):
    devices = {n: t.device for n, t in named if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _check_same_dtype(named):
    dtypes = {n: t.dtype for n, t in named}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n} {_dtype_name(d)}" for n, d in dtypes.items())
        raise TypeError(f"q, k and v must share one dtype, got {listing}")


def _check_number(name, value, *, positive=False, allow_zero=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # Comparisons rather than math.isfinite: under torch.compile a float that changed between calls
    # (the scale of two models with other head dims) is traced as a symbolic float, on which
    # comparisons become guards while math.isfinite breaks the graph. NaN fails both comparisons.
    if not (-math.inf < value < math.inf):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and (value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


def check_emsa_args(q, k, v, mix_weight, mix_bias, scale, eps):
    """Validate emsa_attention's arguments; return (mix_weight as (h,h) or None, scale, eps)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, ndim=4)
    _check_tensor("mix_weight", mix_weight, ndim=(2, 4), optional=True)
    _check_tensor("mix_bias", mix_bias, ndim=1, optional=True)
    check_same_device((("q", q), ("k", k), ("v", v), ("mix_weight", mix_weight), ("mix_bias", mix_bias)))
    _check_same_dtype((("q", q), ("k", k), ("v", v)))
    B, h, N, d = q.shape
    if k.shape[:2] != (B, h) or v.shape[:2] != (B, h):
        raise ValueError(f"q, k and v must agree on batch and heads (B, h, ., .): got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k must have head dim {d} like q, got k {tuple(k.shape)} for q {tuple(q.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have as many tokens as k (M={k.shape[2]}), got v {tuple(v.shape)}")
    if v.shape[3] != d:
        raise ValueError(f"v must have head dim {d} like q, got v {tuple(v.shape)}")
    if k.shape[2] == 0 and B * h * N > 0:
        raise ValueError(f"k and v must have at least one key token (M >= 1), got k {tuple(k.shape)}")
    if mix_weight is not None:
        if tuple(mix_weight.shape) not in ((h, h), (h, h, 1, 1)):
            raise ValueError(f"mix_weight must have shape ({h}, {h}) or ({h}, {h}, 1, 1) for {h} heads, "
                             f"got {tuple(mix_weight.shape)}")
        mix_weight = mix_weight.reshape(h, h)
    if mix_bias is not None:
        if mix_weight is None:
            raise ValueError("mix_bias is given but mix_weight is None: the bias belongs to the head mix")
        if tuple(mix_bias.shape) != (h,):
            raise ValueError(f"mix_bias must have shape ({h},), got {tuple(mix_bias.shape)}")
    if scale is None:  # with d = 0 every logit is 0 whatever the scale: any finite default will do
        scale = d ** -0.5 if d > 0 else 1.0
    else:
        scale = _check_number("scale", scale)
    eps = _check_number("eps", eps, positive=True)
    return mix_weight, scale, eps


def check_pa_args(x, weight, bias):
    _check_tensor("x", x, ndim=4)
    _check_tensor("weight", weight, ndim=4)
    _check_tensor("bias", bias, ndim=1, optional=True)
    check_same_device((("x", x), ("weight", weight), ("bias", bias)))
    C = x.shape[1]
    if tuple(weight.shape) != (C, 1, 3, 3):
        raise ValueError(f"weight must have shape ({C}, 1, 3, 3) for x with {C} channels, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"bias must have shape ({C},), got {tuple(bias.shape)}")


def check_pa_dtypes(x, weight, bias):
    """The depthwise conv takes one dtype, as conv2d itself requires (checked after any autocast cast)."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype {_dtype_name(x.dtype)}, got {_dtype_name(t.dtype)}")


# --------------------------------------------------------------------------- the kernels' extra inputs
# The custom ops torch.ops.rest_kernels.emsa_bwd / pa_bwd are callable directly (not only by autograd),
# so what autograd would hand them (the gradient of the output, the saved output and statistics) is
# checked too: a wrong shape there would otherwise make a kernel read past the end of a buffer.
def _check_like(name, t, ref, ref_name):
    _check_tensor(name, t, ndim=ref.dim())
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {_dtype_name(ref.dtype)}, got {_dtype_name(t.dtype)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _check_stat(name, t, shape, dtype, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {_dtype_name(dtype)} (a statistic of emsa_fwd for q of this dtype), "
                        f"got {_dtype_name(t.dtype)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (a statistic of emsa_fwd), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")


def check_emsa_backward_args(dout, q, out, lse, rsq, rstd, mix: bool):
    """emsa_bwd's inputs beyond emsa_fwd's: dout and out like q, the statistics as emsa_fwd returns
    them (rest_kernels/backends/stats.py: rsq and rstd are empty without the mix)."""
    _check_like("dout", dout, q, "q")
    _check_like("out", out, q, "q")
    B, h, N, _ = q.shape
    shapes = stat_shapes(B, h, N, mix)
    for name, t, shape in zip(("lse", "rsq", "rstd"), (lse, rsq, rstd), shapes):
        _check_stat(name, t, shape, stat_dtype(q.dtype), q.device)


def check_pa_backward_args(dout, x):
    _check_like("dout", dout, x, "x")
