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
from .preference import load_rules


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"triton cannot be imported ({e})"
    return None


#: Under the interpreter only (a GPU compiles the kernels, unaffected): Triton's interpreter before
#: 3.8 turns a scalar kernel argument into a 1-element array and calls int() on it in `range(0, M, BM)`,
#: which NumPy 2.4 refuses (TypeError: only 0-dimensional arrays can be converted to Python scalars).
#: Seen with Triton 3.6.0 + NumPy 2.4.6; Triton 3.8.0 + NumPy 2.4.6 run every test.
INTERPRETER_MIN_TRITON_WITH_NUMPY_2_4 = (3, 8)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _interpreter_incompatibility() -> str | None:
    import numpy
    import triton
    if (_version(numpy.__version__) >= (2, 4)
            and _version(triton.__version__) < INTERPRETER_MIN_TRITON_WITH_NUMPY_2_4):
        need = ".".join(map(str, INTERPRETER_MIN_TRITON_WITH_NUMPY_2_4))
        return (f"the Triton {triton.__version__} interpreter cannot run the kernels with NumPy {numpy.__version__} "
                f"(int() of a 1-element array in range(); fixed in Triton {need}): use Triton >= {need} or "
                f"NumPy < 2.4 for TRITON_INTERPRET=1")
    return None


class TritonBackend(Backend):
    name = "triton"
    auto_device_type = "cuda"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    # where the performance model says eager is faster, per GPU arch (scripts/model_crossover.py;
    # data/triton_crossover.json says how they were made)
    reference_rules = load_rules("triton")

    @property
    def device_type(self):
        return "cpu" if interpreter_on() else "cuda"

    def unavailable_reason(self):
        reason = _triton_import_error()
        if reason is not None:
            return reason
        if not interpreter_on() and not torch.cuda.is_available():
            return "no CUDA device is visible (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
        if interpreter_on():
            return _interpreter_incompatibility()
        return None

    #: the register tiles are [BLOCK, BD]: beyond this head dim the fp32 accumulators spill
    max_head_dim = 256
    #: with the mix the backward holds one accumulator per head (rest_kernels/triton/tiles.py has
    #: them measured for HP up to 8, ResT's largest head count). Whether a given call fits the GPU
    #: it runs on is decided by compiling it for that GPU (_emsa_extra_reasons).
    max_mix_heads = 8
    #: the mixed backward keeps one [BD, width] fp32 accumulator per head: beyond head dim 128 every
    #: tile configuration spilled (rest_kernels/triton/tiles.py); ResT's head dims are 64 and 96
    max_mix_head_dim = 128

    def _emsa_extra_reasons(self, q, k, v, mix_weight, needs_backward):
        from ..triton.capability import plan_emsa
        return _resource_reasons("emsa", (q, k, v, mix_weight), needs_backward,
                                 lambda backward: plan_emsa(q, k, v, mix_weight, backward))

    def _pa_extra_reasons(self, x, weight, bias, needs_backward):
        from ..triton.capability import plan_pa
        return _resource_reasons("pa", (x, weight, bias), needs_backward,
                                 lambda backward: plan_pa(x, weight, bias, backward))

    def _emsa_forward(self, p):
        from ..triton.emsa_fwd import emsa_forward
        with _launch_guard(p.q):
            return emsa_forward(p.q, p.k, p.v, p.kernel_weight, p.scale, p.eps)

    def _emsa_backward(self, p, dout, out, lse, rsq, rstd):
        from ..triton.emsa_bwd import emsa_backward
        with _launch_guard(p.q):
            return emsa_backward(dout, p.q, p.k, p.v, p.kernel_weight, out, lse, rsq, rstd, p.scale, p.eps)

    def _pa_forward(self, p):
        from ..triton.pa import pa_forward
        with _launch_guard(p.x):
            return pa_forward(p.x, p.weight, p.bias)

    def _pa_backward(self, p, dout):
        from ..triton.pa import pa_backward
        with _launch_guard(p.x):
            return pa_backward(dout, p.x, p.weight, p.bias)


def _resource_reasons(op, tensors, needs_backward, plan) -> list[str]:
    """Do the launches of this call (and of its backward when needed) fit the GPU it runs on?
    Compiled for the device's arch and held against its limits (rest_kernels/triton/capability.py);
    every reason, joined. The interpreter has no GPU resources to exhaust."""
    if interpreter_on() or any(t is not None and t.numel() == 0 for t in tensors):
        return []  # an empty call launches nothing
    from ..triton import capability, targets
    limits = targets.fake_gpu_limits()
    real_device = limits is None
    if not real_device:
        device_key, guard = limits.sm, contextlib.nullcontext()
    else:
        device = tensors[0].device
        index = device.index if device.index is not None else torch.cuda.current_device()
        limits, device_key, guard = targets.device_limits(index), ("cuda", index), torch.cuda.device(index)
    reasons = []
    with guard:  # Triton compiles for the current device's arch
        for backward in (False, True) if needs_backward else (False,):
            reasons += capability.cached_reasons(device_key, limits, op, backward, tensors, plan,
                                                 load=real_device)
    return list(dict.fromkeys(reasons))


# The Triton interpreter keeps the grid of the running launch in process-global state, so two Python
# threads launching at once corrupt each other ("x >= grid_dim[0]"). Interpreted launches are
# therefore serialised; on a GPU launches are thread-safe.
_interpreter_lock = threading.Lock()


def _launch_guard(t: torch.Tensor):
    """Interpreted: the lock above. On a GPU: make the tensors' device current, as Triton launches
    on the current device (tensors on cuda:1 while cuda:0 is current would otherwise be read from
    the wrong GPU)."""
    return _interpreter_lock if interpreter_on() else torch.cuda.device(t.device)
