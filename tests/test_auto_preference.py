"""The "auto" choice prefers the reference (or sdpa) only where a fused backend's rules say it is faster,
for the pass the rule was made for, and the reference only where its maps fit comfortably in memory
(rest_kernels/backends/preference.py); it logs why, once. The cpu backend's rules are measured
(bench/crossover.py, inference only for the reference); the GPU backends' are the performance
model's (scripts/model_crossover.py), per GPU arch, training included."""
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


def test_training_calls_take_the_reference_only_inside_a_training_rule(rules):
    # an inference rule says nothing of the backward: the training call stays fused (the fused op,
    # with no double backward)
    rules(_rule("emsa-mix", "fwd", "any", 10 ** 9))
    q, k, v, w = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(3, 3)
    assert _chosen("emsa", (q, k, v, w)) == "reference"
    assert _chosen("emsa", (q, k, v, w), needs_backward=True) == "cpu"
    qg = q.clone().requires_grad_()
    out = rest_kernels.emsa_attention(qg, k, v, w)  # auto, grad on: the fused custom op
    (g,) = torch.autograd.grad(out.sum(), qg, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(g.sum(), qg)
    # a rule made for training (the GPU model's kind) sends it to the reference: autograd can then do
    # more (double backward), and the values are the reference's
    rules(_rule("emsa-mix", "fwd+bwd", "any", 10 ** 9))
    assert _chosen("emsa", (q, k, v, w)) == "cpu"
    assert _chosen("emsa", (q, k, v, w), needs_backward=True) == "reference"
    qg = q.clone().requires_grad_()
    out = rest_kernels.emsa_attention(qg, k, v, w)
    torch.testing.assert_close(out, rest_kernels.emsa_attention(q, k, v, w, backend="reference"))
    (g,) = torch.autograd.grad(out.sum(), qg, create_graph=True)
    assert torch.autograd.grad(g.square().sum(), qg)[0].abs().sum() > 0


def test_a_training_call_keeps_the_fused_backend_when_the_saved_maps_would_not_fit(rules, monkeypatch, caplog):
    q, k, v, w = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(3, 3)
    rules(_rule("emsa-mix", "fwd+bwd", "any", 10 ** 9))
    elements = 2 * 3 * 7 * 5
    # room for what the reference keeps for the backward (REFERENCE_SAVED_MAPS of float32 maps), not more
    room = preference.REFERENCE_SAVED_MAPS["emsa-mix"] * elements * 4
    # per training call 1/128 of the memory (a step keeps every block's maps), not inference's 1/16
    monkeypatch.setattr(preference, "_device_memory", lambda *a: room * 128)
    assert _chosen("emsa", (q, k, v, w), needs_backward=True) == "reference"
    monkeypatch.setattr(preference, "_device_memory", lambda *a: room * 128 - 128)
    with caplog.at_level(logging.WARNING, logger="rest_kernels"):
        assert _chosen("emsa", (q, k, v, w), needs_backward=True) == "cpu"
    assert any("auto keeps cpu" in r.getMessage() and "keep for the backward" in r.getMessage()
               and "1/128 of the device's memory" in r.getMessage() for r in caplog.records)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward of fn()."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B,h,N,M,d,mix", [(2, 4, 256, 64, 32, True), (2, 1, 256, 256, 32, False),
                                          (2, 8, 64, 64, 64, True), (1, 2, 97, 13, 16, False)])
