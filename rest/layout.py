"""When the ResT models run their convolutions channels-last (NHWC).

Why: on the CPU oneDNN's convolutions are much faster on channels-last maps than on NCHW ones
(measured 2026-11-30 on a 2-core AVX2 EPYC, 2 threads, batch 16, rest_lite's convolutions: the
3-channel stem conv 38 -> 6 ms, the 32-channel 3x3 conv 79 -> 29 ms, the patch embeddings
21-23 -> 15-18 ms), and channels-last is the token layout itself: a (B, C, H, W) channels-last map
and the contiguous (B, H*W, C) tokens are the same memory, so the map <-> token reshapes between the
convolutions and the blocks become views instead of copies. PA keeps the layout (rest_kernels'
pa_gate returns channels-last results for channels-last inputs).

The rule (all must hold; otherwise the model runs as the official code does, on NCHW maps):
- the model's backend (its `backend`, else the current default) is not "reference": the reference
  model stays the official eager math, the benchmarks' baseline;
- the images are a float32 CPU tensor and torch has oneDNN;
- nothing is tracing the model (torch.compile, torch.export, ONNX, TorchScript): those see the
  official layout and choose their own;
- REST_KERNELS_CHANNELS_LAST is not "0" (the switch for comparisons).
The results are the same up to float32 rounding (another convolution algorithm); tests/test_models.py
compares both layouts.
"""
from __future__ import annotations

import os

import torch

import rest_kernels

from .dense import tracing

#: set to "0" to keep the models' maps NCHW (for comparisons)
ENV_VAR = "REST_KERNELS_CHANNELS_LAST"


def channels_last_wanted(x: torch.Tensor, backend: str | None) -> bool:
    """Whether a ResT model pinned to `backend` (None: the default) runs the images x channels-last."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or tracing():
        return False
    if os.environ.get(ENV_VAR, "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    return (backend if backend is not None else rest_kernels.default_backend()) != "reference"
