"""What the ResT v1 and v2 model classes share: timm's model protocol and the size arithmetic.

Both families run the same way: a stem and three patch embeddings (convolutions on a (B, C, H, W)
map), each followed by a stage of blocks (rest.layers.Stage), then a final norm over the last map's
channels, average pooling and a linear head. ResTFamily implements everything that reads only that
structure (see rest/models.py's ResT for the protocol's description); a family's class builds its
modules under its official names and says where they are:

- _STAGE_NAMES: (embedding, stage) attribute names in the order the model runs them;
- _EMBED_PREFIX: the patch embeddings' name before their stage number (for group_matcher);
- _BATCHNORM_STAGE: the index of the stage map whose size is the smallest map a BatchNorm sees
  (a batch of one image cannot train BatchNorm on a 1x1 map);
- _stem_convs(): the stem's strided convolutions in order, _embed_conv(embed): an embedding's
  convolution (for the size arithmetic), _first_conv(): the convolution that takes the images;
- _init_weights(m): the family's official init (for the head reset_classifier builds).
"""
from __future__ import annotations

import numbers

import torch
import torch.nn as nn

import rest_kernels

from . import _checks, layout
from .checkpoint import load_checkpoint
from .dense import Linear, check_linear_impl
from .layers import PreNormBlock, Stage
from .lean_mlp import check_mlp_recompute
from .modules import EMSA, PA, EMSAv2

__all__ = ["ResTFamily", "GLOBAL_POOLS", "build_variant"]

# Largest side searched for the minimum input size; beyond any sane configuration.
_MAX_MIN_SIDE = 1 << 14

#: the values of the global_pool option: average pooling, or none (the head sees the map)
GLOBAL_POOLS = ("avg", "")


def _conv_out(n: int, conv: nn.Conv2d, dim: int) -> int:
    """Output length of `conv` along spatial dim 0 (height) or 1 (width) for an input of length n."""
    k, s, p, d = conv.kernel_size[dim], conv.stride[dim], conv.padding[dim], conv.dilation[dim]
    return (n + 2 * p - d * (k - 1) - 1) // s + 1



