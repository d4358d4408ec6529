"""rest.detection: the backbone's maps against the classification model's stage maps (our layout)
and against the official detectron2 forward written out here (official layout), classification and
detectron2 checkpoints, frozen BatchNorm and frozen stages, the builders' torchvision defaults, and
the detectors in train and eval at awkward sizes, under autocast, torch.compile and DDP."""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("torchvision")
from torchvision.models.detection import retinanet as tv_retinanet  # noqa: E402
from torchvision.models.detection import rpn as tv_rpn  # noqa: E402
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

from rest import CheckpointError, ResT  # noqa: E402
from rest import detection  # noqa: E402
from rest.models import variant_config  # noqa: E402
from conftest import require_backend  # noqa: E402

TINY = "rest_detection_test_tiny"
TINY_CONFIG = {**variant_config("rest_lite"), "embed_dims": (16, 32, 64, 128), "depths": (1, 1, 1, 1)}


def _tiny(pretrained=None, **kwargs):
    return ResT(**TINY_CONFIG, **kwargs)


# a variant registered as another family would register its own
detection.register_backbone(TINY, replace(detection.backbone_spec("rest_lite"), build=_tiny))


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (norm affines and BatchNorm statistics included), so that a
    weight left out or a norm skipped shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight")) or \
                    "running_mean" in name:
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                t.add_(0.02 * torch.randn(t.shape, generator=g))
    return module


def classifier(num_classes=10) -> ResT:
    torch.manual_seed(0)
    return randomize(_tiny(num_classes=num_classes)).eval()


def images(b=2, h=67, w=93, seed=1):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the maps
@pytest.mark.parametrize("frozen", [False, True])
def test_our_layout_is_the_classification_models_stage_maps(tmp_path, frozen):
    model = classifier()
    path = tmp_path / "cls.pth"
    torch.save({"model": model.state_dict()}, path)  # with its head, wrapped as the official files are
    backbone = detection.rest_fpn_backbone(TINY, weights=str(path),
                                           norm_layer=FrozenBatchNorm2d if frozen else nn.BatchNorm2d).eval()
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    frozen_bns = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert (len(bns), len(frozen_bns) > 0) == ((0, True) if frozen else (len(bns), False)) and (frozen or bns)
    x = images()
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        maps = backbone.body(x)
    assert list(maps) == ["0", "1", "2", "3"]
    for k, (m, e) in enumerate(zip(maps.values(), expected)):
        assert m.shape == e.shape == (2, TINY_CONFIG["embed_dims"][k], *[s[k] for s in (
            model.stage_sizes(67, 0), model.stage_sizes(93, 1))])
        # frozen BatchNorm computes x * scale + shift: the same map up to rounding
        torch.testing.assert_close(m, e, rtol=1e-4 if frozen else 0, atol=1e-4 if frozen else 0)
    assert backbone.body.strides == [4, 8, 16, 32] and backbone.body.channels == list(TINY_CONFIG["embed_dims"])


def official_v1_forward(model: ResT, norms: dict, x: torch.Tensor, out_features) -> list[torch.Tensor]:
    """The official detectron2 ResT v1 forward (object_detection/restv2/rest.py), written out: tokens
    through each stage's blocks, the stage's LayerNorm on the tokens when the stage is returned, and
    that normalised map into the next stage; stage 4 always gets the final norm."""
    outs = []
    embeds = [model.stem, model.patch_embed_2, model.patch_embed_3, model.patch_embed_4]
    for i in range(4):
        x = embeds[i](x)
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        for blk in getattr(model, f"stage{i + 1}"):
            t = blk(t, H, W)
        ln = model.norm if i == 3 else norms.get(f"norm{i + 1}")
        if ln is not None:
            t = F.layer_norm(t, (C,), ln.weight, ln.bias, ln.eps)
        x = t.transpose(1, 2).reshape(B, C, H, W)
        if f"stage{i + 1}" in out_features:
            outs.append(x)
    return outs


