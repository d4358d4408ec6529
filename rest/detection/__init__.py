"""ResT and ResTv2 backbones for torchvision's detection models (needs torchvision: pip install
rest-kernels[detection]).

    from rest.detection import rest_fpn_backbone, retinanet_rest, fasterrcnn_rest, maskrcnn_rest
    model = maskrcnn_rest("rest_small", num_classes=81, backbone_weights="rest_small.pth")
    model = maskrcnn_rest("restv2_tiny", num_classes=81, layout="official")

- variants.py: the variant names (rest_lite ... rest_large, restv2_tiny ... restv2_large) and what each
  family needs (BACKBONES, register_backbone);
- backbone.py: the stage maps (ResTFeatures), the FPN backbone (ResTFPN, rest_fpn_backbone),
  frozen BatchNorm and frozen stages;
- weights.py: official classification and detectron2 checkpoints as backbone weights;
- builders.py: retinanet_rest, fasterrcnn_rest, maskrcnn_rest.
"""
try:
    import torchvision  # noqa: F401
except ImportError as e:  # pragma: no cover  (torchvision is installed in the test environment)
    raise ImportError("rest.detection needs torchvision: pip install torchvision "
                      "(or pip install 'rest-kernels[detection]')") from e

from .backbone import LAYOUTS, ResTFeatures, ResTFPN, freeze_batchnorm, rest_fpn_backbone
from .builders import fasterrcnn_rest, maskrcnn_rest, retinanet_rest
from .variants import BACKBONES, BackboneSpec, backbone_spec, register_backbone
from .weights import DETECTRON2_PREFIX, load_backbone_weights

__all__ = ["rest_fpn_backbone", "retinanet_rest", "fasterrcnn_rest", "maskrcnn_rest", "ResTFeatures", "ResTFPN",
           "LAYOUTS", "freeze_batchnorm", "BACKBONES", "BackboneSpec", "backbone_spec", "register_backbone",
           "DETECTRON2_PREFIX", "load_backbone_weights"]
