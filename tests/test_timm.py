"""timm integration (rest/timm_integration.py): registry entries, pretrained_cfg, classifier protocol,
features_only backbones, pretrained files. Skipped when timm is not installed."""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import rest  # noqa: E402  (registers the models)
from rest import rest_base, rest_lite, save_checkpoint  # noqa: E402

NAMES = ["rest_lite", "rest_small", "rest_base", "rest_large"]
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def same_weights(dst, src, strict=True):
    dst.load_state_dict(src.state_dict(), strict=strict)
    return dst


def test_registered_with_official_pretrained_cfg():
    assert set(NAMES) <= set(timm.list_models("rest_*"))
    for name in NAMES:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
        assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
        assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000
        assert cfg["classifier"] == "head" and cfg["first_conv"] == "stem.conv1"
    # timm's own data pipeline reads it
    data_cfg = timm.data.resolve_data_config({}, model=timm.create_model("rest_lite"))
    assert data_cfg["crop_pct"] == 0.9 and data_cfg["interpolation"] == "bicubic"


@pytest.mark.parametrize("name,builder", [("rest_lite", rest_lite), ("rest_base", rest_base)])
def test_create_model_is_the_rest_model(name, builder):
    model = timm.create_model(name).eval()
    assert isinstance(model, rest.ResT)
    ref = builder().eval()
    assert model.state_dict().keys() == ref.state_dict().keys()
    same_weights(ref, model)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X))


def test_classifier_protocol():
    model = timm.create_model("rest_lite", num_classes=7, drop_path_rate=0.1).eval()
    assert model.get_classifier() is model.head and model.head.out_features == 7
    assert model.num_features == 512
    with torch.no_grad():
        feats = model.forward_features(X)
        pooled = model.forward_head(feats[3], pre_logits=True)
        assert pooled.shape == (2, 512)
        torch.testing.assert_close(model.head(pooled), model(X))
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(X).shape == (2, 512)
    headless = timm.create_model("rest_lite", num_classes=0)
    assert isinstance(headless.head, torch.nn.Identity)


@pytest.mark.parametrize("name,channels", [("rest_lite", [64, 128, 256, 512]), ("rest_base", [96, 192, 384, 768])])
def test_features_only_gives_the_stage_maps(name, channels):
    backbone = timm.create_model(name, features_only=True).eval()
    info = backbone.feature_info
    assert info.channels() == channels and info.reduction() == [4, 8, 16, 32]
    plain = same_weights(timm.create_model(name).eval(), backbone.model, strict=False)  # no head
    with torch.no_grad():
        maps = backbone(X)
        expected = plain.forward_features(X)
    assert [tuple(m.shape) for m in maps] == [(2, c, 64 // r, 64 // r) for c, r in zip(channels, [4, 8, 16, 32])]
    for m, e in zip(maps, expected):
        torch.testing.assert_close(m, e)


def test_out_indices_select_and_prune():
    full = timm.create_model("rest_lite").eval()
    backbone = timm.create_model("rest_lite", features_only=True, out_indices=(0, 2))
    backbone.model.load_state_dict(full.state_dict(), strict=False)
    assert backbone.feature_info.channels() == [64, 256] and backbone.feature_info.reduction() == [4, 16]
    # stage 4 (and the head) are pruned: their parameters are gone, so DDP sees no unused ones
    names = {n for n, _ in backbone.named_parameters()}
    assert not any(n.startswith(("model.stage4", "model.head", "model.patch_embed_4", "model.norm")) for n in names)
    backbone.eval()
    with torch.no_grad():
        maps = backbone(X)
        expected = full.forward_features(X)
    assert len(maps) == 2
    torch.testing.assert_close(maps[0], expected[0])
    torch.testing.assert_close(maps[1], expected[2])
    # negative indices, timm-style
    last_two = timm.create_model("rest_lite", features_only=True, out_indices=(-2, -1))
    assert last_two.feature_info.reduction() == [16, 32]


def test_forward_intermediates_nhwc_and_final():
    model = timm.create_model("rest_small").eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(X, indices=2, output_fmt="NHWC")
        expected = model.forward_features(X)
    assert len(inter) == 2
    torch.testing.assert_close(inter[0], expected[2].permute(0, 2, 3, 1))
    torch.testing.assert_close(final, expected[3])


def test_backbone_trains():
    backbone = timm.create_model("rest_lite", features_only=True, out_indices=(1, 3))
    maps = backbone(X)
    sum(m.square().mean() for m in maps).backward()
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_pretrained_from_local_file(tmp_path, suffix):
    source = rest_lite()
    with torch.no_grad():
        source.head.bias.add_(1.0)
    path = save_checkpoint(source, tmp_path / f"lite{suffix}")
    if suffix == ".pth":  # the official files wrap the state_dict as {"model": ...}
        torch.save({"model": torch.load(path, weights_only=True)}, path)
    model = timm.create_model("rest_lite", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
