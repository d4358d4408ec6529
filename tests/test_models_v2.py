"""The ResTv2 model zoo (rest/models_v2.py) against the official outputs (tests/data/rest_v2_models.zip,
produced by the authors' models/rest_v2.py in float64) and keys (rest_v2_keys.json), and by
consistency where the official code has no answer: inputs that are not multiples of 32 (the up
branch's crop rule, rest.modules.EMSAv2), per-sample vs batched, fused backends vs the reference
backend (the official math, eager), forward and gradients in float64, and gradcheck of the v2 modules
on the fused backends.

Weights come from the fixtures' recipe (reference_data.fill_weights), as for v1 (tests/test_models.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rest
from rest import EMSAv2, ResTV2, restv2_base, restv2_large, restv2_small, restv2_tiny
from rest.checkpoint import CheckpointError
from rest.layers_v2 import PatchEmbedV2

from support.conformance import RTOL, assert_close_scaled
from support.reference_data import fill_weights, load, randn
from test_models import assert_official_init, check_batch_composition, check_full_grads, train_step

VARIANTS = {"restv2_tiny": restv2_tiny, "restv2_small": restv2_small, "restv2_base": restv2_base,
            "restv2_large": restv2_large}
TINY = dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1), num_classes=10)
# not multiples of 32: stage sizes that are not multiples of the attention's sr_ratio (8, 4, 2)
ODD_SIZES = [(97, 131), (33, 47), (61, 45)]
# the fused backend that serves float64 CPU tensors; cuda-emu (the CUDA kernels' source, emulated) and
# triton (interpreted: tests/conftest.py sets TRITON_INTERPRET=1) serve float32 only
FUSED_CPU = ["cpu"]
FUSED_FLOAT32 = ["cuda-emu", "triton"]


def tiny_model(seed: int, dtype=torch.float64, **kwargs) -> ResTV2:
    model = ResTV2(**{**TINY, **kwargs}).double()
    fill_weights(model, seed)
    return model.to(dtype)


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_keys_shapes_and_parameter_count(variant):
    expected = load("rest_v2_keys.json")[variant]
    with torch.device("meta"):  # shapes only: no memory, no init
        model = VARIANTS[variant]()
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == expected["keys"]
    assert sum(p.numel() for p in model.parameters()) == expected["params"]


def test_exports():
    assert set(rest.__all__) >= {"ResTV2", "EMSAv2", *VARIANTS}


def test_official_init():
    torch.manual_seed(0)
    model = ResTV2(**TINY)
    assert_official_init(model, conv_bias_zero=True)  # v2 zeroes the conv biases too
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def test_variant_configuration_is_fixed_and_options_pass_through():
    with torch.device("meta"):
        model = restv2_tiny(num_classes=10, drop_path_rate=0.1)
    assert model.head.out_features == 10 and model.stage4[1].drop_path.p == pytest.approx(0.1)
    with pytest.raises(TypeError, match="embed_dims"):
        restv2_tiny(embed_dims=[8, 16, 32, 64])
    with pytest.raises(ValueError, match="path"):
        restv2_tiny(pretrained=True)
    with pytest.raises(ValueError, match=r"embed_dims\[1\]"):
        ResTV2(embed_dims=(16, 33, 64, 128))


# --------------------------------------------------------------------------- official outputs
def test_eval_logits_match_official():
    """float64, the default backend (auto), 1e-9 of the logits' scale (measured: 2e-15)."""
    ref = load("rest_v2_models.zip")
    model = restv2_tiny().double()
    fill_weights(model, ref["restv2_tiny"]["seed"])
    with torch.no_grad():
        logits = model.eval()(ref["input"])
    assert_close_scaled(logits, ref["restv2_tiny"]["logits_eval"], RTOL[torch.float64], "restv2_tiny logits")


