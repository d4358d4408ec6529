"""A ResT backbone with a feature pyramid for torchvision's detection models.

ResTFeatures returns the wanted stage maps as the OrderedDict torchvision's FPN reads ("0", "1", ...
as torchvision's IntermediateLayerGetter names them); ResTFPN puts torchvision's
FeaturePyramidNetwork on it and has the `out_channels` the detectors read, with the attribute names
of torchvision's BackboneWithFPN (body, fpn), so a detector's state_dict reads backbone.body.* and
backbone.fpn.* as torchvision's own do. rest_fpn_backbone builds both from a variant name, as
torchvision's resnet_fpn_backbone does for ResNets: backbone weights, frozen BatchNorm, frozen stages.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from .. import _checks
from .variants import BackboneSpec, backbone_spec
from .weights import load_backbone_weights

__all__ = ["ResTFeatures", "ResTFPN", "rest_fpn_backbone", "LAYOUTS", "freeze_batchnorm", "freeze_units",
           "check_returned_layers", "drop_unofficial_final_norm"]

#: the stage-map layouts: "ours" (the model's forward_intermediates) or "official" (the official
#: detection code's per-stage norms, v1's and v2's; see rest/detection/variants.py)
LAYOUTS = ("ours", "official")
NUM_UNITS = 5  # freezable units: the stem, then stages 1-4


def check_returned_layers(returned_layers) -> list[int]:
    """Stage numbers 1-4 (torchvision's layer1-layer4), increasing, without repeats."""
    if isinstance(returned_layers, (str, bytes)) or not isinstance(returned_layers, Sequence) or not returned_layers:
        raise TypeError(f"returned_layers must be a non-empty list of stage numbers 1-4, got {returned_layers!r}")
    layers = [_checks.integer("returned_layers[]", k) for k in returned_layers]
    if max(layers) > 4 or layers != sorted(set(layers)):
        raise ValueError(f"returned_layers must be increasing stage numbers in 1-4 without repeats, got {layers}")
    return layers


def drop_unofficial_final_norm(model: nn.Module, layout: str, spec: BackboneSpec) -> None:
    """In the official layout of a family whose official detection backbone has no final norm (v2:
    spec.official_final_norm is False), make the model's final norm an identity: stage 4's map is
    then the raw stage output (its official norm comes on top), and the norm's parameters leave the
    model (no checkpoint keys needed, no parameter without a gradient). Idempotent."""
    if layout == "official" and not spec.official_final_norm:
        model.norm = nn.Identity()


class ResTFeatures(nn.Module):
    """The stage maps of a ResT-family model for a detector: forward(images) -> OrderedDict of the
    returned stages' maps (B, C_i, H_i, W_i), keyed "0", "1", ... in stage order.

    model: a model of a family in rest.detection.BACKBONES (its head is dropped and the stages after
    the last returned one are pruned away: prune_intermediate_layers). stages: 0-based stage indices.
    layout: "ours" (the model's forward_intermediates maps) or "official" (spec's per-stage norms, in
    `norms` under the official names, so official detectron2 checkpoints load; v1's normalised map
    feeds the next stage; v2's stage 4 gets its own norm_4 instead of the final norm, which goes:
    drop_unofficial_final_norm). `channels` and `strides`: those of the returned maps.
    """

    def __init__(self, model: nn.Module, stages: Sequence[int], layout: str, spec: BackboneSpec):
        super().__init__()
        self.layout = _checks.choice("layout", layout, LAYOUTS)
        self.stages = list(stages)
        self.channels = [model.feature_info[i]["num_chs"] for i in self.stages]
        self.strides = [model.feature_info[i]["reduction"] for i in self.stages]
        model.prune_intermediate_layers(self.stages, prune_head=True)
        drop_unofficial_final_norm(model, self.layout, spec)
        self.model = model
        norms = {}
        if self.layout == "official":
            for i, c in zip(self.stages, self.channels):
                name = spec.official_norm_name(i)
                if name is not None:
                    norms[name] = spec.make_official_norm(c)
        self.norms = nn.ModuleDict(norms)
        # stage index -> its norm's name
        self.norm_names = {i: spec.official_norm_name(i) for i in self.stages
                           if self.layout == "official" and spec.official_norm_name(i) is not None}
        self.normed_feeds_next = self.layout == "official" and spec.normed_feeds_next
        self.units = spec.units

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if self.normed_feeds_next:
            maps = self._forward_feeding_norms(x)
        else:
            maps = self.model.forward_intermediates(x, indices=self.stages, intermediates_only=True)
            maps = [self.norms[self.norm_names[i]](m) if i in self.norm_names else m
                    for i, m in zip(self.stages, maps)]
        return OrderedDict((str(k), m) for k, m in enumerate(maps))

    def _forward_feeding_norms(self, x):
        """The official v1 layout: each returned stage's norm sits in the main path, so the next
        stage receives the normalised map. The model's stage loop, as forward_intermediates runs it."""
        model = self.model
        x = model._prepare_input(x)
        maps = []
        for i, (embed, stage) in enumerate(model._stage_pairs()):
            x = stage(embed(x))
            if i in self.norm_names:
                x = self.norms[self.norm_names[i]](x)
            elif i == 3:
                x = model.norm(x)  # the final norm: stage 4's official norm too
            if i in self.stages:
                maps.append(x)
        return maps

    def unit_of(self, name: str) -> int:
        """The freezable unit (0: stem, 1-4: stages) a parameter or buffer name of this module is in."""
        top, _, rest = name.partition(".")
        if top == "norms":
            norm = rest.partition(".")[0]
            return next(i for i, n in self.norm_names.items() if n == norm) + 1
        sub = rest.partition(".")[0]
        for unit, names in enumerate(self.units):
            if sub in names:
                return unit
        raise ValueError(f"{name}: not in any unit of {self.units}")  # a family's spec misses a module


class ResTFPN(nn.Module):
    """ResTFeatures with torchvision's FeaturePyramidNetwork on top (torchvision's BackboneWithFPN for
    ResT): forward(images) -> OrderedDict of FPN maps, each with `out_channels` channels."""

    def __init__(self, body: ResTFeatures, out_channels: int = 256, extra_blocks=None, norm_layer=None,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.body = body
        if not isinstance(grad_checkpointing, bool):
            raise TypeError(f"grad_checkpointing must be a bool, got {type(grad_checkpointing).__name__}")
        self.grad_checkpointing = grad_checkpointing
        if extra_blocks is None:
            extra_blocks = LastLevelMaxPool()
        elif not isinstance(extra_blocks, ExtraFPNBlock):
            if not callable(extra_blocks):
                raise TypeError(f"extra_blocks must be a torchvision ExtraFPNBlock or a callable (channels of the last "
                                f"returned map, out_channels) -> one, got {type(extra_blocks).__name__}")
            extra_blocks = extra_blocks(body.channels[-1], out_channels)
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            # the FPN's 3x3 convolutions keep their full-width inputs (stride 4 upwards): recompute
            # them in the backward instead (no BatchNorm in the FPN unless fpn_norm_layer adds one, so a
            # second forward updates nothing twice)
            return checkpoint(self.fpn, feats, use_reentrant=False)
        return self.fpn(feats)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in `module` by torchvision's FrozenBatchNorm2d with the same
    statistics and affine values (constant buffers: no batch statistics, no gradients), as
    torchvision's detection builders use for pretrained backbones. Returns the module."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).to(
                device=child.running_mean.device if child.running_mean is not None else None)
            with torch.no_grad():
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    src = getattr(child, attr)
                    if src is not None:
                        getattr(frozen, attr).copy_(src.detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def freeze_units(body: ResTFeatures, trainable_layers: int) -> None:
    """torchvision's rule (backbone_utils._resnet_fpn_extractor): only the last `trainable_layers`
    of the five units (stem, stages 1-4) keep trainable parameters; 5 trains everything."""
    trainable_layers = _checks.integer("trainable_layers", trainable_layers, minimum=0)
    if trainable_layers > NUM_UNITS:
        raise ValueError(f"trainable_layers must be in [0, {NUM_UNITS}], got {trainable_layers}")
    for name, p in body.named_parameters():
        if body.unit_of(name) < NUM_UNITS - trainable_layers:
            p.requires_grad_(False)


def rest_fpn_backbone(variant: str, *, weights: str | os.PathLike | Mapping | None = None, norm_layer=None,
                      trainable_layers: int | None = None, returned_layers: Sequence[int] | None = None,
                      extra_blocks=None, layout: str = "ours", out_channels: int = 256,
                      fpn_norm_layer=None, grad_checkpointing: bool = False, **model_kwargs) -> ResTFPN:
    """A ResT backbone with FPN, as torchvision's resnet_fpn_backbone builds a ResNet one.

    variant: a name in rest.detection.BACKBONES: ResT "rest_lite", "rest_small", "rest_base",
        "rest_large"; ResTv2 "restv2_tiny", "restv2_small", "restv2_base", "restv2_large".
    weights: backbone weights: an official classification checkpoint (its head is dropped) or an
        official detectron2 checkpoint (the `backbone.bottom_up.` keys; its FPN and heads are not
        torchvision's and are ignored), a path or a loaded dict (see rest/detection/weights.py).
        One with the official per-stage norms (v1 norm1-norm3, v2 norm_1-norm_4) needs layout="official".
    norm_layer: what the backbone's BatchNorm2d layers become: None (torchvision's rule: frozen
        BatchNorm, torchvision.ops.FrozenBatchNorm2d, with weights; trainable BatchNorm2d without),
        FrozenBatchNorm2d or nn.BatchNorm2d.
    trainable_layers: how many of the five units (stem, stages 1-4) train, from the top; None: 3 with
        weights (the official FREEZE_AT=2: stem and stage 1 frozen), 5 without (torchvision's rule).
    returned_layers: the stage numbers (1-4) the FPN reads; default [1, 2, 3, 4].
    extra_blocks: torchvision's FPN extra block (default LastLevelMaxPool, as torchvision's), or a callable
        (channels of the last returned map, out_channels) -> one, such as the class LastLevelP6P7.
    layout: "ours" or "official" (see ResTFeatures; the official code's per-stage norms: v1's norm1-norm3
        on stages 1-3, feeding the next stage, and the final norm on stage 4; v2's norm_1-norm_4 on the
        returned maps only, with no final norm; rest/detection/variants.py gives the details).
    out_channels: the FPN's width.
    fpn_norm_layer: torchvision FPN's norm_layer (None: no norm in the FPN, as torchvision's default).
    grad_checkpointing: the memory-lean option: every block of the backbone and the FPN run under
        torch.utils.checkpoint while gradients are recorded (the model's set_grad_checkpointing), so
        a training step keeps only each block's input and the FPN's input maps for backward and
        recomputes the rest (the same gradients, one more forward of the blocks and the FPN).
        Without it the blocks' MLPs still keep little (the model option mlp_recompute, "auto").
    model_kwargs: to the variant's constructor (drop_path_rate, backend, cpu_layout, linear_impl, ...).
    """
    spec = backbone_spec(variant)
    returned_layers = check_returned_layers([1, 2, 3, 4] if returned_layers is None else returned_layers)
    layout = _checks.choice("layout", layout, LAYOUTS)
    out_channels = _checks.integer("out_channels", out_channels)
    if norm_layer not in (None, FrozenBatchNorm2d, nn.BatchNorm2d):
        raise ValueError(f"norm_layer must be None, torchvision.ops.FrozenBatchNorm2d or nn.BatchNorm2d, "
                         f"got {norm_layer!r}")
    if "num_classes" in model_kwargs:
        raise TypeError("rest_fpn_backbone() takes no num_classes: the backbone has no classifier")
    trained = weights is not None
    if trainable_layers is None:
        trainable_layers = 3 if trained else NUM_UNITS
    model = spec.build(num_classes=0, **model_kwargs)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    drop_unofficial_final_norm(model, layout, spec)  # before loading: the official checkpoints have none
    norm_states = load_backbone_weights(model, weights, spec, layout) if trained else {}
    body = ResTFeatures(model, [k - 1 for k in returned_layers], layout, spec)
    if norm_states:
        _load_norms(body, norm_states)
    if norm_layer is FrozenBatchNorm2d or (norm_layer is None and trained):
        freeze_batchnorm(body)
    freeze_units(body, trainable_layers)
    if grad_checkpointing and isinstance(fpn_norm_layer, type) and issubclass(fpn_norm_layer, nn.modules.batchnorm._BatchNorm):
        raise ValueError("grad_checkpointing recomputes the FPN in the backward, which would update a BatchNorm's "
                         "running statistics twice: use fpn_norm_layer=None, a GroupNorm or a frozen BatchNorm")
    return ResTFPN(body, out_channels, extra_blocks, fpn_norm_layer, grad_checkpointing=grad_checkpointing)


def _load_norms(body: ResTFeatures, norm_states: dict) -> None:
    from ..checkpoint import CheckpointError, load_checkpoint

    try:
        load_checkpoint(body.norms, norm_states, source="backbone weights (official per-stage norms)")
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n  (the official layout has a norm for each returned stage that has one: "
                              "returned_layers must be the stages the checkpoint was trained to return)") from None
