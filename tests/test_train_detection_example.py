"""examples/train_detection.py: RetinaNet and Mask R-CNN on a tiny ResT overfit one fixed synthetic
batch (the loss falls below half its first value, then box mAP on that batch is above 0.5); and the
command line trains an epoch with AMP, writes its checkpoint, resumes and evaluates."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("pycocotools")
pytest.importorskip("torchmetrics")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_detection.py")


def load_example():
    spec = importlib.util.spec_from_file_location("train_detection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# optimizer steps to overfit the batch (the example's rest_tiny: a 64-wide FPN and narrow R-CNN heads)
STEPS = {"retinanet": 100, "maskrcnn": 30}


@pytest.fixture
def one_thread():
    """The tiny model's ops are too small for a second thread to pay (and on a shared machine its
    waiting costs more than it computes)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("detector", sorted(STEPS))
def test_overfit_one_batch(tmp_path, detector, one_thread):
    td = load_example()
    steps = STEPS[detector]
    args = td.parse_args(["--detector", detector, "--model", "rest_tiny", "--overfit", str(steps), "--lr", "1e-3",
                          "--batch-size", "2", "--synthetic-train", "2", "--synthetic-val", "1", "--image-size", "128",
                          "--output", str(tmp_path), "--workers", "0"])
    train_set, _ = td.make_datasets(args)
    torch.manual_seed(0)
    model = td.build_model(args, train_set.num_classes).train()
    images, targets = td.collate([train_set[0], train_set[1]])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses, metrics = td.overfit(model, list(images), list(targets), args, opt, scaler, torch.bfloat16)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] / 2, losses
    assert metrics["bbox_mAP"] > 0.5, metrics


def test_command_line_epoch_checkpoint_resume(tmp_path):
    common = [sys.executable, SCRIPT, "--detector", "maskrcnn", "--model", "rest_tiny", "--image-size", "64",
              "--synthetic-train", "4", "--synthetic-val", "2", "--batch-size", "2", "--workers", "0", "--amp",
              "--output", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*extra):
        out = subprocess.run([*common, *extra], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    log = run("--epochs", "1")
    assert "epoch 1/1" in log and "bbox_mAP" in log and "segm_mAP" in log
    state = torch.load(tmp_path / "last.pth", weights_only=True)
    assert state["epoch"] == 1 and state["args"]["amp"] is True
    with open(tmp_path / "synthetic" / "train" / "instances.json") as f:
        assert '"segmentation"' in f.read()
    log = run("--epochs", "2", "--resume", str(tmp_path / "last.pth"))
    assert "resumed from" in log and "at epoch 1" in log and "epoch 2/2" in log and "epoch 1/" not in log
    resumed = torch.load(tmp_path / "last.pth", weights_only=True)
    assert resumed["epoch"] == 2
    key = "backbone.fpn.inner_blocks.0.0.weight"
    assert not torch.equal(resumed["model"][key], state["model"][key])
