"""RetinaNet, Faster R-CNN and Mask R-CNN with a ResT backbone, built as torchvision's own builders
build them on ResNet-50 (torchvision/models/detection/retinanet.py, faster_rcnn.py, mask_rcnn.py):
the same detector classes, heads and defaults; the backbone is rest_fpn_backbone's.

Beyond torchvision's builders: returned_layers is an argument of all three, and the anchor
generator and RoI poolers follow it (torchvision's defaults assume five pyramid levels and maps
"0"-"3"). With the default returned layers they are exactly torchvision's defaults: anchors of
4 x stride (three scales per octave) for RetinaNet and 8 x stride for the RPN.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from .. import _checks
from .backbone import NUM_UNITS, ResTFPN, check_returned_layers, rest_fpn_backbone

__all__ = ["retinanet_rest", "fasterrcnn_rest", "maskrcnn_rest"]

ASPECT_RATIOS = (0.5, 1.0, 2.0)


def _backbone_weights(weights_backbone, backbone_weights):
    if weights_backbone is not None and backbone_weights is not None:
        raise TypeError("pass the backbone weights once: weights_backbone= (torchvision's name) or "
                        "backbone_weights=, not both")
    return weights_backbone if weights_backbone is not None else backbone_weights


def _trainable_layers(trained: bool, trainable_backbone_layers):
    """torchvision's _validate_trainable_layers: without backbone weights everything trains."""
    if not trained:
        if trainable_backbone_layers is not None:
            warnings.warn(f"trainable_backbone_layers={trainable_backbone_layers} has no effect without backbone "
                          f"weights: all {NUM_UNITS} units train", stacklevel=3)
        return NUM_UNITS
    return 3 if trainable_backbone_layers is None else trainable_backbone_layers


def _num_extra_levels(extra_blocks: ExtraFPNBlock) -> int | None:
    if isinstance(extra_blocks, LastLevelP6P7):
        return 2
    if isinstance(extra_blocks, LastLevelMaxPool):
        return 1
    return None  # unknown: the caller must give anchors that match it


def _level_strides(backbone: ResTFPN) -> list[int] | None:
    """The strides of the FPN's levels, None where its extra block is of an unknown kind."""
    extra = _num_extra_levels(backbone.fpn.extra_blocks)
    if extra is None:
        return None
    strides = list(backbone.body.strides)
    return strides + [strides[-1] * 2 ** (j + 1) for j in range(extra)]


def _backbone(variant, weights_backbone, backbone_weights, trainable_backbone_layers, returned_layers,
              extra_blocks, layout, out_channels, backbone_kwargs):
    weights = _backbone_weights(weights_backbone, backbone_weights)
    trainable = _trainable_layers(weights is not None, trainable_backbone_layers)
    return rest_fpn_backbone(variant, weights=weights, trainable_layers=trainable, returned_layers=returned_layers,
                             extra_blocks=extra_blocks, layout=layout, out_channels=out_channels,
                             **(backbone_kwargs or {}))


def _feature_names(backbone: ResTFPN) -> list[str]:
    return [str(k) for k in range(len(backbone.body.stages))]


def retinanet_rest(variant: str = "rest_small", *, num_classes: int = 91, weights_backbone=None,
                   backbone_weights=None, trainable_backbone_layers: int | None = None,
                   returned_layers: Sequence[int] | None = None, extra_blocks: ExtraFPNBlock | None = None,
                   layout: str = "ours", out_channels: int = 256, min_size: int = 800, max_size: int = 1333,
                   backbone_kwargs: dict | None = None, **kwargs) -> RetinaNet:
    """torchvision's RetinaNet on a ResT backbone with FPN (torchvision's retinanet_resnet50_fpn).

    variant: a name in rest.detection.BACKBONES. num_classes: with the background class, as torchvision
    counts (91 for COCO). weights_backbone / backbone_weights (the same; one of them): an official
    classification or detectron2 checkpoint (see rest_fpn_backbone); with them the backbone's
    BatchNorm is frozen and trainable_backbone_layers (0-5, default 3) of the units stem, stage 1-4
    train, from the top. returned_layers: default [2, 3, 4] (P3-P5; P2 would make too many anchors,
    as torchvision says). extra_blocks: default P6 and P7 from stage 4's map (LastLevelP6P7(C4, 256),
    as the official ResT RetinaNet; also a callable, see rest_fpn_backbone). layout: "ours" or
    "official" (the official detection code's per-stage norms). out_channels: the FPN's width
    (torchvision's 256). min_size, max_size: torchvision's resize. backbone_kwargs: to
    rest_fpn_backbone and through it to the variant's constructor (drop_path_rate, backend,
    grad_checkpointing, ...). Other keyword arguments go to RetinaNet.
    """
    num_classes = _checks.integer("num_classes", num_classes)
    returned_layers = check_returned_layers([2, 3, 4] if returned_layers is None else returned_layers)
    backbone = _backbone(variant, weights_backbone, backbone_weights, trainable_backbone_layers, returned_layers,
                         LastLevelP6P7 if extra_blocks is None else extra_blocks, layout, out_channels, backbone_kwargs)
    if "anchor_generator" not in kwargs:
        strides = _level_strides(backbone)
        if strides is not None:
            sizes = tuple((4 * s, int(4 * s * 2 ** (1 / 3)), int(4 * s * 2 ** (2 / 3))) for s in strides)
            kwargs["anchor_generator"] = AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes))
    return RetinaNet(backbone, num_classes, min_size=min_size, max_size=max_size, **kwargs)


