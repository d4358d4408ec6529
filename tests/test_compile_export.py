"""torch.compile(fullgraph=True) and torch.export of the ResT and ResTv2 models: no graph breaks, same outputs
and gradients as eager, and with a fused backend every EMSA / PA is one custom-op node.

Two routes are exercised: the default backend of this machine ("auto": a fused backend where one
serves CPU tensors, else the reference math, which traces as ordinary aten ops), and the fused
custom-op route (tests/support/fused_route.py: the compiled cpu kernels, or a stand-in running the reference
kernels inside the same custom ops), where the node counts are checked.

Weights follow the fixtures' recipe (reference_data.fill_weights): the official init's near-uniform
attention puts InstanceNorm's variance at the order of eps, where it magnifies float32 rounding
differences between two correct evaluation orders far beyond what trained weights see.
"""
from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from rest import ResT, ResTV2, norms, rest_base, rest_large, rest_lite, rest_small

from support.conformance import assert_close_scaled
from support.fused_route import count_ops, fused_cpu_route
from support.reference_data import fill_weights, load
from conftest import require_backend

VARIANTS = {"rest_lite": rest_lite, "rest_small": rest_small, "rest_base": rest_base, "rest_large": rest_large}
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
# compile / export vs eager in float32: same math, possibly another evaluation order
RTOL32 = 1e-4


def model_of(variant, dtype=torch.float32, seed=1, **kwargs):
    model = VARIANTS[variant](**kwargs).double()
    fill_weights(model, seed)
    return model.to(dtype)


