"""The "auto" choice prefers the reference for inference calls only where a fused backend's measured rules say
it is faster and its maps fit comfortably in memory (rest_kernels/backends/preference.py); it logs
why, once; training calls stay fused."""
import json
import logging
import os

import pytest
import torch

import rest_kernels
from conftest import require_backend
from rest_kernels.backends import preference, registry
from rest_kernels.backends.preference import ReferenceFaster

CPU = registry.BACKENDS["cpu"]


def _rule(op, pass_, layout, max_elements):
    return ReferenceFaster(op, pass_, layout, max_elements, "a test's rule")


@pytest.fixture
def rules(monkeypatch):
    """Set the cpu backend's rules (the suite otherwise runs with none, see conftest.py)."""
    require_backend("cpu")

    def set_rules(*rs):
        monkeypatch.setattr(CPU, "reference_rules", tuple(rs))
        monkeypatch.setattr(registry, "_logged_fallbacks", set())
    return set_rules


def _pa(B=1, C=4, H=5, W=5, channels_last=False, grad=False):
    x = torch.randn(B, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(grad), torch.randn(C, 1, 3, 3), torch.randn(C)


def _chosen(op, args, needs_backward=False):
    if op == "pa":
        x, w, b = args
        return registry.select("pa_gate", "auto", (x, w), lambda be: be.pa_unsupported_reason(x, w, b),
                               lambda be: be.pa_route_preference(x, needs_backward)).name
    q, k, v, w = args
    return registry.select("emsa_attention", "auto", (q, k, v), lambda be: be.emsa_unsupported_reason(q, k, v, w),
                           lambda be: be.emsa_route_preference(q, k, w, needs_backward)).name


def test_inside_a_rule_auto_takes_the_reference_and_says_why_once(rules, caplog):
    rules(_rule("pa", "fwd", "contiguous", 100))
    with caplog.at_level(logging.WARNING, logger="rest_kernels"):
        assert _chosen("pa", _pa(C=4, H=5, W=5)) == "reference"          # 100 elements
        assert _chosen("pa", _pa(C=4, H=5, W=5)) == "reference"
        assert _chosen("pa", _pa(C=4, H=6, W=5)) == "cpu"                # 120 elements: outside
        assert _chosen("pa", _pa(C=4, H=5, W=5, channels_last=True)) == "cpu"  # another layout
        assert _chosen("pa", _pa(C=4, H=5, W=5), needs_backward=True) == "cpu"  # training: stays fused
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "auto takes the reference over cpu" in m]) == 1, messages
    assert "a test's rule" in messages[0] and "<= 100 elements" in messages[0]


def test_emsa_rules_count_the_map(rules):
    rules(_rule("emsa-mix", "fwd", "any", 2 * 3 * 7 * 5))
    q, k, v, w = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(3, 3)
    assert _chosen("emsa", (q, k, v, w)) == "reference"
    assert _chosen("emsa", (q, k, v, None)) == "cpu"  # no mix: another op
    k6, v6 = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    assert _chosen("emsa", (q, k6, v6, w)) == "cpu"    # a bigger map


