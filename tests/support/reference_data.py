"""Loading the official fixtures (tests/data) and regenerating their weights and inputs.

The weight recipe is the one of the official fixtures' README (tests/data/README.md): a float64 generator seeded per case,
walking the state_dict keys in plain string order.
"""
from __future__ import annotations

import functools
import json
import os

import torch

from support import fixture_container

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


@functools.lru_cache(maxsize=None)
def load(name: str):
    """A fixture file of tests/data, loaded once per test session: .json as JSON, .zip (the float64
    outputs of the official code) by fixture_container, bit for bit what torch.load gave of the .pt
    files they were packed from (see tests/data/README.md)."""
    path = os.path.join(DATA, name)
    if name.endswith(".json"):
        with open(path) as f:
            return json.load(f)
    if name.endswith(".zip"):
        return fixture_container.load(path)
    raise ValueError(f"unknown fixture kind: {name!r} (tests/data holds .json and .zip files)")


def attention_cases():
    return load("attention_cases.zip")


def pa_cases():
    return load("pa_cases.zip")


@torch.no_grad()
def fill_weights(module: torch.nn.Module, seed: int) -> None:
    """Overwrite every floating tensor of module.state_dict() by the reference recipe."""
    g = torch.Generator().manual_seed(seed)
    state = module.state_dict()
    for key in sorted(state):
        t = state[key]
        if not t.is_floating_point():
            continue
        shape = tuple(t.shape)
        if key.endswith("running_var"):
            value = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
        elif t.dim() == 1 and "norm" in key and key.endswith(".weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        elif t.dim() <= 1:
            value = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            value = torch.randn(shape, generator=g, dtype=torch.float64) * t[0].numel() ** -0.5
        t.copy_(value)


def randn(shape, seed: int) -> torch.Tensor:
    """Inputs and output gradients of the fixtures: float64 normal draws from a fresh seed."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def state_sums(module: torch.nn.Module) -> dict[str, float]:
    return {k: float(v.double().sum()) for k, v in module.state_dict().items() if v.is_floating_point()}
