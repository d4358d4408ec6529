#!/usr/bin/env python3
"""Print the static performance MODEL (not a measurement) of rest-kernels' EMSA and PA calls at
ResT's shapes: per implementation (the triton and cuda backends, eager PyTorch and torch.compile of
the reference) the kernels launched, HBM bytes, tensor-core and CUDA-core FLOPs, SFU operations and
the modelled time on an A100, an H100 and an H200, and the occupancy of every fused kernel from its
compiled registers and shared memory. Model: bench/perf_model.py; assumptions and formulas:
docs/performance_model.md.

    python scripts/perf_model.py                                    # lite and base stages, 224 px B64 and 800x1216 B1
    python scripts/perf_model.py --resources res.json               # Triton rows of scripts/triton_resources.py --json
    python scripts/perf_model.py --cuda-resources path/to/_C*.so    # CUDA rows (cuobjdump) of a built extension
    python scripts/perf_model.py --measured bench.json              # model vs bench/emsa_bench.py --json
    python scripts/perf_model.py --ops emsa --dtypes bf16 --kernels --json model.json

Nothing is compiled or run: the Triton host code runs on meta tensors (launches recorded), the CUDA
host code is transcribed, the reference runs on meta tensors under an aten op log. Occupancy needs
the compiled resources: by default tests/data/triton_resource_budget.json when present and the
extension built next to rest_kernels; without them it is "n/a" with the reason, never guessed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from bench import perf_model as PM  # noqa: E402  (light: no torch; the rest is imported by main)

IMPLS = ("triton", "cuda", "eager", "compile")
FAMILY_SHORT = {"rest_lite/small": "lite", "rest_base/large": "base", "restv2_t/s/b": "v2", "restv2_l": "v2l"}


def _modules():
    """The torch-dependent modules, imported when needed (so that --help is instant)."""
    from bench import _perf_aten, _perf_fused, _perf_inputs
    from rest_kernels.triton import resources
    return _perf_aten, _perf_fused, _perf_inputs, resources


@dataclasses.dataclass(frozen=True)
class Case:
    shape: object       # rest_kernels.triton.resources.Shape
    pass_: str          # "fwd" or "fwd+bwd"
    dtype: str          # "bf16", "fp32", "fp16"
    short: str          # e.g. "lite 224 B64 s2"

    @property
    def op_name(self) -> str:
        return "pa" if self.shape.op == "pa" else ("emsa-mix" if self.shape.mix else "emsa")

    @property
    def label(self) -> str:
        return f"{self.op_name} {self.pass_} {self.short} {self.dtype}"

    def dims(self) -> dict:
        s = self.shape
        if s.op == "pa":
            return dict(B=s.B, C=s.C, H=s.H, W=s.W)
        return dict(B=s.B, h=s.heads, N=s.N, M=s.M, d=s.d)


def short_label(label: str) -> str:
    for long, short in FAMILY_SHORT.items():
        label = label.replace(long, short)
    return label.replace("800x1216", "det").replace("stage ", "s")


def default_cases(args) -> list[Case]:
    R = _modules()[3]
    by_short = {FAMILY_SHORT[f.name]: f for f in R.FAMILIES}
    fams = tuple(by_short[f] for f in args.families)
    shapes = []
    if "224" in args.inputs:
        shapes += R.rest_shapes(fams, {"224": R.RESOLUTIONS["224"]}, (args.batch,))
    if "det" in args.inputs:
        shapes += R.rest_shapes(fams, {"800x1216": R.RESOLUTIONS["800x1216"]}, (args.det_batch,))
    shapes = [s for s in shapes if s.op in args.ops and int(s.label.rsplit(" ", 1)[1]) in args.stages]
    return [Case(s, p, dt, short_label(s.label)) for s in shapes for p in args.passes for dt in args.dtypes]


def measured_cases(measured: list[dict], known: list[Case]) -> list[Case]:
    """The measured op rows whose shape the default cases lack."""
    R = _modules()[3]
    have = {(c.shape.op, c.shape.mix, c.pass_, c.dtype, tuple(sorted(c.dims().items()))) for c in known}
    out = []
    for m in measured:
        key = (m["op"], m["mix"], m["pass"], m["dtype"], tuple(sorted(m["dims"].items())))
        if key in have:
            continue
        have.add(key)
        d = m["dims"]
        if m["op"] == "pa":
            shape = R.Shape(f"{m['label']} B{d['B']}", "pa", d["B"], C=d["C"], H=d["H"], W=d["W"])
        else:
            shape = R.Shape(f"{m['label']} B{d['B']}", "emsa", d["B"], d["h"], d["N"], d["M"], d["d"], m["mix"])
        out.append(Case(shape, m["pass"], m["dtype"], f"{m['label']} B{d['B']} (measured)"))
    return out


# ----------------------------------------------------------------------------- modelling
def impl_kernels(case: Case, impl: str, cache: dict, arch: int = 90):
    """(kernels, None) or (None, why this implementation has no row). `arch`: the GPU modelled
    (the Triton tiles are chosen per arch; the other implementations launch the same everywhere)."""
    _perf_aten, _perf_fused = _modules()[:2]
    s, bwd = case.shape, case.pass_ == "fwd+bwd"
    if impl == "triton":
        return _perf_fused.triton_kernels(s, case.dtype, bwd, arch), None
    if impl == "cuda":
        why = _perf_fused.cuda_unsupported(s)
        return (None, why) if why else (_perf_fused.cuda_kernels(s, case.dtype, bwd), None)
    key = (s, case.dtype, bwd)
    if key not in cache:
        cache[key] = _perf_aten.reference_ops(s, case.dtype, bwd)
    ops = cache[key]
    return (_perf_aten.eager_kernels(ops) if impl == "eager" else _perf_aten.compiled_kernels(ops)), None


def resource_of(kernel: PM.Kernel, impl: str, gpu: PM.GPU, tables: dict):
    """(Resources or None, why missing)."""
    if kernel.resource_key is None:
        return None, None
    table, why_none = tables[impl]
    if table is None:
        return None, why_none
    res = table.get((gpu.arch, kernel.resource_key))
    if res is None:
        return None, f"no {impl} resource row for sm_{gpu.arch} {kernel.resource_key}"
    return res, None


def model_row(case: Case, impl: str, gpus, tables, cache) -> dict:
    kernels, why = impl_kernels(case, impl, cache, gpus[0].arch)
    row = dict(case=case.label, op=case.op_name, **{"pass": case.pass_}, dtype=case.dtype, dims=case.dims(), impl=impl)
    if kernels is None:
        return dict(row, status="unsupported", reason=why)
    times, own = {}, {}
    for g in gpus:
        # each GPU's own launches (Triton's tiles are per arch, and with them the grids, splits and
        # the host code's torch ops); the row's byte and FLOP totals are the first GPU's
        own[g.name] = kernels if impl != "triton" or g.arch == gpus[0].arch else impl_kernels(case, impl, cache, g.arch)[0]
        times[g.name] = [PM.kernel_time(k, g, *resource_of(k, impl, g, tables)) for k in own[g.name]]
    tot = PM.totals(kernels, times)
    row.update(status="ok", launches=tot.launches, hbm_bytes=tot.bytes, tc_flops=tot.tc_flops,
               fp32_flops=tot.fp32_flops, sfu_ops=tot.sfu, seconds=tot.seconds, bound=tot.bound)
    # fused kernels (grid known) without occupancy on a GPU: their wave factor is 1
    row["occupancy_missing"] = {g.name: sum(1 for k, kt in zip(own[g.name], times[g.name])
                                            if k.grid is not None and kt.occupancy is None) for g in gpus}
    # the per-kernel listing is the first GPU's launches, with the GPUs that make the same ones
    same = [g for g in gpus if [k.name for k in own[g.name]] == [k.name for k in kernels]]
    row["kernels"] = [kernel_dict(k, {g.name: times[g.name][i] for g in same}) for i, k in enumerate(kernels)]
    row["resource_keys"] = {str(g.arch): sorted({k.resource_key for k in own[g.name] if k.resource_key})
                            for g in gpus}
    return row


def kernel_dict(k: PM.Kernel, kts: dict) -> dict:
    d = dataclasses.asdict(k)
    d["per_gpu"] = {}
    for g, kt in kts.items():
        occ = kt.occupancy
        d["per_gpu"][g] = dict(seconds=kt.seconds, bound=kt.bound, wave_factor=kt.factor, waves=kt.waves,
                               dot_unit=kt.dot_unit, hbm_bytes=kt.hbm_bytes,
                               occupancy=None if occ is None else dict(
                                   blocks_per_sm=occ.blocks_per_sm, limiter=occ.limiter,
                                   warps_per_sm=occ.warps_per_sm, by=occ.by),
                               occupancy_na=kt.why_no_occupancy)
    return d


def attach_measured(rows: list[dict], measured: list[dict]) -> None:
    for r in rows:
        r["measured"] = [dict(gpu=m["gpu"], seconds=m["seconds"],
                              model_over_measured=(r["seconds"][m["gpu"]] / m["seconds"]) if r["status"] == "ok"
                              and m["gpu"] in r["seconds"] else None)
                         for m in measured
                         if (m["impl"], m["op"], m["mix"], m["pass"], m["dtype"]) ==
                         (r["impl"], r["op"].split("-")[0], r["op"] == "emsa-mix", r["pass"], r["dtype"])
                         and m["dims"] == r["dims"]]


# ----------------------------------------------------------------------------- printing
def us(s: float) -> str:
    v = s * 1e6
    return f"{v:.3g}" if v < 999.5 else f"{v:.0f}"


def gnum(x: float, scale: float) -> str:
    v = x / scale
    if v == 0:
        return "0"
    return f"{v:.3g}" if v < 999.5 else f"{v:.0f}"


def _grid(header: list[str], body: list[list[str]], left: int = 2) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in body]


def main_table(rows: list[dict], gpus, with_measured: bool) -> list[str]:
    header = ["case", "impl", "launches", "HBM MB", "TC GFLOP", "CUDA-core GFLOP", "SFU Gop"]
    header += [f"{g.name} us" for g in gpus] + [f"bound {gpus[-1].name}"]
    if with_measured:
        header.append("measured (model/measured)")
    body, last = [], None
    for r in rows:
        first = r["case"] != last
        last = r["case"]
        cells = [r["case"] if first else "", r["impl"]]
        if r["status"] != "ok":
            cells += ["-"] * (len(header) - 2)
            cells[-1 if not with_measured else -2] = f"n/a: {r['reason']}"
        else:
            cells += [str(r["launches"]), gnum(r["hbm_bytes"], 1e6), gnum(r["tc_flops"], 1e9),
                      gnum(r["fp32_flops"], 1e9), gnum(r["sfu_ops"], 1e9)]
            cells += [us(r["seconds"][g.name]) + ("*" if r["occupancy_missing"][g.name] else "") for g in gpus]
            cells += [r["bound"][gpus[-1].name]]
        if with_measured:
            cells.append("; ".join(f"{m['gpu']} {us(m['seconds'])} us ({m['model_over_measured']:.2f}x)"
                                   if m["model_over_measured"] is not None else f"{m['gpu']} {us(m['seconds'])} us"
                                   for m in r.get("measured", [])) or "-")
        body.append(cells)
    lines = _grid(header, body)
    if any(any(r.get("occupancy_missing", {}).values()) for r in rows):
        lines.append("* some fused kernels of this row have no occupancy on this GPU (no resource row for its arch, "
                     "or more shared memory than its SM has: the triton backend refuses such calls there): "
                     "wave factor 1 for them")
    return lines


def summary_table(rows: list[dict], gpu) -> list[str]:
    """One line per case: the modelled time of each implementation on `gpu`, and eager's and
    torch.compile's time over each fused backend's."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fused = [i for i in impls if i in ("triton", "cuda")]
    header = ["case"] + [f"{i} us" for i in impls]
    header += [f"{b}/{f}" for f in fused for b in ("eager", "compile") if b in impls]
    body = []
    for case in dict.fromkeys(r["case"] for r in rows):
        t = {r["impl"]: r["seconds"][gpu.name] for r in rows if r["case"] == case and r["status"] == "ok"}
        miss = {r["impl"] for r in rows
                if r["case"] == case and r["status"] == "ok" and r["occupancy_missing"][gpu.name]}
        cells = [case] + [(us(t[i]) + ("*" if i in miss else "")) if i in t else "n/a" for i in impls]
        cells += [f"{t[b] / t[f]:.2f}x" if f in t and b in t else "-" for f in fused for b in ("eager", "compile")
                  if b in impls]
        body.append(cells)
    lines = _grid(header, body, left=1)
    if any(r.get("occupancy_missing", {}).get(gpu.name) for r in rows):
        lines.append("* occupancy n/a for some kernels (no resource row, or they do not fit this GPU's SM: the "
                     "triton backend refuses such calls there): wave factor 1 for them")
    return lines


