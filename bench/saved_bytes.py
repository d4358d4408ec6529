"""Bytes that one fused emsa_attention call keeps alive for its backward, per ResT stage shape.

    python bench/saved_bytes.py [--backend cpu] [--batch 1] [--dtype float32] [--input 224,det]

Autograd's saved-tensor hooks see every tensor the op saves. Tensors that are the call's own inputs
(q, k, v, the mix weight) are kept alive by the model anyway and are not counted; what is counted is
what exists only for the backward: the output and the statistics (everything of neither q's nor
the output's shape). Shapes come from bench/_cases.py (every stage of both ResT families at 224 px
and 800 x 1216, each with the op the model runs there: the head mix where heads > 1).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import rest_kernels  # noqa: E402
from bench._cases import INPUTS, stage_shapes  # noqa: E402
from bench._report import fmt_bytes  # noqa: E402
from rest_kernels.diagnostics import saved_tensors_of  # noqa: E402


def saved_bytes(backend: str, B: int, h: int, N: int, M: int, d: int, mix: bool, dtype: torch.dtype) -> dict:
    """{'out': bytes, 'stats': bytes, 'stat_shapes': [...]} saved by one call beyond its inputs."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, d, generator=gen, dtype=dtype).requires_grad_() for n in (N, M, M))
    w = torch.randn(h, h, generator=gen).requires_grad_() if mix else None
    inputs = {t.data_ptr() for t in (q, k, v, w) if t is not None}
    out, saved = saved_tensors_of(rest_kernels.emsa_attention, q, k, v, w, backend=backend)
    seen, result = set(), {"out": 0, "stats": 0, "stat_shapes": []}
    for t in saved:
        if t is None or t.data_ptr() in inputs or (t.data_ptr(), tuple(t.shape)) in seen:
            continue
        seen.add((t.data_ptr(), tuple(t.shape)))
        nbytes = t.numel() * t.element_size()
        if tuple(t.shape) == tuple(out.shape):
            result["out"] += nbytes
        else:
            result["stats"] += nbytes
            result["stat_shapes"].append(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    ap.add_argument("--input", default=",".join(INPUTS), help=f"comma-separated subset of {sorted(INPUTS)}")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    wanted = set(args.input.split(","))
    print(f"backend {args.backend}, batch {args.batch}, {args.dtype}; bytes kept for backward beyond the inputs")
    print(f"{'shape':<24} {'h':>2} {'N':>6} {'M':>5} {'d':>4} {'mix':>4} {'out':>10} {'stats':>10}  statistics")
    totals = {"out": 0, "stats": 0}
    for s in stage_shapes():
        if s.input not in wanted:
            continue
        for mix in ((s.h > 1),) + ((False,) if s.h > 1 else ()):
            r = saved_bytes(args.backend, args.batch, s.h, s.N, s.M, s.d, mix, dtype)
            totals["out"] += r["out"]
            totals["stats"] += r["stats"]
            print(f"{s.label:<24} {s.h:>2} {s.N:>6} {s.M:>5} {s.d:>4} {'yes' if mix else 'no':>4} "
                  f"{fmt_bytes(r['out']):>10} {fmt_bytes(r['stats']):>10}  {', '.join(r['stat_shapes'])}")
    print(f"{'total':<24} {'':>2} {'':>6} {'':>5} {'':>4} {'':>4} {fmt_bytes(totals['out']):>10} "
          f"{fmt_bytes(totals['stats']):>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
