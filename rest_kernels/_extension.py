"""Loading the compiled extension `rest_kernels._C` and checking it matches this torch.

The extension is optional: without it the compiled backends (`cpu`, `cuda`, `cuda-emu`) report
why they are unavailable and everything else keeps working.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def load() -> tuple[object | None, str | None]:
    """Return (module, None) when the extension is usable, else (None, reason)."""
    try:
        from rest_kernels import _C  # noqa: F401  (importing registers torch.ops.rest_kernels_C)
    except ImportError as e:
        return None, (f"the compiled extension rest_kernels._C is not built or failed to load ({e}); "
                      "build it with `pip install --no-build-isolation -e .`")
    info = dict(_C.build_info())
    if info.get("torch") != torch.__version__:
        return None, (f"rest_kernels._C was built against torch {info.get('torch')} but torch "
                      f"{torch.__version__} is running; rebuild with `pip install --no-build-isolation -e .`")
    _register_fakes()
    return _C, None


@functools.lru_cache(maxsize=None)
def _register_fakes() -> None:
    """Shape functions of the forward ops that a traced inference graph calls directly
    (rest_kernels.direct_kernels_in_traces): the custom ops' own (rest_kernels/ops.py), less the
    backend argument. Registered once, when the extension loads; the op packets are resolved here
    too (torch.ops resolves a name on first access under a lock, which Dynamo cannot trace)."""
    from .ops import _emsa_fwd_fake, _pa_fwd_fake
    torch.ops.rest_kernels_C.emsa_fwd, torch.ops.rest_kernels_C.pa_fwd  # noqa: B018 (resolved now)
    torch.library.register_fake("rest_kernels_C::emsa_fwd")(
        lambda q, k, v, mix_weight, scale, eps: _emsa_fwd_fake(q, k, v, mix_weight, None, scale, eps, None))
    torch.library.register_fake("rest_kernels_C::pa_fwd")(
        lambda x, weight, bias: _pa_fwd_fake(x, weight, bias, None))


def build_info() -> dict | None:
    module, _ = load()
    return dict(module.build_info()) if module is not None else None


def unavailable_reason() -> str | None:
    return load()[1]


# --------------------------------------------------------------------------- cpu kernel builds
# The cpu backend's kernels are built once per instruction-set level (csrc/cpu/kernels.h); the
# extension chooses the build when the first cpu op runs (csrc/cpu_dispatch.cpp). These report that
# choice and switch it.
def cpu_kernels_status() -> dict | None:
    """{"builds": [isa, ...] best first, "selected": isa or None, "march": its target (-march, + features:
    "x86-64-v4+avx512bf16"), "reason": why none
    is selected, "runnable": {isa: None or why this CPU cannot run it}}; None without the extension."""
    module, _ = load()
    return dict(module.cpu_kernels_status()) if module is not None else None


def runnable_cpu_builds() -> list[str]:
    """The cpu kernel builds this CPU can run, best first (empty without the extension)."""
    status = cpu_kernels_status()
    if status is None:
        return []
    return [isa for isa in status["builds"] if status["runnable"][isa] is None]


# The cpu kernel builds whose bfloat16 EMSA forward multiplies on bfloat16 operands (VDPBF16PS,
# csrc/cpu/bf16_dot_gemm.h) and rounds the left operand of P v to bfloat16 (P as PyTorch's bfloat16
# attention does; with the head mix the centred P - 1/M); every other build, and every other dtype,
# computes in float32 from exactly widened inputs and rounds out once (csrc/cpu/emsa_cpu.cpp,
# forward_bf16_dot, says why the rounding is safe).
CPU_BUILDS_WITH_BF16_PRODUCTS = frozenset({"avx512bf16"})


def cpu_bf16_products() -> bool:
    """Whether the selected cpu build runs the bfloat16 EMSA forward on bfloat16 products."""
    status = cpu_kernels_status()
    return status is not None and status["selected"] in CPU_BUILDS_WITH_BF16_PRODUCTS


def cpu_kernels_unavailable_reason() -> str | None:
    status = cpu_kernels_status()
    if status is None:
        return unavailable_reason()
    return status["reason"] if status["selected"] is None else None


def cpu_isa_description() -> str:
    """One line for reports: which cpu kernel build runs, e.g. "avx512 (target x86-64-v4; builds: ...)"."""
    status = cpu_kernels_status()
    if status is None:
        return f"none ({unavailable_reason()})"
    if status["selected"] is None:
        return f"none ({status['reason']})"
    # the target is -march plus extra features in one word ("x86-64-v4+avx512bf16"), not a flag
    return f"{status['selected']} (target {status['march'] or 'default'}; builds: {', '.join(status['builds'])})"


def select_cpu_kernels(isa: str) -> None:
    """Run the cpu ops on the `isa` build from now on (for tests and comparisons; REST_KERNELS_CPU_ISA
    chooses at start-up). Raises RuntimeError / ValueError saying why when this CPU cannot run it."""
    module, reason = load()
    if module is None:
        raise RuntimeError(reason)
    module.select_cpu_kernels(isa)