def occupancy_table(rows: list[dict], impl: str, gpus, tables) -> list[str]:
    """One line per distinct compiled kernel the rows launch, per arch."""
    table, why_none = tables[impl]
    seen = {}  # arch -> {resource key: threads of the launch, when known}
    for r in rows:
        if r["impl"] != impl or r["status"] != "ok":
            continue
        threads = {k["resource_key"]: k["threads"] for k in r["kernels"] if k["resource_key"] is not None}
        for arch, keys in r["resource_keys"].items():
            for key in keys:
                seen.setdefault(int(arch), {}).setdefault(key, threads.get(key))
    archs = sorted({g.arch for g in gpus})
    if table is None:
        return [f"{impl}: occupancy n/a for all {len(set().union(*seen.values()) if seen else ())} kernels: {why_none}"]
    header = ["arch", "kernel (dtype, name, config)", "threads", "regs", "spill B", "smem KiB", "HMMA", "HGMMA",
              "blocks/SM", "limited by", "warps/SM"]
    body = []
    for arch in archs:
        limits = PM.arch_limits(arch)
        for key in sorted(seen.get(arch, {})):
            res = table.get((arch, key))
            if res is None:
                body.append([f"sm_{arch}", key] + ["-"] * 8 + ["n/a: no resource row"])
                continue
            threads = res.threads or seen[arch][key]
            occ = PM.occupancy(res, threads, limits)
            body.append([f"sm_{arch}", key, str(threads), str(res.registers), str(res.spill_bytes),
                         f"{res.shared / 1024:.1f}", "-" if res.hmma is None else str(res.hmma),
                         "-" if res.hgmma is None else str(res.hgmma), str(occ.blocks_per_sm), occ.limiter,
                         str(occ.warps_per_sm)])
    return _grid(header, body)


