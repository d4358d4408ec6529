"""Drive the raw compiled ops (torch.ops.rest_kernels_C.*) with hostile arguments for a bounded time.

Run as a child process by tests/test_fuzz_raw_ops.py: a crash (segfault, abort) kills only this
process and the test sees its exit status. Every call must either raise a Python exception
(RuntimeError / ValueError / TypeError / IndexError) or return tensors of the promised shapes.
Usage: python raw_ops_fuzz.py SECONDS SEED
"""
import random
import sys
import time

import torch

import rest_kernels  # noqa: F401  (loads the extension)
from rest_kernels import _extension

ALLOWED = (RuntimeError, ValueError, TypeError, IndexError)


def rand_tensor(rng, ndim=None, dtype=None):
    ndim = rng.choice([0, 1, 2, 3, 4, 4, 4, 5]) if ndim is None else ndim
    shape = [rng.choice([0, 1, 2, 3, 5, 8]) for _ in range(ndim)]
    dtype = dtype or rng.choice([torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32])
    t = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 3, shape, dtype=dtype)
    kind = rng.random()
    if kind < 0.15 and t.dim() > 0 and t.numel() > 0:
        t = t[..., :1].expand(*t.shape[:-1], rng.choice([1, 4]))           # zero stride
    elif kind < 0.3 and t.dim() >= 2:
        t = t.transpose(-1, -2)                                           # non-contiguous
    elif kind < 0.4 and t.dim() >= 1 and t.shape[-1] > 1:
        t = t[..., ::2]                                                    # strided
    return t


def emsa_args(rng):
    if rng.random() < 0.5:  # near-valid: consistent shapes, one thing broken
        B, h, N, M, d = (rng.choice([1, 2, 3]) for _ in range(5))
        q, k, v = torch.randn(B, h, N, d), torch.randn(B, h, M, d), torch.randn(B, h, M, d)
        w = torch.randn(h, h) if rng.random() < 0.7 else None
        broken = rng.choice(["q", "k", "v", "w", "none"])
        if broken == "q":
            q = rand_tensor(rng)
        elif broken == "k":
            k = rand_tensor(rng)
        elif broken == "v":
            v = rand_tensor(rng)
        elif broken == "w":
            w = rand_tensor(rng)
        return q, k, v, w
    return rand_tensor(rng), rand_tensor(rng), rand_tensor(rng), (rand_tensor(rng) if rng.random() < 0.5 else None)


def main(seconds, seed):
    if _extension.unavailable_reason() is not None:
        print("extension unavailable:", _extension.unavailable_reason())
        return 0
    rng = random.Random(seed)
    ops = torch.ops.rest_kernels_C
    deadline = time.monotonic() + seconds
    calls = errors = 0
    while time.monotonic() < deadline:
        suffix = rng.choice(["", "_emu"])
        which = rng.choice(["emsa_fwd", "emsa_bwd", "pa_fwd", "pa_bwd", "depthwise_conv2d"])
        try:
            if which == "depthwise_conv2d":  # the cpu backend's only (no _emu twin)
                x = rand_tensor(rng, 4) if rng.random() < 0.7 else rand_tensor(rng)
                C = x.shape[1] if x.dim() == 4 else 1
                k = [rng.choice([-1, 0, 1, 2, 3, 9]) for _ in range(2)]
                taps = torch.randn(max(k[0] * k[1], 0), C) if rng.random() < 0.6 else rand_tensor(rng)
                b = torch.randn(C) if rng.random() < 0.5 else (rand_tensor(rng) if rng.random() < 0.5 else None)
                stride = [rng.choice([-1, 0, 1, 2, 8]) for _ in range(rng.choice([1, 2, 2, 3]))]
                padding = [rng.choice([-1, 0, 1, 4]) for _ in range(rng.choice([1, 2, 2, 3]))]
                out = ops.depthwise_conv2d(x, taps, b, k, stride, padding)
                assert out.dim() == 4 and out.shape[:2] == x.shape[:2], (out.shape, x.shape)
            elif which == "emsa_fwd":
                q, k, v, w = emsa_args(rng)
                out = getattr(ops, which + suffix)(q, k, v, w, 0.5, 1e-5)
                assert tuple(out[0].shape) == tuple(q.shape), (out[0].shape, q.shape)
            elif which == "emsa_bwd":
                q, k, v, w = emsa_args(rng)
                B, h, N = (q.shape[:3] if q.dim() == 4 else (1, 1, 1))
                stats = [torch.zeros(B, h, N), torch.zeros(B, h, N), torch.ones(B, h)]
                if rng.random() < 0.3:
                    stats[rng.randrange(3)] = rand_tensor(rng)
                out = getattr(ops, which + suffix)(rand_tensor(rng) if rng.random() < 0.3 else torch.randn_like(q),
                                                   q, k, v, w, torch.randn_like(q), *stats, 0.5, 1e-5)
            elif which == "pa_fwd":
                x = rand_tensor(rng, 4) if rng.random() < 0.5 else rand_tensor(rng)
                C = x.shape[1] if x.dim() == 4 else 1
                wt = torch.randn(C, 1, 3, 3) if rng.random() < 0.6 else rand_tensor(rng)
                b = torch.randn(C) if rng.random() < 0.5 else (rand_tensor(rng) if rng.random() < 0.5 else None)
                out = getattr(ops, which + suffix)(x, wt, b)
                assert out.shape == x.shape
            else:
                x = rand_tensor(rng, 4)
                C = x.shape[1]
                wt = torch.randn(C, 1, 3, 3) if rng.random() < 0.6 else rand_tensor(rng)
                out = getattr(ops, which + suffix)(rand_tensor(rng) if rng.random() < 0.3 else torch.randn(x.shape),
                                                   x, wt, None)
            calls += 1
        except ALLOWED:
            errors += 1
            calls += 1
    print(f"{calls} hostile calls, {errors} raised Python exceptions, no crash")
    return 0


if __name__ == "__main__":
    sys.exit(main(float(sys.argv[1]), int(sys.argv[2])))
