"""Measurements shared by the tests and the benchmark."""
from __future__ import annotations

import torch


def saved_tensors_of(fn, *args, **kwargs):
    """Run fn(*args, **kwargs) and return (output, list of tensors autograd saved for backward)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, saved


def saved_tensor_bytes(fn, *args, **kwargs):
    """Run fn and return (output, bytes of the distinct storages autograd saved for backward).

    Storages that the inputs already own (parameters, the input itself) are counted too: this is
    what stays alive for backward because of this call.
    """
    out, saved = saved_tensors_of(fn, *args, **kwargs)
    seen, total = set(), 0
    for t in saved:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return out, total
