"""ONNX export (rest.export_onnx and plain torch.onnx.export) run with onnxruntime (and OpenVINO
where installed) against PyTorch and the official float64 outputs; the export form of the attention
(rest_kernels.backends.reference.emsa_export_form) against the official math in float64."""
from __future__ import annotations

import logging
import math

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import rest  # noqa: E402
import rest_kernels  # noqa: E402
from rest import ResT, ResTV2, rest_lite  # noqa: E402
from rest_kernels.backends.reference import emsa_export_form  # noqa: E402

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


def op_counts(path):
    graph = onnx.load(str(path)).graph
    assert {n.domain for n in graph.node} <= STANDARD_DOMAINS, "non-standard ONNX ops in the graph"
    counts = {}
    for n in graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def op_types(path):
    return set(op_counts(path))


def assert_attention_export_form(path, model):
    """The attention as emsa_export_form writes it: one softmax map per EMSA, no InstanceNormalization
    (the engines' cancels on near-uniform maps); PA as conv + sigmoid."""
    counts = op_counts(path)
    assert {"MatMul", "Softmax", "Conv", "Sigmoid"} <= set(counts)
    assert "InstanceNormalization" not in counts
    assert counts["Softmax"] == sum(isinstance(m, rest.EMSA) for m in model.modules())


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-exporter", "torchscript-exporter"])
def test_export_onnx_runs_in_onnxruntime(tmp_path, monkeypatch, dynamo):
    model = lite()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with fused_cpu_route(monkeypatch):  # the model would use the fused custom ops in PyTorch
        # a fixed image size keeps the trace short; free sizes: test_export_onnx_dynamic_batch_and_size
        path = rest.export_onnx(model, tmp_path / "lite.onnx", x, dynamo=dynamo, dynamic_size=False)
        with torch.no_grad():
            expected = model(x)
    assert_attention_export_form(path, model)
    assert_close_scaled(run_onnx(path, x), expected, RTOL, "onnxruntime logits")
    if not dynamo:  # the TorchScript exporter's file has the example's fixed batch
        for flag in ("dynamic_batch", "dynamic_size"):
            with pytest.raises(ValueError, match=f"{flag} needs the dynamo exporter"):
                rest.export_onnx(model, tmp_path / "no.onnx", x, dynamo=False, **{flag: True})
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
    path = rest.export_onnx(model, tmp_path / "m.onnx", x, dynamic_size=False)
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


def test_export_onnx_rejects_a_bad_example(tmp_path):
    with pytest.raises(ValueError, match=r"example_input must be a \(B, 3, H, W\) tensor, got shape \(3, 64, 64\)"):
        rest.export_onnx(ResT(**load("rest_tiny.zip")["config"]), tmp_path / "no.onnx", torch.randn(3, 64, 64))


# --------------------------------------------------------------------------- the export form
def emsa_case(B, h, N, M, d, q_scale, seed, mix=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, h, N, d, generator=g, dtype=torch.float64) * q_scale
    k = torch.randn(B, h, M, d, generator=g, dtype=torch.float64) * q_scale
    v = torch.randn(B, h, M, d, generator=g, dtype=torch.float64)
    w = torch.randn(h, h, generator=g, dtype=torch.float64) if mix else None
    b = torch.randn(h, generator=g, dtype=torch.float64) if mix else None
    return q, k, v, w, b


@pytest.mark.parametrize("B,h,N,M,d,q_scale,mix", [
    (2, 3, 37, 11, 8, 1.0, True),        # the identities' check size of docs/emsa_math.md
    (1, 2, 196, 49, 32, 0.02, True),     # near-uniform maps (the official init): var of the order of eps
    (2, 4, 5, 1, 8, 1.0, True),          # one key: P = 1, the centred map 0
    (1, 2, 1, 1, 4, 1.0, True),          # a 1x1 map
    (2, 1, 33, 7, 16, 1.0, False),       # no head mix: plain softmax attention
])
def test_export_form_equals_the_official_math_in_float64(B, h, N, M, d, q_scale, mix):
    q, k, v, w, b = emsa_case(B, h, N, M, d, q_scale, seed=N)
    scale = d ** -0.5
    out = emsa_export_form(q, k, v, w, b, scale, 1e-5)
    expected = rest_kernels.emsa_reference(q, k, v, w, b, scale, 1e-5)
    assert out.stride() == expected.stride()  # laid out as (B, N, h, d), like every backend's output
    assert_close_scaled(out, expected, 1e-12, "export form, float64", floor=1.0)


