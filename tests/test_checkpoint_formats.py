"""Checkpoint files in both formats: save_checkpoint picks by suffix, load_checkpoint / pretrained=
read both (rest/checkpoint.py READERS)."""
from __future__ import annotations

import pytest
import torch

import rest
from rest import ResT, load_checkpoint, rest_lite, save_checkpoint
from rest.checkpoint import CheckpointError

from support.reference_data import load

safetensors = pytest.importorskip("safetensors.torch")


def tiny(seed=0):
    torch.manual_seed(seed)
    return ResT(**load("rest_tiny.zip")["config"])


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".pt"])
def test_save_load_round_trip(tmp_path, suffix):
    source, target = tiny(1), tiny(2)
    source.stem.norm1.running_mean.add_(0.5)  # buffers travel too
    path = save_checkpoint(source, tmp_path / f"model{suffix}")
    load_checkpoint(target, path)
    assert_same_state(source, target)


def test_file_formats_are_what_the_suffix_says(tmp_path):
    model = tiny()
    st_path = save_checkpoint(model, tmp_path / "m.safetensors", metadata={"arch": "rest_tiny"})
    pth_path = save_checkpoint(model, tmp_path / "m.pth")
    # safetensors: readable by the safetensors package itself, with the official keys and metadata
    loaded = safetensors.load_file(st_path)
    assert loaded.keys() == model.state_dict().keys()
    from safetensors import safe_open
    with safe_open(st_path, framework="pt") as f:
        assert f.metadata() == {"arch": "rest_tiny"}
    # .pth: a plain state_dict for torch.load(weights_only=True)
    assert torch.load(pth_path, weights_only=True).keys() == model.state_dict().keys()
    with pytest.raises(ValueError, match="metadata"):
        save_checkpoint(model, tmp_path / "m2.pth", metadata={"a": "b"})


def test_pretrained_accepts_both_formats(tmp_path):
    source = rest_lite()
    with torch.no_grad():
        source.head.bias.add_(1.0)
    for name in ("lite.safetensors", "lite.pth"):
        path = save_checkpoint(source, tmp_path / name)
        model = rest_lite(pretrained=path)
        assert_same_state(source, model)
        model = rest_lite(pretrained=str(path))
        assert torch.equal(model.head.bias, source.head.bias)


def test_wrapped_and_compiled_models_save_official_keys(tmp_path):
    model = tiny()
    wrapped = torch.nn.DataParallel(model)
    path = save_checkpoint(wrapped, tmp_path / "dp.safetensors")
    assert set(safetensors.load_file(path)) == set(model.state_dict())
    # a safetensors file written by someone else with "module." prefixes loads too
    prefixed = {"module." + k: v.clone() for k, v in model.state_dict().items()}
    safetensors.save_file(prefixed, tmp_path / "prefixed.safetensors")
    target = load_checkpoint(tiny(5), tmp_path / "prefixed.safetensors")
    assert_same_state(model, target)


def test_safetensors_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(CheckpointError, match="bad.safetensors.*safetensors"):
        load_checkpoint(tiny(), bad)
    # a state_dict of the wrong model: the strict report, as for .pth
    other = ResT(**{**load("rest_tiny.zip")["config"], "num_classes": 3})
    path = save_checkpoint(other, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_checkpoint(tiny(), path)


def test_exports():
    assert rest.save_checkpoint is save_checkpoint
