"""The backbones rest.detection can build, by variant name, and what it needs to know of each family.

A family (ResT v1: rest_lite ... rest_large; ResTv2: restv2_tiny ... restv2_large) describes itself
once in a BackboneSpec; every variant name maps to a spec in BACKBONES. Another family joins by
registering its variants (register_backbone) with a spec of its own: nothing else in rest.detection
names a family.

The official detection code (github wofmanaf/ResT, object_detection/restv2/rest.py for v1,
object_detection/restv2/restv2.py for v2) differs from the classification model in one place, which
the spec records: the stage maps it returns.
- v1: each returned stage 1-3 gets a LayerNorm of its own, `norm1`..`norm3` (created only for the
  returned stages), stage 4 the classifier's final `norm`; and the normalised map is also what the
  next stage receives (the norm sits in the main path, not only on the output).
- v2: each returned stage 1-4 gets a LayerNorm of its own over the map's channels (eps 1e-6),
  `norm_1`..`norm_4` (created only for the returned stages; each an nn.Sequential holding the norm,
  so its checkpoint keys are `norm_k.0.weight` / `norm_k.0.bias`), on the output only: the next
  stage receives the stage's raw map. Stage 4 gets `norm_4` on its raw map; the official detection
  model has no final `norm` at all (its checkpoints have no `norm.*` keys, and its loader ignores
  a classification checkpoint's). (Its settings list depths 2/3/16/3 for restv2_large, against the
  classification model's 2/3/16/2, which restv2_large here builds, so that the ImageNet checkpoint
  loads; no official large detection checkpoint is published.)
- Our layout (the default): the model's forward_intermediates, as timm gives it: stages 1-3 as they
  leave their blocks, stage 4 after the final norm; no extra parameters.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch.nn as nn

from .. import models, models_v2
from ..norms import LayerNorm2d
from ..layers_v2 import NORM_EPS

__all__ = ["BackboneSpec", "BACKBONES", "register_backbone", "backbone_spec"]


@dataclass(frozen=True)
class BackboneSpec:
    """What rest.detection needs of a model family.

    build: the variant's constructor, (pretrained=None, **kwargs) -> model following timm's model
        protocol (forward_intermediates, prune_intermediate_layers, feature_info), with num_classes=.
    official_norm_name: stage index (0-3) -> the official detection code's name of that stage's extra
        norm (a top-level name in its checkpoints), or None where the model's own map already carries
        the official norm (v1's stage 4: the final `norm`).
    make_official_norm: channels -> that norm, a module over a (B, C, H, W) map (its state_dict keys
        are the official ones under the norm's name).
    normed_feeds_next: whether, in the official layout, the normalised map is what the next stage
        receives (v1). Needs the model's stage loop (ResT's _prepare_input and _stage_pairs).
    official_final_norm: whether the official detection backbone has the classifier's final `norm`
        (v1: stage 4's map carries it). False (v2): in the official layout the final norm is an
        identity (its parameters leave the backbone), stage 4's map is the raw stage output under its
        own official norm, and checkpoints need no `norm.*` keys (a classification checkpoint's are
        ignored, as the official loader ignores them).
    units: the model's top-level module names in each of the five freezable units, from the input
        side: the stem, then stages 1-4 (with their patch embeddings and norms), as torchvision's
        ResNet has conv1/bn1 then layer1-4.
    """

    build: Callable[..., nn.Module]
    official_norm_name: Callable[[int], str | None]
    make_official_norm: Callable[[int], nn.Module]
    normed_feeds_next: bool
    official_final_norm: bool
    units: tuple[tuple[str, ...], ...]


_REST_V1 = BackboneSpec(
    build=None,  # per variant, below
    official_norm_name=lambda i: f"norm{i + 1}" if i < 3 else None,
    make_official_norm=lambda channels: LayerNorm2d(channels),  # nn.LayerNorm's defaults, as the official code
    normed_feeds_next=True,
    official_final_norm=True,
    units=(("stem",), ("stage1",), ("patch_embed_2", "stage2"), ("patch_embed_3", "stage3"),
           ("patch_embed_4", "stage4", "norm")),
)

_REST_V2 = BackboneSpec(
    build=None,  # per variant, below
    official_norm_name=lambda i: f"norm_{i + 1}",
    # the official nn.Sequential(LayerNorm(channels, eps=1e-6, data_format="channels_first")): the
    # same numbers as LayerNorm2d, and the same keys (norm_k.0.weight, norm_k.0.bias)
    make_official_norm=lambda channels: nn.Sequential(LayerNorm2d(channels, eps=NORM_EPS)),
    normed_feeds_next=False,
    official_final_norm=False,
    units=(("stem",), ("stage1",), ("patch_2", "stage2"), ("patch_3", "stage3"), ("patch_4", "stage4", "norm")),
)

#: variant name -> its BackboneSpec
BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, spec: BackboneSpec) -> None:
    """Make `name` buildable by rest.detection (rest_fpn_backbone and the detector builders)."""
    if not isinstance(spec, BackboneSpec):
        raise TypeError(f"spec must be a BackboneSpec, got {type(spec).__name__}")
    BACKBONES[name] = spec


for _name in models.VARIANTS:
    register_backbone(_name, replace(_REST_V1, build=getattr(models, _name)))
for _name in models_v2.VARIANTS_V2:
    register_backbone(_name, replace(_REST_V2, build=getattr(models_v2, _name)))


def backbone_spec(variant: str) -> BackboneSpec:
    if not isinstance(variant, str) or variant not in BACKBONES:
        raise ValueError(f"variant must be one of {', '.join(sorted(BACKBONES))}; got {variant!r}")
    return BACKBONES[variant]
