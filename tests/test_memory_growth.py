"""Repeated calls do not grow memory, and autograd graphs (with what they save) are freed.

RSS is read from /proc/self/statm in a process of its own (tests/support/isolated.py), so that nothing else
of the test session allocates meanwhile: WARMUP calls first (allocator arenas, thread pools, lazy
initialisation reach their steady state), then the resident size before and after CALLS more calls.
The growth must stay under LIMIT. A negative control leaks LEAK bytes per call through the same
measurement and must be seen, so a passing check is not a blind one.
"""
import gc
import os
import weakref

import pytest
import torch

from support import isolated
import rest_kernels
from conftest import require_backend

WARMUP, CALLS = 50, 300
LIMIT = 1 << 20          # 1 MiB over CALLS calls: about 3 KiB a call would already exceed it
LEAK = 16 << 10          # the negative control's leak per call: 4.7 MiB over CALLS calls
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _inputs(op):
    g = torch.Generator().manual_seed(0)
    if op == "emsa":
        q, k, v = (torch.randn(2, 2, n, 16, generator=g) for n in (49, 13, 13))
        return dict(q=q, k=k, v=v, mix_weight=torch.randn(2, 2, generator=g), mix_bias=torch.randn(2, generator=g))
    return dict(x=torch.randn(2, 8, 14, 14, generator=g), weight=torch.randn(8, 1, 3, 3, generator=g),
                bias=torch.randn(8, generator=g))


def _call(op, backend, args, backward):
    if backward:
        args = {n: t.detach().requires_grad_(True) for n, t in args.items()}
    if op == "emsa":
        out = rest_kernels.emsa_attention(args["q"], args["k"], args["v"], args["mix_weight"], args["mix_bias"],
                                          backend=backend)
    else:
        out = rest_kernels.pa_gate(args["x"], args["weight"], args["bias"], backend=backend)
    if backward:
        out.sum().backward()
    return out


def _growth(op, backend, backward, leak_bytes=0):
    """Child process: RSS growth over CALLS calls after WARMUP calls (leak_bytes: the negative control)."""
    torch.set_num_threads(1)
    args = _inputs(op)
    kept = []
    with torch.set_grad_enabled(backward):
        for _ in range(WARMUP):
            _call(op, backend, args, backward)
        gc.collect()
        before = _rss()
        for _ in range(CALLS):
            _call(op, backend, args, backward)
            if leak_bytes:
                kept.append(torch.ones(leak_bytes // 4))  # written, so resident
        gc.collect()
        after = _rss()
    return after - before


CASES = [(op, backend, backward) for op in ("emsa", "pa") for backend in ("cpu", "reference")
         for backward in (False, True)]


@pytest.mark.parametrize("op,backend,backward", CASES,
                         ids=[f"{o}-{b}-{'fwd+bwd' if w else 'fwd'}" for o, b, w in CASES])
def test_repeated_calls_do_not_grow_rss(op, backend, backward):
    require_backend(backend)
    outcome = isolated.run(_growth, op, backend, backward, timeout=300)
    assert outcome.status == "returned", outcome.describe() + outcome.traceback
    assert outcome.value < LIMIT, f"RSS grew by {outcome.value / 1024:.0f} KiB over {CALLS} calls"


def test_negative_control_a_leak_is_seen():
    outcome = isolated.run(_growth, "emsa", "reference", False, LEAK, timeout=300)
    assert outcome.status == "returned", outcome.describe() + outcome.traceback
    assert outcome.value >= LIMIT, f"a leak of {LEAK * CALLS >> 10} KiB grew RSS by only {outcome.value >> 10} KiB"
    assert outcome.value >= 0.8 * LEAK * CALLS


@pytest.mark.parametrize("backend", ["cpu", "reference", "cuda-emu"])
@pytest.mark.parametrize("op", ["emsa", "pa"])
@pytest.mark.parametrize("backward", [False, True])
def test_autograd_graph_and_saved_tensors_are_freed(op, backend, backward):
    # Python tensor objects die with their last Python reference even when autograd still holds the
    # tensor, so their weak references say nothing about the graph. The inputs' memory is therefore
    # numpy arrays (weakly referenceable) that a tensor's storage keeps alive until it is freed.
    require_backend(backend)
    arrays = {n: t.numpy().copy() for n, t in _inputs(op).items()}
    refs = {n: weakref.ref(a) for n, a in arrays.items()}
    leaves = {n: torch.from_numpy(a).requires_grad_(True) for n, a in arrays.items()}
    del arrays
    out = (rest_kernels.emsa_attention(leaves["q"], leaves["k"], leaves["v"], leaves["mix_weight"],
                                       leaves["mix_bias"], backend=backend) if op == "emsa"
           else rest_kernels.pa_gate(leaves["x"], leaves["weight"], leaves["bias"], backend=backend))
    del leaves
    gc.collect()
    # only the graph holds the inputs now: what it saved for backward is alive (so the check can fail)
    saved = "q" if op == "emsa" else "x"
    assert refs[saved]() is not None, f"{saved} freed while the graph still needs it"
    if backward:
        out.sum().backward()  # releases what the graph saved
    del out
    gc.collect()
    alive = [n for n, r in refs.items() if r() is not None]
    assert not alive, f"{alive} outlive the output and its graph"