def official_attention(m: EMSAv2, x, H, W):
    """The official Attention.forward (models/rest_v2.py) written out on m's parameters with plain
    torch ops, plus this project's rule for sizes that are not multiples of sr_ratio: the reduced map
    is the sr conv's output, the up branch is cut (or zero-padded) to H x W. Where H and W are
    multiples of sr this is the official code line by line."""
    B, N, C = x.shape
    h, sr = m.num_heads, m.sr_ratio
    q = F.linear(x, m.q.weight, m.q.bias).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
    Hr, Wr = H, W
    if sr > 1:
        x = F.conv2d(x.permute(0, 2, 1).reshape(B, C, H, W), m.sr.weight, m.sr.bias, stride=sr, padding=sr // 2,
                     groups=C)
        Hr, Wr = x.shape[-2:]
        x = F.layer_norm(x.reshape(B, C, -1).permute(0, 2, 1), (C,), m.sr_norm.weight, m.sr_norm.bias, 1e-6)
    kv = F.linear(x, m.kv.weight, m.kv.bias).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    attn = ((q @ k.transpose(-2, -1)) * m.scale).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(B, N, C)
    identity = v.transpose(-1, -2).reshape(B, C, Hr, Wr)
    identity = F.pixel_shuffle(F.conv2d(identity, m.up[0].weight, m.up[0].bias, padding=1, groups=C), sr)
    identity = F.pad(identity, (0, max(0, W - identity.shape[-1]), 0, max(0, H - identity.shape[-2])))[..., :H, :W]
    identity = F.layer_norm(identity.flatten(2).transpose(1, 2), (C,), m.up_norm.weight, m.up_norm.bias, 1e-6)
    return F.linear(out + identity, m.proj.weight, m.proj.bias)


@pytest.mark.parametrize("backend", ["reference", *FUSED_CPU])
@pytest.mark.parametrize("sr,H,W", [(4, 8, 12), (4, 7, 10), (2, 5, 3), (8, 9, 17), (1, 5, 3), (3, 10, 8)],
                         ids=["sr4-8x12", "sr4-7x10", "sr2-5x3", "sr8-9x17", "sr1-5x3", "sr3-10x8"])
def test_attention_matches_the_official_math_and_the_size_rule(backend, sr, H, W):
    m = EMSAv2(16, 2, sr_ratio=sr, backend=backend).double()
    fill_weights(m, 40 + sr)
    x = randn((2, H * W, 16), 41)
    with torch.no_grad():
        assert_close_scaled(m(x, H, W), official_attention(m, x, H, W), RTOL[torch.float64], f"{backend} sr={sr}")


@pytest.mark.parametrize("backend", FUSED_FLOAT32)
@pytest.mark.parametrize("sr,H,W", [(4, 7, 10), (1, 5, 3)], ids=["sr4-7x10", "sr1-5x3"])
def test_float32_only_backends_forward_and_gradients(backend, sr, H, W):
    """float32 on cuda-emu / triton against the float64 official math, output and every gradient."""
    m = EMSAv2(16, 2, sr_ratio=sr, backend=backend).double()
    fill_weights(m, 50 + sr)
    x, dout = randn((2, H * W, 16), 51), randn((2, H * W, 16), 52)
    results = []
    for module, dtype in ((m, torch.float64), (EMSAv2(16, 2, sr_ratio=sr, backend=backend), torch.float32)):
        if dtype == torch.float32:
            module.load_state_dict(m.state_dict())
        xi = x.to(dtype).clone().requires_grad_(True)
        out = official_attention(module, xi, H, W) if dtype == torch.float64 else module(xi, H, W)
        out.backward(dout.to(dtype))
        results.append([out, xi.grad] + [p.grad for p in module.parameters()])
    for (name, _), got, want in zip([("out", 0), ("x", 0), *m.named_parameters()], results[1], results[0]):
        assert_close_scaled(got, want, RTOL[torch.float32], f"{backend} {name}")