def kernel_table(rows: list[dict], gpus) -> list[str]:
    header = ["case", "impl", "kernel", "grid", "HBM MB", "dot GFLOP", "unit"]
    for g in gpus:
        header += [f"{g.name} blk/SM", "waves", "factor", "us"]
    body, last = [], None
    for r in rows:
        if r["status"] != "ok" or r["impl"] not in ("triton", "cuda"):
            continue
        for k in r["kernels"]:
            tag = (r["case"], r["impl"])
            name = k["name"] if len(k["name"]) <= 40 else k["name"][:37] + "..."
            cells = [r["case"] if tag != last else "", r["impl"] if tag != last else "", name,
                     "-" if k["grid"] is None else str(k["grid"]), gnum(k["bytes"], 1e6), gnum(k["dot_flops"], 1e9),
                     k["per_gpu"][gpus[0].name]["dot_unit"] if k["dot_flops"] else "-"]
            last = tag
            for g in gpus:
                p = k["per_gpu"].get(g.name)
                if p is None:  # this GPU launches other kernels (its own tiles): see its totals
                    cells += ["-"] * 4
                    continue
                occ = p["occupancy"]
                cells += ["n/a" if occ is None else str(occ["blocks_per_sm"]),
                          "-" if p["waves"] is None else str(p["waves"]), f"{p['wave_factor']:.2f}", us(p["seconds"])]
            body.append(cells)
    return _grid(header, body, left=3)


