#!/usr/bin/env python3
"""Where the performance MODEL says eager PyTorch beats the triton or cuda backend: the rules "auto"
decides with on GPUs until a GPU measures them. Modelled, not measured.

    python scripts/model_crossover.py                  # print the rules and the rows they come from
    python scripts/model_crossover.py --write          # rest_kernels/backends/data/{triton,cuda}_crossover.json

Every EMSA and PA call of ResT's and ResTv2's stages (all four shape families) at 224 px with batch
1, 8 and 64 and at 800 x 1216 with batch 1, 2 and 8, forward and forward plus backward, in bfloat16,
float16 and float32, is modelled (bench/perf_model.py through scripts/perf_model.py: the backends'
own launches, their compiled resources, eager's aten ops) on each fused backend and on eager
PyTorch, per GPU arch: sm_80 on the A100, sm_90 on the H100 and the H200 (a row per GPU, so that a
rule at sm_90 needs both to agree). The rules are bench/crossover.py's `rules_from` (on a GPU
arch the reference takes both passes): regions of call size per (op, pass, reduction class, dtype, arch)
where eager was modelled faster than the backend by more than --margin on every call of that size.
No rule is made for an arch the model has no GPU of (sm_86, sm_89, sm_100, ...): there "auto" keeps
the fused backends. PA rules cover contiguous maps (the model's layout).

The rows are not stored (a few thousand per backend): the rules are a function of the model and the
compiled resources, and tests/test_auto_preference.py re-derives them. What the model assumes, and how far its forward estimates are from a GPU's measurement, is in
docs/performance_model.md; scripts/gpu_check.sh measures the same calls when a GPU is lent.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import perf_model as PMS  # noqa: E402  (scripts/perf_model.py)
from bench import crossover  # noqa: E402
from bench import perf_model as PM  # noqa: E402

#: the GPUs modelled for each arch whose rules are made (all must agree)
ARCH_GPUS = {80: ("A100",), 90: ("H100", "H200")}
#: (resolution, batches) modelled: those bench/crossover.py measures on a GPU
BATCHES = {"224": crossover.GPU_BATCHES["224"], "800x1216": crossover.GPU_BATCHES["det"]}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
BACKENDS = ("triton", "cuda")


def cases() -> list:
    """Every ResT / ResTv2 stage call modelled, as scripts/perf_model.py's Case."""
    from rest_kernels.triton import resources as R
    out = []
    for res, batches in BATCHES.items():
        for s in R.rest_shapes(R.FAMILIES, {res: R.RESOLUTIONS[res]}, batches):
            for pass_ in ("fwd", "fwd+bwd"):
                for dt in DTYPES:
                    out.append(PMS.Case(s, pass_, dt, PMS.short_label(s.label)))
    return out


def elements(case) -> int:
    s = case.shape
    return s.B * (s.C * s.H * s.W if s.op == "pa" else s.heads * s.N * s.M)


def model_rows(backend: str, tables: dict) -> list[dict]:
    """One row per (case, GPU of a modelled arch) that the backend serves: the backend's and eager's
    modelled seconds, with the keys bench/crossover.py's rules_from groups by."""
    from rest_kernels.backends.preference import reduction_class
    rows, seen, cache = [], set(), {}
    for case in cases():
        s = case.shape
        key = (case.op_name, case.pass_, case.dtype, tuple(sorted(case.dims().items())))
        if key in seen:  # families share shapes (rest_base and ResTv2-T/S/B stage 1)
            continue
        seen.add(key)
        for arch, names in ARCH_GPUS.items():
            gpus = [PM.GPU_BY_NAME[n] for n in names]
            fused = PMS.model_row(case, backend, gpus, tables, cache)
            if fused["status"] != "ok":
                continue  # the backend refuses it: "auto" never picks it there
            eager = PMS.model_row(case, "eager", gpus, tables, cache)
            for g in gpus:
                row = dict(op=case.op_name, layout="contiguous" if s.op == "pa" else "any", elements=elements(case),
                           label=f"{case.label} {g.name}", dtype=DTYPES[case.dtype], arch=arch,
                           fused_s=fused["seconds"][g.name], reference_s=eager["seconds"][g.name],
                           **{"pass": case.pass_})
                if s.op != "pa":
                    row["reduction"] = reduction_class(s.N, s.M)
                rows.append(row)
    return rows


def rules_from(rows: list[dict], margin: float) -> list[dict]:
    """bench/crossover.py's regions; the rows carry their GPU arch, so the reference takes both passes."""
    return crossover.rules_from(rows, margin)


def load_tables() -> dict:
    """The compiled resources the model's occupancy reads (scripts/perf_model.py's defaults: the
    checked-in Triton budget, the built extension's SASS)."""
    return PMS.load_tables(PMS.build_parser().parse_args([]))


def resources_said(tables: dict) -> str:
    said = "; ".join(f"{impl}: " + (tables.get(impl + ":what") or f"none ({tables[impl][1]})") for impl in BACKENDS)
    return said.replace(ROOT + os.sep, "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--margin", type=float, default=0.1, help="eager must be modelled this much faster")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--write", action="store_true", help="write rest_kernels/backends/data/<backend>_crossover.json")
    args = ap.parse_args(argv)
    tables = load_tables()
    if args.write and any(tables[i][0] is None for i in BACKENDS):
        ap.error("--write needs every backend's compiled resources (occupancy), got " + resources_said(tables))
    for backend in args.backends.split(","):
        rows = model_rows(backend, tables)
        rules = rules_from(rows, args.margin)
        print(f"{backend}: {len(rows)} modelled rows, {len(rules)} rules (eager faster by > {args.margin:g})")
        for r in rules:
            print("  ", {k: r[k] for k in ("arch", "dtype", "op", "pass", "reduction", "min_elements", "max_elements")
                          if k in r})
        if args.write:
            from rest_kernels.backends.preference import DATA_DIR
            data = dict(backend=backend, source="modelled",
                        measured=(f"performance model, not a measurement: scripts/model_crossover.py --margin "
                                  f"{args.margin:g} (bench/perf_model.py; sm_80 = A100, sm_90 = H100 and H200), "
                                  f"commit {crossover.git_commit()}, {datetime.date.today().isoformat()}"),
                        resources=resources_said(tables), margin=args.margin, rules=rules)
            path = os.path.join(DATA_DIR, f"{backend}_crossover.json")
            with open(path, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
