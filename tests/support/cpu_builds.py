"""Running a check on every build of the cpu backend's kernels that this CPU can execute."""
from __future__ import annotations

from typing import Callable

from rest_kernels import _extension


def every_build(fn: Callable[[str], None]) -> None:
    """fn(isa) on every kernel build this CPU can run (AVX-512, AVX2, generic), the selection restored."""
    status = _extension.cpu_kernels_status()
    try:
        for isa in _extension.runnable_cpu_builds():
            _extension.select_cpu_kernels(isa)
            fn(isa)
    finally:
        _extension.select_cpu_kernels(status["selected"])
