"""Shared pieces of the hostile-call corpus: expectations, the Case record, comparisons with the
reference, input builders, and what each backend must answer to a valid call on this machine."""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

import torch

import rest_kernels
from rest_kernels import emsa_attention, emsa_reference, pa_gate, pa_reference
from rest_kernels import BackendUnavailableError
from rest_kernels.backends.registry import BACKENDS as BACKEND_OBJECTS

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
#: every backend the registry declares (rest_kernels/backends/registry.py), and "auto"
BACKENDS = ("reference", "auto", *(n for n in BACKEND_OBJECTS if n != "reference"))
#: the custom ops take a concrete backend name ("auto" is refused)
KERNEL_BACKENDS = tuple(BACKEND_OBJECTS)
#: the raw ops of the compiled extension: op-name suffix -> the backend that owns them
RAW_SUFFIXES = {"": "cpu", "_emu": "cuda-emu"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# --------------------------------------------------------------------------- expectations
@dataclasses.dataclass(frozen=True)
class Raises:
    """The call must raise one of `types`, its message matching `match` (re.search); with `output`,
    the child's printed output must match it too (argparse prints its error, then exits)."""
    types: tuple
    match: str
    output: str | None = None

    def problem(self, outcome) -> str | None:
        names = " or ".join(t.__name__ for t in self.types)
        if outcome.status != "raised":
            return f"expected {names} matching {self.match!r}, but the call {outcome.status}"
        if not any(outcome.raised(t) for t in self.types):
            return f"expected {names} matching {self.match!r}, got {outcome.exc_types[0]}"
        if not re.search(self.match, outcome.message):
            return f"{names} raised, but its message does not match {self.match!r}"
        if self.output is not None and not re.search(self.output, outcome.output):
            return f"{names} raised, but the printed output does not match {self.output!r}"
        return None


@dataclasses.dataclass(frozen=True)
class Correct:
    """The call must return, and the case's own comparison with the reference must hold."""
    or_raises: Raises | None = None  # an alternative also accepted (a known, documented refusal)

    def problem(self, outcome) -> str | None:
        if outcome.status == "returned" and outcome.value == "ok":
            return None
        if self.or_raises is not None and self.or_raises.problem(outcome) is None:
            return None
        return "expected a correct result" + (f" (or {self.or_raises.match!r})" if self.or_raises else "")


CORRECT = Correct()


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    fn: Callable[[], object]
    expect: object
    xfail: str | None = None      # a known bug outside Python (csrc/): the reason, for xfail(strict=True)
    timeout: float = 60.0
    alone: bool = False           # changes process state (environment variables): never batched


def unavailable(backend: str, why: str = "") -> Raises:
    return Raises((BackendUnavailableError,), rf"backend '{backend}' cannot serve this call.*{why}")


def value_error(match: str) -> Raises:
    return Raises((ValueError,), match)


def type_error(match: str) -> Raises:
    return Raises((TypeError,), match)


# --------------------------------------------------------------------------- comparisons
def _scale(*tensors) -> float:
    finite = [t.double()[torch.isfinite(t.double())] for t in tensors if t is not None and t.numel()]
    return max([f.abs().max().item() for f in finite if f.numel()] + [1e-30])


TOL = {F64: 1e-9, F32: 1e-4}


def assert_matches(got, oracle, lowp_ref=None, floor=None, what="output", tol=None):
    """got against a float64 oracle: same shape, same NaN/Inf pattern; finite entries within the
    dtype's tolerance relative to the larger of max|oracle| and `floor` (float16 / bfloat16: the
    flash-attention rule against the reference run in that dtype, as tests/support/conformance.py does)."""
    assert tuple(got.shape) == tuple(oracle.shape), f"{what}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    g, o = got.double(), oracle.double()
    assert torch.equal(torch.isnan(g), torch.isnan(o)), f"{what}: NaN pattern differs from the reference"
    assert torch.equal(torch.isinf(g) & (g > 0), torch.isinf(o) & (o > 0)), f"{what}: +Inf pattern differs"
    assert torch.equal(torch.isinf(g) & (g < 0), torch.isinf(o) & (o < 0)), f"{what}: -Inf pattern differs"
    finite = torch.isfinite(o)
    if not finite.any():
        return
    g, o = g[finite], o[finite]
    scale = max(o.abs().max().item(), floor or 0.0, 1e-30)
    err = (g - o).abs().max().item()
    if got.dtype in (F16, BF16) and tol is None:
        assert lowp_ref is not None, "low precision needs the reference run in that dtype"
        ref_err = (lowp_ref.double()[finite] - o).abs().max().item()
        allowance = torch.finfo(got.dtype).eps * scale
        assert err <= 2 * ref_err + allowance, (
            f"{what}: error {err:.3e} > 2 x reference error {ref_err:.3e} + rounding {allowance:.3e}")
        return
    tol = tol if tol is not None else TOL[got.dtype]
    assert err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.0e} x scale {scale:.3e}"


