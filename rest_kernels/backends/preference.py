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
    `op` / `pass_` / `layout` with at most `max_elements` elements (B C H W for PA, B h N M for EMSA)."""
    op: str            # "pa", "emsa" (no mix) or "emsa-mix"
    pass_: str         # "fwd" (inference) or "fwd+bwd" (training)
    layout: str        # PA: "contiguous" or "channels_last"; EMSA: "any"
    max_elements: int
    measured: str      # command, machine, date and commit of the measurement
    faster: str = "reference"

    def describe(self) -> str:
        who = "the reference" if self.faster == "reference" else self.faster
        return (f"{who} was faster on every measured {self.op} {self.pass_} call of "
                f"{self.layout} layout with <= {self.max_elements} elements ({self.measured})")


def load_rules(backend_name: str) -> tuple[ReferenceFaster, ...]:
    path = os.path.join(DATA_DIR, f"{backend_name}_crossover.json")
    if not os.path.exists(path):
        return ()
    with open(path) as f:
        data = json.load(f)
    return tuple(ReferenceFaster(r["op"], r["pass"], r["layout"], int(r["max_elements"]), data["measured"],
                                 r.get("faster", "reference"))
                 for r in data["rules"] if r["max_elements"] > 0)


def emsa_key(q, k, mix_weight) -> tuple[str, str, int]:
    """(op, layout, elements) of an EMSA call."""
    B, h, N, _ = q.shape
    return ("emsa-mix" if mix_weight is not None else "emsa"), "any", B * h * N * k.shape[2]


def pa_key(x) -> tuple[str, str, int]:
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return "pa", ("channels_last" if channels_last else "contiguous"), x.numel()


# Evaluated eagerly when torch.compile traces a caller: the machine's memory is a fact, not a graph.
@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def _device_memory(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _covering(rules, faster: str, op: str, pass_: str, layout: str, elements: int):
    return next((r for r in rules if r.faster == faster and r.op == op and r.pass_ == pass_ and r.layout == layout
                 and elements <= r.max_elements), None)


def route_preference(rules, key, needs_backward: bool, t: torch.Tensor) -> tuple[str | None, str | None]:
    """(the route to take instead of the fused backend: "sdpa", "reference" or None, why) for a call
    with `key` = (op, layout, elements) on tensor t's device. why is None when no rule covers the call."""
    op, layout, elements = key
    rule = _covering(rules, "sdpa", op, "fwd+bwd" if needs_backward else "fwd", layout, elements)
    if rule is not None:
        return "sdpa", rule.describe()
    if needs_backward:  # training calls stay fused rather than take the reference (module docstring)
        return None, None
    rule = _covering(rules, "reference", op, "fwd", layout, elements)
    if rule is None:
        return None, None
    maps = REFERENCE_MAPS[op] * elements * t.element_size()
    if maps > COMFORTABLE_FRACTION * _device_memory(t.device.type, t.device.index):
        return None, (f"{rule.describe()}, but the maps it would materialise would take more than "
                      f"{COMFORTABLE_FRACTION:g} of the device's memory")
    return "reference", rule.describe()
