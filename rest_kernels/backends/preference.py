"""Where "auto" prefers another route to a fused backend that can serve a call: measured or modelled, as data.

A fused backend may be slower than eager PyTorch (the reference) on small calls, where its fixed
costs (packing, a thread rendezvous, several passes) outweigh the work, and slower than PyTorch's
scaled_dot_product_attention (the `sdpa` backend) on plain softmax attention. A backend declares such
regions as `ReferenceFaster` rules (`faster`: "reference" or "sdpa") stored with their provenance in
rest_kernels/backends/data/<backend>_crossover.json. "auto" (registry.select) takes the faster route
for a call inside a rule; `route_preference` says which. Two producers write them:
  - bench/crossover.py MEASURES the cpu backend (source "measured");
  - scripts/model_crossover.py derives the GPU backends' rules (triton, cuda) from the static
    performance MODEL (bench/perf_model.py; source "modelled"), per GPU arch, until a GPU measures
    them: a GPU backend that the model says is slower than eager is not picked. bench/crossover.py
    run on a GPU writes that arch's measured rules (data/<backend>_measured_crossover.json), which
    replace the model's for the archs measured (`load_rules`).

The reference takes an inference call inside a "fwd" rule, and a training call only inside a rule
made for training ("fwd+bwd"), and either only if the maps it would materialise (inference: 1/16 of
the device's memory at most) or keep for the backward (training: 1/128 per call, since a step keeps
every block's) fit comfortably in memory; otherwise auto keeps the fused backend.
bench/crossover.py makes reference rules for inference only: on the CPU, what is kept for the
backward stays the fused backend's whatever the size of the input (detection-size training relies
on it). The GPU rules cover training too, so a fused backward the model says is slower than eager's
(fp32 on SIMT cores, the mixed backward at stage 4) is not taken. With the reference, autograd can
do more (double backward), never less.

A rule covers one dtype (measured or modelled in; other dtypes stay on the fused backend), one GPU
arch where it was made for one (`arch`: 10 x major + minor; None: any device, the CPU's rules), a
range of call sizes (elements: B h N M for EMSA, B C H W for PA), and for EMSA one reduction class
(`reduction_class`: N / M to the nearest power of 4, i.e. sr^2 for ResT's spatial reduction ratios):
which route wins depends on the shape as well as the size (on the CPU, SDPA's training pass beats
the fused kernels at the unreduced stage 4, N = M, and loses where M << N), and one size threshold
per op cannot say that.

sdpa (plain attention, op "emsa", only): its rules are made per pass, the forward's for inference
calls and the forward-plus-backward's for training calls: SDPA materialises no N x M map, and like
the fused kernels it has a first backward and (PyTorch's flash kernels) no double backward, so
nothing autograd can do depends on the route. sdpa rules are checked before the reference's. Either
decision is logged once, with the rule that made it.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

#: What the reference materialises at once, in maps of the rule's "elements" (emsa_key / pa_key):
#: EMSA's logits, softmax and normalised map (3 maps of B h N M), PA's conv output and gate (2 maps of
#: B C H W). A map's element takes `map_element_bytes`.
REFERENCE_MAPS = {"emsa": 3, "emsa-mix": 3, "pa": 2}
#: What the reference keeps for the backward, in the same units, bounding what autograd's saved-tensor
#: hooks counted (tests/test_auto_preference.py holds it): with the mix the logits, the softmax and
#: the normalised map in float32 (3.0 maps; 3.5 from 16-bit inputs, whose map is kept in the input
#: dtype too), without it the softmax map (1.0; 1.6 from 16-bit inputs); PA the input and the
#: conv output (2.0). (It also keeps copies of q and k, O((N + M) d): small beside the maps that
#: this check is about.)
REFERENCE_SAVED_MAPS = {"emsa": 2, "emsa-mix": 4, "pa": 2}
#: "Comfortably": an inference call's maps take at most this fraction of the device's memory.
COMFORTABLE_FRACTION = 1 / 16
#: ... and a training call's saved maps at most this one: a training step keeps every block's maps
#: until its backward (ResT-Large's stage 3 has 18 blocks, the whole model 24), so that 18 calls of
#: one stage stay under about 1/7 of the memory.
COMFORTABLE_TRAINING_FRACTION = 1 / 128


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
    # the GPU arch (10 x major + minor) the rule was made for; None: any device (the CPU's rules)
    arch: int | None = None
    # "measured" (bench/crossover.py) or "modelled" (scripts/model_crossover.py: the performance model)
    source: str = "measured"

    def covers(self, faster: str, op: str, pass_: str, layout: str, elements: int, reduction: int | None,
               dtype: str = "float32", arch: int | None = None) -> bool:
        return (self.faster == faster and self.op == op and self.pass_ == pass_ and self.layout == layout
                and self.min_elements <= elements <= self.max_elements
                and (self.reduction is None or self.reduction == reduction) and self.dtype == dtype
                and (self.arch is None or self.arch == arch))

    def describe(self) -> str:
        who = "the reference" if self.faster == "reference" else self.faster
        size = (f"<= {self.max_elements}" if self.min_elements == 0
                else f"{self.min_elements} to {self.max_elements}")
        shape = "" if self.reduction is None else f", N / M ~ {self.reduction}"
        where = "" if self.arch is None else f" on sm_{self.arch}"
        return (f"{who} was {'modelled' if self.source == 'modelled' else 'measured'} faster on every "
                f"{self.dtype} {self.op} {self.pass_} call of {self.layout} layout{shape} with {size} elements"
                f"{where} ({self.measured})")


def _rules_in(path: str) -> tuple[tuple[ReferenceFaster, ...], dict]:
    if not os.path.exists(path):
        return (), {}
    with open(path) as f:
        data = json.load(f)
    return tuple(ReferenceFaster(r["op"], r["pass"], r["layout"], int(r["max_elements"]), data["measured"],
                                 r.get("faster", "reference"), int(r.get("min_elements", 0)), r.get("reduction"),
                                 r.get("dtype", "float32"), r.get("arch"), data.get("source", "measured"))
                 for r in data["rules"] if r["max_elements"] > 0), data


def load_rules(backend_name: str) -> tuple[ReferenceFaster, ...]:
    """The backend's rules: data/<backend>_crossover.json (the CPU's measurements, or the GPU
    performance model's rules), except that for every GPU arch measured on a GPU
    (data/<backend>_measured_crossover.json, bench/crossover.py --write on a GPU) the measured rules
    replace the model's, even where the measurement found none."""
    rules, _ = _rules_in(os.path.join(DATA_DIR, f"{backend_name}_crossover.json"))
    measured, data = _rules_in(os.path.join(DATA_DIR, f"{backend_name}_measured_crossover.json"))
    archs = set(data.get("archs", ()))
    return measured + tuple(r for r in rules if r.arch is None or r.arch not in archs)


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
# (No functools.lru_cache under the decorator: dynamo then traces the wrapped function instead, and
# cannot trace os.sysconf; torch caches the CUDA device's properties.)
@torch.compiler.assume_constant_result
def _device_memory(device_type: str, index: int | None) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@torch.compiler.assume_constant_result
def device_arch(device_type: str, index: int | None) -> int | None:
    """The GPU arch of a CUDA device as 10 x major + minor (90 for an H100), None for other devices:
    the `arch` a rule made for one GPU arch must match. (torch caches the device's properties.)"""
    if device_type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device())
    return 10 * major + minor


