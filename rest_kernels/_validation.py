"""The one validation boundary of the ops: arguments in, a validated problem out.

`validate_emsa` / `validate_pa` check every argument (each failure a TypeError for a wrong type or
dtype, a ValueError for a wrong shape, device or value, naming the argument and saying what was
expected) and return an `EmsaProblem` / `PaProblem`: the tensors, the resolved scale and eps, the
mix weight as (h, h). Everything below works on problems: the backends' kernels
(rest_kernels/backends/base.py), the custom ops, the reference.

Each call is validated once. A layer that has validated a call and hands it to the next layer
through an op schema (emsa_attention -> the custom op torch.ops.rest_kernels.emsa_fwd; the custom
op -> a backend) wraps that call in `handing_off(problem)`; the next layer's `emsa_problem(...)` /
`pa_problem(...)` returns the handed-off problem when its arguments are the very same objects, and
validates otherwise (a direct call of the custom op or of a backend).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import threading

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


def _check_emsa_args(q, k, v, mix_weight, mix_bias, scale, eps):
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


def _check_pa_args(x, weight, bias):
    _check_tensor("x", x, ndim=4)
    _check_tensor("weight", weight, ndim=4)
    _check_tensor("bias", bias, ndim=1, optional=True)
    check_same_device((("x", x), ("weight", weight), ("bias", bias)))
    C = x.shape[1]
    if tuple(weight.shape) != (C, 1, 3, 3):
        raise ValueError(f"weight must have shape ({C}, 1, 3, 3) for x with {C} channels, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"bias must have shape ({C},), got {tuple(bias.shape)}")


def _check_pa_dtypes(x, weight, bias):
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
    full = stat_shapes(B, h, N, True)
    for name, t, shape, full_shape in zip(("lse", "rsq", "rstd"), (lse, rsq, rstd), shapes, full):
        # without the mix rsq and rstd are empty; the (B,h,N) / (B,h) tensors of the contract before
        # rest_kernels/backends/stats.py are still accepted there (and not read)
        if not mix and isinstance(t, torch.Tensor) and tuple(t.shape) == full_shape:
            shape = full_shape
        _check_stat(name, t, shape, stat_dtype(q.dtype), q.device)


def check_pa_backward_args(dout, x):
    _check_like("dout", dout, x, "x")


# --------------------------------------------------------------------------- problems
@dataclasses.dataclass(frozen=True, eq=False)
class EmsaProblem:
    """A validated emsa_attention call: q (B,h,N,d); k, v (B,h,M,d); the mix weight as (h,h) or None."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mix_weight: torch.Tensor | None
    mix_bias: torch.Tensor | None
    scale: float
    eps: float

    @property
    def mix(self) -> bool:
        return self.mix_weight is not None

    @property
    def empty(self) -> bool:
        """Nothing to compute (B, h, N or d is 0): answered by stats.empty_stats, no kernel runs."""
        return self.q.numel() == 0

    @property  # not cached: Dynamo cannot trace cached_property's lock (rest_kernels.direct_kernels_in_traces)
    def kernel_weight(self) -> torch.Tensor | None:
        """The mix weight as every kernel reads it: (h, h), contiguous, in the statistics dtype
        (float32, float64 for float64 inputs: a float32 copy would cap float64 results near 1e-7)."""
        if self.mix_weight is None:
            return None
        return self.mix_weight.to(stat_dtype(self.q.dtype)).contiguous()

    def with_tensors(self, q, k, v) -> "EmsaProblem":
        """The same problem with q, k, v cast (autocast): shapes and devices are unchanged."""
        return dataclasses.replace(self, q=q, k=k, v=v)

    def is_call(self, q, k, v, mix_weight, mix_bias, scale, eps) -> bool:
        return (q is self.q and k is self.k and v is self.v and mix_weight is self.mix_weight
                and mix_bias is self.mix_bias and scale == self.scale and eps == self.eps)


@dataclasses.dataclass(frozen=True, eq=False)
class PaProblem:
    """A validated pa_gate call: x (B,C,H,W), weight (C,1,3,3), bias (C,) or None, one dtype."""
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def empty(self) -> bool:
        return self.x.numel() == 0

    def is_call(self, x, weight, bias) -> bool:
        return x is self.x and weight is self.weight and bias is self.bias


def validate_emsa(q, k, v, mix_weight, mix_bias, scale, eps) -> EmsaProblem:
    mix_weight, scale, eps = _check_emsa_args(q, k, v, mix_weight, mix_bias, scale, eps)
    return EmsaProblem(q, k, v, mix_weight, mix_bias, scale, eps)


def validate_pa_args(x, weight, bias) -> None:
    """PA's types, shapes and devices: pa_gate checks them before autocast casts, the dtypes after
    (validate_pa(..., args_checked=True)), so a call is still validated once."""
    _check_pa_args(x, weight, bias)


def validate_pa(x, weight, bias, args_checked: bool = False) -> PaProblem:
    if not args_checked:
        _check_pa_args(x, weight, bias)
    _check_pa_dtypes(x, weight, bias)
    return PaProblem(x, weight, bias)


_handoff = threading.local()


@contextlib.contextmanager
def handing_off(problem):
    """Inside the block, the next layer's emsa_problem / pa_problem of this very call takes `problem`."""
    previous = getattr(_handoff, "problem", None)
    _handoff.problem = problem
    try:
        yield problem
    finally:
        _handoff.problem = previous


def _handed_off(kind, *call):
    problem = getattr(_handoff, "problem", None)
    return problem if isinstance(problem, kind) and problem.is_call(*call) else None


def emsa_problem(q, k, v, mix_weight, mix_bias, scale, eps) -> EmsaProblem:
    """The problem of this call: the one the layer above validated, else validated here."""
    return (_handed_off(EmsaProblem, q, k, v, mix_weight, mix_bias, scale, eps)
            or validate_emsa(q, k, v, mix_weight, mix_bias, scale, eps))


def pa_problem(x, weight, bias) -> PaProblem:
    return _handed_off(PaProblem, x, weight, bias) or validate_pa(x, weight, bias)
