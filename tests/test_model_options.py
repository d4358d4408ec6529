"""The model zoo's use of rest_kernels and its explicit CPU options (issue 17, item 7).

- rest/ reaches rest_kernels only through its public API (the names of rest_kernels.__all__), so the
  kernels' internals can change without breaking the models; every public name is documented in
  docs/api.md.
- cpu_layout ("auto" | "channels_last" | "contiguous", rest/layout.py) and linear_impl ("auto" |
  "onednn" | "aten", rest/dense.py) are constructor options that do what they say; "auto" keeps the
  rule that infers them from the backend (tests/test_models.py and tests/test_dense.py cover it).
"""
from __future__ import annotations

import ast
import pathlib

import pytest
import torch
import torch.nn.functional as F

import rest
import rest_kernels
from rest import EMSA, ResT, dense, layout
from rest.layers import Block, Mlp

ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC = set(rest_kernels.__all__) | {"__version__"}
ONEDNN_REASON = dense.onednn_unavailable_reason()
needs_onednn = pytest.mark.skipif(ONEDNN_REASON is not None, reason=f"oneDNN linear unavailable: {ONEDNN_REASON}")


# --------------------------------------------------------------------------- public API only
def private_uses(source: str, filename: str = "<string>") -> list[str]:
    """Every use in `source` of a rest_kernels name that is not public: an import of a submodule
    (import rest_kernels.x, from rest_kernels.x import y), a non-public name imported from the package
    (from rest_kernels import _y), or an attribute of the package that is not public
    (rest_kernels.backends...)."""
    tree = ast.parse(source, filename)
    aliases = set()  # the names the package is bound to in this module
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("rest_kernels."):
                    found.append(f"{filename}:{node.lineno}: import {a.name}")
                elif a.name == "rest_kernels":
                    aliases.add(a.asname or a.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("rest_kernels."):
                found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
            elif node.module == "rest_kernels":
                found += [f"{filename}:{node.lineno}: from rest_kernels import {a.name}"
                          for a in node.names if a.name not in PUBLIC]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr not in PUBLIC):
            found.append(f"{filename}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_checker_finds_private_uses():
    bad = ("import rest_kernels.ops\n"
           "import rest_kernels as rk\n"
           "from rest_kernels.backends.registry import check_name\n"
           "from rest_kernels import _validation, emsa_attention\n"
           "rk.backends.reference.attention_map\n"
           "rk.pa_gate\n")
    found = private_uses(bad)
    assert len(found) == 4, found
    assert all(s in " ".join(found) for s in ("rest_kernels.ops", "backends.registry", "_validation",
                                               "rk.backends"))
    good = "import rest_kernels\nfrom rest_kernels import use_backend\nrest_kernels.emsa_attention_map\n"
    assert private_uses(good) == []


def test_models_import_only_the_public_rest_kernels_api():
    files = sorted((ROOT / "rest").rglob("*.py"))
    assert files
    found = [use for f in files for use in private_uses(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == [], "rest/ uses rest_kernels internals:\n" + "\n".join(found)


def test_every_public_name_is_documented():
    doc = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in rest_kernels.__all__ if f"rest_kernels.{name}" not in doc]
    assert missing == [], f"rest_kernels.__all__ names missing from docs/api.md: {missing}"


# --------------------------------------------------------------------------- helpers
def small_model(dtype=torch.float32, **kwargs) -> ResT:
    torch.manual_seed(0)
    cfg = dict(embed_dims=(8, 16, 32, 64), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1), num_classes=5,
               qkv_bias=True, apply_transform=True)
    return ResT(**{**cfg, **kwargs}).to(dtype)


def images(dtype=torch.float32, channels_last=False):
    x = torch.randn(2, 3, 37, 45, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def conv_inputs(model, x, train=False):
    """Run the model once; returns {conv name: (NCHW-contiguous?, channels-last (not NCHW)?)} of each
    Conv2d's input."""
    seen = {}

    def hook(name):
        def record(module, args):
            t = args[0]
            seen[name] = (t.is_contiguous(), not t.is_contiguous() and t.is_contiguous(
                memory_format=torch.channels_last))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Conv2d)]
    try:
        model.train(train)
        if train:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