def test_reference_saved_maps_bound_what_the_reference_keeps(B, h, N, M, d, mix, dtype):
    """REFERENCE_SAVED_MAPS x map_element_bytes bounds the N x M maps the reference keeps for the
    backward (the memory check of a training call sent to it). Beyond its inputs (the caller's) it also
    keeps copies of q (scaled) and k (float32 from 16-bit inputs), O((N + M) d): not the check's
    concern, added to the bound here."""
    q, k, v = (torch.randn(B, h, n, d, dtype=dtype, requires_grad=True) for n in (N, M, M))
    w = torch.randn(h, h, requires_grad=True) if mix else None
    b = torch.randn(h, requires_grad=True) if mix else None
    saved = _saved_bytes(lambda: rest_kernels.emsa_attention(q, k, v, w, b, backend="reference"))
    inputs = (q.numel() + 2 * k.numel()) * q.element_size()
    op = "emsa-mix" if mix else "emsa"
    unit = preference.map_element_bytes(op, q)
    copies = (q.numel() + k.numel()) * unit
    assert 0 < saved - inputs <= preference.REFERENCE_SAVED_MAPS[op] * B * h * N * M * unit + copies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_saved_maps_bound_what_the_reference_keeps_for_pa(dtype):
    x = torch.randn(2, 16, 30, 31, dtype=dtype, requires_grad=True)
    w, b = torch.randn(16, 1, 3, 3, dtype=dtype, requires_grad=True), torch.randn(16, dtype=dtype, requires_grad=True)
    saved = _saved_bytes(lambda: rest_kernels.pa_gate(x, w, b, backend="reference"))
    # the input itself is one of the maps counted (the conv's input), the weights are small
    bound = preference.REFERENCE_SAVED_MAPS["pa"] * x.numel() * preference.map_element_bytes("pa", x)
    assert x.numel() * x.element_size() < saved <= bound + (w.numel() + b.numel()) * x.element_size()


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


def _load_script(name, path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _shipped(source):
    """{backend: its data/<backend>_crossover.json} for the files of `source` ("measured", "modelled"), plus
    any GPU measurements (data/<backend>_measured_crossover.json) as "<backend> measured" when source is
    "measured"."""
    out = {}
    for name in registry.BACKENDS:
        for suffix, key in (("_crossover.json", name), ("_measured_crossover.json", f"{name} measured")):
            path = os.path.join(preference.DATA_DIR, name + suffix)
            if os.path.exists(path):
                with open(path) as f:
                    data = json.load(f)
                if data.get("source", "measured") == source:
                    out[key] = data
    return out


def _rule_key(r, source):
    return (r.get("faster", "reference"), r["op"], r["pass"], r["layout"], r.get("min_elements", 0), r["max_elements"],
            r.get("reduction"), r.get("dtype", "float32"), r.get("arch"), source)


def _declared_as(name, data):
    """The backend declares every rule of the file, except those of GPU archs a measurement replaced."""
    declared = {(r.faster, r.op, r.pass_, r.layout, r.min_elements, r.max_elements, r.reduction, r.dtype, r.arch,
                 r.source) for r in preference.load_rules(name.split()[0])}
    replaced = set() if name.endswith("measured") else set(_shipped("measured").get(f"{name} measured", {}).get("archs", ()))
    want = {_rule_key(r, data.get("source", "measured")) for r in data["rules"]
            if r["max_elements"] > 0 and r.get("arch") not in replaced}
    return want <= declared


def test_the_shipped_rules_are_the_measurements_they_cite():
    """rest_kernels/backends/data/*_crossover.json of measured rules: each rule is what bench/crossover.py's
    rule derivation gives for the rows stored with it, and the backend declares those rules."""
    crossover = _load_script("crossover", os.path.join(ROOT, "bench", "crossover.py"))
    shipped = _shipped("measured")
    if not shipped:
        pytest.skip("no measured crossovers shipped")
    for name, data in shipped.items():
        assert data["backend"] == name.split()[0] and data["measured"]
        assert crossover.rules_from(data["rows"], data["margin"]) == data["rules"]
        assert _declared_as(name, data)
        if name.endswith("measured"):  # measured on GPUs: every rule for an arch measured
            assert {r["arch"] for r in data["rules"]} <= set(data["archs"])
        else:  # measured on a CPU: any device of its type
            assert all("arch" not in r for r in data["rules"])


@pytest.mark.slow
def test_the_shipped_gpu_rules_are_the_performance_models():
    """data/{triton,cuda}_crossover.json: what scripts/model_crossover.py derives from the performance
    model now (its launches, the checked-in Triton resources, the built extension's SASS), for each GPU
    arch it models; declared by the GPU backends. Regenerate with `python scripts/model_crossover.py --write`
    when a kernel, a tile or the model changes (~20 s)."""
    mc = _load_script("model_crossover", os.path.join(ROOT, "scripts", "model_crossover.py"))
    shipped = _shipped("modelled")
    assert set(shipped) == {"triton", "cuda"}
    tables = mc.load_tables()
    if tables["cuda"][0] is None:
        pytest.skip(f"the cuda backend's compiled resources are not here: {tables['cuda'][1]}")
    for name, data in shipped.items():
        assert data["backend"] == name and "not a measurement" in data["measured"]
        assert mc.rules_from(mc.model_rows(name, tables), data["margin"]) == data["rules"], name
        assert _declared_as(name, data)
        assert {r["arch"] for r in data["rules"]} <= set(mc.ARCH_GPUS)


def test_gpu_rules_cover_only_the_arch_they_were_made_for(monkeypatch):
    """A modelled rule for sm_90 covers calls on an sm_90 device, not on sm_80 nor on the CPU."""
    rule = ReferenceFaster("emsa-mix", "fwd+bwd", "any", 10 ** 9, "a test's model", arch=90, source="modelled")
    q, k = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 5, 4)
    key = preference.emsa_key(q, k, torch.randn(3, 3))
    assert preference.route_preference((rule,), key, True, q) == (None, None)   # a CPU tensor: arch None
    for arch, route in ((90, "reference"), (80, None), (89, None)):
        monkeypatch.setattr(preference, "device_arch", lambda *a, arch=arch: arch)
        assert preference.route_preference((rule,), key, True, q)[0] == route, arch
    monkeypatch.setattr(preference, "device_arch", lambda *a: 90)
    why = preference.route_preference((rule,), key, True, q)[1]
    assert "modelled faster" in why and "on sm_90" in why and "a test's model" in why


