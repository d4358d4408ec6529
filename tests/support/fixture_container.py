"""A lossless container for the float64 fixtures of tests/data (format "rest-kernels-fixture/1").

torch.save of float64 tensors with random mantissas barely compresses (xz saves ~6%): the lent GPU
machines take a working tree of at most 64 MiB and the .pt fixtures alone were ~70 MB. This
container keeps every tensor bit for bit and is read with the standard library plus numpy:

- a zip archive, members stored (not deflated), fixed timestamps, so packing is reproducible;
- `structure.json`: the object with each tensor replaced by {"__tensor__": i}; dicts (str keys, in
  order), lists, {"__tuple__": [...]}, None, bool, int, float (JSON's shortest round-trip repr, so
  exact), str; then the table of tensors (dtype, shape, stride, storage offset, requires_grad,
  sha256 of the storage's bytes) and of storages;
- `storage/<i>.xz`: the bytes of storage i, byte-shuffled (byte k of every element, for k = 0 ..
  itemsize-1, one plane after the other) and xz-compressed: the planes holding the sign, the
  exponent and the top mantissa bits compress well, the six of random low mantissa bits do not;
- a tensor that is exactly `torch.randn(shape, generator=torch.Generator().manual_seed(seed),
  dtype=dtype)` (the fixtures' inputs and output gradients, see tests/data/README.md) is stored as
  its seed and regenerated on load, then checked against the sha256 recorded when packing; a torch
  whose CPU generator draws differently fails loudly here (the fixtures' weight recipe would not
  reproduce on it either).

Tensors sharing a storage share it again after loading; strides and storage offsets are kept.
`save` packs, `load` reads; scripts/pack_fixtures.py converted the .pt files.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import sys
import zipfile

import numpy as np
import torch

FORMAT = "rest-kernels-fixture/1"
STRUCTURE = "structure.json"
_TAGS = ("__tensor__", "__tuple__")
_DATE = (1980, 1, 1, 0, 0, 0)
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}


def _bytes_of(storage: torch.UntypedStorage) -> np.ndarray:
    """The storage's bytes as a uint8 numpy array (no copy)."""
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy()


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()