def _rcnn_kwargs(backbone: ResTFPN, kwargs: dict, mask: bool) -> dict:
    """torchvision's default RPN anchors and RoI poolers, for the levels this backbone has."""
    if "rpn_anchor_generator" not in kwargs:
        strides = _level_strides(backbone)
        if strides is not None:
            sizes = tuple((8 * s,) for s in strides)
            kwargs["rpn_anchor_generator"] = AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes))
    names = _feature_names(backbone)
    kwargs.setdefault("box_roi_pool", MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2))
    if mask:
        kwargs.setdefault("mask_roi_pool", MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2))
    return kwargs


def _rcnn(cls, variant, num_classes, weights_backbone, backbone_weights, trainable_backbone_layers, returned_layers,
          extra_blocks, layout, out_channels, min_size, max_size, backbone_kwargs, kwargs):
    num_classes = _checks.integer("num_classes", num_classes)
    returned_layers = check_returned_layers([1, 2, 3, 4] if returned_layers is None else returned_layers)
    backbone = _backbone(variant, weights_backbone, backbone_weights, trainable_backbone_layers, returned_layers,
                         extra_blocks, layout, out_channels, backbone_kwargs)  # None: LastLevelMaxPool
    kwargs = _rcnn_kwargs(backbone, dict(kwargs), mask=cls is MaskRCNN)
    # torchvision refuses num_classes beside predictors the caller made (they fix the classes)
    given = "box_predictor" in kwargs or "mask_predictor" in kwargs
    return cls(backbone, num_classes=None if given else num_classes, min_size=min_size, max_size=max_size, **kwargs)


def fasterrcnn_rest(variant: str = "rest_small", *, num_classes: int = 91, weights_backbone=None,
                    backbone_weights=None, trainable_backbone_layers: int | None = None,
                    returned_layers: Sequence[int] | None = None, extra_blocks: ExtraFPNBlock | None = None,
                    layout: str = "ours", out_channels: int = 256, min_size: int = 800, max_size: int = 1333,
                    backbone_kwargs: dict | None = None, **kwargs) -> FasterRCNN:
    """torchvision's Faster R-CNN on a ResT backbone with FPN (torchvision's fasterrcnn_resnet50_fpn).
    Arguments as retinanet_rest's, except: returned_layers default [1, 2, 3, 4] (P2-P5) and
    extra_blocks default LastLevelMaxPool (P6 for the RPN), as torchvision's. Other keyword arguments
    go to FasterRCNN."""
    return _rcnn(FasterRCNN, variant, num_classes, weights_backbone, backbone_weights, trainable_backbone_layers,
                 returned_layers, extra_blocks, layout, out_channels, min_size, max_size, backbone_kwargs, kwargs)


def maskrcnn_rest(variant: str = "rest_small", *, num_classes: int = 91, weights_backbone=None,
                  backbone_weights=None, trainable_backbone_layers: int | None = None,
                  returned_layers: Sequence[int] | None = None, extra_blocks: ExtraFPNBlock | None = None,
                  layout: str = "ours", out_channels: int = 256, min_size: int = 800, max_size: int = 1333,
                  backbone_kwargs: dict | None = None, **kwargs) -> MaskRCNN:
    """torchvision's Mask R-CNN on a ResT backbone with FPN (torchvision's maskrcnn_resnet50_fpn).
    Arguments as fasterrcnn_rest's; other keyword arguments go to MaskRCNN."""
    return _rcnn(MaskRCNN, variant, num_classes, weights_backbone, backbone_weights, trainable_backbone_layers,
                 returned_layers, extra_blocks, layout, out_channels, min_size, max_size, backbone_kwargs, kwargs)
