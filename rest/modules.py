"""ResT's attention (EMSA) and position gate (PA) as drop-in modules over the fused ops.

Same parameters, state_dict keys and math as the official `Attention` and `PA` modules of
ResT (Zhang & Yang, NeurIPS 2021); the attention core and the gate go through
rest_kernels.emsa_attention / pa_gate and so through the chosen backend.
"""
from __future__ import annotations

import logging
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

import rest_kernels

from . import _checks
from .dense import Linear, check_linear_impl
from .norms import layer_norm

logger = logging.getLogger("rest_kernels")
_warned_attn_drop = False


# The ops as leaf functions for torch.fx (torch.fx.wrap): a symbolic trace records one call of each
# instead of tracing into rest_kernels (whose argument checks and backend choice need real tensors),
# and the traced module calls the op, with the current backend choice, when it runs.
@torch.fx.wrap
def attention(q, k, v, mix_weight, mix_bias, scale: float, eps: float, backend: str | None):
    return rest_kernels.emsa_attention(q, k, v, mix_weight, mix_bias, scale=scale, eps=eps, backend=backend)


@torch.fx.wrap
def attention_map(q, k, mix_weight, mix_bias, scale: float, eps: float):
    return rest_kernels.emsa_attention_map(q, k, mix_weight, mix_bias, scale=scale, eps=eps)


@torch.fx.wrap
def position_gate(x, weight, bias, backend: str | None):
    return rest_kernels.pa_gate(x, weight, bias, backend=backend)


class _ReducedAttention(nn.Module):
    """What ResT's EMSA and ResTv2's attention share: the configuration checks, the input checks, and
    q from the tokens with k, v from the spatially reduced tokens (depthwise strided conv `sr` of
    kernel sr+1, stride sr, padding sr//2, then LayerNorm `sr_norm`; no reduction at sr_ratio 1).
    Each subclass registers its modules itself, in its official order (the state_dict key order)."""

    def _configure(self, dim, num_heads, sr_ratio, qk_scale, backend, linear_impl) -> str:
        dim = _checks.integer("dim", dim)
        num_heads = _checks.integer("num_heads", num_heads)
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        sr_ratio = _checks.integer("sr_ratio", sr_ratio)  # 0 or a negative ratio used to mean "no reduction"
        if qk_scale is not None:
            _checks.real("qk_scale", qk_scale)
        self.dim = dim
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.sr_ratio = sr_ratio
        self.backend = rest_kernels.check_backend_name(backend) if backend is not None else None
        return check_linear_impl(linear_impl)

    def __prepare_scriptable__(self):
        _checks.refuse_torchscript(self)

    def _check_input(self, x, H, W):
        _checks.input_tensor("x", x, 3, "(B, N, dim)", self.dim, 2, self.q.weight)
        for name, n in (("H", H), ("W", W)):
            # ints; SymInts under torch.compile; 0-dim tensors while TorchScript traces (ONNX export),
            # whose values are not compared here (that would bake them into the trace)
            if isinstance(n, bool) or not isinstance(n, (numbers.Integral, torch.SymInt, torch.Tensor)):
                raise TypeError(f"{name} must be an int (the token map's height / width), got {type(n).__name__}")
            if not isinstance(n, torch.Tensor) and n < 1:
                raise ValueError(f"{name} must be >= 1, got {n}")
        N = x.shape[1]
        if N != H * W:
            raise ValueError(f"x has {N} tokens but H*W = {H}*{W} = {H * W}")

    def _qkv(self, x, H, W):
        """q (B, h, N, d) from the tokens x (B, N, C) of an H x W map; k, v (B, h, M, d) from its reduced
        tokens; and the reduced map's (height, width), the sr conv's real output size. All three are
        views of the projection outputs (strides of (B, N, h, d)), no copies."""
        B, N, C = x.shape
        h = self.num_heads
        d = C // h
        q = self.q(x).view(B, N, h, d).transpose(1, 2)
        if self.sr_ratio > 1:
            x_ = self.sr(tokens_to_map(x, H, W))
            Hr, Wr = x_.shape[-2:]
            x_ = layer_norm(self.sr_norm, map_to_tokens(x_), self.backend)
        else:
            x_, Hr, Wr = x, H, W
        kv = self.kv(x_).view(B, x_.shape[1], 2, h, d)  # M explicit: -1 is ambiguous for B = 0
        return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), (Hr, Wr)


