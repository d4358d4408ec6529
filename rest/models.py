"""ResT v1 (Zhang & Yang, "ResT: An Efficient Transformer for Visual Recognition", NeurIPS 2021):
the model and the four published variants, on rest_kernels' fused EMSA and PA ops.

Architecture, initialisation and state_dict keys follow the official code (github
wofmanaf/ResT, models/rest.py), so official checkpoints load as they are. Differences, all
deliberate:
- any input height and width: each stage's H, W are read from the convolution's actual output
  (the official code assumes multiples of 32 and crashes otherwise);
- forward_features() gives the four stage maps (strides 4/8/16/32) for dense prediction;
- backend= pins the rest_kernels backend of every EMSA and PA of the model;
- cpu_layout= and linear_impl= choose the CPU memory layout of the maps and the product of the
  linear layers ("auto" by default: see ResT's docstring);
- pretrained= loads an official checkpoint file (see rest/checkpoint.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn

import rest_kernels

from . import _checks, layout
from .checkpoint import load_checkpoint
from .dense import Linear, check_linear_impl
from .layers import BasicStem, Block, PatchEmbed
from .modules import EMSA, PA

__all__ = ["ResT", "rest_lite", "rest_small", "rest_base", "rest_large"]

# Largest side searched for the minimum input size; beyond any sane configuration.
_MAX_MIN_SIDE = 1 << 14


def _conv_out(n: int, conv: nn.Conv2d, dim: int) -> int:
    """Output length of `conv` along spatial dim 0 (height) or 1 (width) for an input of length n."""
    k, s, p, d = conv.kernel_size[dim], conv.stride[dim], conv.padding[dim], conv.dilation[dim]
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


class ResT(nn.Module):
    """ResT v1 image classifier / backbone.

    Stem (stride 4) then four stages of `depths[i]` blocks at widths `embed_dims[i]`; stages 2-4
    start with a stride-2 PatchEmbed. Every block is pre-norm EMSA + MLP; the last stage is
    followed by LayerNorm, global average pooling and the linear head (Identity when
    num_classes == 0).

    Options beyond the official configuration (none changes the parameters or the state_dict):
    - backend: pins the rest_kernels backend of every EMSA and PA (None, the default: the current
      default backend, see rest_kernels.use_backend).
    - cpu_layout: the memory layout of CPU images and so of every map after them (rest/layout.py).
      "auto" (default): channels-last for a float32 CPU model when the backend is not "reference",
      torch has oneDNN and REST_KERNELS_CHANNELS_LAST is not "0"; else the images as given.
      "channels_last": always channels-last on the CPU. "contiguous": always NCHW-contiguous images
      on the CPU (the official layout).
    - linear_impl: the product of the linear layers of the blocks (q, kv, proj, the MLP; not the
      classifier head) (rest/dense.py). "auto" (default): oneDNN's matmul for a float32 CPU model (CPU
      autocast off, not while exporting to ONNX) unless the backend is "reference" or
      REST_KERNELS_ONEDNN_LINEAR is "0"; else F.linear. "onednn": oneDNN wherever it can serve the
      call. "aten": always F.linear (exactly nn.Linear).
    The environment variables only steer "auto"; both options change results by rounding only.
    """

    def __init__(self, in_chans=3, num_classes=1000, embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8),
                 mlp_ratios=(4, 4, 4, 4), qkv_bias=False, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1), norm_layer=nn.LayerNorm,
                 apply_transform=False, backend=None, cpu_layout="auto", linear_impl="auto"):
        super().__init__()
        embed_dims, num_heads, mlp_ratios, depths, sr_ratios = _check_config(
            in_chans, num_classes, embed_dims, num_heads, mlp_ratios, qk_scale, drop_rate, attn_drop_rate,
            drop_path_rate, depths, sr_ratios)
        self.num_classes = num_classes
        self.embed_dims = list(embed_dims)
        self.depths = list(depths)
        self.apply_transform = apply_transform
        self.backend = rest_kernels.check_backend_name(backend) if backend is not None else None
        self.cpu_layout = layout.check_cpu_layout(cpu_layout)
        self.linear_impl = check_linear_impl(linear_impl)

        self.stem = BasicStem(in_ch=in_chans, out_ch=embed_dims[0], with_pos=True, backend=backend)
        self.patch_embed_2 = PatchEmbed(2, embed_dims[0], embed_dims[1], with_pos=True, backend=backend)
        self.patch_embed_3 = PatchEmbed(2, embed_dims[1], embed_dims[2], with_pos=True, backend=backend)
        self.patch_embed_4 = PatchEmbed(2, embed_dims[2], embed_dims[3], with_pos=True, backend=backend)

        # stochastic depth rises linearly from 0 at the first block to drop_path_rate at the last
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        first = [sum(depths[:i]) for i in range(4)]
        for i in range(4):
            setattr(self, f"stage{i + 1}", nn.ModuleList([
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                      drop_path=dpr[first[i] + j], norm_layer=norm_layer, sr_ratio=sr_ratios[i],
                      apply_transform=apply_transform, backend=backend, linear_impl=linear_impl)
                for j in range(depths[i])]))

        self.norm = norm_layer(embed_dims[3])
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        self.min_input_size = (self._min_side(0), self._min_side(1))

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

    # ------------------------------------------------------------------ sizes
    def _embeds(self):
        return (None, self.patch_embed_2, self.patch_embed_3, self.patch_embed_4)

    def _stages(self):
        return (self.stage1, self.stage2, self.stage3, self.stage4)

    def stage_sizes(self, n: int, dim: int = 0) -> list[int] | None:
        """Lengths along height (dim 0) or width (dim 1) of the four stage maps for an input of
        length n, by the convolution arithmetic; None if some convolution (stem, patch embedding,
        or an attention's spatial reduction) would get less than one output pixel."""
        sizes = []
        for conv in (self.stem.conv1, self.stem.conv2, self.stem.conv3):
            n = _conv_out(n, conv, dim)
            if n < 1:
                return None
        for embed, stage in zip(self._embeds(), self._stages()):
            if embed is not None:
                n = _conv_out(n, embed.conv, dim)
                if n < 1:
                    return None
            for blk in stage:
                if blk.attn.sr_ratio > 1 and _conv_out(n, blk.attn.sr, dim) < 1:
                    return None
            sizes.append(n)
        return sizes

    def _min_side(self, dim: int) -> int:
        for n in range(1, _MAX_MIN_SIDE + 1):
            if self.stage_sizes(n, dim) is not None:
                return n
        raise ValueError("this ResT configuration accepts no input size")  # pragma: no cover

    def _check_input(self, x):
        _checks.input_tensor("x", x, 4, "(B, C, H, W) images", self.stem.conv1.in_channels, 1,
                             self.stem.conv1.weight)
        H, W = x.shape[-2:]
        min_h, min_w = self.min_input_size
        if H < min_h or W < min_w:
            raise ValueError(f"x: input size {H}x{W} is too small: this ResT needs at least {min_h}x{min_w} "
                             f"(height x width) so that every stage has at least one pixel")
        if self.training and x.shape[0] == 1:
            # BatchNorm in training needs more than one value per channel; the stage-4 map is the smallest
            last = (self.stage_sizes(H, 0) or [0])[-1] * (self.stage_sizes(W, 1) or [0])[-1]
            if last == 1:
                raise ValueError(f"x: a batch of 1 image of {H}x{W} gives a 1x1 stage-4 map, on which BatchNorm "
                                 "cannot train (one value per channel); use a batch of at least 2, a larger "
                                 "input, or model.eval()")

    def _prepare_input(self, x):
        """The checked images in the memory layout that the model's cpu_layout option and rest/layout.py's
        rule give them (every later map follows from it)."""
        self._check_input(x)
        return layout.to_model_layout(x, self.stem.conv1.weight, self.backend, self.cpu_layout)

    # ------------------------------------------------------------------ forward
    def forward_stages(self, x) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Tokens of each stage as its last block leaves them: four (tokens (B, H_i*W_i, C_i),
        (H_i, W_i)) pairs. Stage 4 is before the final norm (as the official blocks output it)."""
        x = self._prepare_input(x)
        out = []
        m = self.stem(x)
        for embed, stage in zip(self._embeds(), self._stages()):
            if embed is not None:
                # back to a map for the PatchEmbed: a view when the tokens are contiguous (B, N, C)
                m = embed(self._to_map(*out[-1]))
            B, C, H, W = m.shape  # the convolution's real output size, for any input size
            t = m.flatten(2).transpose(1, 2)
            for blk in stage:
                t = blk(t, H, W)
            out.append((t, (H, W)))
        return out

    @staticmethod
    def _to_map(t, hw):
        B, _, C = t.shape
        return t.transpose(1, 2).reshape(B, C, *hw)

    def forward_features(self, x) -> list[torch.Tensor]:
        """The four stage maps (B, C_i, H_i, W_i) at strides 4/8/16/32 (H_i = ceil(H / 2^(i+1)) for
        the stock configuration): stages 1-3 as they leave their blocks, stage 4 after the final
        norm. The maps are views of the token tensors (channels-last strides)."""
        stages = self.forward_stages(x)
        t4, hw4 = stages[3]
        return [self._to_map(t, hw) for t, hw in stages[:3]] + [self._to_map(self.norm(t4), hw4)]

    def forward_head(self, feature):
        """Logits from the final (normed) stage-4 map."""
        return self.head(self.avg_pool(feature).flatten(1))

    def forward(self, x):
        t4, hw4 = self.forward_stages(x)[3]
        return self.forward_head(self._to_map(self.norm(t4), hw4))

    # ------------------------------------------------------------------ utilities
    def reset_classifier(self, num_classes: int):
        """A fresh head for num_classes (Identity for 0), initialised like the official head."""
        self.num_classes = num_classes
        ref = self.norm.weight
        self.head = (nn.Linear(self.embed_dims[3], num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        self.head.apply(self._init_weights)

    def set_backend(self, backend: str | None):
        """Pin every EMSA, PA and linear layer of the model to `backend` (None: follow the current
        default)."""
        name = rest_kernels.check_backend_name(backend) if backend is not None else None
        self.backend = name
        for m in self.modules():
            if isinstance(m, (EMSA, PA, Linear)):
                m.backend = name
        return self


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


def _build(variant: str, pretrained, kwargs) -> ResT:
    cfg = {**_COMMON, **_VARIANTS[variant]}
    fixed = sorted(set(kwargs) & set(cfg))
    if fixed:
        raise TypeError(f"{variant}() fixes {', '.join(fixed)}; build ResT(...) directly for another configuration")
    model = ResT(**cfg, **kwargs)
    if pretrained is True:
        raise ValueError(f"{variant}(pretrained=True): no download location is built in; pass the path of an "
                         "official checkpoint file (or a loaded state_dict) as pretrained=")
    if pretrained is not None and pretrained is not False:
        load_checkpoint(model, pretrained)
    return model


# Every constructor: pretrained = None (the official random init), or an official checkpoint: a file
# path (a plain state_dict, or one under "model" / "state_dict", "module." prefixes allowed) or an
# already loaded dict; loaded strictly (rest.checkpoint.load_checkpoint). Other keyword arguments go
# to ResT (num_classes, drop_path_rate, drop_rate, attn_drop_rate, qk_scale, in_chans, backend, cpu_layout,
# linear_impl, ...).
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
