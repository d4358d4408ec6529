"""rest/dense.py: the model zoo's linear layers, oneDNN for CPU float32 (and bfloat16 where oneDNN has a
bfloat16 path) products, nn.Linear otherwise."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rest
import rest_kernels
from rest import dense
from support.module_copies import deep_and_pickled_copies

pytestmark = pytest.mark.skipif(dense.onednn_unavailable_reason() is not None,
                                reason=f"oneDNN linear unavailable: {dense.onednn_unavailable_reason()}")


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the oneDNN path (fused GELU or not) while passing them through."""
    calls = {"plain": 0, "gelu": 0}
    real = dense.onednn_linear

    def counting(x, weight, bias, gelu=False):
        calls["gelu" if gelu else "plain"] += 1
        return real(x, weight, bias, gelu)

    monkeypatch.setattr(dense, "onednn_linear", counting)
    return calls


def _max_abs(t):
    return t.abs().max().item() if t.numel() else 0.0


def f64_linear(x, layer):
    return F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())


@pytest.mark.parametrize("shape", [(7, 13), (2, 3, 13), (2, 3, 4, 13), (13,), (0, 13), (1, 1, 13)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_float64_like_nn_linear(shape, bias, spy):
    torch.manual_seed(0)
    layer = dense.Linear(13, 11, bias=bias)
    ref_layer = nn.Linear(13, 11, bias=bias)
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(shape)
    with torch.no_grad():
        got, theirs = layer(x), ref_layer(x)
    want = f64_linear(x, layer)
    assert got.shape == theirs.shape == want.shape and got.dtype == torch.float32
    # oneDNN's error vs float64 is of the order of MKL's (both float32 sums over 13 terms)
    tol = 4 * _max_abs(theirs.double() - want) + 1e-6
    assert _max_abs(got.double() - want) <= tol
    assert spy["plain"] == 1


def test_non_contiguous_input_and_weight(spy):
    layer = dense.Linear(8, 6)
    with torch.no_grad():
        layer.weight.set_(torch.randn(8, 6).t())  # a transposed (non-contiguous) weight
    x = torch.randn(8, 5).t()
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got.double(), f64_linear(x, layer), rtol=1e-5, atol=1e-5)
    assert spy["plain"] == 1


def test_linear_gelu_fuses_the_exact_gelu(spy):
    torch.manual_seed(1)
    fc, act = dense.Linear(16, 24), nn.GELU()
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        got = dense.linear_gelu(fc, act, x)
    torch.testing.assert_close(got.double(), F.gelu(f64_linear(x, fc)), rtol=1e-5, atol=1e-5)
    assert spy == {"plain": 0, "gelu": 1}


@pytest.mark.parametrize("capability", ["AVX2", "AVX512", "DEFAULT"])
def test_gelu_epilogue_follows_the_cpu_capability(capability, monkeypatch):
    # The GELU runs inside oneDNN's matmul except on the levels of GELU_APART_ON (there: the matmul,
    # then ATen's GELU in place); both are the exact GELU of the same product, whichever this CPU runs.
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert dense.onednn_gelu_epilogue() is (capability != "AVX2")
    torch.manual_seed(2)
    fc = dense.Linear(32, 48)
    x = torch.randn(4, 7, 32)
    with torch.no_grad():
        got = dense.onednn_linear(x, fc.weight, fc.bias, gelu=True)
        plain = dense.onednn_linear(x, fc.weight, fc.bias)
    want = F.gelu(f64_linear(x, fc))
    assert got.shape == want.shape and got.dtype == torch.float32 and got.data_ptr() != plain.data_ptr()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # the same product; the GELUs (oneDNN's erf and ATen's) agree to float32 rounding
    torch.testing.assert_close(got, F.gelu(plain), rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7)


def test_tanh_gelu_or_other_activation_is_not_fused(spy):
    fc = dense.Linear(4, 6)
    x = torch.randn(2, 4)
    with torch.no_grad():
        for act in (nn.GELU(approximate="tanh"), nn.ReLU()):
            torch.testing.assert_close(dense.linear_gelu(fc, act, x), act(F.linear(x, fc.weight, fc.bias)))
    assert spy == {"plain": 2, "gelu": 0}


def test_hooks_are_never_skipped(spy):
    # A fused fc1 + GELU would skip hooks on either module: with a hook they run one at a time.
    fc, act = dense.Linear(4, 6), nn.GELU()
    seen = []
    act.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    x = torch.randn(3, 4)
    with torch.no_grad():
        out = dense.linear_gelu(fc, act, x)
    assert len(seen) == 1 and torch.equal(seen[0], out)
    assert spy == {"plain": 1, "gelu": 0}


def test_falls_back_to_nn_linear_when_it_must(spy, monkeypatch):
    layer = dense.Linear(5, 3)
    x = torch.randn(2, 5)
    with torch.no_grad():
        # float64 and float16 stay on nn.Linear's path (bfloat16 where oneDNN has no bfloat16 path)
        layer.double()(x.double())
        layer.half()(x.half())
        if dense.onednn_bf16_unavailable_reason() is not None:
            layer.bfloat16()(x.bfloat16())
        layer.float()
        # the reference backend keeps the official eager math, pinned or as the default
        dense.Linear(5, 3, backend="reference")(x)
        with rest_kernels.use_backend("reference"):
            layer(x)
        # autocast: nn.Linear's own path, in the autocast dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        # the opt-out switch
        monkeypatch.setenv(dense.ENV_VAR, "0")
        layer(x)
    assert spy["plain"] == 0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gelu", [False, True])
def test_bfloat16_layers_on_onednn_match_float64_like_nn_linear(bias, gelu, spy):
    """A bfloat16 layer takes oneDNN where it has a bfloat16 path (inference and training) and is as
    close to float64 as nn.Linear in bfloat16: both accumulate in float32 and round once to bfloat16,
    so the bound is 2x nn.Linear's error plus one bfloat16 rounding of the output's scale."""
    if dense.onednn_bf16_unavailable_reason() is not None:
        pytest.skip(dense.onednn_bf16_unavailable_reason())
    torch.manual_seed(3)
    layer = dense.Linear(67, 45, bias=bias).bfloat16()
    ref_layer = nn.Linear(67, 45, bias=bias).bfloat16()
    ref_layer.load_state_dict(layer.state_dict())
    x = torch.randn(5, 9, 67).bfloat16()
    with torch.no_grad():
        got = dense.linear_gelu(layer, nn.GELU(), x) if gelu else layer(x)
        theirs = F.gelu(ref_layer(x)) if gelu else ref_layer(x)
    want = f64_linear(x, layer)
    want = F.gelu(want) if gelu else want
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert spy["gelu" if gelu else "plain"] == 1
    eps = torch.finfo(torch.bfloat16).eps
    assert _max_abs(got.double() - want) <= 2 * _max_abs(theirs.double() - want) + eps * _max_abs(want)
    # with gradients: the trainable oneDNN path, gradients as nn.Linear's up to bfloat16 rounding
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(5, 9, 45).bfloat16()
    layer(xg).backward(g)
    ref_layer(xr).backward(g)
    for a, b in [(xg.grad, xr.grad), (layer.weight.grad, ref_layer.weight.grad)]:
        assert a.dtype == torch.bfloat16
        assert _max_abs(a.double() - b.double()) <= 4 * eps * _max_abs(b.double())


@pytest.mark.parametrize("shape", [(7, 13), (2, 3, 13), (13,), (4, 13, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_float64(shape, bias, spy):
    torch.manual_seed(2)
    layer = dense.Linear(13, 11, bias=bias)
    x = torch.randn(shape)
    if shape[-1] != 13:
        x = x.transpose(-1, -2)  # a non-contiguous input
    x.requires_grad_()
    y = layer(x)
    g = torch.randn_like(y)
    dx, *dparams = torch.autograd.grad(y, [x, *layer.parameters()], g)
    assert spy["plain"] == 1  # the forward took the oneDNN path (the backward calls _onednn_mm)
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in layer.parameters()]
    y64 = F.linear(x64, *p64)
    want = torch.autograd.grad(y64, [x64, *p64], g.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for got, exp in zip([dx, *dparams], want):
        assert got.shape == exp.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5)


def test_double_backward_works(spy):
    # create_graph: the backward is made of differentiable matmuls, like nn.Linear's
    layer = dense.Linear(4, 3)
    x = torch.randn(5, 4, requires_grad=True)
    (dx,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    dx.pow(2).sum().backward()
    ref = nn.Linear(4, 3)
    ref.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_()
    (dx2,) = torch.autograd.grad(ref(x2).pow(2).sum(), x2, create_graph=True)
    dx2.pow(2).sum().backward()
    torch.testing.assert_close(dx, dx2)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
    assert spy["plain"] >= 1


def test_traced_graphs_run_the_eager_product_or_the_standard_one(spy):
    # torch.fx: the choice reads the layer (its options, device and dtype), never the input or the
    # tracer, so the fx-traced layer runs oneDNN as eager does, bitwise. torch.compile / torch.export:
    # the traced layer takes F.linear (inductor cannot lower oneDNN's linear on parameters; an exported
    # program carries the standard op), which aot_eager runs as aten's own product, bitwise.
    torch._dynamo.reset()
    layer = dense.Linear(6, 4)
    x = torch.randn(3, 6)
    with torch.no_grad():
        eager = layer(x)
        assert spy["plain"] == 1
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        assert spy["plain"] == 1  # the compiled graph's trace took F.linear
        traced = torch.fx.symbolic_trace(layer)
        assert [n.target for n in traced.graph.nodes if n.op == "call_function"] == [dense.linear]
        fx_out = traced(x)
    assert spy["plain"] == 2  # the fx module's run: oneDNN, as eager
    assert torch.equal(fx_out, eager)
    assert torch.equal(compiled, F.linear(x, layer.weight, layer.bias))


def test_onnx_export_gets_the_standard_product(spy, monkeypatch):
    # ONNX has no operator for oneDNN's matmul: while an export runs the layer takes F.linear
    layer = dense.Linear(6, 4)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    with torch.no_grad():
        x = torch.randn(3, 6)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    assert spy["plain"] == 0


def test_state_dict_and_type_are_nn_linear():
    layer = dense.Linear(5, 3, bias=False)
    assert isinstance(layer, nn.Linear) and list(layer.state_dict()) == ["weight"]
    with pytest.raises(ValueError, match="backend"):
        dense.Linear(5, 3, backend="nope")


def test_model_inference_uses_onednn_and_matches_the_reference_model(spy):
    torch.manual_seed(0)
    fused = rest.rest_lite(backend="cpu").eval()
    ref = rest.rest_lite(backend="reference").eval()
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        got = fused(x)
        assert spy["gelu"] == sum(fused.depths)  # every MLP's fc1 + GELU fused
        n_plain = spy["plain"]
        want = ref(x)
        assert spy["plain"] == n_plain  # the reference model never takes it
        exact = rest.rest_lite(backend="reference").eval().double()
        exact.load_state_dict(fused.state_dict())
        want64 = exact(x.double())
    # both float32 models are equally close to the float64 model
    err_fused = (got.double() - want64).abs().max().item()
    err_ref = (want.double() - want64).abs().max().item()
    assert err_fused <= 4 * err_ref + 1e-6, (err_fused, err_ref)


def test_set_backend_reaches_the_linear_layers(spy):
    model = rest.rest_lite().eval()
    model.set_backend("reference")
    assert all(m.backend == "reference" for m in model.modules() if isinstance(m, dense.Linear))
    with torch.inference_mode():
        model(torch.randn(1, 3, 32, 32))
    assert spy == {"plain": 0, "gelu": 0}


def _packed_layers(model):
    return [m for m in model.modules() if isinstance(m, dense.Linear) and m.packed is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_prepacked_weights_follow_the_weight(dtype, spy):
    """Linear.prepack (rest.optimize_for_inference): the oneDNN-blocked copy gives the layer's product
    and is rebuilt whenever the weight changes: in place (load_state_dict), replaced (.data), cast."""
    if dtype == torch.bfloat16 and dense.onednn_bf16_unavailable_reason() is not None:
        pytest.skip(dense.onednn_bf16_unavailable_reason())
    torch.manual_seed(4)
    layer = dense.Linear(24, 40).to(dtype)
    plain = dense.Linear(24, 40).to(dtype)
    assert layer.prepack() is True
    x = torch.randn(3, 7, 24).to(dtype)

    def check():
        plain.load_state_dict(layer.state_dict())
        with torch.no_grad():
            got, want = layer(x), plain(x)
        # the same oneDNN product with the weight reordered once: equal here, and at most a summation
        # order apart on a CPU where oneDNN picks another kernel for a pre-reordered weight (dtype's
        # default tolerance); a stale copy would be off by the weights' whole change
        torch.testing.assert_close(got, want)
    check()
    first = layer.packed._packed
    check()
    assert layer.packed._packed is first  # reused while the weight is unchanged
    layer.load_state_dict({"weight": torch.randn(40, 24).to(dtype), "bias": layer.bias.detach()})
    check()
    assert layer.packed._packed is not first
    with torch.no_grad():
        layer.weight.data = torch.randn(40, 24).to(dtype)
    check()
    with torch.no_grad():
        layer.weight.mul_(0.5)
    check()
    # with gradients the trainable path runs on the weight itself (the copy is for inference)
    y = layer(x.clone().requires_grad_())
    y.sum().backward()
    assert layer.weight.grad is not None


def test_optimized_model_prepacks_and_survives_copies(spy):
    model = rest.ResT(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1),
                      num_classes=10).eval()
    optimized = rest.optimize_for_inference(model)
    layers = _packed_layers(optimized)
    assert layers and len(layers) == sum(isinstance(m, dense.Linear) for m in optimized.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        got = optimized(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # BatchNorm folding rounds
        # oneDNN's opaque copies cannot be deep-copied or pickled: the copies start empty and rebuild
        for other in deep_and_pickled_copies(optimized):
            # every layer has its (empty) copy again: deepcopy's Parameters lose Python attributes,
            # Linear.__setstate__ packs the copy's weight
            assert len(_packed_layers(other)) == len(layers)
            assert all(m.packed._packed is None for m in _packed_layers(other))
            torch.testing.assert_close(other(x), got)
        # torch.fx: the traced module passes the same Parameters, so it uses their copies too
        traced = torch.fx.symbolic_trace(optimized)
        torch.testing.assert_close(traced(x), got)
        # optimizing an optimized model works too (it deep-copies)
        torch.testing.assert_close(rest.optimize_for_inference(optimized)(x), got)