@pytest.mark.parametrize("returned", [[1, 2, 3, 4], [2, 3, 4]])
def test_official_layout_is_the_official_detectron2_forward(returned):
    backbone = randomize(detection.rest_fpn_backbone(TINY, layout="official", returned_layers=returned), 3).eval()
    body = backbone.body
    assert sorted(body.norms) == [f"norm{k}" for k in returned if k < 4]
    x = images()
    with torch.no_grad():
        expected = official_v1_forward(body.model, dict(body.norms.items()), x, [f"stage{k}" for k in returned])
        maps = list(body(x).values())
        ours = detection.ResTFeatures.forward(_as_ours(body), x)
    for m, e in zip(maps, expected, strict=True):
        torch.testing.assert_close(m, e, rtol=1e-5, atol=1e-5)
    # the normalised map feeds the next stage: after the first normed stage, our layout differs
    assert not torch.allclose(list(ours.values())[-1], maps[-1], atol=1e-3)


def _as_ours(body):
    """The same body run in our layout (no per-stage norms)."""
    clone = detection.ResTFeatures.__new__(detection.ResTFeatures)
    clone.__dict__.update(body.__dict__)
    clone.norm_names, clone.normed_feeds_next = {}, False
    return clone


# ------------------------------------------------------------------ checkpoints
def d2_checkpoint(body) -> dict:
    """An official detectron2 checkpoint of this body: backbone keys under backbone.bottom_up., with
    detectron2's own FPN and heads beside them."""
    state = {f"backbone.bottom_up.{k}": v for k, v in body.model.state_dict().items()}
    state.update({f"backbone.bottom_up.{k}": v for k, v in body.norms.state_dict().items()})
    state["backbone.fpn_lateral2.weight"] = torch.zeros(256, 16, 1, 1)
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(81, 1024)
    return {"model": state, "__author__": "detectron2"}


def test_detectron2_checkpoint_loads_converted(tmp_path):
    source = randomize(detection.rest_fpn_backbone(TINY, layout="official"), 5).eval()
    path = tmp_path / "d2.pth"
    ckpt = d2_checkpoint(source.body)
    ckpt.pop("__author__")
    torch.save(ckpt, path)
    loaded = detection.rest_fpn_backbone(TINY, weights=str(path), layout="official", norm_layer=nn.BatchNorm2d)
    for k, v in source.body.state_dict().items():
        assert torch.equal(loaded.body.state_dict()[k], v), k
    model = detection.maskrcnn_rest(TINY, num_classes=4, backbone_weights=str(path), layout="official",
                                    out_channels=32)
    assert torch.equal(model.backbone.body.norms["norm2"].weight, source.body.norms["norm2"].weight)
    with pytest.raises(CheckpointError, match="layout='official'"):
        detection.rest_fpn_backbone(TINY, weights=str(path))
    with pytest.raises(CheckpointError, match="returned_layers"):  # norm1 in the file, stage 1 not returned
        detection.rest_fpn_backbone(TINY, weights=str(path), layout="official", returned_layers=[2, 3, 4])


def test_classification_checkpoint_mismatch_is_reported(tmp_path):
    state = classifier().state_dict()
    del state["stage2.0.mlp.fc1.weight"]
    with pytest.raises(CheckpointError, match="stage2.0.mlp.fc1.weight"):
        detection.rest_fpn_backbone(TINY, weights=state)
    with pytest.raises(TypeError, match="once"):
        detection.retinanet_rest(TINY, weights_backbone=state, backbone_weights=state)


# ------------------------------------------------------------------ frozen stages and BatchNorm
UNITS = [("model.stem.",), ("model.stage1.",), ("model.patch_embed_2.", "model.stage2.", "norms.norm2."),
         ("model.patch_embed_3.", "model.stage3.", "norms.norm3."),
         ("model.patch_embed_4.", "model.stage4.", "model.norm.")]


@pytest.mark.parametrize("trainable", [0, 1, 3, 5])
def test_trainable_layers_freeze_from_the_stem(trainable):
    backbone = detection.rest_fpn_backbone(TINY, weights=classifier().state_dict(), trainable_layers=trainable,
                                           layout="official", returned_layers=[2, 3, 4])
    for name, p in backbone.body.named_parameters():
        unit = next(u for u, prefixes in enumerate(UNITS) if name.startswith(prefixes))
        assert p.requires_grad == (unit >= 5 - trainable), name
    assert all(p.requires_grad for p in backbone.fpn.parameters())
    # frozen BatchNorm by default with weights: constant buffers, nothing to train or update
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    backbone.train()
    sum(m.mean() for m in backbone(images()).values()).backward()
    for name, p in backbone.body.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_torchvision_defaults_without_weights():
    with pytest.warns(UserWarning, match="no effect"):
        model = detection.fasterrcnn_rest(TINY, num_classes=3, trainable_backbone_layers=2, out_channels=32)
    assert all(p.requires_grad for p in model.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())  # trainable BatchNorm


