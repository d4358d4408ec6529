"""Argument checks of the model zoo's constructors and forwards.

Bad configurations and inputs raise TypeError (wrong type or dtype) or ValueError (wrong value or
shape) naming the argument and what was expected, before anything is built or computed: without
them they surface deep inside PyTorch as RuntimeErrors about some inner layer, or not at all (a
sr_ratio of 0 silently meant "no reduction", a negative num_classes "no head").
"""
from __future__ import annotations

import math
import numbers

import torch


def integer(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def real(name: str, value, low: float = -math.inf, high: float = math.inf, high_open: bool = False) -> float:
    """A finite real number in [low, high] ([low, high) with high_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    if value < low or value > high or (high_open and value == high):
        raise ValueError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")
    return value


def probability(name: str, value, open_one: bool = False) -> float:
    """A dropout probability, in [0, 1] ([0, 1) for stochastic depth, which divides by 1 - p)."""
    return real(name, value, 0.0, 1.0, high_open=open_one)


def choice(name: str, value, choices: tuple[str, ...]) -> str:
    """One of the strings `choices` (a model option such as cpu_layout or linear_impl)."""
    listing = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {listing}; got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {listing}; got {value!r}")
    return value


def sequence(name: str, value, length: int) -> list:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of {length} entries (one per stage), got {type(value).__name__}")
    if len(value) != length:
        raise ValueError(f"{name} must have {length} entries (one per stage); got {list(value)}")
    return list(value)


def input_tensor(name: str, x, ndim: int, layout: str, channels: int, channel_dim: int, param: torch.Tensor):
    """x: a floating tensor of `ndim` dims with `channels` entries along channel_dim, whose dtype is
    the module's unless autocast is on (autocast casts the inputs of each layer itself)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {str(x.dtype).replace('torch.', '')}")
    if x.shape[channel_dim] != channels:
        raise ValueError(f"{name} must have {channels} channels {layout}, got shape {tuple(x.shape)}")
    if x.device != param.device:
        raise ValueError(f"{name} must be on the module's device {param.device}, got {x.device}")
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} must have the module's dtype {str(param.dtype).replace('torch.', '')} "
                        f"(convert the module with .to(dtype), or run under torch.autocast), "
                        f"got {str(x.dtype).replace('torch.', '')}")


def symbolic(x) -> bool:
    """Whether x is a torch.fx Proxy, i.e. torch.fx is tracing the caller symbolically. Argument checks
    need values, which a Proxy does not have, so they are skipped for it; they never decide the math,
    so the traced module computes what the eager one does (the rest_kernels ops it calls still check
    their arguments when it runs)."""
    return isinstance(x, torch.fx.Proxy)


def refuse_torchscript(module) -> None:
    """Called by torch.jit.script (through __prepare_scriptable__) on the package's modules: why they
    cannot be scripted, instead of an error from deep inside the TorchScript compiler."""
    raise RuntimeError(
        f"{type(module).__name__} does not support TorchScript (torch.jit.script): TorchScript is deprecated "
        "in torch 2.14, and these modules call rest_kernels' Python-level ops and make Python-level choices "
        "(backend, memory layout, GEMM) that it cannot compile. Use torch.compile or torch.export, torch.fx "
        "(torch.fx.symbolic_trace), or rest.export_onnx for deployment.")