def recording_backend(graphs):
    """A torch.compile backend that keeps Dynamo's FX graphs and runs them as they are."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend


def expected_counts(model: ResT):
    # one EMSA per block; one PA in the stem and in each of the three patch embeddings
    return {"emsa_fwd": sum(model.depths), "pa_fwd": 4}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compile_fullgraph_eval_matches_eager(variant, monkeypatch):
    # A compiled model runs nn.LayerNorm (rest/norms.py keeps the compiled kernel out of traced graphs):
    # eager on the same LayerNorm is the same math. The kernel's own rounding would otherwise add to
    # the near-uniform maps' amplified differences (rest_large: 2.6e-4 of the scale against 1e-4).
    monkeypatch.setenv(norms.ENV_VAR, "0")
    model = model_of(variant).eval()
    with torch.no_grad():
        expected = model(X)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
        actual = compiled(X)
    assert_close_scaled(actual, expected, RTOL32, f"{variant} compiled logits")


def test_compile_gradients_match_eager():
    model = model_of("rest_lite", torch.float64).train()  # BatchNorm on batch statistics
    # float64: the same math in another order agrees to rounding
    assert_compiled_gradients_match_eager(model, X.double(), 1e-9)


@pytest.mark.slow  # inductor's C++ code generation: ~45 s on a 2-core CPU
def test_inductor_compile_matches_eager():
    # float64 so that inductor's fused reductions are compared at rounding level
    model = model_of("rest_lite", torch.float64).eval()
    x = X.double()
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model, fullgraph=True)(x)
    assert_close_scaled(actual, expected, 1e-9, "inductor logits")


@pytest.mark.slow  # inductor's C++ code generation: ~30 s on a 2-core CPU
def test_inductor_compiles_the_float32_cpu_model():
    """The model as a CPU user has it (float32, fused backend, oneDNN linear layers, channels-last) under
    inductor, the default torch.compile backend: inductor cannot lower oneDNN's linear on parameters,
    so the traced layers take F.linear (rest/dense.py); the logits equal eager's up to float32 rounding
    of differently ordered products (1e-4 of the largest logit: the float32 error of a few hundred
    accumulated products, well above rounding and far below any wrong result)."""
    require_backend("cpu")
    torch.manual_seed(0)
    model = ResT(num_classes=10, embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), depths=(1, 1, 1, 1),
                 backend="cpu", linear_impl="onednn").eval()
    x = torch.randn(2, 3, 61, 45)
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model)(x)
    assert_close_scaled(actual, expected, 1e-4, "inductor float32 logits")


@pytest.mark.parametrize("variant", ["rest_lite", "rest_base"])
def test_fused_ops_are_single_graph_nodes_under_compile(monkeypatch, variant):
    with fused_cpu_route(monkeypatch):
        assert_compiles_to_custom_op_nodes(model_of(variant).eval(), X, variant)


def assert_compiles_to_custom_op_nodes(model, x, what):
    """torch.compile(fullgraph) of `model` gives one graph in which each fused EMSA / PA call is one
    custom-op node, and the logits eager gives."""
    graphs = []
    with torch.no_grad():
        expected = model(x)
        actual = torch.compile(model, fullgraph=True, backend=recording_backend(graphs))(x)
    assert len(graphs) == 1
    assert count_ops(graphs[0].graph, "emsa_fwd", "pa_fwd") == expected_counts(model)
    assert_close_scaled(actual, expected, RTOL32, f"{what} compiled logits (custom ops)")


def _kernel_op_counts(graph) -> dict[str, int]:
    """call_function nodes of torch.ops.rest_kernels_C.emsa_fwd / pa_fwd (the extension's own ops)."""
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    return {name: sum(t.startswith(f"rest_kernels_C.{name}") for t in targets) for name in ("emsa_fwd", "pa_fwd")}


@pytest.mark.parametrize("variant", ["rest", "restv2"])
def test_direct_kernels_in_inference_traces(variant, monkeypatch):
    """rest_kernels.direct_kernels_in_traces (what rest.CompiledInference traces under): an
    inference graph calls the extension's ops themselves, no custom-op node left, the same bits as
    the custom-op graph; a graph that records gradients, and torch.export, keep the custom ops
    (autograd; the one node export and ONNX keep)."""
    require_backend("cpu")
    from rest_kernels import direct_kernels_in_traces
    monkeypatch.setenv(norms.ENV_VAR, "0")  # eager then runs the graphs' nn.LayerNorm too
    model = (model_of("rest_lite") if variant == "rest" else v2_model()).eval()
    x = X_ODD
    graphs = []
    with torch.no_grad():
        expected = model(x)
        custom_ops = torch.compile(model, fullgraph=True, backend=recording_backend(graphs))(x)
        torch._dynamo.reset()
        with direct_kernels_in_traces():
            actual = torch.compile(model, fullgraph=True, backend=recording_backend(graphs))(x)
    assert len(graphs) == 2
    assert _kernel_op_counts(graphs[1].graph) == expected_counts(model)
    assert count_ops(graphs[1].graph, "emsa_fwd", "pa_fwd") == {"emsa_fwd": 0, "pa_fwd": 0}
    torch.testing.assert_close(actual, custom_ops, rtol=0, atol=0)
    assert_close_scaled(actual, expected, RTOL32, f"{variant} direct kernels vs eager")

    graphs.clear()
    torch._dynamo.reset()
    with direct_kernels_in_traces():  # gradients recorded: the custom ops and their autograd
        torch.compile(model, fullgraph=True, backend=recording_backend(graphs))(x.clone().requires_grad_())
        program = torch.export.export(model, (x,))
    assert count_ops(graphs[0].graph, "emsa_fwd", "pa_fwd") == expected_counts(model)
    assert count_ops(program.graph, "emsa_fwd", "pa_fwd") == expected_counts(model)
    assert _kernel_op_counts(program.graph) == {"emsa_fwd": 0, "pa_fwd": 0}


def test_fused_ops_compile_gradients_match_eager(monkeypatch):
    with fused_cpu_route(monkeypatch):
        # NCHW maps: in training on channels-last CPU maps eager BatchNorm takes rest/batchnorm.py's
        # accurate path, which compiled graphs do not (they get PyTorch's kernel, whose channels-last
        # statistics err by ~1e-5, moving the stem's gradients by ~1e-4); linear_impl "aten": compiled
        # graphs take F.linear (rest/dense.py), so eager takes it too and every kernel is the same
        model = model_of("rest_lite", cpu_layout="contiguous", linear_impl="aten").train()
        assert_compiled_gradients_match_eager(model, X, RTOL32)


def assert_compiled_gradients_match_eager(model, x, rtol):
    """Gradients of the input and every parameter, fullgraph-compiled (aot_eager) against eager."""
    def grads(fn):
        model.zero_grad()
        inp = x.clone().requires_grad_(True)
        fn(inp).square().mean().backward()
        return [inp.grad] + [p.grad.clone() for p in model.parameters()]

    eager = grads(model)
    compiled = grads(torch.compile(model, fullgraph=True, backend="aot_eager"))
    names = ["input"] + [n for n, _ in model.named_parameters()]
    largest = max(g.abs().max().item() for g in eager[1:])
    for name, a, e in zip(names, compiled, eager):
        # only the exactly-zero gradients (mix bias etc.) are pure noise: compared against 1e-3 of the largest
        assert_close_scaled(a, e, rtol, f"grad {name}", floor=1e-3 * largest)


def test_compile_with_changing_scale_has_no_graph_break():
    # A second model with other head dims hands the same code another scale; torch.compile then
    # traces the scale as a symbolic float, which the argument checks must not break on.
    import rest_kernels

    def fn(q, k, v, scale):
        return rest_kernels.emsa_attention(q, k, v, torch.eye(2), scale=scale)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    for scale in (0.5, 0.25, 0.125):
        torch.testing.assert_close(compiled(q, k, v, scale), fn(q, k, v, scale))


def test_export_runs_and_matches():
    model = model_of("rest_lite").eval()
    batch = Dim("batch", min=1, max=64)
    program = torch.export.export(model, (X,), dynamic_shapes={"x": {0: batch}})
    with torch.no_grad():
        for x in (X, torch.randn(3, 3, 64, 64)):
            assert_close_scaled(program.module()(x), model(x), RTOL32, f"exported logits, batch {x.shape[0]}")


@pytest.mark.parametrize("variant", ["rest_lite", "rest_small"])
def test_export_has_single_fused_nodes(monkeypatch, variant):
    with fused_cpu_route(monkeypatch):
        model = model_of(variant).eval()
        program = torch.export.export(model, (X,))
        assert count_ops(program.graph, "emsa_fwd", "pa_fwd") == expected_counts(model)
        with torch.no_grad():
            assert_close_scaled(program.module()(X), model(X), RTOL32, f"{variant} exported logits (custom ops)")


def test_export_tiny_model_odd_size(monkeypatch):
    # an input that is not a multiple of 32 exports and runs like eager too
    model = ResT(**load("rest_tiny.zip")["config"]).eval()
    x = torch.randn(1, 3, 47, 33)
    with fused_cpu_route(monkeypatch):
        program = torch.export.export(model, (x,))
        with torch.no_grad():
            assert_close_scaled(program.module()(x), model(x), RTOL32, "tiny exported logits")


# --------------------------------------------------------------------------- ResTv2
V2_TINY = dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 2, 1, 1), num_classes=10)
X_ODD = torch.randn(2, 3, 61, 45, generator=torch.Generator().manual_seed(2))  # stage sizes not multiples of sr


