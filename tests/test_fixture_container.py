"""The lossless fixture container (tests/support/fixture_container.py) and the fixture files of tests/data.

The .pt files the fixtures were packed from are no longer in the tree (scripts/pack_fixtures.py
checked each against its container bit for bit when converting); here the container's round trip
is checked on a synthetic object holding every kind of value and tensor layout it has to keep.
"""
import json
import math
import zipfile

import pytest
import torch

from support import fixture_container as fc
from support.reference_data import load


def _sample():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g, dtype=torch.float64)
    shared = torch.randn(40, generator=g, dtype=torch.float64)
    grad = torch.randn(3, generator=g, dtype=torch.float64).requires_grad_()
    return {
        "config": {"dim": 64, "heads": [1, 2], "ratio": (8, 4), "flag": True, "off": False, "none": None,
                   "name": "rest", "eps": 1e-5, "neg_zero": -0.0, "nan": math.nan, "inf": -math.inf,
                   "third": 1 / 3, "big": 2 ** 70},
        "cases": [
            {"x": base, "xt": base.t(), "tokens": torch.randn(2, 64, 7, generator=g, dtype=torch.float64)
             .transpose(1, 2)},  # strides (448, 1, 7), like the stage outputs of rest_v1_models
            {"view": shared[10:30].view(4, 5), "whole": shared, "step": shared[::3]},
        ],
        "seeded": torch.randn(3, 32, generator=torch.Generator().manual_seed(1234), dtype=torch.float64),
        "seeded_view": torch.randn(64, generator=torch.Generator().manual_seed(99), dtype=torch.float64)[:40],
        "small": torch.tensor([1.5, -2.0, 0.0, -0.0, math.inf, math.nan], dtype=torch.float64),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.empty(0, 4, dtype=torch.float64),
        "f32": torch.randn(7, generator=g),
        "i64": torch.arange(-5, 5),
        "mask": torch.tensor([True, False, True]),
        "grad": grad.detach().requires_grad_(),
    }


def test_round_trip_is_bitwise(tmp_path):
    obj = _sample()
    path = tmp_path / "sample.zip"
    header = fc.save(obj, path, randn_seeds=range(2000))
    back = fc.load(path)
    assert fc.differences(obj, back) == []
    # the same checks spelled out on a few of them
    assert back["cases"][0]["xt"].stride() == (1, 5) and torch.equal(back["cases"][0]["xt"], obj["cases"][0]["xt"])
    assert back["cases"][0]["tokens"].stride() == (448, 1, 7)
    view, whole = back["cases"][1]["view"], back["cases"][1]["whole"]
    assert view.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    assert view.storage_offset() == 10 and back["cases"][1]["step"].stride() == (3,)
    assert back["config"]["ratio"] == (8, 4) and type(back["config"]["heads"]) is list
    assert math.copysign(1, back["config"]["neg_zero"]) == -1 and math.isnan(back["config"]["nan"])
    assert back["config"]["big"] == 2 ** 70 and type(back["config"]["eps"]) is float
    assert back["grad"].requires_grad and not back["seeded"].requires_grad
    # a whole randn draw is stored as its seed; a view of one, or a draw sharing its storage, is not
    assert [t.get("randn_seed") for t in header["tensors"] if "randn_seed" in t] == [1234]
    # a second pack is the same file, byte for byte
    fc.save(obj, tmp_path / "again.zip", randn_seeds=range(2000))
    assert (tmp_path / "again.zip").read_bytes() == path.read_bytes()


def test_differences_sees_one_ulp_and_a_stride():
    obj = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64), "b": [0.1]}
    other = {"a": torch.tensor([1.0, math.nextafter(2.0, 3.0)], dtype=torch.float64), "b": [0.1]}
    assert fc.differences(obj, other)
    assert fc.differences(obj, {"a": obj["a"].clone(), "b": [math.nextafter(0.1, 1.0)]})
    t = torch.zeros(2, 3, dtype=torch.float64)
    assert fc.differences({"t": t}, {"t": t.t().contiguous().t()})
    assert fc.differences({"k": 1}, {"k": True}) and fc.differences({"k": (1,)}, {"k": [1]})
    assert fc.differences({"a": 1, "b": 2}, {"b": 2, "a": 1})


def test_corruption_is_refused(tmp_path):
    path = tmp_path / "c.zip"
    fc.save({"t": torch.randn(1000, dtype=torch.float64)}, path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    header = json.loads(members["structure.json"])
    header["storages"][0]["sha256"] = "0" * 64
    members["structure.json"] = json.dumps(header).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    with pytest.raises(ValueError, match="sha256"):
        fc.load(path)


@pytest.mark.parametrize("bad", [
    {1: torch.zeros(1)},                       # non-str key
    {"__tensor__": 0},                         # a reserved key
    {"p": torch.nn.Parameter(torch.zeros(1))},  # a tensor subclass
    {"s": {1, 2}},                             # an unknown type
])
def test_pack_refuses_what_it_cannot_keep(tmp_path, bad):
    with pytest.raises(TypeError):
        fc.save(bad, tmp_path / "bad.zip")


EMSA_KEYS = ["config", "state_sums", "x", "out", "dout", "grad_x", "grads"]


@pytest.mark.parametrize("name, check", [
    ("attention_cases.zip", lambda o: type(o) is list and len(o) == 8 and all(list(c) == EMSA_KEYS for c in o)),
    ("pa_cases.zip", lambda o: type(o) is list and len(o) == 5 and all(list(c) == EMSA_KEYS for c in o)),
    ("rest_tiny.zip", lambda o: list(o) == ["config", "224x224", "64x96"]
     and o["224x224"]["logits_eval"].shape == (2, 10)),
    ("rest_v1_models.zip", lambda o: list(o) == ["input", "rest_lite", "rest_small", "rest_base", "rest_large"]
     and o["input"].shape == (2, 3, 224, 224) and o["rest_lite"]["stage1_tokens"].stride() == (200704, 1, 3136)),
])
def test_fixture_files_load(name, check):
    obj = load(name)
    assert check(obj)
    tensors = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            tensors.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    assert tensors and all(t.dtype == torch.float64 and not t.requires_grad for t in tensors)
    assert all(torch.isfinite(t).all() for t in tensors)
