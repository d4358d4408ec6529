"""Smoke test of examples/train.py: two steps with AMP and clipping, then a resumed third step; an
ImageFolder step; gradient checkpointing trains the same weights."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train.py")
COMMON = ["--model", "rest_tiny", "--image-size", "48", "--batch-size", "4", "--workers", "0",
          "--num-classes", "3", "--amp", "--clip-grad", "1.0", "--log-every", "1", "--device", "cpu"]


def run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, SCRIPT, *COMMON, *args], capture_output=True, text=True, env=env,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_train_two_steps_then_resume(tmp_path):
    out_dir = str(tmp_path / "run")
    log = run("--steps", "2", "--output", out_dir)
    assert "step 1/2" in log and "step 2/2" in log and "grad_norm" in log
    state = torch.load(os.path.join(out_dir, "last.pth"), weights_only=True)
    assert state["step"] == 2 and state["args"]["amp"] is True
    weights_after_2 = state["model"]

    log = run("--steps", "3", "--output", out_dir, "--resume", os.path.join(out_dir, "last.pth"))
    assert "resumed from" in log and "at step 2" in log and "step 3/3" in log and "step 1/" not in log
    state = torch.load(os.path.join(out_dir, "last.pth"), weights_only=True)
    assert state["step"] == 3
    assert not torch.equal(state["model"]["head.weight"], weights_after_2["head.weight"])
    # the optimizer state travelled: AdamW's step count continued from 2
    assert all(int(s["step"]) == 3 for s in state["optimizer"]["state"].values())

    # the exported weights load as pretrained= of the same architecture
    model = rest.ResT(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1), qkv_bias=True,
                      apply_transform=True, num_classes=3)
    rest.load_checkpoint(model, os.path.join(out_dir, "model.safetensors"))
    assert torch.equal(model.head.weight, state["model"]["head.weight"])


def test_image_folder_data(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / "data" / cls)
        for i in range(3):
            Image.new("RGB", (40, 52), color=(40 * i, 100, 200 if cls == "dog" else 0)).save(tmp_path / "data" / cls / f"{i}.png")
    log = run("--steps", "1", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "run"))
    assert "step 1/1" in log
    state = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert state["model"]["head.weight"].shape[0] == 2  # classes from the folder


def test_grad_checkpointing_trains_the_same_weights(tmp_path):
    # checkpointed blocks recompute their activations in the backward: the same step, bitwise
    pytest.importorskip("timm")
    states = []
    for extra in ([], ["--grad-checkpointing"]):
        out_dir = tmp_path / ("ckpt" if extra else "plain")
        assert "step 1/1" in run("--steps", "1", "--drop-path", "0.2", "--output", str(out_dir), *extra)
        states.append(torch.load(out_dir / "last.pth", weights_only=True))
    assert states[1]["args"]["grad_checkpointing"] is True
    plain, checkpointed = states[0]["model"], states[1]["model"]
    assert plain.keys() == checkpointed.keys()
    for k in plain:
        assert torch.equal(plain[k], checkpointed[k]), k
