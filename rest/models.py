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

import numbers

import torch
import torch.nn as nn

import rest_kernels

from . import _checks, layout
from .checkpoint import load_checkpoint
from .dense import Linear, check_linear_impl
from .layers import BasicStem, Block, LayerNorm2d, PatchEmbed, Stage
from .modules import EMSA, PA

__all__ = ["ResT", "rest_lite", "rest_small", "rest_base", "rest_large", "VARIANTS", "variant_config"]

# Largest side searched for the minimum input size; beyond any sane configuration.
_MAX_MIN_SIDE = 1 << 14

# (embedding, stage) attribute names in the order the model runs them: the official names
_STAGE_NAMES = (("stem", "stage1"), ("patch_embed_2", "stage2"), ("patch_embed_3", "stage3"),
                ("patch_embed_4", "stage4"))

#: the values of the global_pool option: average pooling, or none (the head sees the map)
GLOBAL_POOLS = ("avg", "")


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
    Both choices read the model's configuration (its device, dtype and options) and the process, not
    the input, so tracing does not change them. The environment variables only steer "auto"; both
    options change results by rounding only.
    """

    def __init__(self, in_chans=3, num_classes=1000, embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8),
                 mlp_ratios=(4, 4, 4, 4), qkv_bias=False, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.0, depths=(2, 2, 2, 2), sr_ratios=(8, 4, 2, 1), norm_layer=nn.LayerNorm,
                 apply_transform=False, backend=None, cpu_layout="auto", linear_impl="auto", global_pool="avg"):
        super().__init__()
        embed_dims, num_heads, mlp_ratios, depths, sr_ratios = _check_config(
            in_chans, num_classes, embed_dims, num_heads, mlp_ratios, qk_scale, drop_rate, attn_drop_rate,
            drop_path_rate, depths, sr_ratios)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = _checks.choice("global_pool", global_pool, GLOBAL_POOLS)
        self.embed_dims = list(embed_dims)
        self.depths = list(depths)
        self.apply_transform = apply_transform
        self.backend = rest_kernels.check_backend_name(backend) if backend is not None else None
        self.cpu_layout = layout.check_cpu_layout(cpu_layout)
        self.linear_impl = check_linear_impl(linear_impl)
        # stages the model runs: 4, fewer after prune_intermediate_layers
        self.num_stages = 4
        self.num_features = self.head_hidden_size = embed_dims[3]

        self.stem = BasicStem(in_ch=in_chans, out_ch=embed_dims[0], with_pos=True, backend=backend)
        self.patch_embed_2 = PatchEmbed(2, embed_dims[0], embed_dims[1], with_pos=True, backend=backend)
        self.patch_embed_3 = PatchEmbed(2, embed_dims[1], embed_dims[2], with_pos=True, backend=backend)
        self.patch_embed_4 = PatchEmbed(2, embed_dims[2], embed_dims[3], with_pos=True, backend=backend)

        # stochastic depth rises linearly from 0 at the first block to drop_path_rate at the last
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        first = [sum(depths[:i]) for i in range(4)]
        for i in range(4):
            setattr(self, f"stage{i + 1}", Stage([
                Block(embed_dims[i], num_heads[i], mlp_ratios[i], qkv_bias, qk_scale, drop_rate, attn_drop_rate,
                      drop_path=dpr[first[i] + j], norm_layer=norm_layer, sr_ratio=sr_ratios[i],
                      apply_transform=apply_transform, backend=backend, linear_impl=linear_impl)
                for j in range(depths[i])]))

        self.norm = _final_norm(norm_layer, embed_dims[3])
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.head = nn.Linear(embed_dims[3], num_classes) if num_classes > 0 else nn.Identity()
        # the stage maps: stride, channels and the module whose output each is (norm: stage 4's map
        # after the final norm)
        self.feature_info = [dict(num_chs=c, reduction=4 * 2 ** i, module=f"stage{i + 1}" if i < 3 else "norm")
                             for i, c in enumerate(embed_dims)]

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

    def __prepare_scriptable__(self):
        _checks.refuse_torchscript(self)

    # ------------------------------------------------------------------ sizes
    def _stage_pairs(self) -> list[tuple[nn.Module, Stage]]:
        """(embedding, stage) of every stage the model runs, in order (the stem embeds stage 1)."""
        return [(getattr(self, e), getattr(self, s)) for e, s in _STAGE_NAMES[:self.num_stages]]

    def stage_sizes(self, n: int, dim: int = 0) -> list[int] | None:
        """Lengths along height (dim 0) or width (dim 1) of the stage maps for an input of length n, by
        the convolution arithmetic; None if some convolution (stem, patch embedding, or an attention's
        spatial reduction) would get less than one output pixel."""
        sizes = []
        for conv in (self.stem.conv1, self.stem.conv2, self.stem.conv3):
            n = _conv_out(n, conv, dim)
            if n < 1:
                return None
        for i, (embed, stage) in enumerate(self._stage_pairs()):
            if i > 0:
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
            # BatchNorm in training needs more than one value per channel; the last stage map is the smallest
            last = (self.stage_sizes(H, 0) or [0])[-1] * (self.stage_sizes(W, 1) or [0])[-1]
            if last == 1:
                raise ValueError(f"x: a batch of 1 image of {H}x{W} gives a 1x1 last stage map, on which "
                                 "BatchNorm cannot train (one value per channel); use a batch of at least 2, a "
                                 "larger input, or model.eval()")

    def _prepare_input(self, x):
        """The checked images in the memory layout that the model's cpu_layout option and rest/layout.py's
        rule give them (every later map follows from it)."""
        if not _checks.symbolic(x):
            self._check_input(x)
        # called through the module: torch.fx.wrap makes the function a leaf in layout's namespace only
        return layout.to_model_layout(x, self.stem.conv1.weight, self.backend, self.cpu_layout)

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
                                 self.stem.conv1.weight)
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
        for embed, stage in _STAGE_NAMES[last + 1:self.num_stages]:
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
        ref = self.stem.conv1.weight
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

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise tools (layer decay, group_parameters): the stem;
        then per stage (coarse) or per block (fine) with each patch embedding in its stage's first
        group; the final norm joins the last group (suffix 99999: timm's "same group as the previous
        one"). The head, matched by none, comes after them (timm's rule)."""
        if coarse:
            blocks = [(r"^patch_embed_(\d+)", None), (r"^stage(\d+)\.", None), (r"^norm", (99999,))]
        else:
            blocks = [(r"^patch_embed_(\d+)", (0,)), (r"^stage(\d+)\.(\d+)", None), (r"^norm", (99999,))]
        return dict(stem=r"^stem", blocks=blocks)

    def no_weight_decay(self) -> set[str]:
        """Parameters to exempt from weight decay beyond the 1-d ones (biases, norms), which timm's
        optimizer factory and the official recipe already exempt: none (ResT has no position
        embedding tables or tokens; PA's position information is a convolution's weight)."""
        return set()

    def set_backend(self, backend: str | None):
        """Pin every EMSA, PA and linear layer of the model to `backend` (None: follow the current
        default)."""
        name = rest_kernels.check_backend_name(backend) if backend is not None else None
        self.backend = name
        for m in self.modules():
            if isinstance(m, (EMSA, PA, Linear)):
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
    cfg = variant_config(variant)
    fixed = sorted(set(kwargs) & set(cfg))
    if fixed:
        raise TypeError(f"{variant}() fixes {', '.join(fixed)}; build ResT(...) directly for another configuration "
                        f"(or timm.create_model({variant!r}, ...), which takes overrides)")
    if pretrained is True:
        raise ValueError(f"{variant}(pretrained=True): no download location is built in; pass the path of an "
                         "official checkpoint file (or a loaded state_dict) as pretrained=")
    model = ResT(**cfg, **kwargs)
    if pretrained is not None and pretrained is not False:
        load_checkpoint(model, pretrained)
    return model


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
