"""Loading official ResT checkpoints into the models of this package.

A checkpoint is read by the first reader in READERS that claims its path (by file name), then
unwrapped ({"model": ...} / {"state_dict": ...} wrappers, "module." prefixes of DataParallel /
DistributedDataParallel) and matched strictly against the model: every key present with the
right shape, and nothing left over. Anything else is a CheckpointError that lists what is wrong.

Readers: safetensors files (suffix .safetensors, read with the `safetensors` package: tensors
only, no code) and everything else through torch.load(weights_only=True). To add a file format,
insert a (claims(path) -> bool, read(path) -> mapping) pair before the catch-all torch.load reader.

save_checkpoint(model, path) writes the model's state_dict in the format the suffix names
(.safetensors, else torch.save), so that pretrained= reads it back.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

__all__ = ["CheckpointError", "READERS", "read_checkpoint", "extract_state_dict", "load_checkpoint",
           "save_checkpoint"]

#: wrapper keys of training scripts (timm / DeiT-style: "model"; Lightning and others: "state_dict")
WRAPPER_KEYS = ("model", "state_dict")
#: buffers that older checkpoints may lack and that carry no learned value: tolerated when missing
OPTIONAL_SUFFIXES = ("num_batches_tracked",)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message says why."""


def _read_torch(path: str) -> Mapping:
    try:
        # weights_only: tensors and plain containers only, no arbitrary code from the file
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many kinds: zip, pickle, EOF, ...)
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            hint = (" The file holds objects other than tensors and plain containers; if you trust it, "
                    "load it yourself with torch.load(path, weights_only=False) and pass the state_dict "
                    "(or the dict) as pretrained=.")
        else:
            hint = ""
        raise CheckpointError(f"cannot read checkpoint {path!r} with torch.load: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}.{hint}") from e


SAFETENSORS_SUFFIX = ".safetensors"


def _is_safetensors(path: str) -> bool:
    return path.lower().endswith(SAFETENSORS_SUFFIX)


def _safetensors_module():
    try:
        import safetensors.torch
    except ImportError as e:
        raise CheckpointError("reading or writing .safetensors files needs the `safetensors` package "
                              "(pip install safetensors)") from e
    return safetensors.torch


def _read_safetensors(path: str) -> Mapping:
    st = _safetensors_module()
    try:
        return st.load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for bad headers)
        raise CheckpointError(f"cannot read checkpoint {path!r} as safetensors: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e


#: (claims(path), read(path)) pairs, tried in order; the last one takes every path
READERS: list[tuple[Callable[[str], bool], Callable[[str], Mapping]]] = [
    (_is_safetensors, _read_safetensors),
    (lambda path: True, _read_torch),
]


def read_checkpoint(path: str | os.PathLike) -> Mapping:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file not found: {path!r}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint path is not a file: {path!r}")
    for claims, read in READERS:
        if claims(path):
            return read(path)
    raise CheckpointError(f"no reader for checkpoint {path!r}")  # unreachable with the catch-all reader


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model's state_dict inside a loaded checkpoint: plain, or under one of WRAPPER_KEYS
    (nested wrappers too), with a common "module." prefix removed."""
    path, visited = [], set()
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping):
            where = "".join(f"[{k!r}]" for k in path)
            raise CheckpointError(f"{source}: expected a state_dict (a mapping of names to tensors), "
                                  f"found {type(obj).__name__}{' under ' + where if where else ''}")
        # a wrapper that contains itself (pickle keeps reference cycles) would be unwrapped forever
        if id(obj) in visited:
            raise CheckpointError(f"{source}: the wrappers {''.join(f'[{k!r}]' for k in path)} lead back to "
                                  "a mapping already unwrapped (a self-referencing checkpoint)")
        visited.add(id(obj))
        inner = next((k for k in WRAPPER_KEYS if k in obj), None)
        if inner is None:
            keys = ", ".join(repr(k) for k in list(obj)[:10])
            raise CheckpointError(f"{source}: not a state_dict and no {' or '.join(map(repr, WRAPPER_KEYS))} "
                                  f"entry to unwrap; top-level keys: {keys}{', ...' if len(obj) > 10 else ''}")
        path.append(inner)
        obj = obj[inner]
    state = dict(obj)
    # DataParallel / DDP save "module.<name>"; strip it when every key carries it (possibly repeatedly)
    while state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _mismatch_report(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list, list, list, list]:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state if k not in own]
    shapes = [(k, tuple(state[k].shape), tuple(own[k].shape))
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    # load_state_dict would copy_ these silently: an integer tensor rounded into a float weight, a
    # complex one with its imaginary part dropped; a meta tensor has no values to copy at all
    kinds = [(k, _kind(state[k]), _kind(own[k])) for k in own
             if k in state and (_kind(state[k]) != _kind(own[k]) or state[k].device.type == "meta")]
    return missing, unexpected, shapes, kinds


def _kind(t: torch.Tensor) -> str:
    if t.device.type == "meta":
        return "meta (no values)"
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "floating"
    return "bool" if t.dtype == torch.bool else "integer"


def _format_list(title: str, items: list, limit: int = 20) -> str:
    shown = "\n".join(f"    {item}" for item in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def load_checkpoint(model: nn.Module, checkpoint, source: str | None = None) -> nn.Module:
    """Load `checkpoint` (a path, or an already loaded dict / state_dict) into `model`, strictly.

    Raises CheckpointError naming the file and listing missing keys, unexpected keys and shape
    mismatches when the checkpoint does not fit."""
    if isinstance(checkpoint, (str, os.PathLike)):
        source = source or os.fspath(checkpoint)
        checkpoint = read_checkpoint(checkpoint)
    source = source or "checkpoint"
    state = extract_state_dict(checkpoint, source)
    missing, unexpected, shapes, kinds = _mismatch_report(model, state)
    if missing or unexpected or shapes or kinds:
        parts = [f"checkpoint {source!r} does not match {type(model).__name__}:"]
        if missing:
            parts.append(_format_list("missing keys", missing))
        if unexpected:
            parts.append(_format_list("unexpected keys", unexpected))
        if shapes:
            parts.append(_format_list("shape mismatches (checkpoint vs model)",
                                      [f"{k}: {a} vs {b}" for k, a, b in shapes]))
        if kinds:
            parts.append(_format_list("dtype mismatches (checkpoint vs model)",
                                      [f"{k}: {a} vs {b}" for k, a, b in kinds]))
        raise CheckpointError("\n".join(parts))
    # strict=False only to tolerate the OPTIONAL_SUFFIXES buffers; everything else was checked above
    model.load_state_dict(state, strict=False)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile / DataParallel / DistributedDataParallel wrappers, so
    that a saved checkpoint has the official keys (no "_orig_mod." or "module." prefixes)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> str:
    """Write `model`'s state_dict to `path`: safetensors when the name ends in .safetensors (tensors
    only, loadable without pickle), else torch.save of the plain state_dict (.pth / .pt / any other
    name). Either loads back with load_checkpoint(model, path) or pretrained=path. `metadata`
    (str -> str) goes into the safetensors header and is refused for the torch format. Returns
    the path."""
    path = os.fspath(path)
    state = {k: v.detach().to("cpu") for k, v in unwrap_model(model).state_dict().items()}
    if _is_safetensors(path):
        st = _safetensors_module()
        # safetensors refuses tensors that share memory or are not contiguous: give each its own copy
        st.save_file({k: v.contiguous().clone() for k, v in state.items()}, path,
                     metadata=dict(metadata) if metadata else None)
    else:
        if metadata:
            raise ValueError("metadata= is only stored in .safetensors files")
        torch.save(state, path)
    return path
