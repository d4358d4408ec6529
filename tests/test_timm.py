"""timm integration (rest/timm_integration.py): registry entries and tagged pretrained cfgs, create_model
with configuration overrides and local pretrained files, and timm's own tools on the models: the
getter, hook and fx feature extractors, the fx tracer with EMSA / PA as leaves, parameter grouping
and weight-decay groups; the ResTv2 entries (restv2_*) likewise where the test names them. Skipped when timm is not installed; tests/test_model_protocol.py checks the
protocol itself."""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import rest  # noqa: E402  (registers the models)
from rest import EMSA, PA, EMSAv2, rest_base, rest_lite, restv2_large, restv2_tiny, save_checkpoint  # noqa: E402

NAMES = ["rest_lite", "rest_small", "rest_base", "rest_large"]
NAMES_V2 = ["restv2_tiny", "restv2_small", "restv2_base", "restv2_large"]
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def same_weights(dst, src, strict=True):
    dst.load_state_dict(src.state_dict(), strict=strict)
    return dst


def test_registered_with_tagged_official_pretrained_cfgs():
    assert set(NAMES) <= set(timm.list_models("rest_*"))
    assert timm.list_models("rest_*", include_tags=True) == sorted(f"{n}.in1k" for n in NAMES)
    # no downloadable weights: nothing for timm's pretrained listings (and its download tests)
    assert timm.list_models("rest_*", pretrained=True) == []
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["tag"] == "in1k" and cfg["architecture"] == name
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
        assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000 and cfg["pool_size"] == (7, 7)
        assert cfg["classifier"] == "head" and cfg["first_conv"] == "stem.conv1"
    # ResTv2: the same transform, its own stem and paper
    assert timm.list_models("restv2_*", include_tags=True) == sorted(f"{n}.in1k" for n in NAMES_V2)
    for name in NAMES_V2:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["tag"] == "in1k" and cfg["architecture"] == name and cfg["crop_pct"] == 0.9
        assert cfg["first_conv"] == "stem.proj.0" and cfg["paper_ids"] == "arXiv:2204.07366"
    # timm's own data pipeline reads it
    data_cfg = timm.data.resolve_data_config({}, model=timm.create_model("rest_lite.in1k"))
    assert data_cfg["crop_pct"] == 0.9 and data_cfg["interpolation"] == "bicubic"


@pytest.mark.parametrize("name,builder,cls", [("rest_lite", rest_lite, rest.ResT), ("rest_base", rest_base, rest.ResT),
                                              ("restv2_tiny", restv2_tiny, rest.ResTV2),
                                              ("restv2_large", restv2_large, rest.ResTV2)])
def test_create_model_is_the_rest_model(name, builder, cls):
    model = timm.create_model(name).eval()
    assert type(model) is cls
    ref = builder().eval()
    assert list(model.state_dict()) == list(ref.state_dict())
    same_weights(ref, model)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=0, atol=0)


def test_configuration_overrides():
    model = timm.create_model("rest_lite", depths=(1, 2, 1, 1), embed_dims=(32, 64, 128, 256), num_classes=4,
                              drop_path_rate=0.1)
    assert model.depths == [1, 2, 1, 1] and model.embed_dims == [32, 64, 128, 256]
    assert len(model.stage2) == 2 and model.stage1[0].attn.q.weight.shape == (32, 32)
    assert model.num_features == 256 and model.head.weight.shape == (4, 256)
    with torch.no_grad():
        assert model.eval()(X).shape == (2, 4)
    # overrides are checked like any ResT argument
    with pytest.raises(ValueError, match="depths"):
        timm.create_model("rest_lite", depths=(1, 2))
    with pytest.raises(ValueError, match=r"embed_dims\[0\]"):
        timm.create_model("rest_lite", embed_dims=(30, 64, 128, 256), num_heads=(4, 2, 4, 8))


@pytest.mark.parametrize("name,channels", [("rest_lite", [64, 128, 256, 512]), ("rest_base", [96, 192, 384, 768]),
                                           ("restv2_tiny", [96, 192, 384, 768])])