# The map <-> token views. Why not x.flatten(2).transpose(1, 2), the same values: at batch 1 the
# flatten of a channels-last map gives the tokens' size-1 batch dimension stride C instead of C*H*W;
# the blocks keep it (each residual add takes the layout of its first operand, the tokens), the map
# viewed back from them has it too, and no layout check recognises such a map (suggest_memory_format
# answers "contiguous"): the next convolution copied it to NCHW and every later map of the model lost
# channels-last (found 2026-12-05: rest_base batch 1 float32 made 47 copies per call, before
# LayerNorms and convolutions). Through (B, H, W, C) every stride stays canonical (tests/test_models.py
# holds every convolution's and LayerNorm's input to it, at batch 1 and 2).
def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """The tokens (B, H*W, C) of the map x (B, C, H, W), as a view (contiguous when x is channels-last)."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


def tokens_to_map(t: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The (B, C, H, W) map of the tokens t (B, H*W, C), as a view: channels-last strides when t is
    contiguous (the models' CPU layout), NCHW ones when t came from an NCHW map."""
    B, _, C = t.shape
    return t.reshape(B, H, W, C).permute(0, 3, 1, 2)


class EMSA(_ReducedAttention):
    """Efficient multi-head self-attention: q from x; k, v from a depthwise strided conv of the token
    map (kernel sr+1, stride sr, pad sr//2) plus LayerNorm; with more than one head and
    apply_transform, a 1x1 conv mixes the logits across heads and InstanceNorm follows the softmax.

    backend: pins the rest_kernels backend of the attention (None: the current default).
    linear_impl: the product of the q, kv and proj layers, "auto" (default), "onednn" or "aten"
    (nn.Linear's F.linear); see rest/dense.py."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.,
                 sr_ratio=1, apply_transform=False, backend=None, linear_impl="auto"):
        super().__init__()
        _checks.probability("attn_drop", attn_drop)
        _checks.probability("proj_drop", proj_drop)
        linear_impl = self._configure(dim, num_heads, sr_ratio, qk_scale, backend, linear_impl)
        dim, num_heads = self.dim, self.num_heads

        # rest.dense.Linear: nn.Linear whose CPU float32 inference runs on oneDNN (see rest/dense.py)
        self.q = Linear(dim, dim, bias=qkv_bias, backend=backend, linear_impl=linear_impl)
        self.kv = Linear(dim, dim * 2, bias=qkv_bias, backend=backend, linear_impl=linear_impl)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim, backend=backend, linear_impl=linear_impl)
        self.proj_drop = nn.Dropout(proj_drop)

        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio + 1, stride=sr_ratio, padding=sr_ratio // 2, groups=dim)
            self.sr_norm = nn.LayerNorm(dim)

        self.apply_transform = apply_transform and num_heads > 1
        if self.apply_transform:
            self.transform_conv = nn.Conv2d(num_heads, num_heads, kernel_size=1, stride=1)
            self.transform_norm = nn.InstanceNorm2d(num_heads)

    def forward(self, x, H, W):
        if not _checks.symbolic(x):
            self._check_input(x, H, W)
        B, N, C = x.shape
        q, k, v, _ = self._qkv(x, H, W)

        mix_weight = self.transform_conv.weight if self.apply_transform else None
        mix_bias = self.transform_conv.bias if self.apply_transform else None
        eps = self.transform_norm.eps if self.apply_transform else 1e-5
        if self.training and self.attn_drop.p > 0:
            out = self._forward_with_attn_dropout(q, k, v, mix_weight, mix_bias, eps)
        else:
            out = attention(q, k, v, mix_weight, mix_bias, self.scale, eps, self.backend)
        x = out.transpose(1, 2).reshape(B, N, C)  # a view: the op lays its output out as (B,N,h,d)
        return self.proj_drop(self.proj(x))

    def _forward_with_attn_dropout(self, q, k, v, mix_weight, mix_bias, eps):
        """Dropout on the N x M map needs the map itself (rest_kernels.emsa_attention_map, the official
        eager math), logged once."""
        global _warned_attn_drop
        if not _warned_attn_drop:
            _warned_attn_drop = True
            logger.warning("EMSA: attn_drop=%s in training needs the N x M map; using the reference math "
                           "instead of a fused backend", self.attn_drop.p)
        attn = attention_map(q, k, mix_weight, mix_bias, self.scale, eps)
        return self.attn_drop(attn) @ v


class EMSAv2(_ReducedAttention):
    """ResTv2's attention (the official `Attention` of models/rest_v2.py, same parameters, state_dict
    keys and math): plain softmax attention of q from x over k, v from the reduced map (as EMSA, with
    LayerNorm eps 1e-6 and biased q / kv, no head mix), plus the "up" branch, which restores the
    values' detail lost by the reduction: v as its reduced (Hr, Wr) map, a depthwise 3x3 conv to
    sr^2 channels per channel and PixelShuffle(sr) back to the full grid, then LayerNorm (up_norm),
    added to the attention output before proj.

    Any token map size (the official code needs H and W to be multiples of sr_ratio): the reduced map
    is the sr conv's real output, ceil(H / sr) x ceil(W / sr) for the even ratios of the published
    models, so the up branch yields (Hr * sr, Wr * sr), at least H x W; its top-left H x W window is
    kept. Reduced pixel i is the conv window centred on input row i * sr, and PixelShuffle writes it
    to rows i * sr ... i * sr + sr - 1: cropping at the bottom and right keeps that alignment, drops
    only rows and columns past the image, and is no crop at all where the official code runs (H, W
    multiples of sr), so it equals the official result there. An odd ratio > 1 (no published model
    has one) can give fewer rows than H: the missing bottom rows / right columns of the up branch are
    zeros before up_norm.

    backend: pins the rest_kernels backend of the attention (None: the current default).
    linear_impl: the product of the q, kv and proj layers, see rest/dense.py."""

    def __init__(self, dim, num_heads=8, sr_ratio=1, backend=None, linear_impl="auto"):
        super().__init__()
        linear_impl = self._configure(dim, num_heads, sr_ratio, None, backend, linear_impl)
        dim, sr_ratio = self.dim, self.sr_ratio
        # registration order = the official state_dict key order
        self.q = Linear(dim, dim, bias=True, backend=backend, linear_impl=linear_impl)
        self.kv = Linear(dim, dim * 2, bias=True, backend=backend, linear_impl=linear_impl)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio + 1, stride=sr_ratio, padding=sr_ratio // 2, groups=dim)
            self.sr_norm = nn.LayerNorm(dim, eps=1e-6)
        self.up = nn.Sequential(
            nn.Conv2d(dim, sr_ratio * sr_ratio * dim, kernel_size=3, stride=1, padding=1, groups=dim),
            nn.PixelShuffle(upscale_factor=sr_ratio))
        self.up_norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = Linear(dim, dim, backend=backend, linear_impl=linear_impl)

    def forward(self, x, H, W):
        if not _checks.symbolic(x):
            self._check_input(x, H, W)
        B, N, C = x.shape
        q, k, v, (Hr, Wr) = self._qkv(x, H, W)
        # mix None: plain softmax attention (eps unused)
        out = attention(q, k, v, None, None, self.scale, 1e-5, self.backend)
        out = out.transpose(1, 2).reshape(B, N, C)  # a view: the op lays its output out as (B,N,h,d)
        # v (B, h, M, d) is a view of the kv output (B, M, 2, h, d): its (B, M, C) tokens as a
        # channels-last (B, C, Hr, Wr) map, channel h * d + j as in the official reshape (a view; not
        # dense, k and v interleave, so the conv makes its own channels-last copy of these M x C values)
        v_map = v.transpose(1, 2).reshape(B, Hr, Wr, C).permute(0, 3, 1, 2)
        up = self._fit(self.up(v_map), H, W)
        return self.proj(out + layer_norm(self.up_norm, map_to_tokens(up), self.backend))

    def _fit(self, up, H, W):
        """The up branch's (B, C, Hr * sr, Wr * sr) map cut (or, for an odd sr, zero-padded) to H x W
        (see the class docstring)."""
        if self.sr_ratio > 1 and self.sr_ratio % 2 == 1:
            up = F.pad(up, (0, max(0, W - up.shape[-1]), 0, max(0, H - up.shape[-2])))
        return up[:, :, :H, :W]


class PA(nn.Module):
    """Pixel attention: x * sigmoid(depthwise 3x3 conv(x))."""

    def __init__(self, dim, backend=None):
        super().__init__()
        dim = _checks.integer("dim", dim)
        self.pa_conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.backend = rest_kernels.check_backend_name(backend) if backend is not None else None

    def __prepare_scriptable__(self):
        _checks.refuse_torchscript(self)

    def forward(self, x):
        if not _checks.symbolic(x):
            _checks.input_tensor("x", x, 4, "(B, dim, H, W)", self.pa_conv.in_channels, 1, self.pa_conv.weight)
        return position_gate(x, self.pa_conv.weight, self.pa_conv.bias, self.backend)