def test_anchors_and_poolers_follow_torchvision_and_the_returned_layers():
    r = detection.retinanet_rest(TINY, num_classes=3, out_channels=32)
    assert r.anchor_generator.sizes == tv_retinanet._default_anchorgen().sizes
    assert r.backbone.fpn.extra_blocks.p6.in_channels == TINY_CONFIG["embed_dims"][3]  # P6 from C5, as official
    m = detection.maskrcnn_rest(TINY, num_classes=3, out_channels=32)
    assert m.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert m.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    assert isinstance(m.rpn.anchor_generator, tv_rpn.AnchorGenerator)
    m3 = detection.maskrcnn_rest(TINY, num_classes=3, out_channels=32, returned_layers=[2, 3, 4])
    assert m3.rpn.anchor_generator.sizes == ((64,), (128,), (256,), (512,))
    assert m3.roi_heads.mask_roi_pool.featmap_names == ["0", "1", "2"]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(returned_layers=[0, 1]), ValueError, "returned_layers"),
    (dict(returned_layers=[3, 2]), ValueError, "increasing"),
    (dict(returned_layers="1234"), TypeError, "returned_layers"),
    (dict(layout="d2"), ValueError, "layout"),
    (dict(norm_layer=nn.GroupNorm), ValueError, "norm_layer"),
    (dict(trainable_layers=6), ValueError, "trainable_layers"),
    (dict(num_classes=3), TypeError, "num_classes"),
    (dict(extra_blocks=3), TypeError, "extra_blocks"),
])
def test_bad_arguments_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        detection.rest_fpn_backbone(TINY, **kwargs)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ValueError, match="rest_small"):
        detection.maskrcnn_rest("rest_smal")


# ------------------------------------------------------------------ detectors
def targets(n_images, size, masks):
    out = []
    for i in range(n_images):
        boxes = torch.tensor([[4.0 + i, 6.0, 30.0, 40.0], [20.0, 10.0 + i, 50.0, 45.0]])
        t = dict(boxes=boxes, labels=torch.tensor([1, 2]))
        if masks:
            m = torch.zeros(2, *size, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
                m[k, y0:y1, x0:x1] = 1
            t["masks"] = m
        out.append(t)
    return out


@pytest.mark.parametrize("builder", ["retinanet_rest", "fasterrcnn_rest", "maskrcnn_rest"])
@pytest.mark.parametrize("size_divisible, autocast", [(32, False), (1, True)])
def test_detectors_train_and_eval(builder, size_divisible, autocast):
    """Padded to multiples of 32 (torchvision's default) and at the images' own odd sizes; float32 and
    CPU autocast (bfloat16)."""
    torch.manual_seed(0)
    model = getattr(detection, builder)(TINY, num_classes=3, out_channels=32, min_size=61, max_size=90,
                                        size_divisible=size_divisible)
    imgs = [torch.rand(3, 61, 83), torch.rand(3, 57, 90)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = model(imgs, targets(2, (61, 83), builder == "maskrcnn_rest")[:1] +
                       targets(1, (57, 90), builder == "maskrcnn_rest"))
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.backbone.body.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(imgs)
    assert len(out) == 2 and all(o["boxes"].shape[-1] == 4 for o in out)


def test_compiled_backbone_matches_eager():
    torch.manual_seed(0)
    backbone = randomize(detection.rest_fpn_backbone(TINY, layout="official", out_channels=32)).train()
    for m in backbone.modules():  # the compiled graph gets PyTorch's BatchNorm; eval mode compares the rest
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    x = images(h=64, w=96)

    def run(module):
        backbone.zero_grad()
        out = module(x)
        sum((m * m).mean() for m in out.values()).backward()
        return out, [p.grad.clone() for p in backbone.parameters()]

    expected, expected_grads = run(backbone)
    actual, grads = run(torch.compile(backbone, fullgraph=True, backend="aot_eager"))
    assert list(actual) == list(expected)
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-4, atol=1e-5)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------ DDP
WORLD, DDP_TIMEOUT_S = 2, 120


def _ddp_backbone():
    torch.manual_seed(0)
    # detection fine-tuning's setup: pretrained weights, frozen BatchNorm (constant statistics)
    return detection.rest_fpn_backbone(TINY, weights=classifier().state_dict(), layout="official",
                                       out_channels=16).double()


def _ddp_data():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(4, 3, 48, 64, generator=g, dtype=torch.float64) for _ in range(2)]