def _rand(g, *shape, dtype=F32, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


# --------------------------------------------------------------------------- EMSA inputs and checks
def emsa_args(B=2, h=2, N=5, M=3, d=4, dtype=F32, mix=True, bias=False, seed=0, scale_q=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    args = dict(q=_rand(g, B, h, N, d, dtype=dtype, scale=scale_q), k=_rand(g, B, h, M, d, dtype=dtype),
                v=_rand(g, B, h, M, d, dtype=dtype),
                mix_weight=_rand(g, h, h, dtype=dtype) if mix else None,
                mix_bias=_rand(g, h, dtype=dtype) if (mix and bias) else None)
    if device != "cpu":
        args = {n: (t.to(device) if t is not None else None) for n, t in args.items()}
    return args


def _up(t):
    return t.double() if t is not None else None


def check_emsa(backend, args, scale=None, eps=1e-5, floor_v=True, tol=None):
    """emsa_attention on `backend` against the float64 reference of the same inputs."""
    q, k, v = args["q"], args["k"], args["v"]
    out = emsa_attention(q, k, v, args.get("mix_weight"), args.get("mix_bias"), scale=scale, eps=eps, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device, (out.shape, out.dtype)
    assert out.numel() == 0 or out.transpose(1, 2).is_contiguous(), "output not laid out as (B, N, h, d)"
    if q.device.type == "meta" or out.numel() == 0:
        return  # shapes only (the reference's InstanceNorm refuses empty maps)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    w, b = args.get("mix_weight"), args.get("mix_bias")
    oracle = emsa_reference(_up(q), _up(k), _up(v), _up(w), _up(b), s, eps)
    lowp = emsa_reference(q, k, v, w, b, s, eps) if q.dtype in (F16, BF16) else None
    assert_matches(out, oracle, lowp, floor=_scale(v) if floor_v else None, tol=tol)


def check_emsa_grads(backend, args, dout_kind="random", tol=None):
    """Gradients of q, k, v and mix_weight against float64 autograd of the reference."""
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items() if t is not None}
    out = emsa_attention(leaves["q"], leaves["k"], leaves["v"], leaves.get("mix_weight"), leaves.get("mix_bias"),
                         backend=backend)
    if dout_kind == "ones":  # what out.sum().backward() hands the op: a zero-stride expanded gradient
        dout = torch.ones(1, 1, 1, 1, dtype=out.dtype).expand(out.shape)
    else:
        dout = _rand(torch.Generator().manual_seed(7), *out.shape, dtype=out.dtype)
    names = [n for n in ("q", "k", "v", "mix_weight") if n in leaves]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], dout)
    ups = {n: _up(t.detach()).requires_grad_(True) for n, t in leaves.items()}
    ref = emsa_reference(ups["q"], ups["k"], ups["v"], ups.get("mix_weight"), ups.get("mix_bias"),
                         args["q"].shape[-1] ** -0.5)
    ref_grads = torch.autograd.grad(ref, [ups[n] for n in names], dout.double())
    for n, gr, rg in zip(names, grads, ref_grads):
        assert gr.dtype == leaves[n].dtype, f"grad {n}: dtype {gr.dtype}"
        assert_matches(gr, rg, floor=_scale(*ref_grads), what=f"grad {n}", tol=tol or (1e-8 if gr.dtype == F64 else 2e-4))


