#!/usr/bin/env python3
"""Print what every Triton kernel of rest_kernels costs per GPU arch, compiled ahead of time.

    python scripts/triton_resources.py                      # the CI subset (sm_80, sm_90; bf16, fp32)
    python scripts/triton_resources.py --full               # sm_80/86/89/90, fp16/bf16/fp32, every shape
    python scripts/triton_resources.py --arch native        # the visible GPU, compiled by its own driver
    python scripts/triton_resources.py --full --update-budget   # rewrite tests/data/triton_resource_budget.json
    python scripts/triton_resources.py --json out.json
    python scripts/triton_resources.py --from-json a.json b.json --update-budget   # merge parallel runs

No GPU is needed except for --arch native: the kernels are compiled for each target by Triton's own
JIT with a driver that only names the target (rest_kernels/triton/aot.py). One row per distinct
compiled kernel: registers and spill bytes (ptxas -v), shared memory per block and warps (kernel
metadata), HMMA / HGMMA instructions (SASS), whether it fits the arch's shared memory, and how many
of ResT's calls launch it. --shapes lists which.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rest_kernels.triton import resources as R  # noqa: E402
from rest_kernels.triton.targets import arch_limits  # noqa: E402

BUDGET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data",
                      "triton_resource_budget.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="every arch, dtype, family, resolution and edge shape")
    p.add_argument("--arch", help="comma-separated compute capabilities (80,86,89,90) or 'native'")
    p.add_argument("--dtype", help="comma-separated fp16,bf16,fp32")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--shapes", action="store_true", help="list the calls that launch each kernel")
    p.add_argument("--update-budget", action="store_true", help=f"write the rows to {os.path.relpath(BUDGET)}")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--from-json", nargs="+", metavar="PATH",
                   help="compile nothing: print (and --update-budget from) the merged rows of earlier --json runs")
    args = p.parse_args(argv)

    subset = R.FULL if args.full else R.CI_SUBSET
    archs, dtypes = subset.archs, subset.dtypes
    context = None
    if args.arch == "native":
        import torch
        if not torch.cuda.is_available():
            p.error("--arch native needs a visible CUDA device")
        major, minor = torch.cuda.get_device_capability()
        archs, context = (10 * major + minor,), (lambda arch: contextlib.nullcontext())
    elif args.arch:
        archs = tuple(int(a) for a in args.arch.split(","))
    if args.dtype:
        dtypes = tuple(args.dtype.split(","))
    start = time.time()

    def progress(arch, dtype, shape):
        if not args.quiet:
            print(f"[{time.time() - start:6.0f} s] sm_{arch} {dtype} {shape.label} {shape.op}", file=sys.stderr)

    if args.from_json:
        rows = R.rows_from_json(args.from_json)
    else:
        rows = R.resource_table(subset.shapes(), archs, dtypes, compile_context=context, progress=progress)
    print(R.format_table(rows, with_shapes=args.shapes))
    print(f"\n{len(rows)} compiled kernels, {time.time() - start:.0f} s; {R.toolchain_line()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"toolchain": R.toolchain(), "rows": [R.row_dict(r) for r in rows]}, f, indent=1)
    if args.update_budget:
        R.write_budget(BUDGET, rows)
        print(f"wrote {os.path.relpath(BUDGET)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
