"""What the performance model (bench/perf_model.py) reads from elsewhere: the compiled resources of
the Triton kernels (scripts/triton_resources.py --json, or the checked-in budget), those of the CUDA
extension (cuobjdump of the built .so, or scripts/cuda_resources.py --json) and the measurements of
bench/emsa_bench.py --json. Nothing here compiles or runs a kernel.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import re

from .perf_model import Resources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRITON_BUDGET = os.path.join(ROOT, "tests", "data", "triton_resource_budget.json")


# ----------------------------------------------------------------------------- Triton rows
def triton_resources(paths: list[str]) -> tuple[dict, str]:
    """{(arch, "dtype kernel config"): Resources} from JSON files of scripts/triton_resources.py
    (--json: {"rows": [row, ...]}) or its budget ({"rows": {key: fields}}), and a description."""
    table, toolchains = {}, set()
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        toolchains.add(", ".join(f"{k} {v}" for k, v in doc.get("toolchain", {}).items()))
        rows = doc["rows"]
        items = rows.items() if isinstance(rows, dict) else ((None, r) for r in rows)
        for key, r in items:
            if key is None:
                arch, rest = int(r["arch"]), f"{r['dtype']} {r['kernel']} {r['config']}"
            else:
                sm, rest = key.split(" ", 1)
                arch = int(sm.removeprefix("sm_"))
            res = Resources(int(r["registers"]), int(r["shared"]), 32 * int(r["num_warps"]),
                            int(r["spill_stores"]) + int(r["spill_loads"]), int(r["hmma"]), int(r["hgmma"]))
            old = table.get((arch, rest))
            if old is None or (res.registers, res.shared) > (old.registers, old.shared):
                table[(arch, rest)] = res  # a key compiled twice: the worse one, as resources.merge_row
    what = f"{len(table)} rows from {', '.join(paths)}" + (f" ({'; '.join(sorted(toolchains))})" if toolchains else "")
    return table, what


def default_triton_paths() -> list[str]:
    return [TRITON_BUDGET] if os.path.exists(TRITON_BUDGET) else []


# ----------------------------------------------------------------------------- CUDA extension
_KEY = re.compile(r"rest_cuda::(\w+(?:<[^()]*>)?)\(")


def cuda_key(pretty: str) -> str | None:
    """"void rest_cuda::emsa_fwd_kernel<float, 64>(rest_cuda::EmsaArgs<float>, ...)" ->
    "emsa_fwd_kernel<float, 64>"."""
    m = _KEY.search(pretty)
    return m.group(1) if m else None


def _cuda_resources_script():
    spec = importlib.util.spec_from_file_location("_cuda_resources", os.path.join(ROOT, "scripts", "cuda_resources.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cuda_resources(path: str, sass: bool = True) -> tuple[dict, str]:
    """{(arch, key): Resources} of the CUDA extension: `path` is the built .so (cuobjdump: registers,
    shared memory, local memory, and with sass=True the HMMA / HGMMA counts of the SASS) or a JSON
    list written by scripts/cuda_resources.py --json (no SASS counts)."""
    mod = _cuda_resources_script()
    if path.endswith(".json"):
        with open(path) as f:
            rows = json.load(f)
        mma, what = {}, f"{path} (scripts/cuda_resources.py --json; no SASS counts)"
    else:
        rows = mod.resource_usage(path)
        tool = mod.find_tool("cuobjdump")
        mma = {}
        if sass and tool:
            mma = {(int(re.sub(r"\D", "", arch)), kernel): (c["HMMA"], c["HGMMA"])
                   for (kernel, arch), c in mod.sass_counts(path, by="kernel").items()}
        what = f"cuobjdump of {path}" + ("" if mma else " (no SASS counts)")
    table = {}
    for r in rows:
        key = cuda_key(r["kernel"])
        if key is None:
            continue
        arch = int(re.sub(r"\D", "", r["arch"]))
        hmma, hgmma = mma.get((arch, r["kernel"]), (None, None))
        table[(arch, key)] = Resources(int(r.get("REG", 0)), int(r.get("SHARED", 0)), None,
                                       int(r.get("LOCAL", 0)) + int(r.get("STACK", 0)), hmma, hgmma)
    return table, what


def default_cuda_path() -> str | None:
    """The extension built next to the imported rest_kernels, if any."""
    import rest_kernels
    found = sorted(glob.glob(os.path.join(os.path.dirname(rest_kernels.__file__), "_C*.so")))
    return found[0] if found else None


# ----------------------------------------------------------------------------- measurements
BACKEND_IMPL = {"triton": "triton", "cuda": "cuda", "reference": "eager", "compile": "compile"}
DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def gpu_of(device_name: str) -> str | None:
    for name in ("A100", "H100", "H200"):
        if name in device_name:
            return name
    return None


def measurements(path: str) -> tuple[list[dict], list[str]]:
    """The op rows of a bench/emsa_bench.py --json file that ran on a GPU the model knows:
    [{gpu, impl, op, mix, pass, dtype, dims, seconds}], and the reasons rows were left out."""
    with open(path) as f:
        doc = json.load(f)
    device = doc.get("environment", {}).get("device_name", "")
    gpu = gpu_of(device)
    notes = []
    if gpu is None:
        return [], [f"{path}: measured on {device or 'an unknown device'}, not a GPU the model knows "
                    "(A100, H100, H200)"]
    rows = []
    for r in doc.get("results", []):
        if r.get("kind") != "op" or r.get("status") != "ok" or r.get("time_median_s") is None:
            continue
        impl, dtype = BACKEND_IMPL.get(r["backend"]), DTYPE_SHORT.get(r["dtype"])
        if impl is None or dtype is None:
            notes.append(f"{path}: backend {r['backend']} / dtype {r['dtype']} not modelled")
            continue
        rows.append(dict(gpu=gpu, impl=impl, op="pa" if r["name"] == "pa" else "emsa", mix=r["name"] == "emsa-mix",
                         dtype=dtype, dims=dict(r["shape"]), seconds=float(r["time_median_s"]),
                         label=r.get("shape_label"), **{"pass": r["pass"]}))
    return rows, list(dict.fromkeys(notes))
