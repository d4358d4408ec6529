"""Where "auto" prefers another route to a fused backend that can serve a call: measured, as data.

A fused backend may be slower than eager PyTorch (the reference) on small calls, where its fixed
costs (packing, a thread rendezvous, several passes) outweigh the work, and slower than PyTorch's
scaled_dot_product_attention (the `sdpa` backend) on plain softmax attention. A backend declares such
regions as `ReferenceFaster` rules (`faster`: "reference" or "sdpa"), produced by a benchmark
(bench/crossover.py) and stored with their provenance in rest_kernels/backends/data/<backend>_crossover.json.
"auto" (registry.select) takes the faster route for a call inside a rule; `route_preference` says which.

The reference: only for inference calls, and only if the maps it materialises (its N x M maps for
EMSA) fit comfortably in memory; otherwise auto keeps the fused backend. A training call stays on the
fused backend whatever its size, so that what is kept for the backward does not depend on the size of
the input; bench/crossover.py still measures the training pass and stores it with the rows.

A rule covers one dtype (the one measured: bench/crossover.py measures float32; other dtypes stay on
the fused backend until measured), a range of call sizes (elements: B h N M for EMSA, B C H W for PA), and for EMSA one
reduction class (`reduction_class`: N / M to the nearest power of 4, i.e. sr^2 for ResT's spatial
reduction ratios): which route wins depends on the shape as well as the size (on the CPU, SDPA's
training pass beats the fused kernels at the unreduced stage 4, N = M, and loses where M << N), and
one size threshold per op cannot say that.

sdpa (plain attention, op "emsa", only): its rules are made per pass, the forward's for inference
calls and the forward-plus-backward's for training calls: SDPA materialises no N x M map, and like
the fused kernels it has a first backward and (PyTorch's flash kernels) no double backward, so
nothing autograd can do depends on the route. sdpa rules are checked before the reference's. Either
decision is logged once, with the rule that made it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import torch

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

#: What the reference materialises at once, in units of the rule's "elements" (emsa_key / pa_key)
#: times the element size: EMSA's logits, softmax and normalised map (3 maps of B h N M), PA's conv
#: output and gate (2 maps of B C H W).
REFERENCE_MAPS = {"emsa": 3, "emsa-mix": 3, "pa": 2}
#: "Comfortably": those maps take at most this fraction of the device's memory.
COMFORTABLE_FRACTION = 1 / 16


@dataclasses.dataclass(frozen=True)
class ReferenceFaster:
    """The route `faster` ("reference" or "sdpa") beat the fused backend on every measured call of
    `op` / `pass_` / `layout` (and, for EMSA, `reduction` class) with min_elements to max_elements
    elements (B C H W for PA, B h N M for EMSA)."""
    op: str            # "pa", "emsa" (no mix) or "emsa-mix"
    pass_: str         # "fwd" (inference) or "fwd+bwd" (training)
    layout: str        # PA: "contiguous" or "channels_last"; EMSA: "any"
    max_elements: int
    measured: str      # command, machine, date and commit of the measurement
    faster: str = "reference"
    min_elements: int = 0
    reduction: int | None = None  # EMSA: reduction_class(N, M) of the calls; None: any
    # the dtype the calls were measured in ("float32"): a rule says nothing about other dtypes, where
    # the fused kernels' costs differ (bfloat16 inputs are converted, SDPA has other kernels)
    dtype: str = "float32"

    def covers(self, faster: str, op: str, pass_: str, layout: str, elements: int, reduction: int | None,
               dtype: str = "float32") -> bool:
        return (self.faster == faster and self.op == op and self.pass_ == pass_ and self.layout == layout
                and self.min_elements <= elements <= self.max_elements
                and (self.reduction is None or self.reduction == reduction) and self.dtype == dtype)

    def describe(self) -> str:
        who = "the reference" if self.faster == "reference" else self.faster
        size = (f"<= {self.max_elements}" if self.min_elements == 0
                else f"{self.min_elements} to {self.max_elements}")
        shape = "" if self.reduction is None else f", N / M ~ {self.reduction}"
        return (f"{who} was faster on every measured {self.dtype} {self.op} {self.pass_} call of "
                f"{self.layout} layout{shape} with {size} elements ({self.measured})")


def load_rules(backend_name: str) -> tuple[ReferenceFaster, ...]:
    path = os.path.join(DATA_DIR, f"{backend_name}_crossover.json")
    if not os.path.exists(path):
        return ()
    with open(path) as f:
        data = json.load(f)
    return tuple(ReferenceFaster(r["op"], r["pass"], r["layout"], int(r["max_elements"]), data["measured"],
                                 r.get("faster", "reference"), int(r.get("min_elements", 0)), r.get("reduction"),
                                 r.get("dtype", "float32"))
                 for r in data["rules"] if r["max_elements"] > 0)


def reduction_class(N: int, M: int) -> int:
    """An EMSA call's queries per key, N / M, rounded to the nearest power of 4 (at least 1): sr^2
    for ResT's spatial reduction ratios sr = 1, 2, 4, 8 (exactly, where sr divides the map; the
    ceil of odd sizes moves N / M a little, not to another class)."""
    # integer comparisons (the class boundaries are 2 * 4^k, the geometric midpoints): the shapes may
    # be SymInts while torch.compile traces
    c = 1
    while M > 0 and N >= 2 * c * M:
        c *= 4
    return c


def dtype_name(t: torch.Tensor) -> str:
    """"float32", "bfloat16", ...: a rule's dtype field."""
    return str(t.dtype).removeprefix("torch.")


def emsa_key(q, k, mix_weight) -> tuple[str, str, int, int, str]:
    """(op, layout, elements, reduction class, dtype) of an EMSA call."""
    B, h, N, _ = q.shape
    M = k.shape[2]
    return ("emsa-mix" if mix_weight is not None else "emsa"), "any", B * h * N * M, reduction_class(N, M), dtype_name(q)


def pa_key(x) -> tuple[str, str, int, None, str]:
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return "pa", ("channels_last" if channels_last else "contiguous"), x.numel(), None, dtype_name(x)


# Evaluated eagerly when torch.compile traces a caller: the machine's memory is a fact, not a graph.
@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def _device_memory(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _covering(rules, faster: str, op: str, pass_: str, layout: str, elements: int, reduction: int | None, dtype: str):
    return next((r for r in rules if r.covers(faster, op, pass_, layout, elements, reduction, dtype)), None)


def route_preference(rules, key, needs_backward: bool, t: torch.Tensor) -> tuple[str | None, str | None]:
    """(the route to take instead of the fused backend: "sdpa", "reference" or None, why) for a call
    with `key` = (op, layout, elements, reduction, dtype) on tensor t's device. why is None when no rule
    covers the call."""
    op, layout, elements, reduction, dtype = key
    rule = _covering(rules, "sdpa", op, "fwd+bwd" if needs_backward else "fwd", layout, elements, reduction, dtype)
    if rule is not None:
        return "sdpa", rule.describe()
    if needs_backward:  # training calls stay fused rather than take the reference (module docstring)
        return None, None
    rule = _covering(rules, "reference", op, "fwd", layout, elements, reduction, dtype)
    if rule is None:
        return None, None
    maps = REFERENCE_MAPS[op] * elements * t.element_size()
    if maps > COMFORTABLE_FRACTION * _device_memory(t.device.type, t.device.index):
        return None, (f"{rule.describe()}, but the maps it would materialise would take more than "
                      f"{COMFORTABLE_FRACTION:g} of the device's memory")
    return "reference", rule.describe()
