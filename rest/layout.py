"""The memory layout of the ResT models' maps on the CPU: channels-last (NHWC) or NCHW.

Why channels-last: on the CPU oneDNN's convolutions are much faster on channels-last maps than on
NCHW ones (measured 2026-11-30 on a 2-core AVX2 EPYC, 2 threads, batch 16, rest_lite's convolutions:
the 3-channel stem conv 38 -> 6 ms, the 32-channel 3x3 conv 79 -> 29 ms, the patch embeddings
21-23 -> 15-18 ms), and channels-last is the token layout itself: a (B, C, H, W) channels-last map
and the contiguous (B, H*W, C) tokens are the same memory, so the map <-> token reshapes between the
convolutions and the blocks become views instead of copies (rest/modules.py map_to_tokens /
tokens_to_map, which keep the strides canonical at batch 1 too: otherwise every map after stage 1
went NCHW at batch 1). PA keeps the layout (rest_kernels'
pa_gate returns channels-last results for channels-last inputs).

The model puts CPU images into one layout before the stem, and every later map follows from it. The
model's `cpu_layout` option says which:
- "channels_last": channels-last, for a CPU model of any floating dtype;
- "contiguous": NCHW-contiguous (channels-last images are copied to NCHW), the official layout;
- "auto" (the default): channels-last when all of the following hold, otherwise the images stay as
  they are given (NCHW images: the official code's layout):
  - the model's rest_kernels backend (its `backend`, else the current default) is not "reference":
    the reference model stays the official eager math, the benchmarks' baseline;
  - the model is a float32 or bfloat16 CPU model (its parameters' dtype and device, which its input
    must match) and torch has oneDNN (bfloat16: where oneDNN has a bfloat16 path on this CPU,
    torch.ops.mkldnn._is_mkldnn_bf16_supported(); a model cast for inference, whose convolutions gain as
    much, measured 2026-12-05 on the Zen 4 EPYC, 2 threads, rest_lite batch 16 in bfloat16: the
    32-channel stem conv 11.4 -> 8.6 ms, the 3-channel one 3.2 -> 1.4 ms, the whole model 253 -> 218 ms, interleaved, median of 7);
  - REST_KERNELS_CHANNELS_LAST is not "0" (the switch for comparisons; the explicit values ignore it).
Models on other devices leave their images as they are. The choice reads the model's configuration
and the process, never the images, so tracing cannot change it: torch.compile, torch.export and ONNX
record the same layout conversion as eager runs, and torch.fx records one call of to_model_layout()
(a leaf function), which decides again, identically, when the traced module runs. The results are the
same up to float32 rounding (another convolution algorithm); tests/test_models.py compares both
layouts. images_memory_format() is the one place where the layout is chosen.
"""
from __future__ import annotations

import os

import torch

from . import _checks
from .dense import on_reference_backend

#: set to "0" to keep the maps of models whose cpu_layout is "auto" as the images come (NCHW)
ENV_VAR = "REST_KERNELS_CHANNELS_LAST"

#: the values of the cpu_layout option ("auto" is the default)
CPU_LAYOUTS = ("auto", "channels_last", "contiguous")

# a property of the torch build; read once (torch.compile cannot trace the query itself)
_HAS_ONEDNN = torch.backends.mkldnn.is_available()
# bfloat16 models go channels-last only where oneDNN has a bfloat16 path (where it was measured)
_HAS_ONEDNN_BF16 = _HAS_ONEDNN and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_cpu_layout(cpu_layout) -> str:
    """cpu_layout if it is one of CPU_LAYOUTS, else TypeError / ValueError naming the argument."""
    return _checks.choice("cpu_layout", cpu_layout, CPU_LAYOUTS)


def images_memory_format(device: torch.device, dtype: torch.dtype, backend: str | None,
                         cpu_layout: str) -> torch.memory_format | None:
    """The memory format a ResT model on `device` with parameters of `dtype` and these options gives
    its images before the stem; None: the images stay as they are. backend: the model's pinned
    backend (None: the current default)."""
    if device.type != "cpu":
        return None
    if cpu_layout == "channels_last":
        return torch.channels_last
    if cpu_layout == "contiguous":
        return torch.contiguous_format
    if dtype not in (torch.float32, torch.bfloat16) or (dtype == torch.bfloat16 and not _HAS_ONEDNN_BF16):
        return None
    if os.environ.get(ENV_VAR, "1") == "0" or not _HAS_ONEDNN:
        return None
    return None if on_reference_backend(backend) else torch.channels_last


@torch.fx.wrap
def to_model_layout(x: torch.Tensor, param: torch.Tensor, backend: str | None, cpu_layout: str) -> torch.Tensor:
    """The images x in the memory format images_memory_format() gives a model whose parameters have
    param's device and dtype. A leaf function for torch.fx (see the module docstring)."""
    memory_format = images_memory_format(param.device, param.dtype, backend, cpu_layout)
    return x if memory_format is None else x.contiguous(memory_format=memory_format)
