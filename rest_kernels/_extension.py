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
    return _C, None


def build_info() -> dict | None:
    module, _ = load()
    return dict(module.build_info()) if module is not None else None


def unavailable_reason() -> str | None:
    return load()[1]
