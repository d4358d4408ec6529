"""What each GPU arch lets one block use, as data, and the limits of the device a call runs on.

The numbers are the per-arch limits of NVIDIA's CUDA C++ Programming Guide ("Compute Capabilities",
technical specifications table): shared memory a block may opt into, shared memory and registers
per SM, resident threads and blocks per SM. The grid limits are the same on every arch since
sm_30. On a real device the driver's own numbers (torch.cuda.get_device_properties) win; the
table serves the targets compiled ahead of time without a GPU and the fake devices of the tests.
"""
from __future__ import annotations

import dataclasses

import torch

GRID_X_MAX = 2 ** 31 - 1
GRID_YZ_MAX = 65535
MAX_REGS_PER_THREAD = 255


@dataclasses.dataclass(frozen=True)
class ArchLimits:
    arch: int                     # compute capability as 10 * major + minor
    name: str                     # a representative card, for messages and the performance model
    max_shared_per_block: int     # bytes a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    shared_per_sm: int            # bytes
    regs_per_sm: int
    max_threads_per_sm: int
    max_blocks_per_sm: int

    @property
    def sm(self) -> str:
        return f"sm_{self.arch}"


ARCHS: dict[int, ArchLimits] = {
    80: ArchLimits(80, "A100", 163 * 1024, 164 * 1024, 65536, 2048, 32),
    86: ArchLimits(86, "RTX 3090 / A40", 99 * 1024, 100 * 1024, 65536, 1536, 16),
    89: ArchLimits(89, "RTX 4090 / L40S", 99 * 1024, 100 * 1024, 65536, 1536, 24),
    90: ArchLimits(90, "H100 / H200", 227 * 1024, 228 * 1024, 65536, 2048, 32),
}


def arch_limits(arch: int) -> ArchLimits:
    """The table's limits of `arch` (an unknown arch takes those of the nearest lower one)."""
    if arch in ARCHS:
        return ARCHS[arch]
    lower = [a for a in ARCHS if a <= arch]
    if not lower:
        raise ValueError(f"rest_kernels: no GPU limits known for sm_{arch} (the table starts at sm_80)")
    base = ARCHS[max(lower)]
    return dataclasses.replace(base, arch=arch, name=f"sm_{arch} (limits of {base.sm})")


def device_limits(device: torch.device) -> ArchLimits:
    """Limits of a real CUDA device: its arch, with the driver's numbers where torch reports them."""
    props = torch.cuda.get_device_properties(device)
    arch = 10 * props.major + props.minor
    base = arch_limits(arch)
    return dataclasses.replace(
        base, name=props.name,
        max_shared_per_block=getattr(props, "shared_memory_per_block_optin", base.max_shared_per_block),
        shared_per_sm=getattr(props, "shared_memory_per_multiprocessor", base.shared_per_sm),
        regs_per_sm=getattr(props, "regs_per_multiprocessor", base.regs_per_sm),
        max_threads_per_sm=getattr(props, "max_threads_per_multi_processor", base.max_threads_per_sm))


# A fake GPU for tests and tools (rest_kernels.triton.aot.fake_gpu): when set, the Triton backend
# holds calls against these limits and compiles for this arch instead of asking a real device.
_fake_gpu: ArchLimits | None = None


def fake_gpu_limits() -> ArchLimits | None:
    return _fake_gpu
