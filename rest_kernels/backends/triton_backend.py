"""The `triton` backend: fused Triton kernels (rest_kernels/triton/).

Serves CUDA tensors, and CPU tensors when the Triton interpreter is on (TRITON_INTERPRET=1 set
before triton is imported), which is how the kernels are tested on machines without a GPU.
"""
from __future__ import annotations

import functools
import os

import torch

from .base import Backend


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"triton cannot be imported ({e})"
    return None


class TritonBackend(Backend):
    name = "triton"
    auto_device_type = "cuda"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    @property
    def device_type(self):
        return "cpu" if interpreter_on() else "cuda"

    def unavailable_reason(self):
        reason = _triton_import_error()
        if reason is not None:
            return reason
        if not interpreter_on() and not torch.cuda.is_available():
            return "no CUDA device is visible (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
        return "the Triton kernels are not implemented yet"
