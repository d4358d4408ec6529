"""ResTv2 (Zhang & Yang, "ResT V2: Simpler, Faster and Stronger", NeurIPS 2022, arXiv 2204.07366): the
model and the four published variants, on rest_kernels' fused PA and plain (no head mix) attention.

Architecture, initialisation and state_dict keys follow the official code (github wofmanaf/ResT,
models/rest_v2.py), so official checkpoints (saved as {"model": state_dict}) load as they are. The
differences from the official code are ResT's (rest/models.py): any input height and width, timm's
model protocol (rest/backbone.py), and the backend= / cpu_layout= / linear_impl= / global_pool=
options; pretrained= loads an official checkpoint file (rest/checkpoint.py).
"""
from __future__ import annotations

import torch.nn as nn

from . import _checks
from .backbone import ResTFamily, build_variant
from .layers import Stage
from .norms import LayerNorm2d
from .layers_v2 import NORM_EPS, BlockV2, ConvStem, PatchEmbedV2
from .models import _check_config

__all__ = ["ResTV2", "restv2_tiny", "restv2_small", "restv2_base", "restv2_large", "VARIANTS_V2",
           "variant_config_v2"]


class ResTV2(ResTFamily):
    """ResTv2 image classifier / backbone.

    ConvStem (stride 4, BatchNorm, PA, LayerNorm) then four stages of `depths[i]` blocks at widths
    `embed_dims[i]`; stages 2-4 start with a stride-2 PatchEmbedV2 (conv, PA, LayerNorm). Every block
    is pre-norm EMSAv2 (plain softmax attention over spatially reduced keys, plus the depthwise "up"
    branch of the values, see rest.modules.EMSAv2) + MLP; the last stage is followed by LayerNorm,
    global average pooling and the linear head (Identity when num_classes == 0).

    Any input height and width for which every stage has at least one pixel (min_input_size): the
    stage sizes are the convolutions' real outputs (ceil(H / 4), then halved rounding up), and where
    a stage's size is not a multiple of its attention's sr_ratio the up branch is cropped to the
    stage's size (EMSAv2's docstring gives the rule and why it equals the official result wherever
    the official code runs).

    timm's model protocol exactly as ResT has it (see rest.models.ResT): forward_features,
    forward_head, forward_intermediates (stages 1-3 as they leave their blocks, stage 4 after the
    final norm), prune_intermediate_layers, feature_info, num_features / head_hidden_size,
    get_classifier, reset_classifier, set_grad_checkpointing, group_matcher (stem; patch_N with
    stage N), no_weight_decay, set_backend. Options (none changes the parameters or the state_dict):
    global_pool, backend, cpu_layout, linear_impl, mlp_recompute, as ResT's.
    """

    def __init__(self, in_chans=3, num_classes=1000, embed_dims=(96, 192, 384, 768), num_heads=(1, 2, 4, 8),
                 drop_path_rate=0.0, depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1), backend=None, cpu_layout="auto",
                 linear_impl="auto", global_pool="avg", mlp_recompute="auto"):
        super().__init__()
        embed_dims, num_heads, _, depths, sr_ratios = _check_config(
            in_chans, num_classes, embed_dims, num_heads, (4, 4, 4, 4), None, 0.0, 0.0, drop_path_rate, depths,
            sr_ratios)
        self._set_options(in_chans, num_classes, embed_dims, depths, backend, cpu_layout, linear_impl, global_pool,
                          mlp_recompute)

        self.stem = ConvStem(in_chans, embed_dims[0], backend=backend)
        self.patch_2 = PatchEmbedV2(embed_dims[0], embed_dims[1], backend=backend)
        self.patch_3 = PatchEmbedV2(embed_dims[1], embed_dims[2], backend=backend)
        self.patch_4 = PatchEmbedV2(embed_dims[2], embed_dims[3], backend=backend)
        for i, drop_paths in enumerate(self._drop_path_rates(drop_path_rate)):
            setattr(self, f"stage{i + 1}", Stage([
                BlockV2(embed_dims[i], num_heads[i], sr_ratios[i], drop_path=p, backend=backend,
                        linear_impl=self.linear_impl)
                for p in drop_paths]))
        self._finish(LayerNorm2d(embed_dims[3], eps=NORM_EPS))

    @staticmethod
    def _init_weights(m):
        # the official init: unlike ResT v1, every Conv2d bias is zeroed too
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # where the modules are, for ResTFamily (rest/backbone.py)
    _STAGE_NAMES = (("stem", "stage1"), ("patch_2", "stage2"), ("patch_3", "stage3"), ("patch_4", "stage4"))
    _EMBED_PREFIX = "patch_"
    _BATCHNORM_STAGE = 0  # only the stem has BatchNorms: the smallest map they see is stage 1's size

    def _stem_convs(self):
        return [self.stem.proj[0], self.stem.proj[3], self.stem.proj[6]]

    def _embed_conv(self, embed):
        return embed.proj


# ---------------------------------------------------------------------- the published variants
_VARIANTS = {
    "restv2_tiny": dict(embed_dims=[96, 192, 384, 768], depths=[1, 2, 6, 2]),
    "restv2_small": dict(embed_dims=[96, 192, 384, 768], depths=[1, 2, 12, 2]),
    "restv2_base": dict(embed_dims=[96, 192, 384, 768], depths=[1, 3, 16, 3]),
    "restv2_large": dict(embed_dims=[128, 256, 512, 1024], depths=[2, 3, 16, 2], num_heads=[2, 4, 8, 16]),
}
_COMMON = dict(num_heads=[1, 2, 4, 8], sr_ratios=[8, 4, 2, 1])

#: the published variants' names
VARIANTS_V2 = tuple(_VARIANTS)


def variant_config_v2(variant: str) -> dict:
    """The official configuration (ResTV2 keyword arguments) of a published variant."""
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS_V2)}; got {variant!r}")
    return {**_COMMON, **_VARIANTS[variant]}


def _build(variant: str, pretrained, kwargs) -> ResTV2:
    return build_variant(ResTV2, variant, variant_config_v2(variant), pretrained, kwargs)


# Every constructor: pretrained = None (the official random init), or an official checkpoint: a file
# path (the official files hold {"model": state_dict}; plain state_dicts, "state_dict" wrappers and
# "module." prefixes load too) or an already loaded dict; loaded strictly (rest.checkpoint). Other
# keyword arguments go to ResTV2 (num_classes, drop_path_rate, in_chans, global_pool, backend,
# cpu_layout, linear_impl).


def restv2_tiny(pretrained=None, **kwargs) -> ResTV2:
    """ResTv2-T: dims 96/192/384/768, depths 1/2/6/2 (30.4 M parameters)."""
    return _build("restv2_tiny", pretrained, kwargs)


def restv2_small(pretrained=None, **kwargs) -> ResTV2:
    """ResTv2-S: dims 96/192/384/768, depths 1/2/12/2 (41.2 M parameters)."""
    return _build("restv2_small", pretrained, kwargs)


def restv2_base(pretrained=None, **kwargs) -> ResTV2:
    """ResTv2-B: dims 96/192/384/768, depths 1/3/16/3 (56.0 M parameters)."""
    return _build("restv2_base", pretrained, kwargs)


def restv2_large(pretrained=None, **kwargs) -> ResTV2:
    """ResTv2-L: dims 128/256/512/1024, heads 2/4/8/16, depths 2/3/16/2 (86.5 M parameters)."""
    return _build("restv2_large", pretrained, kwargs)