def test_training_calls_stay_fused(rules):
    # what autograd can do with the op (double backward, what is saved) must not depend on the size
    rules(_rule("emsa-mix", "fwd", "any", 10 ** 9), _rule("emsa-mix", "fwd+bwd", "any", 10 ** 9))
    q, k, v, w = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(3, 3)
    assert _chosen("emsa", (q, k, v, w), needs_backward=True) == "cpu"
    qg = q.clone().requires_grad_()
    out = rest_kernels.emsa_attention(qg, k, v, w)  # auto, grad on: the fused custom op
    (g,) = torch.autograd.grad(out.sum(), qg, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(g.sum(), qg)


def test_the_reference_is_not_taken_when_its_maps_would_not_fit(rules, monkeypatch, caplog):
    rules(_rule("pa", "fwd", "contiguous", 10 ** 6))
    monkeypatch.setattr(preference, "COMFORTABLE_FRACTION", 1e-12)  # nothing fits
    with caplog.at_level(logging.WARNING, logger="rest_kernels"):
        assert _chosen("pa", _pa()) == "cpu"
    assert any("auto keeps cpu" in r.getMessage() and "memory" in r.getMessage() for r in caplog.records)


def test_a_named_backend_is_never_redirected(rules):
    rules(_rule("pa", "fwd", "contiguous", 10 ** 9))
    x, w, b = _pa()
    calls = []
    orig = CPU._pa_forward
    CPU._pa_forward = lambda p: calls.append(1) or orig(p)
    try:
        rest_kernels.pa_gate(x, w, b, backend="cpu")
        rest_kernels.pa_gate(x, w, b)  # auto: the rule sends it to the reference
    finally:
        del CPU._pa_forward
    assert calls == [1]


def test_the_shipped_rules_are_the_measurements_they_cite():
    """rest_kernels/backends/data/*_crossover.json: each rule is what bench/crossover.py's rule
    derivation gives for the rows stored with it, and the backend declares exactly those rules."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("crossover", os.path.join(root, "bench", "crossover.py"))
    crossover = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crossover)
    found = 0
    for name in registry.BACKENDS:
        path = os.path.join(preference.DATA_DIR, f"{name}_crossover.json")
        if not os.path.exists(path):
            continue
        found += 1
        with open(path) as f:
            data = json.load(f)
        assert data["backend"] == name and data["measured"]
        assert crossover.rules_from(data["rows"], data["margin"]) == data["rules"]
        declared = {(r.faster, r.op, r.pass_, r.layout, r.min_elements, r.max_elements, r.reduction)
                    for r in preference.load_rules(name)}
        assert declared == {(r.get("faster", "reference"), r["op"], r["pass"], r["layout"], r.get("min_elements", 0),
                             r["max_elements"], r.get("reduction")) for r in data["rules"] if r["max_elements"] > 0}
    if not found:
        pytest.skip("no measured crossovers shipped")


# --------------------------------------------------------------------------- the sdpa route
def _sdpa_rule(pass_, max_elements):
    return ReferenceFaster("emsa", pass_, "any", max_elements, "a test's sdpa rule", faster="sdpa")


def test_inside_an_sdpa_rule_auto_takes_sdpa_per_pass(rules, caplog):
    rules(_sdpa_rule("fwd", 2 * 3 * 7 * 5), _sdpa_rule("fwd+bwd", 2 * 3 * 7 * 4))
    q, k, v = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    k4, v4 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with caplog.at_level(logging.WARNING, logger="rest_kernels"):
        assert _chosen("emsa", (q, k, v, None)) == "sdpa"                          # inference, inside
        assert _chosen("emsa", (q, k, v, None), needs_backward=True) == "cpu"      # training: its own rule
        assert _chosen("emsa", (q, k4, v4, None), needs_backward=True) == "sdpa"
        assert _chosen("emsa", (q, torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4), None)) == "cpu"  # bigger
        assert _chosen("emsa", (q, k, v, torch.randn(3, 3))) == "cpu"             # the mix: another op
    assert any("auto takes sdpa over cpu" in r.getMessage() and "a test's sdpa rule" in r.getMessage()
               for r in caplog.records)
    # the public op then runs PyTorch's SDPA, differentiable
    qg = q.clone().requires_grad_()
    out = rest_kernels.emsa_attention(qg, k4, v4)
    qr = q.clone().requires_grad_()
    ref = rest_kernels.emsa_attention(qr, k4, v4, backend="reference")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), qg)[0],
                               torch.autograd.grad(ref.square().sum(), qr)[0])


def test_rules_are_regions_per_reduction_class(rules):
    """A rule covers its size range and, for EMSA, one class of N / M (the nearest power of 4): on the
    CPU SDPA's training pass wins at ResT's unreduced stage 4 (N = M) and loses at the same sizes
    where M << N."""
    rules(ReferenceFaster("emsa", "fwd+bwd", "any", 2 * 3 * 8 * 8, "a test's sdpa rule", faster="sdpa",
                          min_elements=2 * 3 * 4 * 4, reduction=1))
    def call(N, M):
        return (torch.randn(2, 3, N, 4), torch.randn(2, 3, M, 4), torch.randn(2, 3, M, 4), None)
    assert _chosen("emsa", call(6, 6), needs_backward=True) == "sdpa"     # inside, N / M = 1
    assert _chosen("emsa", call(8, 8), needs_backward=True) == "sdpa"     # the largest measured size
    assert _chosen("emsa", call(9, 9), needs_backward=True) == "cpu"      # above it: not guessed
    assert _chosen("emsa", call(3, 3), needs_backward=True) == "cpu"      # below min_elements
    assert _chosen("emsa", call(16, 2), needs_backward=True) == "cpu"     # same size, N / M = 8 -> class 4


def test_rules_cover_only_the_dtype_they_were_measured_in(rules):
    """bench/crossover.py measures float32 calls: a bfloat16 call of the same shape stays on the fused
    backend (its costs differ: the kernels convert bfloat16 inputs, SDPA has other kernels)."""
    rules(_rule("pa", "fwd", "contiguous", 100), _sdpa_rule("fwd", 10 ** 9))
    q = torch.randn(1, 1, 4, 4)
    assert _chosen("emsa", (q, q, q, None)) == "sdpa"
    assert _chosen("emsa", (q.bfloat16(), q.bfloat16(), q.bfloat16(), None)) == "cpu"
    x, w, b = _pa(C=4, H=5, W=5)
    assert _chosen("pa", (x, w, b)) == "reference"
    assert _chosen("pa", (x.bfloat16(), w.bfloat16(), b.bfloat16())) == "cpu"
    assert all(r.dtype == "float32" for r in preference.load_rules("cpu"))


def test_reduction_classes_are_resT_sr_squared():
    rc = preference.reduction_class
    assert [rc(N, N // s2) for s2 in (1, 4, 16, 64) for N in (64 * 49, 64 * 950)] == [1, 1, 4, 4, 16, 16, 64, 64]
    # odd maps: ceil(H / sr) keys move N / M a little, not to another class (800 x 1216 / 4 -> 200 x 304)
    assert rc(200 * 304, 25 * 38) == 64 and rc(201 * 305, 26 * 39) == 64 and rc(7, 0) == 1


def test_sdpa_rules_come_before_reference_rules(rules):
    rules(_rule("emsa", "fwd", "any", 10 ** 9), _sdpa_rule("fwd", 10 ** 9))
    q = torch.randn(1, 1, 4, 4)
    assert _chosen("emsa", (q, q, q, None)) == "sdpa"


def test_plain_attention_falls_back_to_sdpa_where_no_fused_backend_serves(monkeypatch, caplog):
    monkeypatch.setattr(registry, "AUTO_ORDER", ("cuda",))  # never serves CPU tensors
    monkeypatch.setattr(registry, "_logged_fallbacks", set())
    q = torch.randn(2, 3, 7, 4)
    with caplog.at_level(logging.WARNING, logger="rest_kernels"):
        assert _chosen("emsa", (q, q, q, None)) == "sdpa"
        assert _chosen("emsa", (q, q, q, torch.randn(3, 3))) == "reference"  # the mix
        assert _chosen("pa", _pa()) == "reference"
    messages = [r.getMessage() for r in caplog.records]
    assert any("falls back to the sdpa backend" in m for m in messages)
