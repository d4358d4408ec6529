"""Where the reference (eager PyTorch) or PyTorch's SDPA beats a fused backend: the data "auto" decides with.

    python bench/crossover.py [--backend cpu] [--write] [--repeats 5] [--margin 0.1]

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


#: the dtype of every measured call, and so of every rule (a rule covers only calls of its dtype)
MEASURED_DTYPE = "float32"


def cases(device: str, ops=("pa", "emsa", "emsa-mix")):
    for s in stage_shapes():
        for op in ops:
            if op != "pa" and not in_model(op, s) and not (op == "emsa" and s.h > 1):
                continue  # plain EMSA is measured at every stage (ResTv2 runs it), the mix where heads > 1
            for batch in BATCHES[s.input]:
                for pass_ in PASSES:
                    for cl in ((False, True) if op == "pa" else (False,)):
                        yield OpCase(op, pass_, s, batch, getattr(torch, MEASURED_DTYPE), device, channels_last=cl)


#: the routes "auto" may take instead of the fused backend, the passes it takes each for, and the row
#: field with the route's time (backends/preference.py)
ROUTES = (("reference", ("fwd",), "reference_s"), ("sdpa", ("fwd", "fwd+bwd"), "sdpa_s"))


def rules_from(rows, margin: float, routes=ROUTES) -> list[dict]:
    """The regions where a route beat the fused backend, per (route, op, pass, layout, reduction class,
    dtype, GPU arch): the call sizes of the group, in order, split into maximal runs of sizes where the
    route was faster by more than `margin` on every call measured at that size; each run is a rule
    from its smallest to its largest size (the run that starts at the group's smallest size also
    covers every smaller call: fixed costs dominate there). Nothing between a slower and a faster
    measurement, nor beyond the largest one, is guessed. Rows without "dtype" are MEASURED_DTYPE's;
    rows with "arch" (scripts/model_crossover.py's, per GPU arch) make rules for that arch only.
    `routes`: (route, passes it takes, row field with its time), ROUTES by default."""
    rules = []
    for faster, passes, field in routes:
        groups = {}
        for r in rows:
            if r["pass"] in passes and field in r:
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
    ap.add_argument("--write", action="store_true", help="write rest_kernels/backends/data/<backend>_crossover.json")
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
    rows = []
    print(f"{'case':<56} {'elements':>10} {'fused':>10} {'reference':>10} {'sdpa':>10} {'ref/fused':>9} "
          f"{'sdpa/fused':>10}")
    for case in cases(device, args.ops):
        times = {}
        for who in (args.backend, "reference") + (("sdpa",) if case.op == "emsa" else ()):
            runner = op_runner(case, who)
            times[who] = measure(runner.fn, device=device, warmup=2, repeats=args.repeats,
                                 min_time=args.min_time).median
        layout = ("channels_last" if case.channels_last else "contiguous") if case.op == "pa" else "any"
        row = dict(op=case.op, layout=layout, elements=elements(case), label=case.label, fused_s=times[args.backend],
                   reference_s=times["reference"], **{"pass": case.pass_})
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
    measured = (f"bench/crossover.py --margin {args.margin}, {cpu_model()}, {torch.get_num_threads()} threads, "
                f"torch {torch.__version__}, commit {git_commit()}, {datetime.date.today().isoformat()}")
    print(measured)
    if args.write:
        path = os.path.join(ROOT, "rest_kernels", "backends", "data", f"{args.backend}_crossover.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(dict(backend=args.backend, measured=measured, margin=args.margin, rules=rules, rows=rows), f,
                      indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
