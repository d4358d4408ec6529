"""Hostile calls to the raw compiled ops end in Python exceptions, never a crash (issue 8).

tests/fuzz/raw_ops_fuzz.py runs in a child process for a bounded time, so a segfault or abort fails
this test instead of killing the test run. REST_KERNELS_FUZZ_SECONDS / _SEED change the budget.
The checks under test are csrc/op_checks.h, shared by every backend's registration.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import require_backend

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_raw_ops_survive_hostile_arguments():
    require_backend("cpu")
    seconds = os.environ.get("REST_KERNELS_FUZZ_SECONDS", "20")
    seed = os.environ.get("REST_KERNELS_FUZZ_SEED", "20261122")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fuzz", "raw_ops_fuzz.py"), seconds, seed],
                          capture_output=True, text=True, timeout=float(seconds) + 120, env=env)
    assert proc.returncode == 0, f"fuzzer died with status {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "no crash" in proc.stdout


@pytest.mark.parametrize("suffix", ["", "_emu"])
def test_raw_ops_name_the_bad_argument(suffix):
    require_backend("cpu" if suffix == "" else "cuda-emu")
    ops = torch.ops.rest_kernels_C
    q = k = v = torch.randn(1, 2, 3, 4)
    good = [torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2)]
    with pytest.raises(ValueError, match="rstd must have shape"):
        getattr(ops, "emsa_bwd" + suffix)(q, q, k, v, None, q, good[0], good[1], torch.ones(2, 2), 0.5, 1e-5)
    with pytest.raises(ValueError, match="mix_weight must have shape"):
        getattr(ops, "emsa_fwd" + suffix)(q, k, v, torch.eye(3), 0.5, 1e-5)
    with pytest.raises(ValueError, match="bias must have shape"):
        getattr(ops, "pa_fwd" + suffix)(torch.randn(1, 2, 3, 3), torch.randn(2, 1, 3, 3), torch.randn(5))
    with pytest.raises(ValueError, match="weight must have x's dtype"):
        getattr(ops, "pa_fwd" + suffix)(torch.randn(1, 2, 3, 3), torch.randn(2, 1, 3, 3).double(), None)