def map_element_bytes(op: str, t: torch.Tensor) -> int:
    """Bytes of one element of the reference's maps: EMSA's are computed in float32 from 16-bit inputs
    (rest_kernels/backends/reference.py), PA's in the input dtype."""
    return t.element_size() if op == "pa" else max(t.element_size(), 4)


def _covering(rules, faster: str, op: str, pass_: str, layout: str, elements: int, reduction: int | None, dtype: str,
              arch: int | None):
    return next((r for r in rules if r.covers(faster, op, pass_, layout, elements, reduction, dtype, arch)), None)


def route_preference(rules, key, needs_backward: bool, t: torch.Tensor) -> tuple[str | None, str | None]:
    """(the route to take instead of the fused backend: "sdpa", "reference" or None, why) for a call
    with `key` = (op, layout, elements, reduction, dtype) on tensor t's device. why is None when no rule
    covers the call."""
    if not rules:
        return None, None
    op, layout, elements, reduction, dtype = key
    pass_ = "fwd+bwd" if needs_backward else "fwd"
    arch = device_arch(t.device.type, t.device.index)
    rule = _covering(rules, "sdpa", op, pass_, layout, elements, reduction, dtype, arch)
    if rule is not None:
        return "sdpa", rule.describe()
    rule = _covering(rules, "reference", op, pass_, layout, elements, reduction, dtype, arch)
    if rule is None:
        return None, None
    maps = (REFERENCE_SAVED_MAPS if needs_backward else REFERENCE_MAPS)[op]
    fraction = COMFORTABLE_TRAINING_FRACTION if needs_backward else COMFORTABLE_FRACTION
    if maps * elements * map_element_bytes(op, t) > fraction * _device_memory(t.device.type, t.device.index):
        what = "keep for the backward" if needs_backward else "materialise"
        return None, (f"{rule.describe()}, but the maps it would {what} would take more than "
                      f"1/{round(1 / fraction)} of the device's memory")
    return "reference", rule.describe()
