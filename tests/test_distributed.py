"""DistributedDataParallel training of a small ResT on the fused ops: two gloo processes on one
machine end with the same parameters as one process on the whole batch.

Why the parameters can agree: the loss is a mean of per-sample terms, each rank takes the mean
over its equal half of the batch, and DDP averages the ranks' gradients, so the averaged gradient
is the full-batch gradient (up to float64 summation order). Everything that couples samples or
draws random numbers must be kept out: dropout and stochastic depth are off, and BatchNorm runs on
its running statistics (eval mode, the usual setup for fine-tuning a backbone). Training-mode
BatchNorm would normalise each half-batch by its own mean and variance, a different function from
the full-batch one; SyncBatchNorm fixes that on GPUs but refuses CPU tensors.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rest import ResT

WORLD = 2
STEPS = 3
BATCH = 4  # per step, over all ranks
TIMEOUT_S = 120
CONFIG = dict(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1), mlp_ratios=(2, 2, 2, 2),
              qkv_bias=True, apply_transform=True, num_classes=5)


def make_model() -> ResT:
    torch.manual_seed(0)
    model = ResT(**CONFIG).double()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def freeze_batchnorm(model):
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 40, 40, generator=g, dtype=torch.float64),
             torch.randint(0, CONFIG["num_classes"], (BATCH,), generator=g)) for _ in range(STEPS)]


def train(model, data, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    shard = BATCH // world
    for x, y in data:
        x, y = x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@contextlib.contextmanager
def process_group(rank: int, world: int, port: int, timeout_s: float = TIMEOUT_S):
    """A gloo process group for this worker (one thread: the ranks share the machine's cores)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank, world, port, out_dir):
    with process_group(rank, world, port):
        model = freeze_batchnorm(make_model())
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        train(ddp, batches(), rank, world)
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int, out_dir: str, timeout_s: float = TIMEOUT_S) -> None:
    """worker(rank, world, port, out_dir) in `world` spawned processes; fails the test past timeout_s."""
    ctx = mp.start_processes(worker, args=(world, free_port(), out_dir), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:  # only our own workers, by handle
            if p.is_alive():
                p.terminate()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo needed")
def test_ddp_two_processes_match_one_process(tmp_path):
    run_ranks(_worker, WORLD, str(tmp_path))
    single = train(freeze_batchnorm(make_model()), batches())
    expected = single.state_dict()
    initial = make_model().state_dict()
    for rank in range(WORLD):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, v in expected.items():
            torch.testing.assert_close(state[k], v, rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {k}")
    # and training did move the weights
    assert not torch.equal(expected["head.weight"], initial["head.weight"])
