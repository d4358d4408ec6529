"""The `triton` backend: fused Triton kernels (rest_kernels/triton/).

Serves CUDA tensors, and CPU tensors when the Triton interpreter is on (TRITON_INTERPRET=1 set
before triton is imported), which is how the kernels are tested on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

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
        return None

    def emsa_unsupported_reason(self, q, k, v, mix_weight):
        reason = self._common_reason((q, k, v), "q")
        if reason is not None:
            return reason
        from ..triton._common import MAX_HEAD_DIM, MAX_MIX_HEADS, mix_tile_limit, pow2
        d, h = q.shape[3], q.shape[1]
        if d > MAX_HEAD_DIM:
            return f"triton supports head dims up to {MAX_HEAD_DIM}, got {d}"
        if mix_weight is not None and h > MAX_MIX_HEADS:
            return f"triton fuses the head mix for up to {MAX_MIX_HEADS} heads, got {h}"
        if mix_weight is not None and not interpreter_on():
            # a GPU block's shared memory (227 KiB on H100) bounds heads x padded head dim of a program
            limit = mix_tile_limit(q.dtype)
            if pow2(h) * pow2(d, 16) > limit:
                return (f"triton fuses the head mix in {str(q.dtype).replace('torch.', '')} for "
                        f"next_pow2(h) * next_pow2(d) <= {limit} (shared memory), got h {h}, d {d}")
        return None

    def emsa_forward(self, q, k, v, mix_weight, scale, eps):
        from ..triton.emsa_fwd import emsa_forward
        with _launch_guard():
            return emsa_forward(q, k, v, mix_weight, scale, eps)

    def emsa_backward(self, dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale, eps):
        from ..triton.emsa_bwd import emsa_backward
        with _launch_guard():
            return emsa_backward(dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale, eps)

    def pa_forward(self, x, weight, bias):
        from ..triton.pa import pa_forward
        with _launch_guard():
            return pa_forward(x, weight, bias)

    def pa_backward(self, dout, x, weight, bias):
        from ..triton.pa import pa_backward
        with _launch_guard():
            return pa_backward(dout, x, weight, bias)


# The Triton interpreter keeps the grid of the running launch in process-global state, so two Python
# threads launching at once corrupt each other ("x >= grid_dim[0]"). Interpreted launches are
# therefore serialised; on a GPU launches are thread-safe and run unguarded.
_interpreter_lock = threading.Lock()


def _launch_guard():
    return _interpreter_lock if interpreter_on() else contextlib.nullcontext()