def v2_model(seed=3, dtype=torch.float32, **kwargs):
    model = ResTV2(**{**V2_TINY, **kwargs}).double()
    fill_weights(model, seed)
    return model.to(dtype)


def test_v2_fused_ops_are_single_nodes_under_compile_and_export(monkeypatch):
    """ResTv2's plain attention and PA as single custom-op nodes, fullgraph compile and torch.export
    (with a free batch), at a size whose up branch is cut (rest.modules.EMSAv2)."""
    with fused_cpu_route(monkeypatch):
        model = v2_model().eval()
        assert_compiles_to_custom_op_nodes(model, X_ODD, "restv2")
        program = torch.export.export(model, (X_ODD,), dynamic_shapes={"x": {0: Dim("batch", min=1, max=64)}})
        assert count_ops(program.graph, "emsa_fwd", "pa_fwd") == expected_counts(model)
        with torch.no_grad():
            for x in (X_ODD, X_ODD[:1]):
                assert_close_scaled(program.module()(x), model(x), RTOL32, f"restv2 exported, batch {x.shape[0]}")


def test_v2_compile_gradients_match_eager(monkeypatch):
    with fused_cpu_route(monkeypatch):
        # float64, NCHW maps (see test_fused_ops_compile_gradients_match_eager), an odd size
        model = v2_model(dtype=torch.float64, cpu_layout="contiguous").train()
        assert_compiled_gradients_match_eager(model, X_ODD.double(), 1e-9)
