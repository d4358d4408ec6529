"""Numerical extremes, NaN/Inf propagation, determinism, concurrency and property-based agreement,
for every fused backend that runs on this machine's CPU (skipped with its reason otherwise)."""
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import conformance
import rest_kernels
from conftest import require_backend
from rest_kernels.backends.registry import BACKENDS

#: the fused backends that serve CPU tensors here, from their declarations (triton: under the interpreter)
CPU_FUSED = [n for n, b in BACKENDS.items() if n != "reference" and b.device_type == "cpu"]


def fused_dtypes(backend):
    return [d for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16) if d in BACKENDS[backend].dtypes]


def run(backend, q, k, v, w=None):
    return rest_kernels.emsa_attention(q, k, v, w, backend=backend)


# --------------------------------------------------------------------------- numerical extremes
@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("mix", [True, False])
def test_huge_logits_stay_finite_and_match(backend, mix):
    require_backend(backend)
    # |logits| up to ~1e4: the online softmax must subtract the running max, never overflow.
    for dtype in fused_dtypes(backend):
        q, k, v, w, _ = conformance.emsa_inputs(1, 2, 9, 7, 4, dtype, mix, logit_scale=3e3)
        with torch.no_grad():
            logits = (q.double() @ k.double().transpose(-2, -1)) * 0.5
            assert logits.abs().max() > 1e3
            out = run(backend, q, k, v, w)
            ref = run("reference", q.double(), k.double(), v.double(), w.double() if mix else None)
        assert torch.isfinite(out).all(), f"{backend} {dtype}: non-finite output"
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
        if mix and dtype == torch.float32 and backend in ("triton", "cuda-emu"):
            # The tiled backends rebuild P = exp(S - lse) / M from the saved float32 row statistic
            # (rest_kernels/backends/stats.py), whose rounding is an ulp of |lse| ~ |logits| = 1e4,
            # i.e. ~1e-3 relative on P, as for flash-attention's saved log-sum-exp. PyTorch's own
            # float32 logits carry the same ulp, so only one-hot rows like these are exact there.
            tol = 4 * torch.finfo(torch.float32).eps * logits.abs().max().item()
        conformance.assert_close_scaled(out, ref, tol, f"{backend} {dtype} huge logits")


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_uniform_attention_variance_below_eps(backend):
    require_backend(backend)
    # q = 0: every probability is 1/M, the variance is 0 << eps and the normalised map is 0 in exact
    # arithmetic; rounding of P (about 1e-8) is scaled by rstd = eps^-1/2 ~ 316, so the output must be
    # zero to the dtype's tolerance relative to the scale of v.
    for dtype in fused_dtypes(backend):
        q = torch.zeros(2, 2, 6, 4, dtype=dtype)
        k, v = torch.randn(2, 2, 5, 4, dtype=dtype), torch.randn(2, 2, 5, 4, dtype=dtype)
        w = torch.randn(2, 2, dtype=dtype)
        out = run(backend, q, k, v, w)
        tol = conformance.RTOL.get(dtype, 1e-2)
        assert out.double().abs().max() <= tol * v.double().abs().max(), f"{backend} {dtype}: {out.abs().max()}"


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("logit_scale", [1e-2, 1e-3])
def test_near_uniform_attention_is_as_accurate_as_pytorch(backend, logit_scale):
    require_backend(backend)
    # Tiny logits: P = 1/M (1 + O(logits)) and the map's variance (about logit_scale^2 / M^2) is far
    # below eps, so the InstanceNorm output is that small deviation times rstd ~ eps^-1/2. A variance
    # taken as sum P^2 / M - 1/M^2 in float32 cancels away its digits; the flash-attention rule: no
    # more than twice PyTorch's own float32 error, plus rounding.
    torch.manual_seed(5)
    B, h, N, M, d = 2, 2, 37, 49, 16
    q = torch.randn(B, h, N, d) * logit_scale
    k, v = torch.randn(B, h, M, d), torch.randn(B, h, M, d)
    w = torch.randn(h, h) * 0.5
    with torch.no_grad():
        exact = run("reference", q.double(), k.double(), v.double(), w.double())
        torch_err = (run("reference", q, k, v, w).double() - exact).abs().max().item()
        err = (run(backend, q, k, v, w).double() - exact).abs().max().item()
    # One normalisation for every backend (rest_kernels/backends/stats.py): P - 1/M formed exactly
    # before the product with v, from the row's log-mean-exp, so no backend keeps a known gap here.
    rounding = 2 ** -23 * exact.abs().max().item()
    assert err <= 2 * torch_err + rounding, f"{backend}: error {err:.3g}, PyTorch float32 {torch_err:.3g}"


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_single_key_gives_zero_normalised_map(backend):
    require_backend(backend)
    for dtype in fused_dtypes(backend):
        q, k, v, w, _ = conformance.emsa_inputs(2, 3, 4, 1, 5, dtype, True)
        with torch.no_grad():
            out = run(backend, q, k, v, w)
        assert torch.count_nonzero(out) == 0  # P == 1 everywhere, minus the mean 1/M = 1
        plain = run(backend, q.detach(), k.detach(), v.detach(), None)
        torch.testing.assert_close(plain, v.detach().expand(2, 3, 4, 5))  # softmax over one key is 1


