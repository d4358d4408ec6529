"""Make "auto" on CPU tensors take the fused custom-op path (torch.ops.rest_kernels.emsa_fwd / pa_fwd
and their registered autograd), with or without a compiled backend.

With the compiled `cpu` backend available nothing is patched and its kernels run. Without it, a
stand-in registered under the name "cpu" serves the calls with the reference backend's
implementation of the kernel contract (rest_kernels/backends/reference.py), so the custom ops, their
fake (meta) functions and autograd registration are what torch.compile / torch.export / autocast
see: the same graph a fused backend gives, with the official math inside the node.
"""
from __future__ import annotations

import contextlib

import torch

from rest_kernels.backends import registry
from rest_kernels.backends.reference import ReferenceBackend


class ReferenceKernelsAsCpu(ReferenceBackend):
    """The reference kernels behind the custom ops, under the `cpu` backend's name."""
    name = "cpu"
    auto_device_type = "cpu"
    device_type = "cpu"
    dtypes = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def fused_cpu_route(monkeypatch):
    """Within the block, "auto" on CPU tensors goes through the custom ops; yields a description
    of what runs inside them ("compiled cpu kernels" or "reference kernels (stand-in)")."""
    if registry.available_backends()["cpu"] is None:
        yield "compiled cpu kernels"
        return
    with monkeypatch.context() as m:
        m.setitem(registry.BACKENDS, "cpu", ReferenceKernelsAsCpu())
        m.setitem(registry._availability, "cpu", None)
        torch._dynamo.reset()  # no graph traced with the other routing may be reused
        try:
            yield "reference kernels (stand-in)"
        finally:
            torch._dynamo.reset()


def count_ops(graph, *names) -> dict[str, int]:
    """How many call_function nodes of each torch.ops.rest_kernels.<name> an FX graph has."""
    counts = dict.fromkeys(names, 0)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        for name in names:
            if target.startswith(f"rest_kernels.{name}") or target.startswith(f"rest_kernels::{name}"):
                counts[name] += 1
    return counts