class ResTFamily(nn.Module):
    """timm's model protocol and the size arithmetic over a family's stem, embeddings and stages
    (see the module docstring for what a subclass provides)."""

    _STAGE_NAMES: tuple[tuple[str, str], ...] = ()
    _EMBED_PREFIX = ""
    _BATCHNORM_STAGE = -1

    def _stem_convs(self) -> list[nn.Conv2d]:
        raise NotImplementedError

    def _embed_conv(self, embed: nn.Module) -> nn.Conv2d:
        raise NotImplementedError

    def _first_conv(self) -> nn.Conv2d:
        return self._stem_convs()[0]

    @staticmethod
    def _init_weights(m):
        raise NotImplementedError

    # ------------------------------------------------------------------ construction
    def _set_options(self, in_chans, num_classes, embed_dims, depths, backend, cpu_layout, linear_impl, global_pool,
                     mlp_recompute="auto"):
        """The attributes of timm's protocol and the model options (checked), before the modules are built."""
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = _checks.choice("global_pool", global_pool, GLOBAL_POOLS)
        self.embed_dims = list(embed_dims)
        self.depths = list(depths)
        self.backend = rest_kernels.check_backend_name(backend) if backend is not None else None
        self.cpu_layout = layout.check_cpu_layout(cpu_layout)
        self.linear_impl = check_linear_impl(linear_impl)
        self.mlp_recompute = check_mlp_recompute(mlp_recompute)
        # stages the model runs: 4, fewer after prune_intermediate_layers
        self.num_stages = 4
        self.num_features = self.head_hidden_size = embed_dims[3]

    def _drop_path_rates(self, drop_path_rate: float) -> list[list[float]]:
        """Per stage, its blocks' stochastic depth: rising linearly from 0 at the first block of the model
        to drop_path_rate at the last (the official schedule)."""
        # on the CPU whatever the default device (a model built under torch.device("meta") too)
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths), device="cpu").tolist()
        first = [sum(self.depths[:i]) for i in range(4)]
        return [dpr[first[i]:first[i] + self.depths[i]] for i in range(4)]

    def _finish(self, norm: nn.Module):
        """After the stem, embeddings and stages: the final norm (a module over the last map's channels,
        so that the normed map is a real module's output), pooling and head, feature_info, the official
        init and the smallest input size."""
        self.norm = norm
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.head = nn.Linear(self.embed_dims[3], self.num_classes) if self.num_classes > 0 else nn.Identity()
        # the stage maps: stride, channels and the module whose output each is (norm: stage 4's map
        # after the final norm)
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"stage{i + 1}" if i < 3 else "norm")
                             for i, c in enumerate(self.embed_dims)]
        self.apply(self._init_weights)
        self.set_mlp_recompute(self.mlp_recompute)
        self.min_input_size = (self._min_side(0), self._min_side(1))

    def __prepare_scriptable__(self):
        _checks.refuse_torchscript(self)

    # ------------------------------------------------------------------ sizes
    def _stage_pairs(self) -> list[tuple[nn.Module, Stage]]:
        """(embedding, stage) of every stage the model runs, in order (the stem embeds stage 1)."""
        return [(getattr(self, e), getattr(self, s)) for e, s in self._STAGE_NAMES[:self.num_stages]]

    def stage_sizes(self, n: int, dim: int = 0) -> list[int] | None:
        """Lengths along height (dim 0) or width (dim 1) of the stage maps for an input of length n, by
        the convolution arithmetic; None if some convolution (stem, patch embedding, or an attention's
        spatial reduction) would get less than one output pixel."""
        sizes = []
        for conv in self._stem_convs():
            n = _conv_out(n, conv, dim)
            if n < 1:
                return None
        for i, (embed, stage) in enumerate(self._stage_pairs()):
            if i > 0:
                n = _conv_out(n, self._embed_conv(embed), dim)
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
        raise ValueError(f"this {type(self).__name__} configuration accepts no input size")  # pragma: no cover

    def _check_input(self, x):
        _checks.input_tensor("x", x, 4, "(B, C, H, W) images", self._first_conv().in_channels, 1,
                             self._first_conv().weight)
        H, W = x.shape[-2:]
        min_h, min_w = self.min_input_size
        if H < min_h or W < min_w:
            raise ValueError(f"x: input size {H}x{W} is too small: this {type(self).__name__} needs at least {min_h}x{min_w} "
                             f"(height x width) so that every stage has at least one pixel")
        if self.training and x.shape[0] == 1:
            # BatchNorm in training needs more than one value per channel: refused where the smallest map a
            # BatchNorm sees (the stage map _BATCHNORM_STAGE names) is 1x1
            i = self._BATCHNORM_STAGE
            side = (self.stage_sizes(H, 0) or [0])[i] * (self.stage_sizes(W, 1) or [0])[i]
            if side == 1:
                which = "last" if i == -1 else "first"
                raise ValueError(f"x: a batch of 1 image of {H}x{W} gives a 1x1 {which} stage map, on which "
                                 "BatchNorm cannot train (one value per channel); use a batch of at least 2, a "
                                 "larger input, or model.eval()")

    def _prepare_input(self, x):
        """The checked images in the memory layout that the model's cpu_layout option and rest/layout.py's
        rule give them (every later map follows from it)."""
        if not _checks.symbolic(x):
            self._check_input(x)
        # called through the module: torch.fx.wrap makes the function a leaf in layout's namespace only
        return layout.to_model_layout(x, self._first_conv().weight, self.backend, self.cpu_layout)

    # ------------------------------------------------------------------ forward
    def forward_features(self, x):
        """The final normed map (B, C4, H4, W4) (stride 32 for the stock configuration, H4 =
        ceil(H / 32)): stage 4's map after the final norm. A pruned model (prune_intermediate_layers)
        returns its last stage's map."""
        x = self._prepare_input(x)
        for embed, stage in self._stage_pairs():
            x = stage(embed(x))
        return self.norm(x)

    def forward_head(self, x, pre_logits: bool = False):
        """Logits from the final normed map x (B, C, H, W) of forward_features (timm's rule:
        forward_head(forward_features(x)) == forward(x)); pre_logits: the features the head would
        see. global_pool "avg": the channel means (B, C) and logits (B, num_classes); "": the map
        itself, with the head applied to every pixel's channels (B, num_classes, H, W)."""
        if not _checks.symbolic(x):
            _checks.input_tensor("x", x, 4, "(B, C, H, W), the map of forward_features", self.num_features, 1,
                                 self._first_conv().weight)
        if self.global_pool == "avg":
            x = self.avg_pool(x).flatten(1)
            return x if pre_logits else self.head(x)
        if pre_logits:
            return x
        return self.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x, indices=None, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False):
        """The stage maps, as timm's forward_intermediates gives them.

        indices: which stage maps (0-3): None for all, an int n for the last n, or a sequence of
        indices (negative ones count from the end). The maps are stages 1-3 as they leave their
        blocks and stage 4 after the final norm (strides 4/8/16/32); `norm` is accepted for timm's
        interface and changes nothing: stage 4's map always has the final norm, the others have no
        norm of their own. output_fmt: "NCHW" (the maps, channels-last strides) or "NHWC" (their
        permuted views). Returns the list of maps when intermediates_only, else (the final normed map
        as forward_features gives it, the list). With stop_early or intermediates_only the stages
        after the last wanted map are not run (the first item is then the last map computed)."""
        take, last = _take_indices(indices, self.num_stages)
        output_fmt = _checks.choice("output_fmt", output_fmt, ("NCHW", "NHWC"))
        stop = last if (stop_early or intermediates_only) else self.num_stages - 1
        x = self._prepare_input(x)
        maps = []
        for i, (embed, stage) in enumerate(self._stage_pairs()[:stop + 1]):
            x = stage(embed(x))
            if i == self.num_stages - 1:
                x = self.norm(x)
            if i in take:
                maps.append(x if output_fmt == "NCHW" else x.permute(0, 2, 3, 1))
        return maps if intermediates_only else (x, maps)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        """Keep only what the wanted stage maps need (timm's rule; indices as in
        forward_intermediates): the stages after the last wanted one and their embeddings leave the
        model (and their parameters with them), and so does the final norm when stage 4 goes; the
        head is reset to Identity with global_pool "" when prune_head or when stages go (it was
        sized for the last stage). num_features and head_hidden_size become the last kept stage's
        width. Stage 4's map includes the final norm, so the norm stays while stage 4 is wanted,
        whatever prune_norm says. Returns the absolute indices taken."""
        take, last = _take_indices(indices, self.num_stages)
        pruned_end = last < self.num_stages - 1
        for embed, stage in self._STAGE_NAMES[last + 1:self.num_stages]:
            delattr(self, embed)
            delattr(self, stage)
        if pruned_end:
            self.num_stages = last + 1
            self.norm = nn.Identity()
            self.num_features = self.head_hidden_size = self.embed_dims[last]
            self.min_input_size = (self._min_side(0), self._min_side(1))
        if prune_head or pruned_end:
            self.reset_classifier(0, "")
        return take

    # ------------------------------------------------------------------ classifier and training
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None):
        """A fresh head for num_classes (Identity for 0), initialised like the official head, on the
        model's device and dtype; global_pool: "avg" or "" (None keeps the current one)."""
        num_classes = _checks.integer("num_classes", num_classes, minimum=0)
        if global_pool is not None:
            self.global_pool = _checks.choice("global_pool", global_pool, GLOBAL_POOLS)
        self.num_classes = num_classes
        ref = self._first_conv().weight
        self.head = (nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
                     if num_classes > 0 else nn.Identity())
        self.head.apply(self._init_weights)
        self.head.train(self.training)

    def set_grad_checkpointing(self, enable: bool = True):
        """Run every block under torch.utils.checkpoint while gradients are recorded (less memory,
        one more forward of the blocks in the backward; the same results)."""
        if not isinstance(enable, bool):
            raise TypeError(f"enable must be a bool, got {type(enable).__name__}")
        for _, stage in self._stage_pairs():
            stage.grad_checkpointing = enable

    def set_mlp_recompute(self, mode: str = "auto"):
        """What every block's MLP branch keeps for the backward (rest/lean_mlp.py): "auto" (the
        default: "hidden" on the CPU, "gelu" elsewhere, "none" on the reference backend), "none",
        "gelu" or "hidden". The same results in every mode; "hidden" keeps the least."""
        self.mlp_recompute = check_mlp_recompute(mode)
        for m in self.modules():
            if isinstance(m, PreNormBlock):
                m.mlp_recompute = self.mlp_recompute
        return self

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise tools (layer decay, group_parameters): the stem;
        then per stage (coarse) or per block (fine) with each patch embedding in its stage's first
        group; the final norm joins the last group (suffix 99999: timm's "same group as the previous
        one"). The head, matched by none, comes after them (timm's rule)."""
        if coarse:
            blocks = [(rf"^{self._EMBED_PREFIX}(\d+)", None), (r"^stage(\d+)\.", None), (r"^norm", (99999,))]
        else:
            blocks = [(rf"^{self._EMBED_PREFIX}(\d+)", (0,)), (r"^stage(\d+)\.(\d+)", None), (r"^norm", (99999,))]
        return dict(stem=r"^stem", blocks=blocks)

    def no_weight_decay(self) -> set[str]:
        """Parameters to exempt from weight decay beyond the 1-d ones (biases, norms), which timm's
        optimizer factory and the official recipe already exempt: none (ResT and ResTv2 have no position
        embedding tables or tokens; PA's position information is a convolution's weight)."""
        return set()

    def set_backend(self, backend: str | None):
        """Pin every EMSA, PA and linear layer of the model to `backend` (None: follow the current
        default)."""
        name = rest_kernels.check_backend_name(backend) if backend is not None else None
        self.backend = name
        for m in self.modules():
            if isinstance(m, (EMSA, EMSAv2, PA, Linear)):
                m.backend = name
        return self


def _take_indices(indices, n: int) -> tuple[list[int], int]:
    """The absolute stage indices `indices` selects among n (timm's convention: None all, an int k the
    last k, a sequence those indices, negative ones from the end), and the largest."""
    if indices is None:
        indices = n
    if isinstance(indices, numbers.Integral) and not isinstance(indices, bool):
        if not 0 < indices <= n:
            raise ValueError(f"indices: an int selects the last n of the {n} stage maps, 1 <= n <= {n}; "
                             f"got {indices}")
        take = list(range(n - int(indices), n))
    elif isinstance(indices, (list, tuple)) and indices:
        take = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"indices: stage indices must be ints, got {type(i).__name__} {i!r}")
            if not -n <= i < n:
                raise ValueError(f"indices: stage index {i} is out of range for {n} stage maps "
                                 f"({-n} to {n - 1})")
            take.append(int(i) % n)
    else:
        raise TypeError("indices must be None, an int (the last n stage maps) or a non-empty list / tuple "
                        f"of stage indices; got {indices!r}")
    return take, max(take)


def build_variant(cls, variant: str, cfg: dict, pretrained, kwargs):
    """A published variant: cls(**cfg, **kwargs), then the checkpoint `pretrained` loaded strictly (a
    path or a loaded dict; None / False: the official random init). The variant's own configuration
    cannot be overridden here (that would no longer be the variant)."""
    fixed = sorted(set(kwargs) & set(cfg))
    if fixed:
        raise TypeError(f"{variant}() fixes {', '.join(fixed)}; build {cls.__name__}(...) directly for another "
                        f"configuration (or timm.create_model({variant!r}, ...), which takes overrides)")
    if pretrained is True:
        raise ValueError(f"{variant}(pretrained=True): no download location is built in; pass the path of an "
                         "official checkpoint file (or a loaded state_dict) as pretrained=")
    model = cls(**cfg, **kwargs)
    if pretrained is not None and pretrained is not False:
        load_checkpoint(model, pretrained)
    return model
