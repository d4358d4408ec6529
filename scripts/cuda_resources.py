#!/usr/bin/env python
"""Registers, shared memory and spills of every CUDA kernel in the built extension, per arch.

Reads the extension's fatbinary with `cuobjdump --dump-resource-usage` (CUDA toolkit) and prints
one line per (kernel, arch). Exits non-zero when a hot kernel (the EMSA and PA kernels doing the
work) uses local memory (register spills / stack arrays), or when a kernel lacks code for an arch
the extension says it was built for.

    python scripts/cuda_resources.py [path/to/_C*.so] [--json]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOT = ("emsa_stats_kernel", "emsa_fwd_kernel", "emsa_stats_mma_kernel", "emsa_fwd_mma_kernel", "emsa_bwd_kernel",
       "emsa_bwd_mma_kernel", "pa_fwd_kernel", "pa_bwd_dz_kernel", "pa_bwd_dx_kernel", "pa_bwd_dw_kernel")
#: every kernel family csrc/cuda defines (the build test checks each has code for every arch)
FAMILIES = HOT + ("emsa_rstd_kernel", "emsa_vbar_kernel", "emsa_bwd_rowdot_kernel", "emsa_bwd_rowstat_kernel",
                  "emsa_dmix_kernel", "emsa_bwd_split_sum_kernel", "mma_selftest_kernel")
#: SASS instructions counted per kernel (sass_counts): the tensor-core products, the fp32 FMAs and the
#: 16-byte shared-memory loads (the SIMT products' register blocking)
SASS_OPS = ("HMMA", "HGMMA", "FFMA", "LDS.128")


def find_tool(name: str) -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", name)):
            return os.path.join(home, "bin", name)
    if shutil.which(name):
        return shutil.which(name)
    # a toolkit without cuobjdump (nvcc-only installs): Triton's wheel ships one
    import importlib.util
    spec = importlib.util.find_spec("triton")
    for base in (spec.submodule_search_locations or []) if spec else []:
        cand = os.path.join(base, "backends", "nvidia", "bin", name)
        if os.path.exists(cand):
            return cand
    return None


def find_extension() -> str:
    found = sorted(glob.glob(os.path.join(ROOT, "rest_kernels", "_C*.so")))
    if not found:
        raise SystemExit("no rest_kernels/_C*.so: build the extension first")
    return found[0]


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def family_of(pretty: str) -> str:
    for fam in sorted(FAMILIES, key=len, reverse=True):
        if re.search(r"\b" + fam + r"\b", pretty):
            return fam
    return pretty


def _cuobjdump(flag: str, so_path: str) -> str:
    tool = find_tool("cuobjdump")
    if tool is None:
        raise SystemExit("cuobjdump not found (set CUDA_HOME)")
    return subprocess.run([tool, flag, so_path], capture_output=True, text=True, check=True).stdout


def _function_lines(text: str, header: str):
    """(mangled function, arch, line) for every line of cuobjdump's output that follows a function
    header (the regex `header`, group 1 the name), within its arch's section."""
    arch, func = None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+a?)", line)
        if m:
            arch, func = m.group(1), None
            continue
        m = re.match(header, line)
        if m:
            func = m.group(1)
            continue
        if func is not None:
            yield func, arch, line


def resource_usage(so_path: str) -> list[dict]:
    """[{kernel, family, arch, REG, STACK, SHARED, LOCAL}] from the extension's cubins."""
    rows, seen = [], set()
    for func, arch, line in _function_lines(_cuobjdump("--dump-resource-usage", so_path), r"\s*Function (\S+):"):
        if "REG:" in line and (func, arch) not in seen:
            seen.add((func, arch))
            vals = dict((k, int(v)) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line))
            rows.append({"mangled": func, "arch": arch, **vals})
    names = demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        r["kernel"] = names[r.pop("mangled")]
        r["family"] = family_of(r["kernel"])
    return rows


def sass_counts(so_path: str, by: str = "family") -> dict[tuple[str, str], dict[str, int]]:
    """{(family, arch): {"HMMA": n, "HGMMA": n, "FFMA": n, "LDS.128": n}} summed over the kernels of each family
    (by="kernel": one entry per demangled kernel), from the extension's SASS (`cuobjdump -sass`):
    what the GPU would execute. Static counts: an instruction in a loop counts once."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(op) for op in SASS_OPS) + r")(?=[.\s])")  # opcode (+ modifiers)
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for func, arch, line in _function_lines(_cuobjdump("-sass", so_path), r"\s*Function : (\S+)"):
        c = counts.setdefault((func, arch), dict.fromkeys(SASS_OPS, 0))
        for op in pattern.findall(line):
            c[op] += 1
    names = demangle(sorted({func for func, _ in counts}))
    grouped: dict[tuple[str, str], dict[str, int]] = {}
    for (mangled, arch), c in counts.items():
        key = names[mangled] if by == "kernel" else family_of(names[mangled])
        total = grouped.setdefault((key, arch), dict.fromkeys(SASS_OPS, 0))
        for op, n in c.items():
            total[op] += n
    return grouped


def problems(rows: list[dict], archs: list[str]) -> list[str]:
    bad = []
    for r in rows:
        if r["family"] in HOT and (r.get("LOCAL", 0) > 0 or r.get("STACK", 0) > 0):
            bad.append(f"{r['kernel']} on {r['arch']}: {r.get('LOCAL', 0)} bytes local memory, "
                       f"{r.get('STACK', 0)} bytes stack (register spills or local arrays)")
    by_kernel: dict[str, set] = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], set()).add(r["arch"])
    for kernel, have in by_kernel.items():
        missing = set(archs) - have
        if missing:
            bad.append(f"{kernel}: no code for {sorted(missing)}")
    fams = {r["family"] for r in rows}
    for fam in FAMILIES:
        if fam not in fams:
            bad.append(f"kernel family {fam} not found in the extension")
    return bad


def built_archs() -> list[str]:
    sys.path.insert(0, ROOT)
    from rest_kernels import _extension
    info = _extension.build_info() or {}
    archs = [a.strip() for a in info.get("cuda_archs", "").replace(",", ";").split(";") if a.strip()]
    return ["sm_" + a.replace(".", "").replace("+PTX", "") for a in archs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("so", nargs="?", help="extension .so (default: rest_kernels/_C*.so)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--archs", help="expected archs, e.g. sm_80,sm_90 (default: the build record's)")
    args = ap.parse_args(argv)
    rows = resource_usage(args.so or find_extension())
    archs = args.archs.split(",") if args.archs else built_archs()
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'arch':7} {'REG':>4} {'SHARED':>7} {'LOCAL':>6} {'STACK':>6}  kernel")
        for r in sorted(rows, key=lambda r: (r["family"], r["kernel"], r["arch"])):
            print(f"{r['arch']:7} {r.get('REG', 0):4d} {r.get('SHARED', 0):7d} {r.get('LOCAL', 0):6d} "
                  f"{r.get('STACK', 0):6d}  {r['kernel']}")
    bad = problems(rows, archs)
    for b in bad:
        print("PROBLEM:", b, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
