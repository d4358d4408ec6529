"""Where the reference (eager PyTorch) or PyTorch's SDPA beats a fused backend: the data "auto" decides with.

    python bench/crossover.py [--backend cpu] [--write] [--repeats 5] [--margin 0.1]
    python bench/crossover.py --backend triton --write      # on a GPU: this arch's measured rules

Times every op ResT and ResTv2 run (PA on NCHW and channels-last maps, EMSA with and without the head
mix) at every stage of the shape families (bench/_cases.py), at 224 px with batch 1 and 8 and at
800 x 1216 with batch 1, forward (inference, no autograd) and forward plus backward, on the fused
backend, on the reference and, for plain EMSA, on the `sdpa` backend, in one process, alternately per
case. The reference takes inference calls only (rest_kernels/backends/preference.py), so its rules are
made for the forward; sdpa's for both passes (the forward's for inference calls, the forward plus
backward's for training calls). For each (route, op, pass, layout) the rule's threshold is the largest
call size (elements: B C H W for PA, B h N M for EMSA) such that the route was faster than the fused
backend by more than `margin`, per reduction class for EMSA (N / M, see rest_kernels/backends/preference.py):
regions are runs of measured sizes where the route won every call; one slower call between two
faster ones splits them (no guessing between measurements, nor beyond the largest). With --write the rules and their
provenance (command, machine, date, commit) go to rest_kernels/backends/data/<backend>_crossover.json,
which the backend declares (rest_kernels/backends/preference.py).

On a GPU (--backend triton or cuda with a CUDA device) it measures bfloat16, float16 and float32 (by
default), with ResT's training batches (224 px batch 1, 8, 64; 800 x 1216 batch 1, 2, 8); the rows
carry their dtype and GPU arch, the reference is preferred for training calls too, and --write merges
this arch's measurements into <backend>_measured_crossover.json, whose rules replace the performance
model's (scripts/model_crossover.py) for every arch measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._cases import PASSES, OpCase, in_model, op_runner, stage_shapes  # noqa: E402
from bench._env import cpu_model  # noqa: E402
from bench._timing import measure  # noqa: E402
from rest_kernels.backends.preference import reduction_class  # noqa: E402

#: (input, batches) measured
BATCHES = {"224": (1, 8), "det": (1,)}


def elements(case: OpCase) -> int:
    s = case.shape
    return case.batch * (s.C * s.H * s.W if case.op == "pa" else s.h * s.N * s.M)


#: the dtype of every measured call on the CPU, and so of its rules (a rule covers only calls of its
#: dtype); on a GPU --dtypes chooses (default bfloat16, float16 and float32: its kernels differ per dtype)
MEASURED_DTYPE = "float32"
GPU_DTYPES = ("bfloat16", "float16", "float32")
#: (input, batches) measured on a GPU: its training batches too (scripts/model_crossover.py models the same)
GPU_BATCHES = {"224": (1, 8, 64), "det": (1, 2, 8)}


def cases(device: str, ops=("pa", "emsa", "emsa-mix"), dtypes=(MEASURED_DTYPE,)):
    batches = GPU_BATCHES if device == "cuda" else BATCHES
    for s in stage_shapes():
        for op in ops:
            if op != "pa" and not in_model(op, s) and not (op == "emsa" and s.h > 1):
                continue  # plain EMSA is measured at every stage (ResTv2 runs it), the mix where heads > 1
            for batch in batches[s.input]:
                for pass_ in PASSES:
                    for dtype in dtypes:
                        for cl in ((False, True) if op == "pa" else (False,)):
                            yield OpCase(op, pass_, s, batch, getattr(torch, dtype), device, channels_last=cl)


def reference_passes(arch) -> tuple[str, ...]:
    """The passes the reference is preferred for (rest_kernels/backends/preference.py): inference only
    on the CPU (rows without a GPU arch); on a GPU training too, so that no fused backend slower than
    eager is picked."""
    return ("fwd",) if arch is None else ("fwd", "fwd+bwd")


#: the routes "auto" may take instead of the fused backend, the passes it takes each for (given a
#: row's GPU arch, None on the CPU), and the row field with the route's time (backends/preference.py)
ROUTES = (("reference", reference_passes, "reference_s"), ("sdpa", lambda arch: ("fwd", "fwd+bwd"), "sdpa_s"))


def rules_from(rows, margin: float) -> list[dict]:
    """The regions where a route beat the fused backend, per (route, op, pass, layout, reduction class,
    dtype, GPU arch): the call sizes of the group, in order, split into maximal runs of sizes where the
    route was faster by more than `margin` on every call measured at that size; each run is a rule
    from its smallest to its largest size (the run that starts at the group's smallest size also
    covers every smaller call: fixed costs dominate there). Nothing between a slower and a faster
    measurement, nor beyond the largest one, is guessed. Rows without "dtype" are MEASURED_DTYPE's;
    rows with "arch" (measured on a GPU, or scripts/model_crossover.py's model of one) make rules
    for that arch only."""
    rules = []
    for faster, passes, field in ROUTES:
        groups = {}
        for r in rows:
            if r["pass"] in passes(r.get("arch")) and field in r:
                key = (r["op"], r["pass"], r["layout"], r.get("reduction"), r.get("dtype", MEASURED_DTYPE),
                       r.get("arch"))
                groups.setdefault(key, []).append(r)
        for (op, pass_, layout, reduction, dtype, arch), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
            sizes = sorted({r["elements"] for r in rs})
            wins = {e: all(r[field] < (1 - margin) * r["fused_s"] for r in rs if r["elements"] == e) for e in sizes}
            run = []
            for e in sizes + [None]:  # None closes the last run
                if e is not None and wins[e]:
                    run.append(e)
                    continue
                if run:
                    rule = dict(op=op, min_elements=0 if run[0] == sizes[0] else run[0], max_elements=run[-1],
                                layout=layout, dtype=dtype, **{"pass": pass_})
                    if reduction is not None:
                        rule["reduction"] = reduction
                    if arch is not None:
                        rule["arch"] = arch
                    rules.append(rule if faster == "reference" else dict(rule, faster=faster))
                run = []
    return rules


def git_commit() -> str:
    try:
        import subprocess
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - provenance only
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds per repeat at least")
    ap.add_argument("--margin", type=float, default=0.1, help="the reference must be this much faster")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ops", default="pa,emsa,emsa-mix",
                    help="comma-separated ops to measure (default all; --write needs all)")
    ap.add_argument("--dtypes", default=None,
                    help=f"comma-separated dtypes (default {MEASURED_DTYPE} on the CPU, {','.join(GPU_DTYPES)} on a GPU)")
    ap.add_argument("--write", action="store_true",
                    help="write rest_kernels/backends/data/<backend>_crossover.json (CPU) or, on a GPU, this "
                         "arch's measurements into <backend>_measured_crossover.json")
    ap.add_argument("--json", metavar="PATH", help="also write the rows and rules measured here to PATH")
    args = ap.parse_args(argv)
    args.ops = tuple(args.ops.split(","))
    if args.write and set(args.ops) != {"pa", "emsa", "emsa-mix"}:
        ap.error("--write replaces every rule of the backend: measure every op (no --ops)")
    if args.threads:
        torch.set_num_threads(args.threads)
    import rest_kernels
    reason = rest_kernels.available_backends()[args.backend]
    if reason is not None:
        print(f"backend {args.backend} unavailable: {reason}")
        return 1
    device = "cuda" if args.backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    from rest_kernels.backends.preference import device_arch
    arch = device_arch(device, None)
    dtypes = tuple(args.dtypes.split(",")) if args.dtypes else (GPU_DTYPES if device == "cuda" else (MEASURED_DTYPE,))
    bad = [d for d in dtypes if not isinstance(getattr(torch, d, None), torch.dtype)]
    if bad:
        ap.error(f"--dtypes: not torch dtypes: {', '.join(bad)}")
    if args.write and device == "cpu" and dtypes != (MEASURED_DTYPE,):
        ap.error(f"--write on the CPU: the rules' dtype is {MEASURED_DTYPE} (bench/crossover.py's MEASURED_DTYPE)")
    rows = []
    print(f"{'case':<56} {'elements':>10} {'fused':>10} {'reference':>10} {'sdpa':>10} {'ref/fused':>9} "
          f"{'sdpa/fused':>10}")
    for case in cases(device, args.ops, dtypes):
        times = {}
        for who in (args.backend, "reference") + (("sdpa",) if case.op == "emsa" else ()):
            runner = op_runner(case, who)
            times[who] = measure(runner.fn, device=device, warmup=2, repeats=args.repeats,
                                 min_time=args.min_time).median
        layout = ("channels_last" if case.channels_last else "contiguous") if case.op == "pa" else "any"
        row = dict(op=case.op, layout=layout, elements=elements(case), label=case.label, fused_s=times[args.backend],
                   reference_s=times["reference"], **{"pass": case.pass_})
        if device == "cuda":  # a GPU's rows say their dtype and arch (rules per dtype and arch)
            row.update(dtype=str(case.dtype).removeprefix("torch."), arch=arch)
        if case.op != "pa":
            row["reduction"] = reduction_class(case.shape.N, case.shape.M)
        if "sdpa" in times:
            row["sdpa_s"] = times["sdpa"]
        rows.append(row)
        sdpa = (f"{row['sdpa_s'] * 1e3:>8.3f}ms" if "sdpa_s" in row else f"{'-':>10}")
        ratio = (f"{row['sdpa_s'] / row['fused_s']:>10.2f}" if "sdpa_s" in row else f"{'-':>10}")
        print(f"{case.label + f' B{case.batch}':<56} {row['elements']:>10} {row['fused_s'] * 1e3:>8.3f}ms "
              f"{row['reference_s'] * 1e3:>8.3f}ms {sdpa} {row['reference_s'] / row['fused_s']:>9.2f} {ratio}")
    rules = rules_from(rows, args.margin)
    for r in rules:
        shape = f" N/M~{r['reduction']}" if "reduction" in r else ""
        print(f"rule: {r['op']} {r['pass']} {r['layout']}{shape}: {r.get('faster', 'reference')} preferred from "
              f"{r['min_elements']} to {r['max_elements']} elements")
    if not rules:
        print("no rule: the fused backend was as fast or faster everywhere measured")
    where = (f"{torch.cuda.get_device_name()} (sm_{arch})" if device == "cuda"
             else f"{cpu_model()}, {torch.get_num_threads()} threads")
    measured = (f"bench/crossover.py --margin {args.margin}, {where}, torch {torch.__version__}, "
                f"commit {git_commit()}, {datetime.date.today().isoformat()}")
    print(measured)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(backend=args.backend, measured=measured, margin=args.margin, rules=rules, rows=rows), f,
                      indent=1)
    if args.write:
        data_dir = os.path.join(ROOT, "rest_kernels", "backends", "data")
        if device == "cuda":
            path = os.path.join(data_dir, f"{args.backend}_measured_crossover.json")
            old = json.load(open(path)) if os.path.exists(path) else None
            data = merge_gpu_measurement(old, args.backend, arch, measured, args.margin, rows)
        else:
            path = os.path.join(data_dir, f"{args.backend}_crossover.json")
            data = dict(backend=args.backend, measured=measured, margin=args.margin, rules=rules, rows=rows)
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {path}")
    return 0


def merge_gpu_measurement(old: dict | None, backend: str, arch: int, measured: str, margin: float,
                          rows: list[dict]) -> dict:
    """<backend>_measured_crossover.json after measuring on a GPU of `arch`: this arch's rows replace
    its earlier ones, other archs' stay, and the rules are re-derived from all rows. `archs` names
    every arch measured: there these rules replace the performance model's
    (rest_kernels/backends/preference.py load_rules), even where they are none."""
    if old is not None and old.get("margin", margin) != margin:
        raise ValueError(f"--margin {margin} differs from the {old['margin']} of the stored measurements: "
                         "measure every arch again with one margin")
    kept = [r for r in (old or {}).get("rows", []) if r.get("arch") != arch]
    provenance = {int(a): text for a, text in (old or {}).get("provenance", {}).items() if int(a) != arch}
    provenance[arch] = measured
    all_rows = kept + rows
    archs = sorted(provenance)
    return dict(backend=backend, source="measured", archs=archs,
                measured="; ".join(f"sm_{a}: {provenance[a]}" for a in archs),
                provenance={str(a): provenance[a] for a in archs}, margin=margin,
                rules=rules_from(all_rows, margin), rows=all_rows)


if __name__ == "__main__":
    sys.exit(main())