@pytest.mark.parametrize("backend", CPU_FUSED)
@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_like_the_reference(backend, mix, poison):
    require_backend(backend)
    q, k, v, w, _ = conformance.emsa_inputs(2, 2, 5, 4, 3, torch.float32, mix)
    q, k, v = q.detach().clone(), k.detach(), v.detach()
    q[0, 1, 2, 0] = poison
    with torch.no_grad():
        out = run(backend, q, k, v, w.detach() if mix else None)
        ref = run("reference", q, k, v, w.detach() if mix else None)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{backend}: NaN pattern differs"
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- determinism
def _outputs_and_grads(backend, seed=0):
    q, k, v, w, b = conformance.emsa_inputs(2, 3, 37, 11, 8, torch.float32, True, seed=seed)
    out = rest_kernels.emsa_attention(q, k, v, w, b, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v, w), torch.ones_like(out))
    return (out.detach(),) + grads


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_bitwise_repeatable(backend):
    require_backend(backend)
    first, second = _outputs_and_grads(backend), _outputs_and_grads(backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_bitwise_independent_of_thread_count(backend):
    require_backend(backend)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _outputs_and_grads(backend)
        torch.set_num_threads(2)
        two = _outputs_and_grads(backend)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_concurrent_python_threads_are_correct(backend):
    require_backend(backend)
    expected = {s: _outputs_and_grads(backend, seed=s) for s in range(4)}
    results, errors = {}, []

    def worker(seed):
        try:
            results[seed] = _outputs_and_grads(backend, seed=seed)
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for s in range(4):
        for a, b in zip(results[s], expected[s]):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- property-based agreement
@pytest.mark.parametrize("backend", CPU_FUSED)
def test_property_backend_agrees_with_reference(backend):
    require_backend(backend)
    dtypes = fused_dtypes(backend)

    @settings(max_examples=12, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(B=st.integers(1, 2), h=st.integers(1, 4), N=st.integers(1, 40), M=st.integers(1, 40),
           d=st.integers(1, 20), mix=st.booleans(), layout=st.sampled_from(["model", "contiguous", "transposed"]),
           dtype=st.sampled_from(dtypes), seed=st.integers(0, 2 ** 16))
    def check(B, h, N, M, d, mix, layout, dtype, seed):
        conformance.check_emsa_op(backend, B, h, N, M, d, dtype, mix=mix, layout=layout, seed=seed)

    check()


@pytest.mark.parametrize("backend", CPU_FUSED)
def test_property_pa_agrees_with_reference(backend):
    require_backend(backend)
    dtypes = fused_dtypes(backend)

    @settings(max_examples=12, deadline=None, derandomize=True)
    @given(B=st.integers(1, 2), C=st.integers(1, 9), H=st.integers(1, 13), W=st.integers(1, 13),
           bias=st.booleans(), channels_last=st.booleans(), dtype=st.sampled_from(dtypes), seed=st.integers(0, 99))
    def check(B, C, H, W, bias, channels_last, dtype, seed):
        conformance.check_pa_op(backend, B, C, H, W, dtype, bias=bias, channels_last=channels_last, seed=seed)

    check()
