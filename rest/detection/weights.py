"""Backbone weights for rest.detection: official classification checkpoints and official detectron2
checkpoints, recognised by their keys.

- Classification (github wofmanaf/ResT's ImageNet checkpoints, or rest.save_checkpoint's files): the
  model's state_dict; the classifier (`head.*`) is dropped, the rest loads strictly.
- detectron2 (the official object_detection code; its convert_to_d2.py prefixes every key of a
  classification checkpoint, the classifier's too, with `backbone.bottom_up.`, and a trained
  detector's backbone keys carry the same prefix): the keys under that prefix are the backbone's: the
  model's own (the classifier's `head.*` dropped, as above), plus the official layout's per-stage
  norms (`norm1`..`norm3` for v1, `norm_1.0`..`norm_4.0` for v2), which go to the detection body
  (layout="official"). Everything else in the file (detectron2's FPN, RPN and heads, named and
  shaped for detectron2, not torchvision) is ignored: torchvision's are trained from scratch.
- In the official layout of v2 (BackboneSpec.official_final_norm False) the final norm is not part
  of the backbone: a checkpoint's `norm.*` keys are ignored (the official code's non-strict loader
  ignores them too) and a trained detector's checkpoint has none.
Both go through rest/checkpoint.py (file formats, wrappers, "module." prefixes, strict matching).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from ..checkpoint import CheckpointError, extract_state_dict, load_checkpoint, read_checkpoint

__all__ = ["DETECTRON2_PREFIX", "load_backbone_weights", "split_backbone_state"]

#: detectron2's prefix of the bottom-up (backbone) weights inside its FPN backbone
DETECTRON2_PREFIX = "backbone.bottom_up."
CLASSIFIER_PREFIX = "head."
FINAL_NORM_PREFIX = "norm."


def split_backbone_state(state: Mapping[str, torch.Tensor], spec, layout: str = "ours") -> tuple[str, dict, dict]:
    """(format, the model's weights, the official per-stage norms' weights) of a checkpoint's
    state_dict for a backbone in `layout`; format is "detectron2" or "classification"."""
    if any(k.startswith(DETECTRON2_PREFIX) for k in state):
        fmt = "detectron2"
        state = {k[len(DETECTRON2_PREFIX):]: v for k, v in state.items() if k.startswith(DETECTRON2_PREFIX)}
    else:
        fmt = "classification"
    unused = [CLASSIFIER_PREFIX]
    if layout == "official" and not spec.official_final_norm:
        unused.append(FINAL_NORM_PREFIX)  # not in the official (v2) detection backbone
    state = {k: v for k, v in state.items() if not k.startswith(tuple(unused))}
    norm_names = {spec.official_norm_name(i) for i in range(4)} - {None}
    norms = {k: v for k, v in state.items() if k.partition(".")[0] in norm_names}
    model = {k: v for k, v in state.items() if k not in norms}
    return fmt, model, norms


def load_backbone_weights(model: nn.Module, weights, spec, layout: str = "ours") -> dict[str, torch.Tensor]:
    """Load `weights` (a path or a loaded dict) into the classifier-less `model` (num_classes=0)
    strictly; returns the official per-stage norms' weights found (empty for a classification one),
    which only the official layout has. In the official layout `model` is as that layout runs it
    (rest.detection.backbone.drop_unofficial_final_norm: v2's without its final norm)."""
    source = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else "backbone weights"
    if isinstance(weights, (str, os.PathLike)):
        weights = read_checkpoint(weights)
    elif not isinstance(weights, Mapping):
        raise TypeError(f"backbone weights must be a checkpoint path or a loaded state_dict / checkpoint dict, "
                        f"got {type(weights).__name__}")
    fmt, state, norms = split_backbone_state(extract_state_dict(weights, source), spec, layout)
    if norms and layout != "official":
        names = sorted({k.partition(".")[0] for k in norms})
        raise CheckpointError(f"{source}: the checkpoint has the official detection layout's per-stage norms "
                              f"({', '.join(names)}); build with layout='official' to use them")
    if not state:
        raise CheckpointError(f"{source}: no backbone weights in the {fmt} checkpoint")
    load_checkpoint(model, state, source=f"{source} ({fmt} checkpoint)")
    return norms