# --------------------------------------------------------------------------- any input size
@pytest.mark.parametrize("size", ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_odd_sizes_shapes_and_batch_composition(size):
    model = tiny_model(12).eval()
    feats_batched = check_batch_composition(model, randn((3, 3, *size), 6))
    hs, ws = model.stage_sizes(size[0], 0), model.stage_sizes(size[1], 1)
    assert [tuple(f.shape) for f in feats_batched] == [(3, c, h, w) for c, h, w in zip(model.embed_dims, hs, ws)]
    # ceil(H / 4), then halved rounding up: the convolutions' real outputs
    assert hs[0] == -(-size[0] // 4) and hs[3] == -(-hs[2] // 2)


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("size", [(97, 131), (64, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_fused_backends_agree_with_the_reference_forward_and_gradients(backend, size):
    """The whole model in float64 on a fused backend against our eager v2 (backend="reference"):
    eval logits, and in train mode the logits, the input's and every parameter's gradient."""
    x = randn((2, 3, *size), 8)
    dlogits = randn((2, 10), 9)
    results = []
    for b in (backend, "reference"):
        model = tiny_model(11, backend=b)
        with torch.no_grad():
            eval_logits = model.eval()(x)
        results.append((eval_logits, *train_step(model, x, dlogits)))
    (e0, l0, gi0, g0), (e1, l1, gi1, g1) = results
    rtol = RTOL[torch.float64]
    assert_close_scaled(e0, e1, rtol, "eval logits")
    assert_close_scaled(l0, l1, rtol, "train logits")
    assert_close_scaled(gi0, gi1, rtol, "grad_input")
    check_full_grads(g0, g1, torch.float64, f"{backend} vs reference")


def test_smallest_inputs_and_one_pixel_stem_batchnorm():
    model = tiny_model(3)
    assert model.min_input_size == (1, 1)  # every stride rounds up: one pixel is a 1x1 map everywhere
    with torch.no_grad():
        assert model.eval()(randn((1, 3, 1, 1), 1)).shape == (1, 10)
        assert model(randn((1, 3, 5, 3), 1)).shape == (1, 10)
    # the stem's BatchNorms cannot train on one image whose stage-1 map is 1x1
    with pytest.raises(ValueError, match="1x1 first stage map"):
        model.train()(randn((1, 3, 4, 4), 1))
    assert model.train()(randn((1, 3, 5, 5), 1)).shape == (1, 10)


# --------------------------------------------------------------------------- gradcheck
# fast_mode: gradcheck's check of random projections of the Jacobian (one directional derivative per
# input instead of one per element): the full check took minutes here for modules of a few thousand
# parameters. The ops themselves have full gradchecks (tests/test_conformance.py).
@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("sr,H,W", [(2, 5, 3), (4, 4, 8), (1, 3, 2)], ids=["sr2-5x3", "sr4-4x8", "sr1-3x2"])
def test_attention_gradcheck(backend, sr, H, W):
    m = EMSAv2(8, 2, sr_ratio=sr, backend=backend).double()
    fill_weights(m, 7)
    names, params = zip(*m.named_parameters())
    x = randn((2, H * W, 8), 3).requires_grad_(True)

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x, H, W))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().clone().requires_grad_(True) for p in params]),
                                    fast_mode=True)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_patch_embed_gradcheck(backend):
    m = PatchEmbedV2(3, 4, backend=backend).double()
    fill_weights(m, 8)
    names, params = zip(*m.named_parameters())
    x = randn((2, 3, 5, 6), 4).requires_grad_(True)

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().clone().requires_grad_(True) for p in params]),
                                    fast_mode=True)


# --------------------------------------------------------------------------- checkpoints and options
@pytest.mark.parametrize("wrap", ["model", "plain", "module."])
def test_official_checkpoint_loads(tmp_path, wrap):
    source = tiny_model(5)
    state = source.state_dict()
    obj = {"model": state} if wrap == "model" else (
        {f"module.{k}": v for k, v in state.items()} if wrap == "module." else state)
    path = tmp_path / "restv2.pth"
    torch.save(obj, path)
    model = ResTV2(**TINY).double()
    rest.load_checkpoint(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_variant_pretrained_and_v1_checkpoint_refused(tmp_path):
    full = restv2_tiny()
    path = tmp_path / "restv2_tiny.pth"
    torch.save({"model": full.state_dict()}, path)
    loaded = restv2_tiny(pretrained=path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in full.state_dict().items())
    # a v1 checkpoint: the error lists what differs
    torch.save(rest.ResT(embed_dims=(16, 32, 64, 128)).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*stem\.proj\.0\.weight.*unexpected keys"):
        rest.load_checkpoint(ResTV2(**TINY), path)


def test_backend_pinning():
    model = tiny_model(11, backend="reference")
    pinned = [m.backend for m in model.modules() if isinstance(m, (EMSAv2, rest.PA))]
    assert len(pinned) == 4 + 4 and set(pinned) == {"reference"}  # 4 blocks, stem + 3 patch embeddings
    model.set_backend("cpu")
    assert {m.backend for m in model.modules() if isinstance(m, (EMSAv2, rest.PA))} == {"cpu"}
