"""One error statistic for whole-model gradients, the same for our runs and for PyTorch's own.

err(g) = ||g - g64||_F / ||g64||_F for each gradient g against its float64 value g64. Why this and
not a difference of norms or sums: ||g|| - ||g64|| can be near zero by cancellation while g is far
from g64 elementwise (and then "twice PyTorch's norm difference" is an accidentally tiny bound); the
relative Frobenius error of the difference has no such cancellation and is what the flash-attention
rule compares (our error against PyTorch's own error in the same dtype, same statistic).

Gradients that are exactly zero in exact arithmetic (the attention's mix bias, kv.bias and
sr_norm.bias, and in train mode each PatchEmbed conv bias, which the following BatchNorm's batch mean
cancels) hold only rounding noise in float64: their error is taken relative to the larger of their
own norm and 1e-3 of the largest gradient norm of the model (the floor of tests/data/README.md).
"""
from __future__ import annotations

import re

import torch

from support.conformance import ZERO_GRAD_KEYS

# The scale of an exactly-zero gradient: this fraction of the model's largest gradient norm at least.
ZERO_GRAD_FLOOR = 1e-3


def is_zero_grad_key(name: str) -> bool:
    """The attention's zero gradients, and in train mode the bias of each PatchEmbed conv."""
    return name.endswith(ZERO_GRAD_KEYS) or re.fullmatch(r"patch_embed_\d\.conv\.bias", name) is not None


def relative_errors(grads: dict, oracle: dict) -> dict:
    """err(g) for every name of `oracle` (see the module docstring); `grads` must have the same names."""
    assert set(grads) == set(oracle), sorted(set(grads) ^ set(oracle))
    largest = max(g.double().norm().item() for n, g in oracle.items() if not n.startswith("<"))
    out = {}
    for name, e in oracle.items():
        g = grads[name]
        assert g is not None, f"no gradient for {name}"
        e = e.double()
        scale = e.norm().item()
        if is_zero_grad_key(name):
            scale = max(scale, ZERO_GRAD_FLOOR * largest)
        out[name] = (g.double() - e).norm().item() / max(scale, 1e-300)
    return out


# --------------------------------------------------------------------------- ReLU branches
# A ReLU whose input is within rounding of zero may take either branch in float32: the forward is
# continuous there (the output differs by about that rounding), but its derivative jumps from 0 to 1.
# One flipped element among the stem's ~1.6 million moves the gradients of the stem and of the input
# by about 1e-3 relative (measured on rest_lite's fixture: scripts/grad_error_table.py), a lottery
# that says nothing about the arithmetic. So each float32 run is compared with the exact gradient of
# the branch it took: its ReLU masks are recorded and the float64 oracle run applies them.
class _RecordReLU(torch.nn.Module):
    def __init__(self, masks: list):
        super().__init__()
        self.masks = masks

    def forward(self, x):
        y = torch.relu(x)
        self.masks.append(y > 0)
        return y


class _ReplayReLU(torch.nn.Module):
    def __init__(self, queue: list):
        super().__init__()
        self.masks = queue  # shared by every replaced ReLU: masks are consumed in call order

    def forward(self, x):
        return x * self.masks.pop(0).to(x.dtype)


def _swap_relus(model: torch.nn.Module, make) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.ReLU):
                setattr(parent, name, make())


def train_step(model, x, dlogits, relu_masks=None):
    """The fixtures' train-mode step: BatchNorm on batch statistics, gradients of
    (logits * dlogits).sum(). Returns (grads, masks): every parameter's gradient plus "<logits>" and
    "<grad_input>", and the ReLU masks in call order. relu_masks: ReLUs apply these masks instead
    (the oracle of a recorded run)."""
    masks = []
    if relu_masks is None:
        _swap_relus(model, lambda: _RecordReLU(masks))
    else:
        queue = list(relu_masks)
        _swap_relus(model, lambda: _ReplayReLU(queue))
    model.train()
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    (logits * dlogits.to(logits.dtype)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads["<logits>"] = logits.detach()
    grads["<grad_input>"] = x.grad
    if relu_masks is not None:
        assert not queue, f"{len(queue)} recorded ReLU masks were not used"
    return grads, masks
