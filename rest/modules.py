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

import rest_kernels

from . import _checks
from .dense import Linear, check_linear_impl

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


class EMSA(nn.Module):
    """Efficient multi-head self-attention: q from x; k, v from a depthwise strided conv of the token
    map (kernel sr+1, stride sr, pad sr//2) plus LayerNorm; with more than one head and
    apply_transform, a 1x1 conv mixes the logits across heads and InstanceNorm follows the softmax.

    backend: pins the rest_kernels backend of the attention (None: the current default).
    linear_impl: the product of the q, kv and proj layers, "auto" (default), "onednn" or "aten"
    (nn.Linear's F.linear); see rest/dense.py."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.,
                 sr_ratio=1, apply_transform=False, backend=None, linear_impl="auto"):
        super().__init__()
        dim = _checks.integer("dim", dim)
        num_heads = _checks.integer("num_heads", num_heads)
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        sr_ratio = _checks.integer("sr_ratio", sr_ratio)  # 0 or a negative ratio used to mean "no reduction"
        _checks.probability("attn_drop", attn_drop)
        _checks.probability("proj_drop", proj_drop)
        if qk_scale is not None:
            _checks.real("qk_scale", qk_scale)
        self.dim = dim
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.backend = rest_kernels.check_backend_name(backend) if backend is not None else None
        linear_impl = check_linear_impl(linear_impl)

        # rest.dense.Linear: nn.Linear whose CPU float32 inference runs on oneDNN (see rest/dense.py)
        self.q = Linear(dim, dim, bias=qkv_bias, backend=backend, linear_impl=linear_impl)
        self.kv = Linear(dim, dim * 2, bias=qkv_bias, backend=backend, linear_impl=linear_impl)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim, backend=backend, linear_impl=linear_impl)
        self.proj_drop = nn.Dropout(proj_drop)

        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio + 1, stride=sr_ratio, padding=sr_ratio // 2, groups=dim)
            self.sr_norm = nn.LayerNorm(dim)

        self.apply_transform = apply_transform and num_heads > 1
        if self.apply_transform:
            self.transform_conv = nn.Conv2d(num_heads, num_heads, kernel_size=1, stride=1)
            self.transform_norm = nn.InstanceNorm2d(num_heads)

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

    def forward(self, x, H, W):
        if not _checks.symbolic(x):
            self._check_input(x, H, W)
        B, N, C = x.shape
        h = self.num_heads
        d = C // h
        # Views, no copies: (B,N,C) -> (B,h,N,d) with strides of the projection output.
        q = self.q(x).view(B, N, h, d).transpose(1, 2)
        if self.sr_ratio > 1:
            x_ = x.transpose(1, 2).reshape(B, C, H, W)
            x_ = self.sr_norm(self.sr(x_).flatten(2).transpose(1, 2))
        else:
            x_ = x
        kv = self.kv(x_).view(B, x_.shape[1], 2, h, d)  # M explicit: -1 is ambiguous for B = 0
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

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