STEM = ("stem.conv1", "stem.conv2", "stem.conv3")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts every entry into rest/dense.py's oneDNN path (forward products, fused GELU, backward
    products) while passing the calls through."""
    calls = {"n": 0}
    real_linear, real_mm = dense.onednn_linear, dense._onednn_mm

    def linear(*args, **kwargs):
        calls["n"] += 1
        return real_linear(*args, **kwargs)

    def mm(*args, **kwargs):
        calls["n"] += 1
        return real_mm(*args, **kwargs)

    monkeypatch.setattr(dense, "onednn_linear", linear)
    monkeypatch.setattr(dense, "_onednn_mm", mm)
    return calls


# --------------------------------------------------------------------------- cpu_layout
@pytest.mark.parametrize("channels_last_images", [False, True], ids=["nchw-images", "channels-last-images"])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_cpu_layout_contiguous_keeps_the_stem_nchw(monkeypatch, backend, channels_last_images):
    """"contiguous": the images are made NCHW-contiguous whatever the backend or their own layout, so
    the stem runs the official NCHW maps (also where "auto" would pick channels-last)."""
    monkeypatch.delenv("REST_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv(layout.ENV_VAR, raising=False)
    model = small_model(cpu_layout="contiguous", backend=backend)
    x = images(channels_last=channels_last_images)
    for train in (False, True):
        seen = conv_inputs(model, x, train)
        assert all(seen[n][0] for n in STEM), seen
    with torch.no_grad():
        stem_out = model.eval().stem(model._prepare_input(x))
    assert stem_out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", [None, "reference"])
def test_cpu_layout_channels_last_is_used_everywhere(monkeypatch, backend, dtype):
    """"channels_last": every convolution gets channels-last maps, also for the reference backend,
    float64 and REST_KERNELS_CHANNELS_LAST=0, where "auto" keeps NCHW."""
    monkeypatch.delenv("REST_KERNELS_BACKEND", raising=False)
    monkeypatch.setenv(layout.ENV_VAR, "0")
    model = small_model(dtype, cpu_layout="channels_last", backend=backend)
    for train in (False, True):
        seen = conv_inputs(model, images(dtype), train)
        assert seen and all(cl for _, cl in seen.values()), seen


def test_cpu_layout_auto_follows_the_rule(monkeypatch):
    """"auto" (the default) is rest/layout.py's rule: channels-last for a float32 or bfloat16 CPU model unless the
    backend is "reference" or REST_KERNELS_CHANNELS_LAST=0; else the images as they are given."""
    monkeypatch.delenv("REST_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv(layout.ENV_VAR, raising=False)
    assert ResT().cpu_layout == "auto"
    cpu, f32, f64 = torch.device("cpu"), torch.float32, torch.float64

    def fmt(dtype=f32, backend=None, cpu_layout="auto", device=cpu):
        return layout.images_memory_format(device, dtype, backend, cpu_layout)

    assert fmt() == (torch.channels_last if torch.backends.mkldnn.is_available() else None)
    assert fmt(backend="reference") is None
    assert fmt(f64) is None
    assert fmt(torch.float16) is None
    # a bfloat16 model (rest.optimize_for_inference(model, dtype=torch.bfloat16)) is channels-last too
    # (where oneDNN has a bfloat16 path: where it was measured)
    assert fmt(torch.bfloat16) == (fmt() if layout._HAS_ONEDNN_BF16 else None)
    assert fmt(device=torch.device("meta")) is None  # not a CPU model: the images stay as they are
    with rest_kernels.use_backend("reference"):
        assert fmt() is None
    monkeypatch.setenv(layout.ENV_VAR, "0")
    assert fmt() is None
    # the explicit values ignore the backend, the dtype and the switch
    assert fmt(f64, "reference", "channels_last") == torch.channels_last
    assert fmt(f32, "cpu", "contiguous") == torch.contiguous_format
    # "reference" + auto leaves channels-last images channels-last (the official code converts nothing)
    seen = conv_inputs(small_model(backend="reference"), images(channels_last=True))
    assert seen["stem.conv1"][1]


def test_cpu_layout_is_the_model_s_not_the_images(monkeypatch):
    """The layout follows the model's dtype, not the images': under CPU autocast a float32 model gets
    bfloat16 images channels-last too, while a float64 model keeps float64 images as they come."""
    monkeypatch.delenv("REST_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv(layout.ENV_VAR, raising=False)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN: 'auto' keeps every layout")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        seen = conv_inputs(small_model(), images(torch.bfloat16))
    assert seen["stem.conv1"][1]
    seen = conv_inputs(small_model(torch.float64), images(torch.float64))
    assert seen["stem.conv1"][0]


def test_cpu_layouts_agree(monkeypatch):
    """The layout changes the rounding only (float64: to the last bits), in eval and in training."""
    monkeypatch.delenv(layout.ENV_VAR, raising=False)
    x = images(torch.float64)
    out = {}
    for cpu_layout in layout.CPU_LAYOUTS:
        model = small_model(torch.float64, cpu_layout=cpu_layout)
        with torch.no_grad():
            logits = model.eval()(x)
        model.train()
        xg = x.clone().requires_grad_()
        model(xg).square().sum().backward()
        out[cpu_layout] = (logits, xg.grad, model.stem.conv1.weight.grad)
    for cpu_layout in ("channels_last", "contiguous"):
        for got, want in zip(out[cpu_layout], out["auto"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- linear_impl
def test_linear_impl_reaches_every_linear_layer():
    model = small_model(linear_impl="aten")
    layers = [m for m in model.modules() if isinstance(m, dense.Linear)]
    assert len(layers) == 4 * 5  # per block: q, kv, proj, fc1, fc2
    assert model.linear_impl == "aten" and all(m.linear_impl == "aten" for m in layers)
    assert all(m.linear_impl == "auto" for m in small_model().modules() if isinstance(m, dense.Linear))
    assert EMSA(8, 2, linear_impl="onednn").proj.linear_impl == "onednn"
    assert Mlp(8, 16, linear_impl="aten").fc2.linear_impl == "aten"
    blk = Block(8, 2, linear_impl="aten")
    assert blk.attn.q.linear_impl == blk.mlp.fc1.linear_impl == "aten"
    # the official state_dict: the option adds no keys
    assert list(small_model(linear_impl="aten").state_dict()) == list(small_model().state_dict())


@pytest.mark.parametrize("backend", [None, "cpu"])
def test_linear_impl_aten_never_takes_the_onednn_path(onednn_calls, monkeypatch, backend):
    """"aten": F.linear (exactly nn.Linear) in inference, training and the fused-GELU spot, on a
    backend where "auto" would take oneDNN."""
    monkeypatch.delenv("REST_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv(dense.ENV_VAR, raising=False)
    if backend is not None and rest_kernels.available_backends()[backend] is not None:
        pytest.skip(f"backend {backend!r} unavailable")
    layer = dense.Linear(13, 11, linear_impl="aten")
    x = torch.randn(3, 13)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert torch.equal(dense.linear_gelu(layer, torch.nn.GELU(), x), F.gelu(F.linear(x, layer.weight, layer.bias)))
    model = small_model(linear_impl="aten", backend=backend)
    conv_inputs(model, images(), train=False)
    conv_inputs(model, images(), train=True)
    assert onednn_calls["n"] == 0


@needs_onednn
def test_linear_impl_auto_takes_onednn_off_the_reference_backend(onednn_calls, monkeypatch):
    """The default keeps today's rule (tests/test_dense.py has the details)."""
    monkeypatch.delenv("REST_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv(dense.ENV_VAR, raising=False)
    conv_inputs(small_model(backend="reference"), images())
    assert onednn_calls["n"] == 0
    conv_inputs(small_model(), images())
    assert onednn_calls["n"] > 0


@needs_onednn
def test_linear_impl_onednn_ignores_the_backend_and_the_switch(onednn_calls, monkeypatch):
    """"onednn": oneDNN for every call it can serve, also on the reference backend and with
    REST_KERNELS_ONEDNN_LINEAR=0, where "auto" stays on F.linear; same results up to rounding."""
    monkeypatch.setenv(dense.ENV_VAR, "0")
    fused = small_model(backend="reference", linear_impl="onednn").eval()
    plain = small_model(backend="reference").eval()
    plain.load_state_dict(fused.state_dict())
    x = images()
    with torch.no_grad():
        got = fused(x)
        n = onednn_calls["n"]
        assert n == 4 * 5  # every linear layer of the 4 blocks (fc1 + GELU is one call)
        want = plain(x)
        assert onednn_calls["n"] == n
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # training: the forward and the two backward products on oneDNN
    layer = dense.Linear(6, 4, backend="reference", linear_impl="onednn")
    before = onednn_calls["n"]
    layer(torch.randn(3, 6, requires_grad=True)).sum().backward()
    assert onednn_calls["n"] == before + 3


@needs_onednn
def test_linear_impl_onednn_falls_back_where_onednn_cannot_serve(onednn_calls):
    layer = dense.Linear(6, 4, linear_impl="onednn")
    x = torch.randn(3, 6)
    with torch.no_grad():
        layer.double()(x.double())  # a float64 layer
        layer.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
    assert onednn_calls["n"] == 0


@needs_onednn
def test_traced_layers_take_the_eager_path_or_the_standard_one(onednn_calls):
    """linear_impl="onednn" too: torch.fx records the choice and makes it again when the traced module
    runs (oneDNN, bitwise eager's); torch.compile / torch.export trace F.linear (inductor cannot lower
    oneDNN's linear on parameters, rest/dense.py), which aot_eager runs as aten's product."""
    layer = dense.Linear(6, 4, linear_impl="onednn")
    x = torch.randn(3, 6)
    with torch.no_grad():
        eager = layer(x)
        assert onednn_calls["n"] == 1
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        assert onednn_calls["n"] == 1  # dynamo traced F.linear
        traced = torch.fx.symbolic_trace(layer)
        fx_out = traced(x)
        assert onednn_calls["n"] == 2  # the fx module made eager's choice when it ran
    assert torch.equal(fx_out, eager) and torch.equal(compiled, F.linear(x, layer.weight, layer.bias))


# --------------------------------------------------------------------------- invalid values
@pytest.mark.parametrize("name,bad", [("cpu_layout", "nchw"), ("cpu_layout", "channels-last"),
                                      ("cpu_layout", "AUTO"), ("linear_impl", "mkl"), ("linear_impl", "")])
def test_invalid_option_values_raise_value_error_naming_the_argument(name, bad):
    with pytest.raises(ValueError, match=name):
        ResT(**{name: bad})
    with pytest.raises(ValueError, match=name):
        rest.rest_lite(**{name: bad})
    if name == "linear_impl":
        for build in (lambda: EMSA(8, 2, linear_impl=bad), lambda: Mlp(8, 16, linear_impl=bad),
                      lambda: Block(8, 2, linear_impl=bad), lambda: dense.Linear(4, 3, linear_impl=bad)):
            with pytest.raises(ValueError, match=name):
                build()


@pytest.mark.parametrize("name", ["cpu_layout", "linear_impl"])
@pytest.mark.parametrize("bad", [None, 1, True])
def test_option_values_of_the_wrong_type_raise_type_error(name, bad):
    with pytest.raises(TypeError, match=name):
        ResT(**{name: bad})


def test_timm_passes_the_options_through():
    timm = pytest.importorskip("timm")
    model = timm.create_model("rest_lite", cpu_layout="contiguous", linear_impl="aten", num_classes=3)
    assert model.cpu_layout == "contiguous" and model.stage1[0].attn.q.linear_impl == "aten"


# --------------------------------------------------------------------------- attn_drop path
def test_attention_dropout_uses_the_public_attention_map(monkeypatch):
    """EMSA with attn_drop in training drops out rest_kernels.emsa_attention_map's map; in eval (or
    with attn_drop 0) the fused op runs and the map is never formed."""
    calls = []
    real = rest_kernels.emsa_attention_map

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(rest_kernels, "emsa_attention_map", spy)
    torch.manual_seed(0)
    attn = EMSA(16, 2, qkv_bias=True, attn_drop=0.5, sr_ratio=2, apply_transform=True).double()
    x = torch.randn(2, 6 * 5, 16, dtype=torch.float64)
    with torch.no_grad():
        attn.eval()(x, 6, 5)
    assert calls == []
    attn.train()
    torch.manual_seed(3)
    got = attn(x, 6, 5)
    assert len(calls) == 1
    # the same computation written out, with the same dropout mask
    B, N, C, h = 2, 30, 16, 2
    q = attn.q(x).view(B, N, h, C // h).transpose(1, 2)
    m = attn.sr_norm(attn.sr(x.transpose(1, 2).reshape(B, C, 6, 5)).flatten(2).transpose(1, 2))
    kv = attn.kv(m).view(B, m.shape[1], 2, h, C // h)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    torch.manual_seed(3)
    amap = real(q, k, attn.transform_conv.weight, attn.transform_conv.bias, scale=attn.scale,
                eps=attn.transform_norm.eps)
    out = (F.dropout(amap, 0.5, True) @ v).transpose(1, 2).reshape(B, N, C)
    torch.testing.assert_close(got, attn.proj(out))
    got.sum().backward()
    assert attn.transform_conv.weight.grad is not None and attn.q.weight.grad is not None