def header_lines(gpus, tables, measured_notes, measured_paths) -> list[str]:
    a = PM.DEFAULT
    out = ["rest-kernels performance MODEL -- modelled times, not measurements (bench/perf_model.py; "
           "docs/performance_model.md)", "", "GPUs:"]
    for g in gpus:
        out.append(f"  {g.name}: {g.sms} SMs, HBM {g.hbm / 1e12:.3g} TB/s, tensor bf16 {g.tc16 / 1e12:.0f} / TF32 "
                   f"{g.tf32 / 1e12:.0f} TFLOP/s dense, fp32 {g.fp32 / 1e12:.3g} TFLOP/s, "
                   f"SFU {g.sfu / 1e12:.3g} Top/s, "
                   f"L2 {g.l2 / 2 ** 20:.0f} MiB. Source: {g.source}.")
    out.append("Assumptions (every implementation alike):")
    out += [f"  - {line}" for line in a.lines()]
    out.append("Per kernel: time = wave_factor x max(bytes/BW, TC FLOPs/TC, CUDA-core FLOPs/FP32, SFU ops/SFU), each "
               "scaled by its efficiency, + launches x launch cost; an implementation is the sum of its kernels.")
    out.append("Wave factor from the blocks per SM that registers, shared memory and threads allow (fused kernels "
               "with resource rows); 1 for library kernels (eager / compile / torch ops), whose grids are unknown.")
    for impl in ("triton", "cuda"):
        table, why = tables[impl]
        out.append(f"Resources {impl}: " + (tables[impl + ':what'] if table is not None else f"none ({why})"))
    if measured_paths:
        out.append("Measured: " + ", ".join(measured_paths) + "".join(f"\n  note: {n}" for n in measured_notes))
    out.append("Columns: HBM MB = bytes to and from HBM (1e6), each tensor once per kernel; TC / CUDA-core GFLOP "
               "executed (fused kernels: padded tiles included); bound = the term holding most of the modelled time.")
    return out


