"""ResT in timm's model registry, so timm-based code (training scripts, detection and segmentation
frameworks that take a timm backbone) can use it by name.

Imported by rest/__init__.py only when timm imports; importing it registers

    rest_lite, rest_small, rest_base, rest_large

    timm.create_model("rest_lite")                                     # classifier, official init
    timm.create_model("rest_lite", features_only=True, out_indices=(1, 2, 3))   # backbone
    timm.create_model("rest_lite", pretrained=True,
                      pretrained_cfg_overlay=dict(file="rest_lite.pth"))   # or .safetensors

The models are TimmResT, a ResT (same state_dict keys and math, rest_kernels ops) with the parts of
timm's model protocol that its tooling calls: pretrained_cfg (the official evaluation transform:
ImageNet mean/std, crop_pct 0.9, bicubic, 224x224), feature_info,
forward_intermediates / prune_intermediate_layers (timm's "getter" feature extractor), get_classifier
/ reset_classifier(num_classes, global_pool) and forward_head(x, pre_logits).

Feature maps are the ones of ResT.forward_features: stages 1-3 as they leave their blocks, stage 4
after the model's final LayerNorm (strides 4/8/16/32). No download location is built in (the
official weights are not on a hub timm knows): pretrained=True needs a local file through
pretrained_cfg_overlay=dict(file=...), loaded with the same unwrapping as rest.load_checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models._features import feature_take_indices
from timm.models._registry import _model_entrypoints, register_model

from .checkpoint import extract_state_dict
from .models import _COMMON, _VARIANTS, ResT

__all__ = ["TimmResT", "MODEL_NAMES"]

MODEL_NAMES = tuple(_VARIANTS)


class TimmResT(ResT):
    """ResT with timm's model protocol (feature_info, intermediates, classifier access)."""

    def __init__(self, *args, global_pool: str = "avg", **kwargs):
        if global_pool not in ("avg", ""):
            raise ValueError(f"ResT supports global_pool 'avg' (or '' for none); got {global_pool!r}")
        super().__init__(*args, **kwargs)
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dims[3]
        # one entry per stage map; "module" names the ModuleList whose output the map is
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"stage{i + 1}")
                             for i, c in enumerate(self.embed_dims)]

    # ------------------------------------------------------------------ classifier
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"ResT supports global_pool 'avg' or ''; got {global_pool!r}")
            self.global_pool = global_pool
        super().reset_classifier(num_classes)

    def forward_head(self, feature, pre_logits: bool = False):
        """Logits (or the pooled features with pre_logits=True) from the final normed stage-4 map;
        with global_pool '' the map is returned unpooled (head on channels-last tokens)."""
        if self.global_pool == "avg":
            x = self.avg_pool(feature).flatten(1)
        else:
            x = feature.permute(0, 2, 3, 1)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x)[3])

    # ------------------------------------------------------------------ intermediates
    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's intermediate-feature protocol. indices: None (all four), an int n (the last n) or
        a list of stage indices 0-3. The maps are forward_features' (stage 4 always after the final
        norm, so `norm` changes nothing). Returns the list of maps, or (final map, list) unless
        intermediates_only. Stages after the last wanted one are not run when stop_early or
        intermediates_only."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC'; got {output_fmt!r}")
        take, max_index = feature_take_indices(4, indices)
        last = max_index if (stop_early or intermediates_only) else 3
        x = self._prepare_input(x)
        maps = []
        m = self.stem(x)
        for i in range(last + 1):
            if i > 0:
                m = getattr(self, f"patch_embed_{i + 1}")(m)
            B, C, H, W = m.shape
            t = m.flatten(2).transpose(1, 2)
            for blk in getattr(self, f"stage{i + 1}"):
                t = blk(t, H, W)
            if i == 3:
                t = self.norm(t)
            m = self._to_map(t, (H, W))
            maps.append(m)
        out = [maps[i] if output_fmt == "NCHW" else maps[i].permute(0, 2, 3, 1) for i in take]
        if intermediates_only:
            return out
        return maps[3], out

    def prune_intermediate_layers(self, indices=None, prune_norm: bool = False, prune_head: bool = True):
        """Drop what the wanted maps do not need: the head, and the stages after the last wanted
        one (their parameters leave the model). Stage 4's map includes the final norm, so the norm
        stays while stage 4 is wanted. Returns the absolute indices taken."""
        take, max_index = feature_take_indices(4, indices)
        if prune_head:
            self.reset_classifier(0, "")
        for i in range(max_index + 1, 4):
            setattr(self, f"stage{i + 1}", nn.ModuleList())
            if i > 0:
                setattr(self, f"patch_embed_{i + 1}", nn.Identity())
        if max_index < 3:
            self.norm = nn.Identity()
        return take


def _cfg(**kwargs):
    # The official evaluation transform (wofmanaf/ResT main.py / datasets.py): resize to 224 / 0.9,
    # centre crop 224, bicubic, ImageNet mean and std.
    return dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
                interpolation="bicubic", fixed_input_size=False, mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv="stem.conv1", classifier="head",
                license="apache-2.0", paper_ids="arXiv:2105.13677",
                paper_name="ResT: An Efficient Transformer for Visual Recognition",
                origin_url="https://github.com/wofmanaf/ResT", **kwargs)


default_cfgs = generate_default_cfgs({name: _cfg() for name in MODEL_NAMES})


def _filter_checkpoint(state_dict, model):
    """timm hands the loaded file here: unwrap it like rest.load_checkpoint does."""
    return extract_state_dict(state_dict, "pretrained file")


def _create(variant: str, pretrained: bool = False, **kwargs) -> TimmResT:
    cfg = {**_COMMON, **_VARIANTS[variant]}
    fixed = sorted(set(kwargs) & set(cfg))
    if fixed:
        raise TypeError(f"{variant} fixes {', '.join(fixed)}; build rest.ResT(...) directly for another configuration")
    return build_model_with_cfg(
        TimmResT, variant, pretrained,
        pretrained_filter_fn=_filter_checkpoint,
        # timm's "getter" extractor calls forward_intermediates: ResT's stages are not a flat
        # sequence of modules (each block takes H, W), which the default module-walking extractor needs
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **cfg, **kwargs)


def _register(name: str):
    def entry(pretrained: bool = False, **kwargs) -> TimmResT:
        return _create(name, pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"timm entry point of {name} (see rest.timm_integration)."
    globals()[name] = entry
    # register once per process (a re-import must not trigger timm's overwrite warning)
    if _model_entrypoints.get(name) is None or getattr(_model_entrypoints[name], "__module__", None) != __name__:
        register_model(entry)
    return entry


for _name in MODEL_NAMES:
    _register(_name)
