"""The memory layout of the ResT models' maps on the CPU: channels-last (NHWC) or NCHW.

Why channels-last: on the CPU oneDNN's convolutions are much faster on channels-last maps than on
NCHW ones (measured 2026-11-30 on a 2-core AVX2 EPYC, 2 threads, batch 16, rest_lite's convolutions:
the 3-channel stem conv 38 -> 6 ms, the 32-channel 3x3 conv 79 -> 29 ms, the patch embeddings
21-23 -> 15-18 ms), and channels-last is the token layout itself: a (B, C, H, W) channels-last map
and the contiguous (B, H*W, C) tokens are the same memory, so the map <-> token reshapes between the
convolutions and the blocks become views instead of copies. PA keeps the layout (rest_kernels'
pa_gate returns channels-last results for channels-last inputs).

The model puts CPU images into one layout before the stem, and every later map follows from it. The
model's `cpu_layout` option says which:
- "channels_last": channels-last, for CPU images of any floating dtype, traced or not;
- "contiguous": NCHW-contiguous (channels-last images are copied to NCHW), the official layout;
- "auto" (the default): channels-last when all of the following hold, otherwise the images stay as
  they are given (NCHW images: the official code's layout):
  - the model's rest_kernels backend (its `backend`, else the current default) is not "reference":
    the reference model stays the official eager math, the benchmarks' baseline;
  - the images are a float32 CPU tensor and torch has oneDNN;
  - nothing is tracing the model (torch.compile, torch.export, ONNX, TorchScript): those see the
    official layout and choose their own;
  - REST_KERNELS_CHANNELS_LAST is not "0" (the switch for comparisons; the explicit values ignore it).
Images on other devices are always left as they are. The results are the same up to float32 rounding
(another convolution algorithm); tests/test_models.py compares both layouts. images_memory_format()
is the one place where the layout is chosen.
"""
from __future__ import annotations

import os

import torch

from . import _checks
from .dense import on_reference_backend, tracing

#: set to "0" to keep the maps of models whose cpu_layout is "auto" as the images come (NCHW)
ENV_VAR = "REST_KERNELS_CHANNELS_LAST"

#: the values of the cpu_layout option ("auto" is the default)
CPU_LAYOUTS = ("auto", "channels_last", "contiguous")


def check_cpu_layout(cpu_layout) -> str:
    """cpu_layout if it is one of CPU_LAYOUTS, else TypeError / ValueError naming the argument."""
    return _checks.choice("cpu_layout", cpu_layout, CPU_LAYOUTS)


def images_memory_format(x: torch.Tensor, backend: str | None, cpu_layout: str) -> torch.memory_format | None:
    """The memory format a ResT model with these options gives the images x before its stem; None:
    x stays as it is. backend: the model's pinned backend (None: the current default)."""
    if x.device.type != "cpu":
        return None
    if cpu_layout == "channels_last":
        return torch.channels_last
    if cpu_layout == "contiguous":
        return torch.contiguous_format
    if x.dtype != torch.float32 or tracing():
        return None
    if os.environ.get(ENV_VAR, "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    return None if on_reference_backend(backend) else torch.channels_last