# ----------------------------------------------------------------------------- main
def _csv(choices):
    def parse(text):
        vals = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in vals if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(bad)} not in {', '.join(map(str, choices))}")
        return vals
    return parse


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See docs/performance_model.md.")
    p.add_argument("--families", type=_csv(tuple(FAMILY_SHORT.values())), default=["lite", "base"],
                   help="model families: lite (rest_lite/small), base (rest_base/large), v2, v2l (default lite,base)")
    p.add_argument("--inputs", type=_csv(("224", "det")), default=["224", "det"], help="224 and/or det (800x1216)")
    p.add_argument("--batch", type=int, default=64, help="batch at 224 px (default 64)")
    p.add_argument("--det-batch", type=int, default=1, help="batch at 800x1216 (default 1)")
    p.add_argument("--stages", type=_csv(("1", "2", "3", "4")), default=["1", "2", "3", "4"])
    p.add_argument("--ops", type=_csv(("emsa", "pa")), default=["emsa", "pa"])
    p.add_argument("--passes", type=_csv(("fwd", "fwd+bwd")), default=["fwd", "fwd+bwd"])
    p.add_argument("--dtypes", type=_csv(("bf16", "fp32", "fp16")), default=["bf16", "fp32"])
    p.add_argument("--impls", type=_csv(IMPLS), default=list(IMPLS))
    p.add_argument("--gpus", type=_csv(tuple(PM.GPU_BY_NAME)), default=[g.name for g in PM.GPUS])
    p.add_argument("--resources", action="append", metavar="PATH",
                   help="Triton resource JSON (scripts/triton_resources.py --json, or its budget); repeatable. "
                        "Default: tests/data/triton_resource_budget.json when present")
    p.add_argument("--cuda-resources", metavar="PATH",
                   help="the built extension (_C*.so: cuobjdump) or scripts/cuda_resources.py --json output. "
                        "Default: the extension next to rest_kernels, when built")
    p.add_argument("--no-sass", action="store_true", help="skip counting HMMA/HGMMA in the extension's SASS")
    p.add_argument("--measured", action="append", metavar="PATH", help="bench/emsa_bench.py --json output; repeatable")
    p.add_argument("--kernels", action="store_true", help="also print every fused kernel launch of every case")
    p.add_argument("--summary", type=_csv(tuple(PM.GPU_BY_NAME)), default=[], metavar="GPUS",
                   help="also print one line per case: each implementation's time on these GPUs and the ratios")
    p.add_argument("--json", metavar="PATH", help="write everything (per kernel too) as JSON")
    return p