def test_the_gpu_backends_declare_the_models_rules():
    """Every shipped GPU rule sends a float32 call, or a 16-bit training call, to the reference (the fp32
    SIMT paths, the 16-bit mixed backward of the cuda backend): the forward of 16-bit inputs is never
    modelled slower than eager. The suite's conftest removes them, so read the files."""
    for name in ("triton", "cuda"):
        rules = preference.load_rules(name)
        assert rules and all(r.source == "modelled" and r.arch in (80, 90) and r.faster == "reference" for r in rules)
        assert all(r.dtype == "float32" or r.pass_ == "fwd+bwd" for r in rules), name


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


def test_compiled_callers_inside_a_reference_rule_compile_whole(rules):
    """torch.compile(fullgraph=True) of a call that a rule sends to the reference: the device's memory
    and arch are constants to dynamo (assume_constant_result). With functools.lru_cache under that
    decorator dynamo traced into os.sysconf and the compile failed (found with the shipped cpu rule
    for PA at 729,600-802,816 elements)."""
    rules(_rule("pa", "fwd", "contiguous", 10 ** 9), _rule("emsa-mix", "fwd", "any", 10 ** 9))
    x, w, b = _pa(C=4, H=6, W=7)
    pa = torch.compile(lambda x, w, b: rest_kernels.pa_gate(x, w, b), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(pa(x, w, b), rest_kernels.pa_gate(x, w, b, backend="reference"))
    q, k, v, m = torch.randn(2, 3, 7, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(3, 3)
    emsa = torch.compile(lambda *a: rest_kernels.emsa_attention(*a), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(emsa(q, k, v, m), rest_kernels.emsa_attention(q, k, v, m, backend="reference"))


def _write(directory, name, data):
    with open(os.path.join(directory, name), "w") as f:
        json.dump(data, f)


def test_a_gpu_measurement_replaces_the_models_rules_for_its_arch(tmp_path, monkeypatch):
    """data/<backend>_measured_crossover.json (bench/crossover.py --write on a GPU) replaces the model's
    rules for every arch it measured, even with no rule of its own there; the other archs keep the
    model's."""
    def rule(arch, max_elements):
        return {"op": "emsa-mix", "pass": "fwd+bwd", "layout": "any", "max_elements": max_elements,
                "dtype": "float32", "reduction": 1, "arch": arch}
    monkeypatch.setattr(preference, "DATA_DIR", str(tmp_path))
    _write(tmp_path, "triton_crossover.json", {"backend": "triton", "source": "modelled", "measured": "the model",
                                                "margin": 0.1, "rules": [rule(80, 100), rule(90, 200)]})
    assert {(r.arch, r.max_elements, r.source) for r in preference.load_rules("triton")} == {
        (80, 100, "modelled"), (90, 200, "modelled")}
    _write(tmp_path, "triton_measured_crossover.json", {"backend": "triton", "source": "measured", "archs": [90],
                                                         "measured": "sm_90: an H200", "margin": 0.1,
                                                         "rules": [rule(90, 300)], "rows": []})
    assert {(r.arch, r.max_elements, r.source) for r in preference.load_rules("triton")} == {
        (80, 100, "modelled"), (90, 300, "measured")}
    _write(tmp_path, "triton_measured_crossover.json", {"backend": "triton", "source": "measured", "archs": [90, 80],
                                                         "measured": "...", "margin": 0.1, "rules": [], "rows": []})
    assert preference.load_rules("triton") == ()  # both archs measured: the fused backend won everywhere


def _row(op, pass_, elements, fused, ref, arch=None, dtype=None):
    r = {"op": op, "pass": pass_, "layout": "any", "elements": elements, "fused_s": fused, "reference_s": ref,
         "reduction": 1}
    if arch is not None:
        r["arch"] = arch
    if dtype is not None:
        r["dtype"] = dtype
    return r


def test_gpu_rows_make_training_rules_for_the_reference_cpu_rows_do_not():
    crossover = _load_script("crossover", os.path.join(ROOT, "bench", "crossover.py"))
    cpu = [_row("emsa-mix", p, 100, 2.0, 1.0) for p in ("fwd", "fwd+bwd")]
    assert [(r["pass"], "arch" in r) for r in crossover.rules_from(cpu, 0.1)] == [("fwd", False)]
    gpu = [_row("emsa-mix", p, 100, 2.0, 1.0, arch=90, dtype="bfloat16") for p in ("fwd", "fwd+bwd")]
    rules = crossover.rules_from(gpu, 0.1)
    assert sorted((r["pass"], r["arch"], r["dtype"]) for r in rules) == [("fwd", 90, "bfloat16"),
                                                                          ("fwd+bwd", 90, "bfloat16")]
    # one arch's rows never make another's rule
    both = gpu + [_row("emsa-mix", "fwd", 100, 1.0, 1.0, arch=80, dtype="bfloat16")]
    assert {r["arch"] for r in crossover.rules_from(both, 0.1)} == {90}


def test_gpu_measurements_merge_per_arch():
    crossover = _load_script("crossover", os.path.join(ROOT, "bench", "crossover.py"))
    h200 = [_row("emsa-mix", "fwd", 100, 2.0, 1.0, arch=90, dtype="float32")]
    a100 = [_row("emsa-mix", "fwd", 100, 2.0, 1.0, arch=80, dtype="float32")]
    data = crossover.merge_gpu_measurement(None, "triton", 90, "an H200", 0.1, h200)
    data = crossover.merge_gpu_measurement(data, "triton", 80, "an A100", 0.1, a100)
    assert data["archs"] == [80, 90] and {r["arch"] for r in data["rules"]} == {80, 90}
    assert data["measured"] == "sm_80: an A100; sm_90: an H200"
    # measuring sm_90 again replaces its rows (the fused backend now wins there): its rule goes
    again = [_row("emsa-mix", "fwd", 100, 1.0, 1.0, arch=90, dtype="float32")]
    data = crossover.merge_gpu_measurement(data, "triton", 90, "an H200, again", 0.1, again)
    assert {r["arch"] for r in data["rules"]} == {80} and len(data["rows"]) == 2 and data["archs"] == [80, 90]
    assert data["rules"] == crossover.rules_from(data["rows"], 0.1)
    with pytest.raises(ValueError, match="margin"):
        crossover.merge_gpu_measurement(data, "triton", 90, "x", 0.2, again)