def _randn(shape, seed: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _randn_prefixes(seeds, dtype) -> dict[bytes, int]:
    """First 16 values of randn(n) for n >= 16 (a lookup only: every hit is checked in full)."""
    table = {}
    for seed in seeds:
        table.setdefault(_randn(16, seed, dtype).numpy().tobytes(), seed)
    return table


def save(obj, path, randn_seeds=(), preset: int = 6) -> dict:
    """Pack `obj` into the container at `path`; returns the header.

    randn_seeds: candidate seeds; a tensor equal bit for bit to torch.randn(its shape, that seed, its
    dtype) (contiguous, alone in its storage) is stored as the seed.
    """
    tensors, storages, storage_index, blobs = [], [], {}, []
    prefixes: dict[torch.dtype, dict[bytes, int]] = {}
    seeds = list(randn_seeds)
    users: dict[tuple, int] = {}

    def count_users(o):
        if isinstance(o, torch.Tensor):
            key = o.untyped_storage()._cdata  # the StorageImpl: the same for every view of it
            users[key] = users.get(key, 0) + 1
        elif isinstance(o, dict):
            for v in o.values():
                count_users(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                count_users(v)

    def as_seed(t: torch.Tensor, key) -> int | None:
        if (not seeds or not t.is_floating_point() or t.numel() < 16 or users[key] != 1
                or t.storage_offset() != 0 or not t.is_contiguous()
                or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            return None
        if t.dtype not in prefixes:
            prefixes[t.dtype] = _randn_prefixes(seeds, t.dtype)
        seed = prefixes[t.dtype].get(t.reshape(-1)[:16].numpy().tobytes())
        if seed is None or not torch.equal(_randn(tuple(t.shape), seed, t.dtype), t):
            return None
        return seed

    def tensor(t: torch.Tensor) -> dict:
        if type(t) is not torch.Tensor or t.device.type != "cpu" or t.layout != torch.strided:
            raise TypeError(f"only plain strided CPU tensors can be packed, not {type(t).__name__} "
                            f"on {t.device} ({t.layout})")
        if t.is_conj() or t.is_neg() or t.grad_fn is not None:
            raise TypeError("only leaf tensors without conjugate/negative bits can be packed")
        name = str(t.dtype).removeprefix("torch.")
        if _DTYPES.get(name) != t.dtype:
            raise TypeError(f"dtype {t.dtype} is not supported")
        storage = t.untyped_storage()
        key = storage._cdata
        entry = {"dtype": name, "shape": list(t.shape), "requires_grad": t.requires_grad}
        seed = as_seed(t.detach(), key)
        if seed is not None:
            entry.update(randn_seed=seed, sha256=_sha256(t.detach().numpy()))
            return entry
        if key not in storage_index:
            data = _bytes_of(storage)
            itemsize = t.element_size() if storage.nbytes() % t.element_size() == 0 else 1
            shuffled = data.reshape(-1, itemsize).T.tobytes()
            member = f"storage/{len(storages)}.xz"
            blobs.append((member, lzma.compress(shuffled, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                                                preset=preset)))
            storage_index[key] = len(storages)
            storages.append({"member": member, "nbytes": storage.nbytes(), "itemsize": itemsize,
                             "sha256": _sha256(data)})
        entry.update(storage=storage_index[key], stride=list(t.stride()), storage_offset=t.storage_offset())
        return entry

    def encode(o):
        if o is None or isinstance(o, (bool, str)) or type(o) in (int, float):
            return o
        if isinstance(o, torch.Tensor):
            tensors.append(tensor(o))
            return {"__tensor__": len(tensors) - 1}
        if type(o) is list:
            return [encode(v) for v in o]
        if type(o) is tuple:
            return {"__tuple__": [encode(v) for v in o]}
        if type(o) is dict:
            for k in o:
                if type(k) is not str or k in _TAGS:
                    raise TypeError(f"dict keys must be str other than {_TAGS}, not {k!r}")
            return {k: encode(v) for k, v in o.items()}
        raise TypeError(f"cannot pack a {type(o).__name__}")

    count_users(obj)
    header = {"format": FORMAT, "byteorder": sys.byteorder, "torch": torch.__version__}
    header["object"] = encode(obj)
    header.update(tensors=tensors, storages=storages)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in [(STRUCTURE, json.dumps(header, indent=1).encode())] + blobs:
            info = zipfile.ZipInfo(name, date_time=_DATE)
            info.external_attr = 0o644 << 16
            z.writestr(info, data)
    return header


def _storage(z: zipfile.ZipFile, s: dict, path) -> torch.UntypedStorage:
    planes = np.frombuffer(lzma.decompress(z.read(s["member"]), format=lzma.FORMAT_XZ), dtype=np.uint8)
    n, itemsize = s["nbytes"], s["itemsize"]
    if planes.size != n:
        raise ValueError(f"{path}: {s['member']} holds {planes.size} bytes, not {n}")
    out = torch.empty(n, dtype=torch.uint8)  # a storage of torch's own, as torch.load gives
    np.copyto(out.numpy().reshape(-1, itemsize), planes.reshape(itemsize, -1).T)
    if _sha256(out.numpy()) != s["sha256"]:
        raise ValueError(f"{path}: {s['member']} does not match its sha256")
    return out.untyped_storage()


def load(path):
    """The object packed by `save`, with every tensor bit for bit as it was packed."""
    with zipfile.ZipFile(path) as z:
        header = json.loads(z.read(STRUCTURE))
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format {header.get('format')!r})")
        if header["byteorder"] != sys.byteorder:
            raise ValueError(f"{path}: packed on a {header['byteorder']}-endian machine")
        storages = [_storage(z, s, path) for s in header["storages"]]

    tensors = []
    for i, e in enumerate(header["tensors"]):
        dtype = _DTYPES[e["dtype"]]
        if "randn_seed" in e:
            t = _randn(tuple(e["shape"]), e["randn_seed"], dtype)
            if _sha256(t.numpy()) != e["sha256"]:
                raise RuntimeError(
                    f"{path}: tensor {i} = torch.randn({tuple(e['shape'])}, seed {e['randn_seed']}) does not "
                    f"reproduce the one packed under torch {header['torch']}: this torch's CPU generator "
                    f"draws differently, and the weight recipe of tests/data/README.md would not reproduce either")
        else:
            t = torch.empty(0, dtype=dtype).set_(storages[e["storage"]], e["storage_offset"], e["shape"], e["stride"])
        tensors.append(t.requires_grad_(e["requires_grad"]))

    def decode(o):
        if isinstance(o, list):
            return [decode(v) for v in o]
        if isinstance(o, dict):
            if len(o) == 1 and "__tensor__" in o:
                return tensors[o["__tensor__"]]
            if len(o) == 1 and "__tuple__" in o:
                return tuple(decode(v) for v in o["__tuple__"])
            return {k: decode(v) for k, v in o.items()}
        return o

    return decode(header["object"])


def differences(a, b, path: str = "") -> list[str]:
    """Where `b` is not `a` bit for bit: types, dict key order, values (NaN equals NaN), and for
    tensors dtype, shape, stride, storage offset, requires_grad, the bytes of the whole storage,
    torch.equal, and which tensors share a storage. Empty when they are identical."""
    found, pairs = [], {}

    def walk(a, b, path):
        if type(a) is not type(b):
            found.append(f"{path}: {type(a).__name__} vs {type(b).__name__}")
        elif isinstance(a, torch.Tensor):
            meta = lambda t: (t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), t.requires_grad,  # noqa: E731
                              t.untyped_storage().nbytes())
            if meta(a) != meta(b):
                found.append(f"{path}: {meta(a)} vs {meta(b)}")
                return
            sa, sb = a.untyped_storage(), b.untyped_storage()
            if pairs.setdefault(sa._cdata, sb._cdata) != sb._cdata:
                found.append(f"{path}: storage sharing differs")
            if not np.array_equal(_bytes_of(sa), _bytes_of(sb)):
                found.append(f"{path}: storage bytes differ")
            elif not (torch.equal(a, b) or (a.is_floating_point() and a.isnan().any()
                                            and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))):
                found.append(f"{path}: torch.equal is False")
        elif isinstance(a, dict):
            if list(a) != list(b):
                found.append(f"{path}: keys {list(a)} vs {list(b)}")
            else:
                for k in a:
                    walk(a[k], b[k], f"{path}/{k}")
        elif isinstance(a, (list, tuple)):
            if len(a) != len(b):
                found.append(f"{path}: length {len(a)} vs {len(b)}")
            else:
                for i, (x, y) in enumerate(zip(a, b)):
                    walk(x, y, f"{path}/{i}")
        elif not (a == b or (isinstance(a, float) and a != a and b != b)):
            found.append(f"{path}: {a!r} vs {b!r}")
        elif isinstance(a, float) and str(a) != str(b):  # -0.0 vs 0.0
            found.append(f"{path}: {a!r} vs {b!r}")

    walk(a, b, path)
    return found