def load_tables(args) -> dict:
    _perf_inputs = _modules()[2]
    tables = {}
    paths = args.resources or _perf_inputs.default_triton_paths()
    if paths:
        table, what = _perf_inputs.triton_resources(paths)
        tables["triton"], tables["triton:what"] = (table, None), what
    else:
        tables["triton"] = (None, "no Triton resource rows: tests/data/triton_resource_budget.json is absent and no "
                                  "--resources PATH (scripts/triton_resources.py --json) was given")
    so = args.cuda_resources or _perf_inputs.default_cuda_path()
    if so:
        table, what = _perf_inputs.cuda_resources(so, sass=not args.no_sass)
        tables["cuda"], tables["cuda:what"] = (table, None), what
    else:
        tables["cuda"] = (None, "the extension is not built here and no --cuda-resources PATH was given")
    for impl in ("eager", "compile"):
        tables[impl] = (None, "library kernels")
    return tables


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.stages = [int(s) for s in args.stages]
    gpus = [PM.GPU_BY_NAME[n] for n in args.gpus]
    tables = load_tables(args)
    _perf_inputs = _modules()[2]
    measured, notes = [], []
    for path in args.measured or []:
        rows, n = _perf_inputs.measurements(path)
        measured += rows
        notes += n
    cases = default_cases(args)
    cases += measured_cases([m for m in measured if m["impl"] in args.impls], cases)
    cache: dict = {}
    rows = [model_row(c, impl, gpus, tables, cache) for c in cases for impl in args.impls]
    attach_measured(rows, measured)
    out = header_lines(gpus, tables, notes, args.measured or [])
    out += ["", f"Modelled time per call ({len(cases)} cases x {len(args.impls)} implementations):", ""]
    out += main_table(rows, gpus, bool(args.measured))
    for impl in ("triton", "cuda"):
        if impl in args.impls:
            out += ["", f"Occupancy of the {impl} kernels these cases launch (blocks per SM from registers "
                        f"(per warp, in units of {PM.REG_ALLOC_UNIT}), shared memory (+{PM.SHARED_RESERVED} B "
                        f"reserved per block, units of {PM.SHARED_ALLOC_UNIT} B), threads and the block limit):", ""]
            out += occupancy_table(rows, impl, gpus, tables)
    for name in args.summary:
        out += ["", f"Summary, modelled time on the {name} (eager/triton = eager's time over triton's: > 1, triton "
                    f"is modelled faster):", ""]
        out += summary_table(rows, PM.GPU_BY_NAME[name]) if name in args.gpus else [f"({name} not in --gpus)"]
    if args.kernels:
        out += ["", "Fused kernel launches (blocks/SM, waves = ceil(grid / (SMs x blocks/SM)), wave factor, "
                    "modelled us):", ""]
        out += kernel_table(rows, gpus)
    print("\n".join(out))
    if args.json:
        doc = dict(schema="rest-kernels-perf-model/1", note="a model, not a measurement",
                   gpus=[dict(dataclasses.asdict(g), sfu=g.sfu) for g in gpus],
                   assumptions=dataclasses.asdict(PM.DEFAULT),
                   resources={i: tables.get(i + ":what") or tables[i][1] for i in ("triton", "cuda")},
                   measured=args.measured or [], rows=rows)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
