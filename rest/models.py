"""ResT v1 (Zhang & Yang, "ResT: An Efficient Transformer for Visual Recognition", NeurIPS 2021):
the model and the four published variants, on rest_kernels' fused EMSA and PA ops.

Architecture, initialisation and state_dict keys follow the official code (github
wofmanaf/ResT, models/rest.py), so official checkpoints load as they are. Differences, all
deliberate:
- any input height and width: each stage's H, W are read from the convolution's actual output
  (the official code assumes multiples of 32 and crashes otherwise);
- timm's model protocol, as timm's own models have it (timm/models/pvt_v2.py): forward_features()
  gives the final normed map, forward_intermediates() the four stage maps (strides 4/8/16/32) for
  dense prediction, and the rest (see ResT's docstring). The model needs no timm; with timm
  installed, rest/timm_integration.py registers the variants;
- backend= pins the rest_kernels backend of every EMSA and PA of the model;
- cpu_layout= and linear_impl= choose the CPU memory layout of the maps and the product of the
  linear layers ("auto" by default: see ResT's docstring);
- pretrained= loads an official checkpoint file (see rest/checkpoint.py).
"""
from __future__ import annotations

import torch.nn as nn

from . import _checks
from .backbone import ResTFamily, build_variant
from .layers import BasicStem, Block, PatchEmbed, Stage
from .norms import LayerNorm2d

__all__ = ["ResT", "rest_lite", "rest_small", "rest_base", "rest_large", "VARIANTS", "variant_config"]


