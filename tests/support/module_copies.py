"""The two ways a user copies a module: copy.deepcopy and a torch.save / torch.load round trip."""
from __future__ import annotations

import copy
import io

import torch


def deep_and_pickled_copies(module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(copy.deepcopy(module), the module saved with torch.save and loaded back with torch.load)."""
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return copy.deepcopy(module), torch.load(buf, weights_only=False)
