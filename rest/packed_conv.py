"""Convolutions that keep oneDNN's blocked copy of their weight, for inference.

Why: on the CPU, F.conv2d hands oneDNN a plain (out, in, kh, kw) weight, which oneDNN reorders into
its blocked layout on every call; where the output map is small the reorder is most of the call.
Measured 2026-12-05 on the 2-core AMD EPYC Zen 4, 2 threads, float32, channels-last input, median
of 30: rest_base's stage-4 patch embedding at batch 1 (384 -> 768, 3x3 stride 2, 14 x 14 input) 3080 ->
1104 us; stage 3's (192 -> 384, 28 x 28) 1350 -> 1138 us; batch 16 (256 -> 512, 14 x 14) 8408 -> 7646 us;
the same results bit for bit. The copy is made for the input's shape (oneDNN's layout for the weight
depends on it) and remade when the shape changes: a model served at one size reorders once, one fed
ever-changing sizes (a detector) reorders each call, as F.conv2d does. rest.optimize_for_inference makes the stem's and the patch embeddings'
convolutions PackedConv2d (rest/inference.py).

The copy is rest.dense.PackedWeight's (rebuilt when the weight changes, empty after deepcopy or
pickling) with oneDNN's convolution reorder. It is used where oneDNN's convolution entry point gives
what F.conv2d gives: no gradient recorded, a CPU channels-last 4-D input of the weight's dtype
(float32, or bfloat16 where oneDNN has a bfloat16 path), zero padding given as numbers, and no
torch.compile / export / ONNX export running (they get the standard convolution). Otherwise the
layer is nn.Conv2d. conv2d() is a torch.fx leaf, like rest.dense.linear.

Depthwise convolutions (one filter per channel, dilation 1: EMSA's key/value reduction `sr`) run the
cpu backend's own depthwise_conv2d kernel instead (csrc/cpu/depthwise_conv.cpp, whose header has the
measurements) for float32 inference where rest.dense's rule for its own kernels holds
(packed_kernel_unavailable_reason() is None: AVX2 CPUs, PACKED_KERNEL_ON), on the weight's taps
(kh * kw, C), made once. The conditions are those of the oneDNN copy above, except that any input
layout is taken (the output is channels-last) and torch.compile traces the kernel too (not
torch.export or ONNX export): the graph makes the taps from the graph constant, which inductor's
freezing folds, so they are made once, at compile time, as packed_linear's panels
(rest.dense.compiled_kernel_applies). Elsewhere they keep oneDNN's copy, as any other layer.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dense import (PACKED_ATTR, PackedWeight, kernel_pack, onednn_bf16_unavailable_reason,
                    onednn_unavailable_reason, packed_kernel_unavailable_reason)

__all__ = ["PackedConv2d", "conv2d"]


@kernel_pack
def depthwise_taps(weight: torch.Tensor) -> torch.Tensor:
    """depthwise_conv2d's taps (kh * kw, C) of a (C, 1, kh, kw) weight (a PackedWeight pack function)."""
    return weight.reshape(weight.shape[0], -1).t().contiguous()


def register_kernel_fakes() -> None:
    """The depthwise kernel's shape function (called once, by rest.dense, where the kernels load): the
    output (B, C, Ho, Wo) with channels-last strides, as the kernel makes it."""

    @torch.library.register_fake("rest_kernels_C::depthwise_conv2d")
    def _fake_depthwise(x, taps, bias, kernel_size, stride, padding):
        B, C, H, W = x.shape
        Ho = (H + 2 * padding[0] - kernel_size[0]) // stride[0] + 1
        Wo = (W + 2 * padding[1] - kernel_size[1]) // stride[1] + 1
        return x.new_empty((B, Ho, Wo, C)).permute(0, 3, 1, 2)


def depthwise_kernel_takes(conv: nn.Conv2d) -> bool:
    """Whether from_conv gives this layer the depthwise kernel's taps (module docstring): one filter per
    channel, dilation 1, float32, and rest.dense's rule for the cpu backend's own kernels holds now."""
    return (conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
            and tuple(conv.dilation) == (1, 1) and conv.weight.dtype == torch.float32
            and packed_kernel_unavailable_reason() is None)


def _kernel_path(x: torch.Tensor, weight: torch.Tensor, packed) -> bool:
    """Whether this call runs the cpu backend's depthwise kernel on the weight's taps."""
    if packed is None or not packed.for_kernel:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return False
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32
            and weight.dtype == torch.float32)


def _reorder(weight: torch.Tensor, input_shape: tuple, padding, stride, dilation, groups) -> torch.Tensor:
    # input_shape: the layout oneDNN picks depends on it; without it (None) the copy is in a layout
    # the call then reorders again, slower than no copy (measured: 5.2 vs 1.2 ms at 96 -> 192, 56 x 56)
    return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), list(padding), list(stride), list(dilation),
                                                     groups, list(input_shape))


def _packed_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    packed = getattr(weight, PACKED_ATTR, None)
    if packed is None or packed.for_kernel:  # a kernel's copy is not oneDNN's (a weight cast after packing)
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        return False
    if x.device.type != "cpu" or x.dim() != 4 or x.dtype != weight.dtype:
        return False
    if not x.is_contiguous(memory_format=torch.channels_last):
        return False  # oneDNN's entry point returns NCHW maps in its own format otherwise
    if weight.dtype == torch.bfloat16:
        return onednn_bf16_unavailable_reason() is None
    return weight.dtype == torch.float32 and onednn_unavailable_reason() is None


@torch.fx.wrap
def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
           groups: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups), on the weight's PackedWeight where
    the module docstring's conditions hold: the cpu backend's depthwise kernel where the copy is its
    taps, else oneDNN's convolution."""
    packed = getattr(weight, PACKED_ATTR, None)
    if _kernel_path(x, weight, packed):
        # compiled: the taps are traced on the graph constant and folded by freezing (module docstring)
        taps = packed.pack(weight) if torch.compiler.is_compiling() else packed.get(weight)
        return torch.ops.rest_kernels_C.depthwise_conv2d(x, taps, bias, list(weight.shape[-2:]), list(stride),
                                                         list(padding))
    if _packed_path(x, weight):
        packed = getattr(weight, PACKED_ATTR).get(weight, tuple(x.shape))  # remade when the input shape changes
        return torch.ops.mkldnn._convolution_pointwise(x, packed, bias, list(padding), list(stride), list(dilation),
                                                       groups, "none", [], "")
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class PackedConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict) whose inference calls use a kept oneDNN copy of
    the weight (module docstring). Made by from_conv, sharing the convolution's parameters."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> nn.Conv2d:
        """A PackedConv2d with conv's parameters, or conv itself where packing does not apply
        (padding given as a string, a padding mode other than zeros, another subclass). Its copy: the
        depthwise kernel's taps where the module docstring's rule takes a depthwise layer (decided now,
        by the weight's dtype and the process), else oneDNN's."""
        if type(conv) is not nn.Conv2d or isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            return conv
        if depthwise_kernel_takes(conv):
            pack = depthwise_taps
        else:
            pack = functools.partial(_reorder, padding=tuple(conv.padding), stride=tuple(conv.stride),
                                     dilation=tuple(conv.dilation), groups=conv.groups)
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)  # the same parameters, buffers, hooks and options
        setattr(new.weight, PACKED_ATTR, PackedWeight(pack))
        return new

    def forward(self, x):
        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
