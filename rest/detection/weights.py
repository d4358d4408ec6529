"""Backbone weights for rest.detection: official classification checkpoints and official detectron2
checkpoints, recognised by their keys.

- Classification (github wofmanaf/ResT's ImageNet checkpoints, or rest.save_checkpoint's files): the
  model's state_dict; the classifier (`head.*`) is dropped, the rest loads strictly.
- detectron2 (the official object_detection code; its convert_to_d2.py prefixes every backbone key
  with `backbone.bottom_up.`): the keys under that prefix are the backbone's: the model's own, plus
  the official layout's per-stage norms (`norm1`..`norm3` for v1), which go to the detection body
  (layout="official"). Everything else in the file (detectron2's FPN, RPN and heads, named and
  shaped for detectron2, not torchvision) is ignored: torchvision's are trained from scratch.
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


def split_backbone_state(state: Mapping[str, torch.Tensor], spec) -> tuple[str, dict, dict]:
    """(format, the model's weights, the official per-stage norms' weights) of a checkpoint's
    state_dict; format is "detectron2" or "classification"."""
    if any(k.startswith(DETECTRON2_PREFIX) for k in state):
        fmt = "detectron2"
        state = {k[len(DETECTRON2_PREFIX):]: v for k, v in state.items() if k.startswith(DETECTRON2_PREFIX)}
    else:
        fmt = "classification"
        state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIX)}
    norm_names = {spec.official_norm_name(i) for i in range(4)} - {None}
    norms = {k: v for k, v in state.items() if k.partition(".")[0] in norm_names}
    model = {k: v for k, v in state.items() if k not in norms}
    return fmt, model, norms


def load_backbone_weights(model: nn.Module, weights, spec) -> dict[str, torch.Tensor]:
    """Load `weights` (a path or a loaded dict) into the classifier-less `model` (num_classes=0)
    strictly; returns the official per-stage norms' weights found (empty for a classification one)."""
    source = os.fspath(weights) if isinstance(weights, (str, os.PathLike)) else "backbone weights"
    if isinstance(weights, (str, os.PathLike)):
        weights = read_checkpoint(weights)
    elif not isinstance(weights, Mapping):
        raise TypeError(f"backbone weights must be a checkpoint path or a loaded state_dict / checkpoint dict, "
                        f"got {type(weights).__name__}")
    fmt, state, norms = split_backbone_state(extract_state_dict(weights, source), spec)
    if not state:
        raise CheckpointError(f"{source}: no backbone weights in the {fmt} checkpoint")
    load_checkpoint(model, state, source=f"{source} ({fmt} checkpoint)")
    return norms
