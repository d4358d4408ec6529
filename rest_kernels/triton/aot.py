"""Compiling the Triton kernels for a GPU arch on a machine without a GPU.

Triton compiles for whatever target its active driver reports. `compiling_for(arch)` makes a
driver active that reports `GPUTarget("cuda", arch, 32)` and owns no device: inside it, a planned
launch (rest_kernels/triton/launch.py) runs the real JIT path (binder, specialisation on the
arguments, the CUDA backend's passes, ptxas for that arch) and returns the compiled kernel, whose
metadata, PTX and cubin are exactly what a GPU of that arch would load. Only launching is impossible,
and planning never launches.

Each arch gets its own device key, because the JIT keeps one binder and kernel cache per device:
with a shared key a kernel compiled for sm_80 would be served to a later sm_90 compile.
The driver is process-global in Triton, so `compiling_for` is not for use while other threads launch
Triton kernels on a real GPU (tests and tools only).
"""
from __future__ import annotations

import contextlib


class TargetDriver:
    """A Triton driver that only answers "which target": enough for compiling, nothing runs."""

    def __init__(self, arch: int, warp_size: int = 32):
        from triton.backends.compiler import GPUTarget
        self.arch = arch
        self.target = GPUTarget("cuda", arch, warp_size)
        self.device_key = f"aot-sm_{arch}"

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device_key

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch
        return torch.device("meta")


@contextlib.contextmanager
def compiling_for(arch: int):
    """Make Triton compile for sm_`arch` inside the block (no GPU needed, nothing can be launched)."""
    from triton.runtime import driver
    previous = driver._active
    driver.set_active(TargetDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


@contextlib.contextmanager
def fake_gpu(arch: int):
    """Make the Triton backend believe it runs on a GPU of `arch` (limits from targets.ARCHS): its
    capability checks compile for that arch and hold the launches against its limits. For tests and
    tools; nothing can be launched. Not thread-safe (process-global, like Triton's driver)."""
    from . import targets
    previous = targets._fake_gpu
    targets._fake_gpu = targets.arch_limits(arch)
    try:
        with compiling_for(arch):
            yield targets._fake_gpu
    finally:
        targets._fake_gpu = previous
