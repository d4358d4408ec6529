"""A corpus of hostile calls over every public entry point, each with the outcome it must have.

Entry points: rest_kernels.emsa_attention / pa_gate (every backend), the custom ops
torch.ops.rest_kernels.emsa_fwd / emsa_bwd / pa_fwd / pa_bwd called directly, the raw compiled ops
torch.ops.rest_kernels_C.* (cpu and cuda-emu), the modules rest.EMSA / rest.PA, the models (ResT and
the variants' constructors and forwards), checkpoint loading (rest.load_checkpoint, pretrained=) and
the benchmark's options (bench/emsa_bench.py).

Each Case has an id, a zero-argument function that makes the call (building its own inputs), and an
expectation: Raises (an exception of one of the given types whose message matches a pattern that
names the argument and what was expected) or Correct (the function checks the result against the
reference itself and returns None). tests/test_hostile_calls.py runs every case in its own process
(tests/support/isolated.py), so a crash or a hang is that case's outcome. The corpus is rebuilt identically in
the child (case functions are closures), which looks its case up by id: run_case(case_id).

The cases live in tests/hostile/: _common.py (expectations, comparisons, inputs), ops.py (the ops,
custom ops, raw ops, autograd), zoo.py (modules, models, checkpoints), cli.py (benchmark options,
default backend).

Backends: "reference", "auto", "cpu", "cuda-emu", "triton" and "cuda". Where a backend cannot serve a
valid call (cuda without a GPU, float64 on triton, a head dim beyond a kernel's limit) the expected
outcome is BackendUnavailableError saying why; validation errors are the same in every backend,
since the arguments are checked before a backend is chosen.
"""
from __future__ import annotations

import functools

import torch

from hostile._common import BACKENDS, Case, Correct  # noqa: F401  (re-exported for the test module)
from hostile.cli import bench_cases, environment_cases
from hostile.ops import autograd_cases, custom_op_cases, emsa_cases, pa_cases, raw_op_cases
from hostile.zoo import checkpoint_cases, model_cases, module_cases


@functools.lru_cache(maxsize=None)
def corpus() -> tuple[Case, ...]:
    cases = (emsa_cases() + pa_cases() + custom_op_cases() + raw_op_cases() + module_cases() + model_cases()
             + checkpoint_cases() + bench_cases() + environment_cases() + autograd_cases())
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return tuple(cases)


@functools.lru_cache(maxsize=None)
def by_id() -> dict[str, Case]:
    return {c.id: c for c in corpus()}


def run_case(case_id: str):
    """Entry point in the child process: make the call; a Correct case's own checks raise on a wrong
    result, so returning means "ok"."""
    case = by_id()[case_id]
    # One intra-op thread: two cases run at once on this 2-core machine, and OpenMP barriers of
    # oversubscribed threads cost a scheduler slice per parallel region. The kernels' thread-count
    # independence is tested in tests/test_reliability.py.
    torch.set_num_threads(1)
    result = case.fn()
    if isinstance(case.expect, Correct):
        return "ok"
    return f"returned {type(result).__name__}"  # a Raises case that returned: the test reports it
