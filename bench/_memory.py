"""How much memory one call needs at its peak, on the GPU and on the CPU, measured by the allocator.

Both measure the call's own peak: the most bytes its allocations hold at any moment beyond what was
allocated before the call started (inputs, weights, optimizer state are not counted; outputs and
gradients the call creates are). One extra call, after the timed ones, is measured.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys

import torch

METHODS = {
    "cuda": ("torch.cuda.reset_peak_memory_stats(), then torch.cuda.max_memory_allocated() after one call "
             "minus torch.cuda.memory_allocated() before it: the peak of the call's own allocations in "
             "PyTorch's CUDA caching allocator (tensors and the workspaces allocated through it), not "
             "the allocator's reserved cache"),
    "cpu": ("torch.profiler.profile(profile_memory=True) around one call: PyTorch's CPU allocator "
            "reports every allocation and free; peak = the largest running sum of allocated minus "
            "freed bytes, in time order. Memory taken outside PyTorch's allocator (malloc/std::vector "
            "inside C++ kernels, thread stacks) is not seen; process RSS is not used"),
}


def method(device: str) -> str:
    return METHODS["cuda" if device == "cuda" else "cpu"]


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 while the profiler starts and stops: kineto prints its own
    start/stop lines (and a 'gpuGetDeviceCount failed' line without a GPU) from C++."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters): just run
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cuda_peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def _cpu_peak(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    # The raw allocator records ("[memory]" events with signed byte counts) of the profile: the
    # public key_averages() only has per-op sums, which cannot give a peak.
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def peak_memory(fn, device: str) -> int:
    """Peak bytes of one call of fn (see METHODS)."""
    gc.collect()
    return _cuda_peak(fn) if device == "cuda" else _cpu_peak(fn)