def emsa_expect(backend, dtype=F32, h=2, d=4, mix=True, device="cpu"):
    """What a valid EMSA call must give on `backend` here: a correct result or BackendUnavailableError."""
    if backend in ("reference", "auto"):
        return CORRECT
    reason = rest_kernels.available_backends()[backend]
    if reason is not None:
        return unavailable(backend)
    b = BACKEND_OBJECTS[backend]
    if b.device_type and device != b.device_type:  # "" serves any device
        return unavailable(backend, f"{backend} serves")
    # the backend's own reasons for such a call (rest_kernels/backends/base.py), not a second copy
    # of its rules: tensors of the case's dtype, heads and head dim, one row and one key
    q = torch.empty(1, h, 1, d, dtype=dtype, device=device)
    w = torch.empty(h, h, dtype=F32, device=device) if mix else None
    reasons = b.emsa_not_supported_reasons(q, q, q, w)
    return unavailable(backend, re.escape(reasons[0])) if reasons else CORRECT


def pa_expect(backend, dtype=F32, device="cpu"):
    """What a valid PA call must give on `backend` here, from the backend's own reasons."""
    if backend in ("reference", "auto"):
        return CORRECT
    if rest_kernels.available_backends()[backend] is not None:
        return unavailable(backend)
    b = BACKEND_OBJECTS[backend]
    if b.device_type and device != b.device_type:  # "" serves any device
        return unavailable(backend, f"{backend} serves")
    x, w = torch.empty(1, 1, 1, 1, dtype=dtype, device=device), torch.empty(1, 1, 3, 3, dtype=dtype, device=device)
    reasons = b.pa_not_supported_reasons(x, w, None)
    return unavailable(backend, re.escape(reasons[0])) if reasons else CORRECT


def pa_args(B=2, C=3, H=5, W=6, dtype=F32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=_rand(g, B, C, H, W, dtype=dtype), weight=_rand(g, C, 1, 3, 3, dtype=dtype),
                bias=_rand(g, C, dtype=dtype) if bias else None)


def check_pa(backend, args, grad=False):
    x, w, b = args["x"], args["weight"], args["bias"]
    if grad:
        x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
        b = b.detach().requires_grad_(True) if b is not None else None
    out = pa_gate(x, w, b, backend=backend)
    assert out.shape == x.shape and out.dtype == x.dtype, (out.shape, out.dtype)
    if out.numel() == 0:
        return  # shapes only (conv2d refuses groups=0 for C = 0)
    ups = [_up(t.detach()) if t is not None else None for t in (x, w, b)]
    oracle = pa_reference(*ups)
    lowp = pa_reference(x.detach(), w.detach(), b.detach() if b is not None else None) if x.dtype in (F16, BF16) else None
    assert_matches(out, oracle, lowp, floor=_scale(x))
    if grad:
        leaves = [t for t in (x, w, b) if t is not None]
        dout = _rand(torch.Generator().manual_seed(8), *out.shape, dtype=out.dtype)
        grads = torch.autograd.grad(out, leaves, dout)
        ups = [u.requires_grad_(True) for u in ups if u is not None]
        ref_grads = torch.autograd.grad(pa_reference(*ups, *([None] * (3 - len(ups)))), ups, dout.double())
        for n, gr, rg in zip(("x", "weight", "bias"), grads, ref_grads):
            assert_matches(gr, rg, floor=_scale(rg), what=f"grad {n}", tol=1e-8 if gr.dtype == F64 else 2e-4)


