"""Every Triton kernel of the package is launched through `launch`, so that a launch can also be
*planned*: compiled for a target without running.

Why: what a launch costs in GPU resources (shared memory, registers, grid) is only known once the
JIT has specialised the kernel for the actual arguments and compiled it for the target arch. The
interpreter checks none of it, and a launch that does not fit raises `OutOfResources` only at run
time. Inside `planning()`, the host functions (emsa_forward, emsa_backward, pa_forward, pa_backward)
run unchanged on meta tensors, every `launch` compiles its kernel for the active driver's target
(`JITFunction.warmup`: the same specialisation and cache as a real launch) and records it instead of
running it. rest_kernels/triton/capability.py uses that to refuse calls that would not fit, and
rest_kernels/triton/resources.py to measure every kernel ahead of time for sm_80..sm_90.
Inside `recording()` nothing is compiled either: each launch is only recorded, with its positional
arguments (a static cost model, bench/perf_model.py, reads the grids, tiles and tensor sizes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading

_local = threading.local()


@dataclasses.dataclass
class PlannedLaunch:
    """One launch of a plan: the kernel's name, its grid and the compiled kernel (metadata.shared,
    metadata.num_warps, asm['ptx'] / asm['cubin'] ...). `constexprs`: the keyword arguments that
    select the compiled kernel (constexpr parameters, num_warps, num_stages); `scalars`: keyword
    arguments that are runtime parameters (e.g. a split count that must not multiply the
    kernel's specialisations)."""
    name: str
    grid: tuple[int, int, int]
    compiled: object
    constexprs: dict
    args: tuple = ()  # the positional arguments (kept by recording() only)
    scalars: dict = dataclasses.field(default_factory=dict)


def _grid3(grid) -> tuple[int, int, int]:
    g = tuple(int(x) for x in grid)
    return g + (1,) * (3 - len(g))


def _runtime_params(kernel) -> set[str]:
    """Names of the kernel's runtime (not constexpr) parameters: from the JIT's parameters, or from
    the annotations of the Python function under the interpreter (which keeps no such list)."""
    params = getattr(kernel, "params", None)
    if params is not None:
        return {p.name for p in params if not p.is_constexpr}
    return {name for name, p in inspect.signature(kernel.fn).parameters.items()
            if "constexpr" not in str(p.annotation)}


def _split_kwargs(kernel, kwargs: dict) -> tuple[dict, dict]:
    """(constexpr and launch options, runtime parameters) of a launch's keyword arguments."""
    runtime = _runtime_params(kernel)
    return ({k: v for k, v in kwargs.items() if k not in runtime},
            {k: v for k, v in kwargs.items() if k in runtime})


def launch(kernel, grid, *args, **kwargs):
    """`kernel[grid](*args, **kwargs)`, or, inside `planning()`, compile it and record the launch."""
    plan = getattr(_local, "plan", None)
    if plan is None:
        return kernel[grid](*args, **kwargs)
    constexprs, scalars = _split_kwargs(kernel, kwargs)
    if getattr(_local, "record_only", False):
        plan.append(PlannedLaunch(kernel.fn.__name__, _grid3(grid), None, constexprs, args, scalars))
        return None
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    plan.append(PlannedLaunch(kernel.fn.__name__, _grid3(grid), compiled, constexprs, scalars=scalars))
    return compiled


@contextlib.contextmanager
def planning():
    """Record (and compile, never run) the launches made by this thread inside the block.

    Yields the list of PlannedLaunch; the host code must be given meta tensors (nothing is run, so
    nothing is read or written)."""
    if getattr(_local, "plan", None) is not None:
        raise RuntimeError("rest_kernels: planning() does not nest")
    _local.plan = []
    try:
        yield _local.plan
    finally:
        _local.plan = None


@contextlib.contextmanager
def recording(sink: list | None = None):
    """Record the launches made by this thread inside the block without compiling or running them
    (PlannedLaunch with compiled=None and the positional arguments). `sink`: the list to append
    to (default a new one), so a caller can interleave its own records (e.g. the torch ops the
    host code issues between launches). Host code must be given meta tensors."""
    if getattr(_local, "plan", None) is not None:
        raise RuntimeError("rest_kernels: recording() does not nest, nor run inside planning()")
    _local.plan, _local.record_only = (sink if sink is not None else []), True
    try:
        yield _local.plan
    finally:
        _local.plan, _local.record_only = None, False