def _ddp_train(model, data, rank=0, world=1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    shard = data[0].shape[0] // world
    for x in data:
        out = model(x[rank * shard:(rank + 1) * shard])
        opt.zero_grad()
        sum(m.square().mean() for m in out.values()).backward()
        opt.step()
    return model


def _ddp_worker(rank, world, port, out_dir):
    from test_distributed import process_group

    with process_group(rank, world, port, DDP_TIMEOUT_S):
        model = _ddp_backbone()
        _ddp_train(nn.parallel.DistributedDataParallel(model), _ddp_data(), rank, world)
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo needed")
def test_ddp_two_processes_match_one_process(tmp_path):
    from test_distributed import run_ranks

    run_ranks(_ddp_worker, WORLD, str(tmp_path), DDP_TIMEOUT_S)
    expected = _ddp_train(_ddp_backbone(), _ddp_data()).state_dict()
    initial = _ddp_backbone().state_dict()
    for rank in range(WORLD):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, v in expected.items():
            torch.testing.assert_close(state[k], v, rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {k}")
    moved = "body.model.stage4.0.mlp.fc1.weight"
    assert not torch.equal(expected[moved], initial[moved])
    assert torch.equal(expected["body.model.stem.conv1.weight"], initial["body.model.stem.conv1.weight"])  # frozen


def test_grad_checkpointing_keeps_gradients_and_saves_less():
    from rest_kernels.diagnostics import saved_tensor_bytes

    x = images(h=64, w=96)
    results = []
    for lean in (False, True):
        torch.manual_seed(0)
        backbone = detection.rest_fpn_backbone(TINY, out_channels=16, grad_checkpointing=lean).double().train()
        with torch.enable_grad():
            out, nbytes = saved_tensor_bytes(backbone, x.double())
        sum(m.square().mean() for m in out.values()).backward()
        results.append((nbytes, [p.grad for p in backbone.parameters()]))
    (eager_bytes, eager_grads), (lean_bytes, lean_grads) = results
    assert lean_bytes < eager_bytes / 2
    for g, e in zip(lean_grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    model = detection.maskrcnn_rest(TINY, num_classes=3, out_channels=16, backbone_kwargs=dict(grad_checkpointing=True))
    assert all(s.grad_checkpointing for _, s in model.backbone.body.model._stage_pairs())
    assert model.backbone.grad_checkpointing  # the FPN is recomputed too
    with pytest.raises(ValueError, match="BatchNorm"):
        detection.rest_fpn_backbone(TINY, grad_checkpointing=True, fpn_norm_layer=nn.BatchNorm2d)


def test_saved_for_backward_at_detection_size():
    """What one training forward of rest_lite's backbone with FPN keeps for the backward at 800 x 1216
    (batch 1, float32; every storage once, parameters included, as bench/_detection_cases.py counts):
    the fused default keeps at least 4x less than eager, the memory-lean option (grad_checkpointing) at
    least 8x less. Counted, not timed: the count does not depend on the machine. (Measured 2026-12-05:
    eager 2,756 MiB; fused with the MLPs' modules 1,132; default 631; lean 260.)"""
    from rest_kernels.diagnostics import saved_tensor_bytes

    require_backend("cpu")
    x = torch.rand(1, 3, 800, 1216, generator=torch.Generator().manual_seed(0))
    kept = {}
    for name, kwargs in (("eager", dict(backend="reference")), ("default", dict(backend="cpu")),
                         ("lean", dict(backend="cpu", grad_checkpointing=True))):
        torch.manual_seed(0)
        backbone = detection.rest_fpn_backbone("rest_lite", **kwargs).train()
        with torch.enable_grad():
            out, kept[name] = saved_tensor_bytes(lambda x: sum(m.mean() for m in backbone(x).values()), x)
        del out, backbone
    assert kept["eager"] >= 4 * kept["default"], kept
    assert kept["eager"] >= 8 * kept["lean"], kept
