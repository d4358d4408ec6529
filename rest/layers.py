"""The building blocks of ResT v1 around the attention: stochastic depth, the MLP, the encoder
block, a stage of blocks, the convolutional stem, the stage-to-stage patch embedding and the final
norm over a map's channels.

Parameter names match the official code (github wofmanaf/ResT, models/rest.py) so that its
checkpoints load unchanged. Stage sizes are always read from a convolution's actual output, so
any input height and width works (the official PatchEmbed reports H // 2, which is wrong for odd
sizes, where its stride-2 convolution yields ceil(H / 2)).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .batchnorm import BatchNorm2d
from .dense import Linear, linear_gelu
from .lean_mlp import eligible, norm_mlp, resolve_mlp_recompute
from .modules import EMSA, PA, map_to_tokens, tokens_to_map
from .norms import LayerNorm2d, add_layer_norm, kernel_applies, layer_norm  # noqa: F401  (LayerNorm2d: re-exported, it lived here)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch with probability p and scale the
    kept ones by 1 / (1 - p), so the branch's expectation is unchanged."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    # one Bernoulli draw per sample, broadcast over every other dim
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Module form of drop_path (no parameters)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1); got {p}")
        self.p = float(p)

    def forward(self, x):
        return drop_path(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout, over the last dim. On the CPU in float32 inference
    fc1 and the GELU are one oneDNN matmul where fc1 takes the oneDNN path (linear_impl "auto" or
    "onednn"; see rest/dense.py)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, backend=None, linear_impl="auto"):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim, backend=backend, linear_impl=linear_impl)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_dim, dim, backend=backend, linear_impl=linear_impl)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(linear_gelu(self.fc1, self.act, x))))


class PreNormBlock(nn.Module):
    """A pre-norm transformer block on tokens (B, H*W, C): x + attn(norm1(x), H, W), then
    x + mlp(norm2(x)), each residual branch under stochastic depth. Subclasses build the modules.

    mlp_recompute: what the MLP branch keeps for the backward, one of rest.lean_mlp.MLP_RECOMPUTE
    ("auto" by default; the models set it from their option of that name): the same results, less
    memory for "gelu" and "hidden" (see rest/lean_mlp.py)."""

    mlp_recompute = "auto"

    def forward(self, x, H: int, W: int):
        backend = self.attn.backend
        a = self.drop_path(self.attn(layer_norm(self.norm1, x, backend), H, W))
        if kernel_applies(self.norm2, x, a, backend):
            # inference on the CPU: the residual add and norm2 in one pass (rest/norms.py)
            x, n = add_layer_norm(self.norm2, x, a, backend)
            return x + self.drop_path(self.mlp(n))
        x = x + a
        return x + self.drop_path(self._mlp_branch(x))

    def _mlp_branch(self, x):
        # eligible() first: it refuses torch.fx proxies before anything reads a (proxied) parameter
        if eligible(x, self.norm2, self.mlp):
            mode = resolve_mlp_recompute(self.mlp_recompute, self.mlp.fc1)
            if mode != "none":
                return norm_mlp(x, self.norm2, self.mlp, mode)
        return self.mlp(layer_norm(self.norm2, x, self.attn.backend))


class Block(PreNormBlock):
    """ResT's block: EMSA and the MLP. linear_impl: the product of every linear layer of the block
    (EMSA's and the MLP's), see rest/dense.py."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=0.0, norm_layer=nn.LayerNorm, sr_ratio=1,
                 apply_transform=False, backend=None, linear_impl="auto"):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = EMSA(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop,
                         proj_drop=drop, sr_ratio=sr_ratio, apply_transform=apply_transform, backend=backend,
                         linear_impl=linear_impl)
        # no module (and so no state_dict entry) either way; Identity keeps the repr honest
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, backend=backend, linear_impl=linear_impl)


class Stage(nn.ModuleList):
    """A stage's blocks, run on a (B, C, H, W) map: the map's tokens go through the blocks and come
    back as a map. A ModuleList, so the blocks keep the official state_dict keys (stage1.0.attn...);
    a module with a forward, so that the stage's map is the output of a real, called module (what
    timm's hook and fx feature extractors read).

    The output is a view of the last block's (B, H*W, C) tokens (channels-last strides), not a copy.
    grad_checkpointing: while gradients are recorded, each block runs under torch.utils.checkpoint (its
    activations are recomputed in the backward instead of stored). That gives the same results: the
    blocks hold no buffers that a second forward could update twice, and the checkpoint restores the
    RNG state, so stochastic depth and dropout draw the same masks again."""

    def __init__(self, blocks=()):
        super().__init__(blocks)
        self.grad_checkpointing = False

    def forward(self, x):
        B, C, H, W = x.shape  # the convolution's real output size, for any input size
        t = map_to_tokens(x)  # contiguous when x is channels-last
        for blk in self:
            if self.grad_checkpointing and torch.is_grad_enabled():
                t = checkpoint(blk, t, H, W, use_reentrant=False)
            else:
                t = blk(t, H, W)
        return tokens_to_map(t, H, W)


class BasicStem(nn.Module):
    """Stride-4 stem: conv3x3/2 -> BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3/2 -> PA."""

    def __init__(self, in_ch=3, out_ch=64, with_pos=True, backend=None):
        super().__init__()
        hidden = out_ch // 2
        self.conv1 = nn.Conv2d(in_ch, hidden, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm1 = BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, out_ch, kernel_size=3, stride=2, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.with_pos = with_pos
        if with_pos:
            self.pos = PA(out_ch, backend=backend)

    def forward(self, x):
        x = self.act(self.norm1(self.conv1(x)))
        x = self.act(self.norm2(self.conv2(x)))
        x = self.conv3(x)
        return self.pos(x) if self.with_pos else x


class PatchEmbed(nn.Module):
    """Downsampling between stages: conv (kernel s+1, stride s, padding s//2) -> BN -> PA, on a
    (B, C, H, W) map; returns the new map (its H, W are the convolution's real output size)."""

    def __init__(self, patch_size=2, in_ch=3, out_ch=768, with_pos=True, backend=None):
        super().__init__()
        self.patch_size = patch_size
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size=patch_size + 1, stride=patch_size,
                              padding=patch_size // 2)
        self.norm = BatchNorm2d(out_ch)
        self.with_pos = with_pos
        if with_pos:
            self.pos = PA(out_ch, backend=backend)

    def forward(self, x):
        x = self.norm(self.conv(x))
        return self.pos(x) if self.with_pos else x
