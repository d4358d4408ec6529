"""Choosing a backend: names, the current default, "auto", and reasons for every refusal.

The default is the innermost `use_backend(...)` of the calling thread, else the environment
variable REST_KERNELS_BACKEND, else "auto". "auto" takes the first backend of AUTO_ORDER that is
available here and can serve the inputs, unless its rules (measured on the CPU, modelled per GPU arch)
send the call to the reference or to sdpa (backends/preference.py); where none serves, `sdpa` for plain softmax attention and
`reference` for everything else, logging the reasons once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading

import torch

from .base import Backend
from .compiled import CpuBackend, CudaBackend, CudaEmuBackend
from .reference import ReferenceBackend
from .sdpa import SdpaBackend
from .triton_backend import TritonBackend

logger = logging.getLogger("rest_kernels")

BACKENDS: dict[str, Backend] = {
    b.name: b for b in (ReferenceBackend(), TritonBackend(), CudaBackend(), CpuBackend(), CudaEmuBackend(),
                        SdpaBackend())
}
#: "auto" tries these in order (each only for tensors on its auto_device_type)
AUTO_ORDER = ("triton", "cuda", "cpu")
ENV_VAR = "REST_KERNELS_BACKEND"

_local = threading.local()
_logged_fallbacks: set[str] = set()


def _stack() -> list[str]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def check_backend_name(name: str, allow_auto: bool = True) -> str:
    """`name` if it names a backend (or is "auto", unless allow_auto is False), else TypeError (not a
    string) or ValueError (no such backend) listing the choices. Public as
    rest_kernels.check_backend_name: the one check behind every `backend=` argument."""
    choices = ", ".join(repr(n) for n in (["auto"] if allow_auto else []) + list(BACKENDS))
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {choices}; got {type(name).__name__} {name!r}")
    if not (name in BACKENDS or (allow_auto and name == "auto")):
        raise ValueError(f"backend must be one of {choices}; got {name!r}")
    return name


check_name = check_backend_name  # the short name the package's own modules use


@contextlib.contextmanager
def use_backend(name: str):
    """`with use_backend("cpu"): ...` makes `name` the default of this thread inside the block."""
    check_name(name)
    _stack().append(name)
    try:
        yield
    finally:
        _stack().pop()


def default_backend() -> str:
    stack = _stack()
    if stack:
        return stack[-1]
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return check_name(env.strip())
        except ValueError as e:
            raise ValueError(f"environment variable {ENV_VAR}: {e}") from None
    return "auto"


_availability: dict[str, str | None] = {}


# Evaluated eagerly even while torch.compile traces a caller: availability is a fact of this process
# (imports, the extension, the device), not something to trace.
@torch.compiler.assume_constant_result
def unavailable_reason(name: str) -> str | None:
    """None when backend `name` can run in this process, else why not (computed once)."""
    if name not in _availability:
        _availability[name] = BACKENDS[name].unavailable_reason()
    return _availability[name]


def available_backends() -> dict[str, str | None]:
    """Each backend's name mapped to None where it is usable here, else the reason it is not."""
    return {name: unavailable_reason(name) for name in BACKENDS}


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot serve the call; the message says why."""


# Run eagerly when torch.compile traces a caller, so logging never breaks the graph.
@torch.compiler.assume_constant_result
def _log_fallback_once(message: str) -> bool:
    if message not in _logged_fallbacks:
        _logged_fallbacks.add(message)
        logger.warning("%s", message)
    return True


def select(op: str, name: str | None, tensors: tuple, unsupported, prefer_route=None) -> Backend:
    """Pick the backend for one call. `unsupported(backend)` returns None or a reason;
    `prefer_route(backend)` returns (the name of the backend to take instead, "reference" or "sdpa", or
    None; why or None): "auto" takes that route over a fused backend that can serve the call where
    that backend's measured rules say it is faster (backends/preference.py), logging once why either
    way. Where no fused backend serves, auto takes sdpa if it can serve the call (plain softmax
    attention: PyTorch's SDPA, never slower than the official eager math and without its N x M maps),
    else the reference."""
    name = default_backend() if name is None else check_name(name)
    if torch.onnx.is_in_onnx_export():
        # ONNX has no fused kernels: export the official math as standard operators.
        return BACKENDS["reference"]
    if name != "auto":
        backend = BACKENDS[name]
        reason = unavailable_reason(name) or unsupported(backend)
        if reason is not None:
            raise BackendUnavailableError(f"rest_kernels.{op}: backend {name!r} cannot serve this call: {reason}")
        return backend
    device_type = tensors[0].device.type
    reasons = []
    for candidate in AUTO_ORDER:
        backend = BACKENDS[candidate]
        if backend.auto_device_type != device_type:
            continue
        reason = unavailable_reason(candidate) or unsupported(backend)
        if reason is None:
            if prefer_route is not None:
                route, why = prefer_route(backend)
                if route is not None:
                    who = "the reference" if route == "reference" else route
                    _log_fallback_once(f"rest_kernels.{op}: auto takes {who} over {candidate}: {why}")
                    return BACKENDS[route]
                if why is not None:
                    _log_fallback_once(f"rest_kernels.{op}: auto keeps {candidate}: {why}")
            return backend
        reasons.append(f"{candidate}: {reason}")
    if not reasons:
        reasons.append(f"no fused backend serves {device_type} tensors")
    fallback = "sdpa" if unavailable_reason("sdpa") is None and unsupported(BACKENDS["sdpa"]) is None else "reference"
    _log_fallback_once(f"rest_kernels.{op} falls back to the {fallback} backend: " + "; ".join(reasons))
    return BACKENDS[fallback]