def test_every_feature_extractor_gives_the_stage_maps(name, channels):
    torch.manual_seed(0)  # the same official init in every model below
    plain = timm.create_model(name).eval()
    with torch.no_grad():
        expected = plain.forward_intermediates(X, intermediates_only=True)
    assert [tuple(m.shape) for m in expected] == [(2, c, 64 // r, 64 // r) for c, r in zip(channels, [4, 8, 16, 32])]
    for feature_cls in ("getter", "hook", "fx"):
        torch.manual_seed(0)
        backbone = timm.create_model(name, features_only=True, feature_cls=feature_cls).eval()
        info = backbone.feature_info
        assert info.channels() == channels and info.reduction() == [4, 8, 16, 32], feature_cls
        with torch.no_grad():
            maps = backbone(X)
        maps = list(maps.values()) if isinstance(maps, dict) else maps
        assert len(maps) == 4, feature_cls
        for m, e in zip(maps, expected):
            assert torch.equal(m, e), feature_cls


def test_out_indices_select_and_prune():
    full = timm.create_model("rest_lite").eval()
    backbone = timm.create_model("rest_lite", features_only=True, out_indices=(0, 2))
    backbone.model.load_state_dict(full.state_dict(), strict=False)
    assert backbone.feature_info.channels() == [64, 256] and backbone.feature_info.reduction() == [4, 16]
    # stage 4 (and the head) are pruned: their parameters are gone, so DDP sees no unused ones
    names = {n for n, _ in backbone.named_parameters()}
    assert not any(n.startswith(("model.stage4", "model.head", "model.patch_embed_4", "model.norm")) for n in names)
    assert backbone.model.num_features == 256
    backbone.eval()
    with torch.no_grad():
        maps = backbone(X)
        expected = full.forward_intermediates(X, intermediates_only=True)
    assert len(maps) == 2
    assert torch.equal(maps[0], expected[0]) and torch.equal(maps[1], expected[2])
    # negative indices, timm-style
    last_two = timm.create_model("rest_lite", features_only=True, out_indices=(-2, -1))
    assert last_two.feature_info.reduction() == [16, 32]


def test_backbone_trains():
    backbone = timm.create_model("rest_lite", features_only=True, out_indices=(1, 3))
    maps = backbone(X)
    sum(m.square().mean() for m in maps).backward()
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- timm's fx tools
class LeafTracer(torch.fx.Tracer):
    """torch.fx's tracer with timm's registered leaf modules (what timm's fx extractor uses)."""

    def is_leaf_module(self, m, qualname):
        return type(m) in timm.models.get_notrace_modules() or super().is_leaf_module(m, qualname)


def leaf_traced(model):
    return torch.fx.GraphModule(model, LeafTracer().trace(model))


@pytest.mark.parametrize("name,attention", [("rest_small", EMSA), ("restv2_tiny", EMSAv2)])
def test_attention_and_pa_are_timm_leaf_modules(name, attention):
    assert {attention, PA} <= set(timm.models.get_notrace_modules())
    model = timm.create_model(name).eval()
    traced = leaf_traced(model)
    called = [type(traced.get_submodule(n.target)) for n in traced.graph.nodes if n.op == "call_module"]
    assert called.count(attention) == sum(model.depths) and called.count(PA) == 4
    with torch.no_grad():
        assert torch.equal(traced(X), model(X))


def test_timm_fx_traced_model_trains_like_eager():
    model = timm.create_model("rest_lite", num_classes=7).train()
    traced = leaf_traced(model)
    results = []
    for m in (traced, model):
        model.zero_grad(set_to_none=True)
        x = X.clone().requires_grad_(True)
        out = m(x)
        out.square().sum().backward()
        results.append([out, x.grad] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- optimizer helpers
def test_group_matcher_groups_for_timm_layer_tools():
    from timm.models import group_parameters
    from timm.optim import param_groups_layer_decay
    model = timm.create_model("rest_small")
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    heads = lambda names: sorted({n.split(".")[0] for n in names})  # noqa: E731
    assert [heads(g) for g in coarse.values()] == [
        ["stem"], ["stage1"], ["patch_embed_2", "stage2"], ["patch_embed_3", "stage3"],
        ["norm", "patch_embed_4", "stage4"], ["head"]]
    fine = group_parameters(model, model.group_matcher(coarse=False))
    # stem, one group per block (each patch embedding with its stage's first block, the final norm
    # with the last block), head
    assert len(fine) == 1 + sum(model.depths) + 1
    assert heads(list(fine.values())[-2]) == ["norm", "stage4"]
    groups = list(fine.values())
    assert heads(groups[3]) == ["patch_embed_2", "stage2"] and {n.split(".")[1] for n in groups[3]
                                                                if n.startswith("stage")} == {"0"}
    # timm's layer-wise learning-rate decay reads it
    layer_groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in layer_groups) == len(list(model.parameters()))
    # ResTv2: the same groups under its official names (patch_N)
    model = timm.create_model("restv2_tiny")
    coarse = group_parameters(model, model.group_matcher(coarse=True))
    assert [heads(g) for g in coarse.values()] == [
        ["stem"], ["stage1"], ["patch_2", "stage2"], ["patch_3", "stage3"], ["norm", "patch_4", "stage4"], ["head"]]
    assert len(group_parameters(model, model.group_matcher(coarse=False))) == 1 + sum(model.depths) + 1


def test_weight_decay_exempts_only_one_dimensional_parameters():
    from timm.optim import param_groups_weight_decay
    model = timm.create_model("rest_lite")
    assert model.no_weight_decay() == set()
    groups = param_groups_weight_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay())
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters() if p.ndim > 1}


# --------------------------------------------------------------------------- pretrained files
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_from_local_file(tmp_path, suffix):
    source = rest_lite()
    with torch.no_grad():
        source.head.bias.add_(1.0)
    path = save_checkpoint(source, tmp_path / f"lite{suffix}")
    if suffix == ".pth":  # the official files wrap the state_dict as {"model": ...}
        torch.save({"model": torch.load(path, weights_only=True)}, path)
    for name in ("rest_lite", "rest_lite.in1k"):
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        for k, v in source.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k
    # another class count: the backbone loads, the head is a fresh one
    model = timm.create_model("rest_lite", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.head.out_features == 10 and torch.equal(model.stem.conv1.weight, source.stem.conv1.weight)


def test_restv2_pretrained_from_an_official_style_file(tmp_path):
    source = restv2_tiny()
    with torch.no_grad():
        source.head.bias.add_(1.0)
    path = tmp_path / "restv2_tiny.pth"
    torch.save({"model": source.state_dict()}, path)  # the official v2 files' wrapping
    model = timm.create_model("restv2_tiny.in1k", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_pretrained_without_a_file_says_how():
    with pytest.raises(ValueError, match="pretrained_cfg_overlay=dict\\(file="):
        timm.create_model("rest_lite", pretrained=True)
