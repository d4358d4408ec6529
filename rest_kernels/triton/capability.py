"""Does a call fit the GPU it would run on? The launches it would make, compiled for that arch.

The backend's host functions (emsa_forward, emsa_backward, pa_forward, pa_backward) run unchanged
on meta tensors with the call's shapes, strides and dtypes inside `launch.planning()`: every launch
is compiled for the device's arch (the same specialisation and JIT cache as the real launch, so on a
GPU the real launch later finds its kernel compiled) and recorded with its grid. Each recorded
launch is then held against the arch's limits (rest_kernels/triton/targets.py): shared memory per
block, the grid's y/z limit, threads per block. The answer is every reason, e.g.
"_dkdv_kernel needs 120 KiB of shared memory per block; sm_86 (RTX 3090 / A40) allows 99 KiB", so
"auto" falls back instead of the launch raising OutOfResources.

Plans are cached per (device, op, direction, shapes, strides, dtypes): a model calls each shape
again and again, and only the first call pays for the planning (and, on a GPU, the compile it
would have paid at its first launch anyway).
"""
from __future__ import annotations

import threading

import torch

from .launch import PlannedLaunch, planning
from .targets import GRID_X_MAX, GRID_YZ_MAX, MAX_REGS_PER_THREAD, ArchLimits

_cache: dict = {}
_lock = threading.Lock()


def _meta(t: torch.Tensor | None, dtype: torch.dtype | None = None):
    if t is None:
        return None
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=dtype or t.dtype, device="meta")


def _meta_like_out(q: torch.Tensor) -> torch.Tensor:
    """out / dout as the forward lays them out: (B, h, N, d) viewed from (B, N, h, d) memory."""
    B, h, N, d = q.shape
    return torch.empty(B, N, h, d, dtype=q.dtype, device="meta").transpose(1, 2)


def _no_fake_mode():
    """Planning makes its own meta tensors: step out of any FakeTensorMode a caller traces in."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    return unset_fake_temporarily()


def plan_emsa(q, k, v, mix_weight, backward: bool) -> list[PlannedLaunch]:
    """The launches of the forward (backward=False) or the backward of one EMSA call, compiled
    for the active driver's target. Inputs may be real, fake or meta tensors: only their shapes,
    strides and dtypes are used."""
    from .emsa_bwd import emsa_backward
    from .emsa_fwd import emsa_forward
    with _no_fake_mode():
        q, k, v = _meta(q), _meta(k), _meta(v)
        w = None if mix_weight is None else torch.empty(mix_weight.shape, dtype=torch.float32, device="meta")
        scale, eps = 1.0, 1e-5  # runtime scalars: no influence on the compiled kernels
        with planning() as plan:
            if not backward:
                emsa_forward(q, k, v, w, scale, eps)
            else:
                B, h, N, _ = q.shape
                f32 = dict(dtype=torch.float32, device="meta")
                out = _meta_like_out(q)
                lse, rsq, rstd = torch.empty(B, h, N, **f32), torch.empty(B, h, N, **f32), torch.empty(B, h, **f32)
                emsa_backward(_meta_like_out(q), q, k, v, w, out, lse, rsq, rstd, scale, eps)
    return plan


def plan_pa(x, weight, bias, backward: bool) -> list[PlannedLaunch]:
    from .pa import pa_backward, pa_forward
    with _no_fake_mode():
        x, weight, bias = _meta(x), _meta(weight), _meta(bias)
        with planning() as plan:
            if not backward:
                pa_forward(x, weight, bias)
            else:
                pa_backward(torch.empty_like(x), x, weight, bias)
    return plan


def _max_threads(compiled, limits: ArchLimits, load: bool) -> int:
    """Threads per block the kernel's registers allow. On a real device (load=True) the driver's own
    answer (cuFuncGetAttribute MAX_THREADS_PER_BLOCK, read when Triton loads the kernel, as the launch
    would). Otherwise the bound for the worst case ptxas allows, 255 registers per thread: registers
    are allocated per warp in units of 256, so a warp holds ceil(255 * 32 / 256) * 256 = 8192 and a
    block of 64K registers at most 8 warps (256 threads)."""
    if load:
        compiled._init_handles()
        return int(compiled.n_max_threads)
    warp_regs = -(-MAX_REGS_PER_THREAD * 32 // 256) * 256
    return min(1024, limits.regs_per_sm // warp_regs * 32)


def launch_reasons(launches: list[PlannedLaunch], limits: ArchLimits, what: str = "",
                   load: bool = False) -> list[str]:
    """Every way in which these launches do not fit a device with `limits` (empty: they fit);
    `what` ("forward", "backward") prefixes each reason; load=True on a real device (the kernels are
    loaded to ask the driver how many threads their registers allow)."""
    reasons = []
    what = f"{what} " if what else ""
    for launch in launches:
        meta = launch.compiled.metadata
        shared = int(meta.shared)
        if shared > limits.max_shared_per_block:
            reasons.append(f"{what}{launch.name} needs {shared / 1024:.0f} KiB of shared memory per block; "
                           f"{limits.sm} ({limits.name}) allows {limits.max_shared_per_block / 1024:.0f} KiB")
        threads = int(meta.num_warps) * 32
        try:
            max_threads = _max_threads(launch.compiled, limits, load and shared <= limits.max_shared_per_block)
        except Exception as e:  # the driver refused to load it (Triton's OutOfResources and kin)
            reasons.append(f"{what}{launch.name} cannot be loaded on {limits.sm} ({limits.name}): {e}")
            max_threads = threads
        if threads > max_threads:
            reasons.append(f"{what}{launch.name} needs {threads} threads per block; with its registers "
                           f"{limits.sm} runs at most {max_threads}")
        gx, gy, gz = launch.grid
        if gx > GRID_X_MAX:
            reasons.append(f"{what}{launch.name} needs a grid x of {gx} blocks; the limit is {GRID_X_MAX}")
        for axis, g in (("y", gy), ("z", gz)):
            if g > GRID_YZ_MAX:
                reasons.append(f"{what}{launch.name} needs a grid {axis} of {g} blocks; the limit is {GRID_YZ_MAX}")
    return list(dict.fromkeys(reasons))  # the same reason from two launches once


def _key(device_key, op, backward, tensors):
    return (device_key, op, backward) + tuple(
        None if t is None else (tuple(t.shape), tuple(t.stride()), t.dtype) for t in tensors)


def cached_reasons(device_key, limits: ArchLimits, op: str, backward: bool, tensors, plan,
                   load: bool = False) -> list[str]:
    """launch_reasons of `plan(backward)` for these tensors on this device, computed once."""
    key = _key(device_key, op, backward, tensors)
    with _lock:
        if key in _cache:
            return _cache[key]
    reasons = launch_reasons(plan(backward), limits, "backward" if backward else "forward", load)
    with _lock:
        _cache[key] = reasons
    return reasons
