"""ResT and ResTv2 in timm's model registry, so timm-based code (training scripts, detection and segmentation
frameworks that take a timm backbone) can use it by name.

Imported by rest/__init__.py only when timm imports. It registers the entry points, nothing else:
the models are rest.ResT and rest.ResTV2 themselves, which implement timm's model protocol (see
rest/backbone.py).

    timm.create_model("rest_lite")                                     # classifier, official init
    timm.create_model("rest_lite", depths=(2, 2, 4, 2))                # a configuration override
    timm.create_model("rest_lite", features_only=True, out_indices=(1, 2, 3))   # backbone
    timm.create_model("restv2_tiny")                                   # ResTv2 likewise
    timm.create_model("rest_lite.in1k", pretrained=True,
                      pretrained_cfg_overlay=dict(file="rest_lite.pth"))   # or .safetensors

Each variant has one pretrained config, tagged in1k (the official ImageNet-1k weights): the official
evaluation transform (ImageNet mean / std, crop_pct 0.9, bicubic, 224 x 224). No download location
is built in (the official weights are not on a hub timm knows): pretrained=True needs a local file
through pretrained_cfg_overlay=dict(file=...), loaded with the same unwrapping as rest.load_checkpoint.
For torch.fx (timm's fx feature extractor, timm's fx tests) EMSA, EMSAv2 and PA are leaf modules.
"""
from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import (build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_module,
                         resolve_pretrained_cfg)

from .checkpoint import extract_state_dict
from .models import VARIANTS, ResT, variant_config
from .models_v2 import VARIANTS_V2, ResTV2, variant_config_v2
from .modules import EMSA, PA, EMSAv2

__all__ = ["MODEL_NAMES"]

MODEL_NAMES = VARIANTS + VARIANTS_V2

# traced as single calls by timm's fx tools: their forwards hold argument checks and the op calls
register_notrace_module(EMSA)
register_notrace_module(PA)
register_notrace_module(EMSAv2)


def _cfg(**kwargs):
    # The official evaluation transform (wofmanaf/ResT main.py / datasets.py): resize to 224 / 0.9,
    # centre crop 224, bicubic, ImageNet mean and std. url "": no download location.
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
                interpolation="bicubic", fixed_input_size=False, mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, classifier="head", license="apache-2.0",
                origin_url="https://github.com/wofmanaf/ResT", **kwargs)


_V1 = dict(first_conv="stem.conv1", paper_ids="arXiv:2105.13677",
           paper_name="ResT: An Efficient Transformer for Visual Recognition")
_V2 = dict(first_conv="stem.proj.0", paper_ids="arXiv:2204.07366",
           paper_name="ResT V2: Simpler, Faster and Stronger")

default_cfgs = generate_default_cfgs({**{f"{name}.in1k": _cfg(**_V1) for name in VARIANTS},
                                      **{f"{name}.in1k": _cfg(**_V2) for name in VARIANTS_V2}})


def _filter_checkpoint(state_dict, model):
    """timm hands the loaded file here: unwrap it like rest.load_checkpoint does."""
    return extract_state_dict(state_dict, "pretrained file")


def _create(variant: str, pretrained: bool = False, **kwargs) -> ResT | ResTV2:
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                     pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
        if not cfg.has_weights:
            # timm itself would only log a warning and keep the random init
            raise ValueError(f"{variant}: pretrained=True needs a local official checkpoint, e.g. "
                             f"timm.create_model({variant!r}, pretrained=True, "
                             "pretrained_cfg_overlay=dict(file='path/to/file.pth')); no download location is built in")
    # overrides (depths=..., embed_dims=...) replace the variant's values, as in timm's own models
    cls, config = (ResTV2, variant_config_v2(variant)) if variant in VARIANTS_V2 else (ResT, variant_config(variant))
    return build_model_with_cfg(
        cls, variant, pretrained,
        pretrained_filter_fn=_filter_checkpoint,
        # timm's "getter" extractor calls forward_intermediates. The default one would run the model's
        # children in registration order, which the official key order makes differ from the order they
        # run in; feature_cls="hook" or "fx" also work (feature_info names the modules).
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **{**config, **kwargs})


@register_model
def rest_lite(pretrained: bool = False, **kwargs) -> ResT:
    """ResT-Lite: dims 64/128/256/512, depths 2/2/2/2."""
    return _create("rest_lite", pretrained, **kwargs)


@register_model
def rest_small(pretrained: bool = False, **kwargs) -> ResT:
    """ResT-Small: dims 64/128/256/512, depths 2/2/6/2."""
    return _create("rest_small", pretrained, **kwargs)


@register_model
def rest_base(pretrained: bool = False, **kwargs) -> ResT:
    """ResT-Base: dims 96/192/384/768, depths 2/2/6/2."""
    return _create("rest_base", pretrained, **kwargs)


@register_model
def rest_large(pretrained: bool = False, **kwargs) -> ResT:
    """ResT-Large: dims 96/192/384/768, depths 2/2/18/2."""
    return _create("rest_large", pretrained, **kwargs)


@register_model
def restv2_tiny(pretrained: bool = False, **kwargs) -> ResTV2:
    """ResTv2-T: dims 96/192/384/768, depths 1/2/6/2."""
    return _create("restv2_tiny", pretrained, **kwargs)


@register_model
def restv2_small(pretrained: bool = False, **kwargs) -> ResTV2:
    """ResTv2-S: dims 96/192/384/768, depths 1/2/12/2."""
    return _create("restv2_small", pretrained, **kwargs)


@register_model
def restv2_base(pretrained: bool = False, **kwargs) -> ResTV2:
    """ResTv2-B: dims 96/192/384/768, depths 1/3/16/3."""
    return _create("restv2_base", pretrained, **kwargs)


@register_model
def restv2_large(pretrained: bool = False, **kwargs) -> ResTV2:
    """ResTv2-L: dims 128/256/512/1024, heads 2/4/8/16, depths 2/3/16/2."""
    return _create("restv2_large", pretrained, **kwargs)