class ResT(ResTFamily):
    """ResT v1 image classifier / backbone.

    Stem (stride 4) then four stages of `depths[i]` blocks at widths `embed_dims[i]`; stages 2-4
    start with a stride-2 PatchEmbed. Every block is pre-norm EMSA + MLP; the last stage is
    followed by LayerNorm, global average pooling and the linear head (Identity when
    num_classes == 0).

    timm's model protocol (the names and meanings of timm's own models, e.g. timm/models/pvt_v2.py):
    - forward(x) = forward_head(forward_features(x));
    - forward_features(x): the final normed map (B, C4, H4, W4), stride 32 for the stock strides;
    - forward_head(x, pre_logits=False): pooled features (pre_logits) or logits from that map; with
      global_pool "" the map stays unpooled (B, C, H, W) and the head, a linear layer, applies to each
      pixel's channels (logits (B, num_classes, H, W); the map itself when num_classes == 0);
    - forward_intermediates(...) and prune_intermediate_layers(...): the stage maps (stages 1-3 as
      they leave their blocks, stage 4 after the final norm) and pruning for a backbone;
    - feature_info: per stage map its channels, stride and the module whose output it is (stage1,
      stage2, stage3, norm), so timm's hook and fx feature extractors find it;
    - num_features / head_hidden_size (the head's input width), num_classes, in_chans, global_pool,
      get_classifier(), reset_classifier(num_classes, global_pool=None), set_grad_checkpointing(),
      group_matcher(), no_weight_decay().
    TorchScript (torch.jit.script) is refused with an error saying why; torch.compile, torch.export
    and torch.fx trace the model.

    Options beyond the official configuration (none changes the parameters or the state_dict):
    - global_pool: "avg" (default) or "" (no pooling, see forward_head).
    - backend: pins the rest_kernels backend of every EMSA and PA (None, the default: the current
      default backend, see rest_kernels.use_backend).
    - cpu_layout: the memory layout of CPU images and so of every map after them (rest/layout.py).
      "auto" (default): channels-last for a float32 CPU model when the backend is not "reference",
      torch has oneDNN and REST_KERNELS_CHANNELS_LAST is not "0"; else the images as given.
      "channels_last": always channels-last on the CPU. "contiguous": always NCHW-contiguous images
      on the CPU (the official layout).
    - linear_impl: the product of the linear layers of the blocks (q, kv, proj, the MLP; not the
      classifier head) (rest/dense.py). "auto" (default): oneDNN's matmul for a float32 CPU model
      (CPU autocast off, not while exporting to ONNX) unless the backend is "reference" or
      REST_KERNELS_ONEDNN_LINEAR is "0"; else F.linear. "onednn": oneDNN wherever it can serve.
      "aten": always F.linear (exactly nn.Linear).
    - mlp_recompute: what each block's MLP branch (LayerNorm, fc1, GELU, fc2) keeps for the backward
      (rest/lean_mlp.py): "none" (the modules: 10 token-widths), "gelu" (the LayerNorm's input and
      statistics and fc1's output, recomputing the LayerNorm output and the GELU: 5 widths), "hidden"
      (the LayerNorm's input and statistics, recomputing fc1 too: 1 width). "auto" (default): "hidden"
      for a CPU model (no slower there, measured), "gelu" for others, "none" on the "reference"
      backend (its model stays the official modules).
      set_mlp_recompute(mode) changes it on a built model. The same results in every mode; the
      fused modes have no double backward (as the fused attention).
    Both choices read the model's configuration (its device, dtype and options) and the process, not
    the input, so tracing does not change them (except that torch.compile / torch.export trace the
    linear layers as F.linear: rest/dense.py). The environment variables only steer "auto"; both
    options change results by rounding only.
    """

    def __init__(self, in_chans=3, num_classes=1000, embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8),
                 mlp_ratios=(4, 4, 4, 4), qkv_bias=False, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1), norm_layer=nn.LayerNorm,
                 apply_transform=False, backend=None, cpu_layout="auto", linear_impl="auto", global_pool="avg",
                 mlp_recompute="auto"):
        super().__init__()
        embed_dims, num_heads, mlp_ratios, depths, sr_ratios = _check_config(
            in_chans, num_classes, embed_dims, num_heads, mlp_ratios, qk_scale, drop_rate, attn_drop_rate,
            drop_path_rate, depths, sr_ratios)
        self._set_options(in_chans, num_classes, embed_dims, depths, backend, cpu_layout, linear_impl, global_pool,
                          mlp_recompute)
        self.apply_transform = apply_transform

        self.stem = BasicStem(in_ch=in_chans, out_ch=embed_dims[0], with_pos=True, backend=backend)
        self.patch_embed_2 = PatchEmbed(2, embed_dims[0], embed_dims[1], with_pos=True, backend=backend)
        self.patch_embed_3 = PatchEmbed(2, embed_dims[1], embed_dims[2], with_pos=True, backend=backend)
        self.patch_embed_4 = PatchEmbed(2, embed_dims[2], embed_dims[3], with_pos=True, backend=backend)

        for i, drop_paths in enumerate(self._drop_path_rates(drop_path_rate)):
            setattr(self, f"stage{i + 1}", Stage([
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                      drop_path=p, norm_layer=norm_layer, sr_ratio=sr_ratios[i],
                      apply_transform=apply_transform, backend=backend, linear_impl=linear_impl)
                for p in drop_paths]))
        self._finish(_final_norm(norm_layer, embed_dims[3]))

    @staticmethod
    def _init_weights(m):
        # the official init; Conv2d biases keep PyTorch's default, as in the official code
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # where the modules are, for ResTFamily (rest/backbone.py)
    _STAGE_NAMES = (("stem", "stage1"), ("patch_embed_2", "stage2"), ("patch_embed_3", "stage3"),
                    ("patch_embed_4", "stage4"))
    _EMBED_PREFIX = "patch_embed_"
    _BATCHNORM_STAGE = -1  # every PatchEmbed has a BatchNorm: the last stage map is the smallest one

    def _stem_convs(self):
        return [self.stem.conv1, self.stem.conv2, self.stem.conv3]

    def _embed_conv(self, embed):
        return embed.conv


def _final_norm(norm_layer, dim: int) -> LayerNorm2d:
    """The final norm as a module over the stage-4 map's channels (so that the normed map is a real
    module's output, see feature_info), built from norm_layer's LayerNorm settings."""
    norm = norm_layer(dim)
    if type(norm) is not nn.LayerNorm:
        raise TypeError(f"norm_layer must build an nn.LayerNorm (the final norm is applied to the channels of "
                        f"the stage-4 map), got {type(norm).__name__}")
    return LayerNorm2d(dim, eps=norm.eps, elementwise_affine=norm.elementwise_affine, bias=norm.bias is not None)


