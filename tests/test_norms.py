"""The models' CPU inference LayerNorm: the compiled kernel (csrc/cpu/layer_norm_cpu.cpp, through
torch.ops.rest_kernels_C.add_layer_norm) and the rule of rest/norms.py that decides when it runs."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rest
import rest_kernels
from rest import norms
from conftest import require_backend
from support.cpu_builds import every_build

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _kernels():
    require_backend("cpu")
    assert norms.kernel_unavailable_reason() is None  # registers the fake implementation too


def op(*args):
    return torch.ops.rest_kernels_C.add_layer_norm(*args)


def inputs(shape, dtype, seed=0, affine=True):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    # an offset mean and a spread scale: the centred variance is what is tested, not just N(0, 1)
    x = (3 + 2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = (1 + 0.5 * torch.randn(C, generator=g, dtype=torch.float64)).to(dtype) if affine else None
    b = (0.5 * torch.randn(C, generator=g, dtype=torch.float64)).to(dtype) if affine else None
    return x, r, w, b


def float64_layer_norm(s, w, b, eps):
    return F.layer_norm(s.double(), s.shape[-1:], None if w is None else w.double(),
                        None if b is None else b.double(), eps)


def max_err(a, ref):
    return (a.double() - ref).abs().max().item() if a.numel() else 0.0


# C: one value, fewer than a vector, awkward tails, ResT's 64 / 96 / 512 and beyond a GEMM-like 256;
# rows not a multiple of the kernel's 4-row groups or of its tasks (16K values).
SHAPES = [(1, 1), (3, 1, 3), (2, 5, 17), (7, 64), (2, 3, 96), (5, 100), (3, 513), (1, 1031, 64), (0, 8), (4, 0, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_against_float64_by_the_low_precision_rule(shape, affine, residual, dtype):
    """Error against float64 at most 2x PyTorch's own (F.layer_norm of the same rounded sum in that
    dtype) plus rounding: an ulp of the output's largest value (its one rounding to the dtype) and
    four ulps, in the arithmetic's dtype (float32; float64 for float64), of the largest |s| carried
    through rstd * |w| (forming s - mean rounds the mean to an ulp of the row's values; with few values
    per row PyTorch's own error is a sample of a handful of roundings and can be 0). The sum
    x + residual is the bits of `x + residual` in that dtype."""
    x, r, w, b = inputs(shape, dtype, affine=affine)
    eps = 1e-6
    out, total = op(x, r if residual else None, w, b, eps)
    s = x + r if residual else x
    if residual:
        assert torch.equal(total, s)
    else:
        assert total.shape == (0,)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    ref = float64_layer_norm(s, w, b, eps)
    theirs = F.layer_norm(s, s.shape[-1:], w, b, eps) if shape[-1] else s
    rounding = 0.0
    if ref.numel():
        s64 = s.double()
        rstd = (s64.var(-1, unbiased=False) + eps).rsqrt().max().item()
        wmax = 1.0 if w is None else w.double().abs().max().item()
        arith = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        rounding = torch.finfo(dtype).eps * ref.abs().max().item() + 4 * arith * s64.abs().max().item() * rstd * wmax
    assert max_err(out, ref) <= 2 * max_err(theirs, ref) + rounding


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_kernel_is_tight_in_float(dtype):
    """float64 to 1e-12 and float32 to 1e-5 of the output's scale: what the builds' summation orders allow."""
    x, r, w, b = inputs((6, 50, 96), dtype)
    out, _ = op(x, r, w, b, 1e-5)
    ref = float64_layer_norm(x + r, w, b, 1e-5)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert max_err(out, ref) <= tol * ref.abs().max().item()


def test_constant_rows_give_the_bias():
    """A constant row has variance 0: (x - mean) = 0 exactly, rstd = eps^-1/2 finite, out = bias."""
    x = torch.full((3, 40), 7.25)
    b = torch.linspace(-1, 1, 40)
    out, _ = op(x, None, torch.ones(40), b, 1e-5)
    assert torch.equal(out, b.expand(3, 40))


def test_any_strides():
    x, r, w, b = inputs((4, 6, 33), torch.float32)
    xt, rt = x.transpose(0, 1), r.transpose(0, 1)  # not contiguous
    out, total = op(xt, rt, w, b, 1e-6)
    want, want_total = op(xt.contiguous(), rt.contiguous(), w, b, 1e-6)
    assert torch.equal(out, want) and torch.equal(total, want_total)


def test_results_do_not_depend_on_the_thread_count():
    x, r, w, b = inputs((3, 700, 64), torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x, r, w, b, 1e-6)
        torch.set_num_threads(max(2, threads))
        many = op(x, r, w, b, 1e-6)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, c) for a, c in zip(one, many))


def test_every_runnable_build_meets_the_same_bound():
    x, r, w, b = inputs((5, 37, 100), torch.float32)
    ref = float64_layer_norm(x + r, w, b, 1e-6)

    def check(isa):
        out, _ = op(x, r, w, b, 1e-6)
        assert max_err(out, ref) <= 1e-5 * ref.abs().max().item(), isa

    every_build(check)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_opcheck(residual):
    x, r, w, b = inputs((2, 9, 24), torch.float32)
    torch.library.opcheck(torch.ops.rest_kernels_C.add_layer_norm.default, (x, r if residual else None, w, b, 1e-6))


@pytest.mark.parametrize("bad, message", [
    (dict(x=torch.zeros((), dtype=torch.float32)), "x must have at least one dimension"),
    (dict(x=torch.zeros(2, 4, dtype=torch.int32)), "x must be a floating tensor"),
    (dict(residual=torch.zeros(2, 5)), "residual must have shape"),
    (dict(residual=torch.zeros(2, 4, dtype=torch.float64)), "residual must have x's dtype"),
    (dict(weight=torch.ones(5)), "weight must have shape"),
    (dict(bias=torch.zeros(4, dtype=torch.float64)), "bias must have x's dtype"),
    (dict(eps=-1.0), "eps must be finite and >= 0"),
    (dict(eps=float("nan")), "eps must be finite and >= 0"),
], ids=["scalar", "int", "residual-shape", "residual-dtype", "weight-shape", "bias-dtype", "eps-negative", "eps-nan"])
def test_bad_arguments_raise_naming_them(bad, message):
    args = dict(x=torch.zeros(2, 4), residual=torch.zeros(2, 4), weight=torch.ones(4), bias=torch.zeros(4), eps=1e-5)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        op(args["x"], args["residual"], args["weight"], args["bias"], args["eps"])


# --------------------------------------------------------------------------- when the kernel runs
def test_the_rule():
    norm = nn.LayerNorm(8)
    x, r = torch.randn(2, 8), torch.randn(2, 8)
    with torch.no_grad():
        assert norms.kernel_applies(norm, x, r)
        assert not norms.kernel_applies(norm, x, r, backend="reference")  # the official eager math
        assert not norms.kernel_applies(norm, x.double(), r.double())      # not the norm's dtype
        assert not norms.kernel_applies(norm, x, r[:1])                    # broadcasting: the plain add
        assert not norms.kernel_applies(nn.LayerNorm((2, 8)), x)          # more than the last dimension
        with torch.autocast("cpu", torch.bfloat16):
            assert not norms.kernel_applies(norm, x, r)
    assert not norms.kernel_applies(norm, x, r)  # gradients wanted for the norm's parameters
    norm.requires_grad_(False)
    assert norms.kernel_applies(norm, x, r)
    assert not norms.kernel_applies(norm, x.requires_grad_(), r)
    with torch.no_grad():
        handle = norm.register_forward_hook(lambda *a: None)
        assert not norms.kernel_applies(norm, x, r)  # a hook must see its module called
        handle.remove()
        os.environ[norms.ENV_VAR] = "0"
        try:
            assert not norms.kernel_applies(norm, x, r)
        finally:
            del os.environ[norms.ENV_VAR]


def _ran_kernel(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "rest_kernels_C::add_layer_norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("factory", ["rest_lite", "restv2_tiny"])
def test_models_run_it_at_inference_by_the_low_precision_rule(factory, dtype):
    """Every LayerNorm of the model (the blocks' norm1, the add before norm2, sr_norm; ResTv2's up_norm
    and map norms; the final norm) takes the kernel in an inference call, and the logits' error
    against the float64 model is at most 2x that of the same model on nn.LayerNorm, plus an ulp of
    the logits' scale in that dtype."""
    torch.manual_seed(0)
    base = getattr(rest, factory)().eval()
    model = rest.optimize_for_inference(base, dtype=dtype)
    exact = rest.optimize_for_inference(base).double()
    x = torch.randn(2, 3, 64, 64).to(dtype)
    with torch.no_grad():
        calls = _ran_kernel(lambda: model(x))
        ours = model(x).double()
        os.environ[norms.ENV_VAR] = "0"
        try:
            assert _ran_kernel(lambda: model(x)) == 0
            theirs = model(x).double()
        finally:
            del os.environ[norms.ENV_VAR]
        ref = exact(x.double())
    assert calls == sum(1 for m in model.modules() if isinstance(m, nn.LayerNorm))
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    assert max_err(ours, ref) <= 2 * max_err(theirs, ref) + ulp


def test_training_keeps_pytorch_layer_norm():
    model = rest.rest_lite()
    x = torch.randn(1, 3, 64, 64)
    assert _ran_kernel(lambda: model(x).sum().backward()) == 0