def test_export_form_float32_error_at_near_uniform_maps():
    # the float32 error against float64 no more than the official math's own in float32 (measured:
    # about 0.9x; InstanceNorm written as E[P^2] - E[P]^2, as the engines evaluate it, is worse)
    q, k, v, w, b = emsa_case(2, 2, 784, 49, 32, 0.02, seed=0)
    scale = 32 ** -0.5
    exact = rest_kernels.emsa_reference(q, k, v, w, b, scale, 1e-5)
    args32 = [t.float() for t in (q, k, v, w, b)]
    err = (emsa_export_form(*args32, scale, 1e-5).double() - exact).abs().max().item()
    err_official = (rest_kernels.emsa_reference(*args32, scale, 1e-5).double() - exact).abs().max().item()
    assert err <= 1.5 * err_official, (err, err_official)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_export_form_low_precision_inputs(dtype):
    q, k, v, w, b = emsa_case(2, 2, 50, 13, 16, 1.0, seed=3)
    low = [t.to(dtype) for t in (q, k, v)]
    out = emsa_export_form(*low, w.float(), b.float(), 0.25, 1e-5)
    assert out.dtype == dtype
    expected = rest_kernels.emsa_reference(*low, w.float(), b.float(), 0.25, 1e-5)
    assert_close_scaled(out, expected, 2e-2, f"export form, {dtype}")


@pytest.mark.parametrize("size", ["224x224", "64x96"])
def test_model_in_export_mode_matches_official_float64(size, monkeypatch):
    # the whole model as an ONNX export traces it (every is_in_onnx_export() branch taken), run in
    # float64 against the official code's float64 logits: the exported math is the official math
    case = load("rest_tiny.zip")[size]
    model = ResT(**load("rest_tiny.zip")["config"]).double()
    fill_weights(model, case["seed"])
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    with torch.no_grad():
        logits = model.eval()(case["input"])
    assert_close_scaled(logits, case["logits_eval"], 1e-9, f"tiny {size}, export mode, float64")


# --------------------------------------------------------------------------- engines at the official init
@pytest.fixture(scope="module")
def official_init_export(tmp_path_factory):
    """rest_tiny's configuration at the official init (near-uniform attention maps), exported once
    with free batch, height and width from a small example."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    torch.manual_seed(0)
    model = ResT(**load("rest_tiny.zip")["config"]).eval()
    path = rest.export_onnx(model, tmp_path_factory.mktemp("onnx") / "tiny_init.onnx", torch.randn(2, 3, 64, 64))
    return model, path


def run_openvino(path, x):
    ov = pytest.importorskip("openvino")
    # f32 stated: OpenVINO's default on CPUs with avx512_bf16 / AMX is bf16
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return torch.from_numpy(compiled(x.numpy())[0])


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_engines_float32_error_at_the_official_init(official_init_export, engine):
    # 224 px, where the official graph's InstanceNormalization cancelled in both engines (measured
    # 53x and 51x PyTorch's float32 error on this model; the rest_lite: 450x and 130x)
    model, path = official_init_export
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        exact = ResT(**load("rest_tiny.zip")["config"]).double().eval()
        exact.load_state_dict(model.state_dict())
        exact = exact(x.double())
        err_pytorch = (model(x).double() - exact).abs().max().item()
    out = (run_onnx if engine == "onnxruntime" else run_openvino)(path, x)
    err = (out.double() - exact).abs().max().item()
    assert err <= 2 * err_pytorch, f"{engine}: float32 error {err:.2e} > 2x PyTorch's {err_pytorch:.2e}"


def test_export_onnx_dynamic_batch_and_size(official_init_export):
    model, path = official_init_export
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    for shape in [(3, 3, 47, 33), (1, 3, 96, 64), (2, 3, 32, 32)]:  # 32 px: 1x1 maps in stage 4
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(math.prod(shape)))
        with torch.no_grad():
            assert_close_scaled(run_onnx(path, x), model(x), RTOL, f"onnxruntime logits, {shape}")