def _check_config(in_chans, num_classes, embed_dims, num_heads, mlp_ratios, qk_scale, drop_rate, attn_drop_rate,
                  drop_path_rate, depths, sr_ratios):
    """Validate ResT's configuration up front (see rest/_checks.py); returns the per-stage lists."""
    _checks.integer("in_chans", in_chans)
    _checks.integer("num_classes", num_classes, minimum=0)
    seqs = [_checks.sequence(name, seq, 4) for name, seq in (
        ("embed_dims", embed_dims), ("num_heads", num_heads), ("mlp_ratios", mlp_ratios), ("depths", depths),
        ("sr_ratios", sr_ratios))]
    embed_dims, num_heads, mlp_ratios, depths, sr_ratios = seqs
    for i in range(4):
        dim = _checks.integer(f"embed_dims[{i}]", embed_dims[i])
        heads = _checks.integer(f"num_heads[{i}]", num_heads[i])
        if dim % heads:
            raise ValueError(f"embed_dims[{i}] ({dim}) must be divisible by num_heads[{i}] ({heads})")
        if _checks.real(f"mlp_ratios[{i}]", mlp_ratios[i]) <= 0 or int(dim * mlp_ratios[i]) < 1:
            raise ValueError(f"mlp_ratios[{i}] must be > 0 with at least one hidden unit, got {mlp_ratios[i]}")
        _checks.integer(f"depths[{i}]", depths[i], minimum=0)
        _checks.integer(f"sr_ratios[{i}]", sr_ratios[i])
    if qk_scale is not None:
        _checks.real("qk_scale", qk_scale)
    _checks.probability("drop_rate", drop_rate)
    _checks.probability("attn_drop_rate", attn_drop_rate)
    _checks.probability("drop_path_rate", drop_path_rate, open_one=True)
    return embed_dims, num_heads, mlp_ratios, depths, sr_ratios


# ---------------------------------------------------------------------- the published variants
_VARIANTS = {
    "rest_lite": dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 2, 2]),
    "rest_small": dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 6, 2]),
    "rest_base": dict(embed_dims=[96, 192, 384, 768], depths=[2, 2, 6, 2]),
    "rest_large": dict(embed_dims=[96, 192, 384, 768], depths=[2, 2, 18, 2]),
}
_COMMON = dict(num_heads=[1, 2, 4, 8], mlp_ratios=[4, 4, 4, 4], qkv_bias=True, sr_ratios=[8, 4, 2, 1],
               apply_transform=True)

#: the published variants' names
VARIANTS = tuple(_VARIANTS)


def variant_config(variant: str) -> dict:
    """The official configuration (ResT keyword arguments) of a published variant."""
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    return {**_COMMON, **_VARIANTS[variant]}


def _build(variant: str, pretrained, kwargs) -> ResT:
    return build_variant(ResT, variant, variant_config(variant), pretrained, kwargs)


# Every constructor: pretrained = None (the official random init), or an official checkpoint: a file
# path (a plain state_dict, or one under "model" / "state_dict", "module." prefixes allowed) or an
# already loaded dict; loaded strictly (rest.checkpoint.load_checkpoint). Other keyword arguments go
# to ResT (num_classes, drop_path_rate, drop_rate, attn_drop_rate, qk_scale, in_chans, global_pool,
# backend, cpu_layout, linear_impl, ...).
# For another number of classes: load the 1000-class checkpoint, then model.reset_classifier(n).


def rest_lite(pretrained=None, **kwargs) -> ResT:
    """ResT-Lite: dims 64/128/256/512, depths 2/2/2/2 (10.5 M parameters)."""
    return _build("rest_lite", pretrained, kwargs)


def rest_small(pretrained=None, **kwargs) -> ResT:
    """ResT-Small: dims 64/128/256/512, depths 2/2/6/2 (13.7 M parameters)."""
    return _build("rest_small", pretrained, kwargs)


def rest_base(pretrained=None, **kwargs) -> ResT:
    """ResT-Base: dims 96/192/384/768, depths 2/2/6/2 (30.3 M parameters)."""
    return _build("rest_base", pretrained, kwargs)


def rest_large(pretrained=None, **kwargs) -> ResT:
    """ResT-Large: dims 96/192/384/768, depths 2/2/18/2 (51.7 M parameters)."""
    return _build("rest_large", pretrained, kwargs)
