"""rest.optimize_for_inference: BatchNorm folded into the convolutions, against the official outputs."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import rest
from rest import ResT

import rest_kernels
from support.conformance import RTOL, assert_close_scaled, assert_lowp_close
from support.fused_route import fused_cpu_route
from support.reference_data import fill_weights, load


def tiny(seed, dtype):
    model = ResT(**load("rest_tiny.zip")["config"]).double()
    fill_weights(model, seed)
    return model.to(dtype)


@pytest.mark.parametrize("size", ["224x224", "64x96"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_folded_model_matches_official(size, dtype):
    case = load("rest_tiny.zip")[size]
    model = tiny(case["seed"], dtype).train()
    optimized = rest.optimize_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in optimized.modules())
    assert not optimized.training
    # the argument is left as it was: its BatchNorms, its mode
    assert model.training and sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 5
    with torch.no_grad():
        logits = optimized(case["input"].to(dtype))
    assert_close_scaled(logits, case["logits_eval"], RTOL[dtype], f"folded tiny {size}")


def test_folded_model_on_the_fused_route(monkeypatch):
    case = load("rest_tiny.zip")["224x224"]
    with fused_cpu_route(monkeypatch), torch.no_grad():
        model = tiny(case["seed"], torch.float32).eval()
        expected = model(case["input"].float())
        assert_close_scaled(rest.optimize_for_inference(model)(case["input"].float()), expected, 1e-5, "folded, fused")


@pytest.mark.parametrize("size", ["224x224", "64x96"])
def test_bfloat16_model_matches_official_by_the_low_precision_rule(size, monkeypatch):
    """optimize_for_inference(model, dtype=torch.bfloat16): folded, cast, on the fused route, against
    the official float64 logits by the flash-attention rule (at most 2x the error of the official
    math run in bfloat16, plus one bfloat16 rounding of the logits' scale)."""
    case = load("rest_tiny.zip")[size]
    x = case["input"].bfloat16()
    with fused_cpu_route(monkeypatch), torch.no_grad():
        optimized = rest.optimize_for_inference(tiny(case["seed"], torch.float32).train(), dtype=torch.bfloat16)
        assert not optimized.training
        assert all(t.dtype == torch.bfloat16 for t in optimized.state_dict().values() if t.is_floating_point())
        got = optimized(x)
    with rest_kernels.use_backend("reference"), torch.no_grad():
        official_bf16 = tiny(case["seed"], torch.float64).eval().to(torch.bfloat16)(x)
    assert got.dtype == torch.bfloat16
    assert_lowp_close(got, official_bf16, case["logits_eval"], f"bfloat16 folded tiny {size}")


def test_bad_argument():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        rest.optimize_for_inference("rest_lite")
    for dtype in (torch.float16, torch.float64, "bfloat16"):
        with pytest.raises(ValueError, match="dtype must be one of None, torch.float32, torch.bfloat16"):
            rest.optimize_for_inference(ResT(), dtype=dtype)


def test_folded_restv2_matches_unfolded_float64():
    # ResTv2's stem keeps its BatchNorms in an nn.Sequential (proj.1, proj.4): folded too. Reference
    # here: the same model unfolded in eval, float64, with running statistics far from the init's.
    model = rest.ResTV2(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1),
                        num_classes=10).double()
    fill_weights(model, 7)
    optimized = rest.optimize_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in optimized.modules())
    x = torch.randn(2, 3, 61, 45, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        assert_close_scaled(optimized(x), model.eval()(x), 1e-12, "folded ResTv2, float64")


# ---------------------------------------------------------------- rest.compile_for_inference
def _profiled_ops(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.slow
@pytest.mark.parametrize("linear", ["onednn", "kernel"])
def test_compiled_model_matches_official_float32(monkeypatch, linear):
    """compile_for_inference: float32 logits against the official fixture, then at another size
    (dynamic shapes: a new size must not reuse a graph for the old one) against the same model's eager
    optimize_for_inference; the attention and PA still rest_kernels' ops inside the compiled graph; no
    gradients recorded; the same state_dict as the optimized model. The linear layers on either
    product rest/dense.py may give them (REST_KERNELS_PACKED_LINEAR; the default follows the CPU)."""
    from rest import dense
    monkeypatch.setenv(dense.PACKED_KERNEL_ENV_VAR, "1" if linear == "kernel" else "0")
    if linear == "kernel" and dense.packed_kernel_unavailable_reason() is not None:
        pytest.skip(dense.packed_kernel_unavailable_reason())
    case = load("rest_tiny.zip")["224x224"]
    with fused_cpu_route(monkeypatch):
        model = tiny(case["seed"], torch.float32).train()
        compiled = rest.compile_for_inference(model)
        optimized = rest.optimize_for_inference(model)
        assert isinstance(compiled, rest.CompiledInference) and not compiled.training
        assert compiled.state_dict().keys() == {"model." + k for k in optimized.state_dict()}
        counters.clear()
        with torch.enable_grad():  # the wrapper turns gradients off itself
            logits = compiled(case["input"].float())
        assert not logits.requires_grad
        # frozen: inductor's freezing pass packed the linear weights (Dynamo must see the setting while
        # tracing, not only inductor; without it the weights stayed graph inputs and nothing was packed)
        # or, on the packed_linear kernel, folded the graph's pack_linear_weight calls (checked below)
        if linear == "onednn":
            assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] > 0, dict(counters["inductor"])
        assert_close_scaled(logits, case["logits_eval"], RTOL[torch.float32], "compiled tiny 224x224")
        x = load("rest_tiny.zip")["64x96"]["input"].float()
        with torch.no_grad():
            assert_close_scaled(compiled(x), optimized(x), RTOL[torch.float32], "compiled vs eager, tiny 64x96")
        # the graph calls the extension's kernels itself (rest_kernels.direct_kernels_in_traces),
        # or on the stand-in route (no extension) the custom ops
        ops = _profiled_ops(lambda: compiled(x))
        direct = rest_kernels.available_backends()["cpu"] is None
        prefix = "rest_kernels_C::" if direct else "rest_kernels::"
        assert {prefix + "emsa_fwd", prefix + "pa_fwd"} <= ops, sorted(ops)
        assert not direct or not {"rest_kernels::emsa_fwd", "rest_kernels::pa_fwd"} & ops, sorted(ops)
        if linear == "kernel":  # the products and reductions on the kernels, their copies made at compile time
            assert {"rest_kernels_C::packed_linear", "rest_kernels_C::depthwise_conv2d"} <= ops, sorted(ops)
            assert "rest_kernels_C::pack_linear_weight" not in ops, sorted(ops)


@pytest.mark.slow
def test_compiled_bfloat16_model_matches_official_by_the_low_precision_rule(monkeypatch):
    """bfloat16 by the flash-attention rule at both fixture sizes, called in an order that makes a
    guard skip wrong if it reused a graph across sizes: 64x96 (compiled for that size: the default
    for bfloat16 is torch's automatic dynamic), 64x96 again (a known signature: no guards evaluated),
    224x224 (a new size: guarded, compiles with symbolic sizes), 64x96 again (its own graph, the same
    bits as before)."""
    cases = {size: load("rest_tiny.zip")[size] for size in ("64x96", "224x224")}
    seed = cases["64x96"]["seed"]
    with rest_kernels.use_backend("reference"), torch.no_grad():
        official = tiny(seed, torch.float64).eval().to(torch.bfloat16)
        official_bf16 = {size: official(case["input"].bfloat16()) for size, case in cases.items()}
    with fused_cpu_route(monkeypatch):
        compiled = rest.compile_for_inference(tiny(seed, torch.float32), dtype=torch.bfloat16)
        assert compiled.dynamic is None
        got = {}
        for size in ("64x96", "64x96", "224x224", "64x96"):
            out = compiled(cases[size]["input"].bfloat16())
            assert out.dtype == torch.bfloat16
            if size in got:
                torch.testing.assert_close(out, got[size], rtol=0, atol=0)
            got[size] = out
            assert_lowp_close(out, official_bf16[size], cases[size]["logits_eval"], f"bfloat16 compiled tiny {size}")
    assert len(compiled.known_calls) == 2


@pytest.mark.slow
def test_compiled_call_from_a_thread_with_another_thread_count(monkeypatch):
    """A known signature in another global state (here a worker thread with one intra-op thread:
    Dynamo guards on the thread count, inductor's C++ kernels are made for it) runs the guarded call
    and compiles for that state instead of skipping the guards into a recompilation error."""
    import threading
    x = load("rest_tiny.zip")["64x96"]["input"].float()
    with fused_cpu_route(monkeypatch):
        compiled = rest.compile_for_inference(tiny(1, torch.float32))
        first = compiled(x)
        compiled(x)  # the known-signature path
        got, errors = [], []

        def worker():
            torch.set_num_threads(1)
            try:
                got.append(compiled(x))
            except Exception as e:  # reported below, with its message
                errors.append(e)

        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
    assert not errors, errors
    assert_close_scaled(got[0], first, RTOL[torch.float32], "compiled in a one-thread worker")


def test_call_signature_tells_apart_what_selects_a_graph():
    """CompiledInference skips Dynamo's guards only for a signature it has run: every input property
    and global mode the compiled graphs depend on must change the signature."""
    from rest.inference import _call_signature
    x = torch.randn(2, 3, 8, 8)
    base = _call_signature(x)
    assert base == _call_signature(x.clone())
    others = [x.double(), x.bfloat16(), torch.randn(1, 3, 8, 8), torch.randn(2, 3, 8, 9),
              x.contiguous(memory_format=torch.channels_last), torch.randn(2, 3, 8, 16)[..., ::2],
              torch.randn(3 * 2 * 64 + 1)[1:].view(2, 3, 8, 8), x.clone().requires_grad_()]
    for other in others:
        assert _call_signature(other) != base
    with torch.inference_mode():
        assert _call_signature(x) != base
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _call_signature(x) != base
    with torch.overrides.TorchFunctionMode():
        assert _call_signature(x) is None
    assert _call_signature([x]) is None
    assert _call_signature(torch.nn.Parameter(x)) is None  # a subclass: every guard


def test_compile_for_inference_dynamic_by_dtype():
    """dynamic=None: symbolic sizes for float32 models (oneDNN, not MKL, for the linear layers),
    torch's automatic dynamic for bfloat16 (convolution weights packed for the first size)."""
    assert rest.compile_for_inference(ResT()).dynamic is True
    assert rest.compile_for_inference(ResT(), dtype=torch.bfloat16).dynamic is None
    assert rest.compile_for_inference(ResT(), dynamic=False).dynamic is False


def test_compiled_inference_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        rest.compile_for_inference("rest_lite")
    with pytest.raises(ValueError, match="dtype must be one of None, torch.float32, torch.bfloat16"):
        rest.compile_for_inference(ResT(), dtype=torch.float16)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got int"):
        rest.CompiledInference(3)
    compiled = rest.CompiledInference(rest.optimize_for_inference(ResT()))
    with pytest.raises(RuntimeError, match="for inference only"):
        compiled.train()
    assert not compiled.eval().training and not compiled.model.training
