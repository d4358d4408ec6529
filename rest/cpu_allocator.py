"""tune_cpu_allocator(): let glibc's malloc reuse freed memory for the next CPU tensors (process-wide).

Why: PyTorch has no caching allocator for CPU tensors; each one is a malloc, and glibc serves every
block above its mmap threshold (128 KiB, rising as blocks are freed, to at most 32 MiB on 64-bit)
with a fresh mmap, whose pages fault in one at a time when first written, and unmaps it on free. At
batch 16 ResT's stage-1 maps are larger than any threshold (rest_lite's MLP hidden map: 16 x 3136 x
256 float32, 51 MB), so every forward pays those page faults again. ONNX Runtime and OpenVINO keep
their own memory arenas and do not. Measured 2026-12-05 (2-core AMD EPYC Zen 4, 2 threads, torch
2.14.1): stage 1's fc1 on oneDNN (50176 x 64 -> 256, float32) 25.3 ms per call with glibc's defaults,
9.4 ms with the mmap threshold raised above it (environment MALLOC_MMAP_THRESHOLD_=4294967296);
F.gelu over its output 21.8 -> 4.4 ms; the whole fused rest_lite at batch 16, float32, in one process
before and after this call: 355-362 -> 316 ms per image batch. At batch 1 the maps are small and the
difference is within the run-to-run noise (rest_base, batch 1, fused, medians of 15 in five runs of
`bench/emsa_bench.py`: tuned 66.6, 61.3, 62.4 ms; default 60.9, 62.2 ms).

What it sets (mallopt): M_MMAP_MAX = 0, so blocks come from malloc's heaps and freed ones are reused,
and M_TRIM_THRESHOLD = 2 GiB - 1, so freed memory at the top of the heap is not handed back to the
system at once. The cost: the process keeps about its peak memory (what a serving process holds
anyway), and freed blocks can fragment the heap. It is not undone (glibc has no call that restores its
dynamic thresholds), so call it in a process that serves or benchmarks, not in a library. The other
way, with no code: preload jemalloc or tcmalloc (LD_PRELOAD), as PyTorch's CPU performance tuning
guide advises.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger("rest_kernels")

__all__ = ["tune_cpu_allocator", "cpu_allocator_unsupported_reason"]

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: what tune_cpu_allocator sets: option name -> (mallopt parameter, value)
SETTINGS = {"M_MMAP_MAX": (_M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, 2 ** 31 - 1)}

_applied: list[dict] = []


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None, f"needs glibc's malloc (mallopt); this is {platform.system()} with {platform.libc_ver()[0] or 'an unknown C library'}"
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(lib, "mallopt"):
        return None, "the C library has no mallopt"
    return lib, None


def cpu_allocator_unsupported_reason() -> str | None:
    """None when tune_cpu_allocator can act in this process, else why not."""
    return _libc()[1]


def tune_cpu_allocator() -> dict:
    """Make glibc's malloc keep and reuse freed memory instead of mapping fresh pages for every large
    CPU tensor (the module docstring says why and at what cost). Process-wide, idempotent, not undone.
    Returns the settings applied ({"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2147483647}); RuntimeError
    saying why where the C library is not glibc."""
    if _applied:
        return dict(_applied[0])
    lib, reason = _libc()
    if lib is None:
        raise RuntimeError(f"rest.tune_cpu_allocator: {reason}; preload jemalloc or tcmalloc instead")
    done = {}
    for name, (param, value) in SETTINGS.items():
        if lib.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            raise RuntimeError(f"rest.tune_cpu_allocator: mallopt({name}, {value}) failed")
        done[name] = value
    logger.info("rest: glibc malloc tuned for reuse (%s)", ", ".join(f"{k}={v}" for k, v in done.items()))
    _applied.append(done)
    return dict(done)
