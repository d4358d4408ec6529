"""Checks that need Triton compiling for real GPU targets, run in a process of their own.

The test session runs Triton under its interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when no
GPU is visible), and `@triton.jit` reads that switch when the kernels are defined: in that process
they are interpreted functions, which cannot compile. tests/test_triton_resources.py runs this file
with TRITON_INTERPRET=0 and reads the JSON it prints:

    TRITON_INTERPRET=0 python tests/support/triton_aot_checks.py auto       # "auto" on fake GPUs of each arch
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from rest_kernels.backends import registry  # noqa: E402
from rest_kernels.triton import resources as R  # noqa: E402
from rest_kernels.triton.aot import fake_gpu  # noqa: E402

#: (label, shape, dtype, training): calls whose fit differs between archs (see the budget table)
AUTO_CASES = [
    ("rest_lite stage 1 bf16 train", R.Shape("", "emsa", 64, 1, 3136, 49, 64, False), "bf16", True),
    ("rest_lite stage 4 bf16 train", R.Shape("", "emsa", 64, 8, 49, 49, 64, True), "bf16", True),
    ("rest_lite stage 4 bf16 infer", R.Shape("", "emsa", 64, 8, 49, 49, 64, True), "bf16", False),
    ("rest_base stage 4 bf16 train", R.Shape("", "emsa", 64, 8, 49, 49, 96, True), "bf16", True),
    ("rest_base stage 3 fp32 infer", R.Shape("", "emsa", 64, 4, 196, 49, 96, True), "fp32", False),
    ("emsa batch 70000 (grid y)", R.Shape("", "emsa", 70000, 1, 49, 49, 64, False), "bf16", False),
    ("pa batch 100000 stage 2", R.Shape("", "pa", 100000, C=128, H=28, W=28), "bf16", True),
    ("pa plane 16384 x 8192 (grid y)", R.Shape("", "pa", 1, C=1, H=16384, W=8192), "fp32", False),
]


def _fake_inputs(shape: R.Shape, dtype: torch.dtype, training: bool):
    """Tensors on a fake "cuda" device (FakeTensorMode: no GPU, no memory), laid out as the model's."""
    tensors = R.shape_tensors(shape, dtype, device="cuda")
    if training:
        tensors[0].requires_grad_()
    return tensors


def auto_on_fake_gpus(archs=(80, 86, 89, 90)) -> list[dict]:
    """For each arch and case: the backend "auto" picks and the Triton backend's reason."""
    registry._availability["triton"] = None  # a GPU "is there": the fake one
    results = []
    triton_backend = registry.BACKENDS["triton"]
    for arch in archs:
        with fake_gpu(arch):
            for label, shape, dname, training in AUTO_CASES:
                with FakeTensorMode():
                    t = _fake_inputs(shape, R.DTYPES[dname], training)
                    if shape.op == "emsa":
                        def unsupported(b, t=t):
                            return b.emsa_unsupported_reason(*t, needs_backward=training)
                    else:
                        def unsupported(b, t=t):
                            return b.pa_unsupported_reason(*t, needs_backward=training)
                    chosen = registry.select(shape.op, "auto", t[:2], unsupported)
                    reason = unsupported(triton_backend)
                results.append(dict(arch=arch, case=label, chosen=chosen.name, reason=reason))
    return results


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: the checks compile for real GPU targets")
    what = sys.argv[1] if len(sys.argv) > 1 else "auto"
    if what != "auto":
        sys.exit(f"unknown check {what!r} (expected: auto)")
    print(json.dumps(auto_on_fake_gpus()))
