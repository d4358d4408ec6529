"""ONNX export (rest.export_onnx and plain torch.onnx.export) run with onnxruntime against PyTorch."""
from __future__ import annotations

import logging

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import rest  # noqa: E402
from rest import ResT, ResTV2, rest_lite  # noqa: E402

from support.conformance import assert_close_scaled  # noqa: E402
from support.fused_route import fused_cpu_route  # noqa: E402
from support.reference_data import fill_weights, load  # noqa: E402

# onnxruntime vs PyTorch in float32: the same math in other kernels (fixture-recipe weights, so
# InstanceNorm does not magnify rounding as at the official init's near-uniform attention)
RTOL = 1e-4
STANDARD_DOMAINS = {"", "ai.onnx"}


@pytest.fixture(autouse=True)
def _quiet_exporter():
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def lite():
    model = rest_lite().double()
    fill_weights(model, 1)
    return model.float().eval()


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def op_types(path):
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= STANDARD_DOMAINS, "non-standard ONNX ops in the graph"
    return {n.op_type for n in graph.node}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-exporter", "torchscript-exporter"])
def test_export_onnx_runs_in_onnxruntime(tmp_path, monkeypatch, dynamo):
    model = lite()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with fused_cpu_route(monkeypatch):  # the model would use the fused custom ops in PyTorch
        path = rest.export_onnx(model, tmp_path / "lite.onnx", x, dynamo=dynamo)
        with torch.no_grad():
            expected = model(x)
    ops = op_types(path)
    # the attention written out: logits, softmax, InstanceNorm over the map; PA as conv + sigmoid
    assert {"MatMul", "Softmax", "InstanceNormalization", "Conv", "Sigmoid"} <= ops
    assert_close_scaled(run_onnx(path, x), expected, RTOL, "onnxruntime logits")
    if not dynamo:  # the TorchScript exporter's file has the example's fixed batch
        with pytest.raises(ValueError, match="dynamo"):
            rest.export_onnx(model, tmp_path / "no.onnx", x, dynamo=False, dynamic_batch=True)
        return
    # the batch dimension is free
    x3 = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert_close_scaled(run_onnx(path, x3), model(x3), RTOL, "onnxruntime logits, batch 3")


def test_plain_torch_onnx_export_lowers_the_fused_ops(tmp_path, monkeypatch):
    # no helper: torch.onnx.export as users call it; the registry routes to the reference math
    model = ResT(**load("rest_tiny.zip")["config"]).eval()
    x = torch.randn(1, 3, 47, 33)  # not a multiple of 32
    with fused_cpu_route(monkeypatch):
        torch.onnx.export(model, (x,), tmp_path / "tiny.onnx", dynamo=True)
        with torch.no_grad():
            expected = model(x)
    op_types(tmp_path / "tiny.onnx")
    assert_close_scaled(run_onnx(tmp_path / "tiny.onnx", x), expected, RTOL, "tiny model")


def test_export_onnx_restores_the_model(tmp_path):
    model = ResT(**load("rest_tiny.zip")["config"]).double()
    fill_weights(model, 2)
    model.float().train()
    model.set_backend("cpu")  # pinned to a fused backend that may be unavailable here
    x = torch.randn(1, 3, 64, 64)  # a batch-1 example: still a free batch dimension in the file
    path = rest.export_onnx(model, tmp_path / "m.onnx", x)
    assert model.training
    assert all(m.backend == "cpu" for m in model.modules() if isinstance(m, (rest.EMSA, rest.PA)))
    model.set_backend(None).eval()
    with torch.no_grad():
        assert_close_scaled(run_onnx(path, x), model(x), RTOL, "batch 1")
        x4 = torch.randn(4, 3, 64, 64)
        assert_close_scaled(run_onnx(path, x4), model(x4), RTOL, "batch 4")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-exporter", "torchscript-exporter"])
def test_restv2_export_onnx_runs_in_onnxruntime(tmp_path, monkeypatch, dynamo):
    """ResTv2 at a size whose stage maps are not multiples of the reduction ratios (the up branch is
    cut to the map, rest.modules.EMSAv2): plain softmax attention, the up branch's PixelShuffle
    (DepthToSpace) and PA as standard operators."""
    model = ResTV2(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1), num_classes=10).double()
    fill_weights(model, 4)
    model = model.float().eval()
    x = torch.randn(2, 3, 61, 45, generator=torch.Generator().manual_seed(1))
    with fused_cpu_route(monkeypatch):
        path = rest.export_onnx(model, tmp_path / "v2.onnx", x, dynamo=dynamo)
        with torch.no_grad():
            expected = model(x)
    ops = op_types(path)
    assert {"MatMul", "Softmax", "Conv", "Sigmoid", "DepthToSpace"} <= ops and "InstanceNormalization" not in ops
    assert_close_scaled(run_onnx(path, x), expected, RTOL, "onnxruntime restv2 logits")
    if dynamo:
        x3 = torch.randn(3, 3, 61, 45)
        with torch.no_grad():
            assert_close_scaled(run_onnx(path, x3), model(x3), RTOL, "onnxruntime restv2 logits, batch 3")
