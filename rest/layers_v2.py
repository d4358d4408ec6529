"""The building blocks of ResTv2 around its attention: the block, the convolutional stem and the
stage-to-stage patch embedding.

Parameter names and registration order match the official code (github wofmanaf/ResT,
models/rest_v2.py) so that its checkpoints load unchanged and state_dict keys come in the same
order. Where the official stem and embeddings flatten the map to tokens and apply LayerNorm, these
return the (B, C, H, W) map with LayerNorm over its channels (rest.layers.LayerNorm2d, the same
numbers), as ResT's modules do, and the stage sizes are the convolutions' real output sizes (the
official code reports H // 4 and H // 2, wrong for sizes that are not multiples of 32).
"""
from __future__ import annotations

import torch.nn as nn

from .batchnorm import BatchNorm2d
from .layers import DropPath, Mlp, PreNormBlock
from .norms import LayerNorm2d
from .modules import PA, EMSAv2

#: the LayerNorm epsilon of every ResTv2 norm (the official value)
NORM_EPS = 1e-6


class BlockV2(PreNormBlock):
    """ResTv2's block: x + EMSAv2(LN(x)), then x + MLP(LN(x)) with a 4x hidden MLP; biases
    everywhere, LayerNorm eps 1e-6."""

    def __init__(self, dim, num_heads, sr_ratio=1, drop_path=0.0, backend=None, linear_impl="auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = EMSAv2(dim, num_heads=num_heads, sr_ratio=sr_ratio, backend=backend, linear_impl=linear_impl)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, 4 * dim, backend=backend, linear_impl=linear_impl)
        # no module (and so no state_dict entry) either way; Identity keeps the repr honest
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()


class ConvStem(nn.Module):
    """Stride-4 stem: conv3x3/2 -> BN -> ReLU -> conv3x3/2 -> BN -> ReLU -> conv1x1 (as `proj`, an
    nn.Sequential: keys proj.0, proj.1, proj.3, proj.4, proj.6), then PA and LayerNorm over channels."""

    def __init__(self, in_ch=3, out_ch=96, backend=None):
        super().__init__()
        hidden = out_ch // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_ch, hidden, kernel_size=3, stride=2, padding=1, bias=False),
            BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_ch, kernel_size=3, stride=2, padding=1, bias=False),
            BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, kernel_size=1, stride=1))
        self.pos = PA(out_ch, backend=backend)
        self.norm = LayerNorm2d(out_ch, eps=NORM_EPS)

    def forward(self, x):
        return self.norm(self.pos(self.proj(x)))


class PatchEmbedV2(nn.Module):
    """Downsampling between stages: conv (kernel 3, stride 2, padding 1) -> PA -> LayerNorm over
    channels, on a (B, C, H, W) map; returns the new map (ceil(H / 2) x ceil(W / 2))."""

    def __init__(self, in_ch, out_ch, patch_size=2, backend=None):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, out_ch, kernel_size=patch_size + 1, stride=patch_size, padding=patch_size // 2)
        self.pos = PA(out_ch, backend=backend)
        self.norm = LayerNorm2d(out_ch, eps=NORM_EPS)

    def forward(self, x):
        return self.norm(self.pos(self.proj(x)))
