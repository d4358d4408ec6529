"""What each Triton kernel costs on each GPU arch, measured ahead of time: registers, spills, shared
memory, warps and tensor-core instructions, at ResT's shapes.

How: the backend's host functions are planned (rest_kernels/triton/capability.py) on meta tensors of
the shapes ResT and ResTv2 really run (`rest_shapes`), for a target arch (aot.compiling_for, or the
GPU present), so the kernels specialise exactly as on that GPU. Each distinct compiled kernel is then
measured:
  - registers and spill bytes: ptxas's own report (`ptxas -v`) of the kernel's PTX, run with the
    options Triton's CUDA backend uses, so the numbers are those of Triton's own cubin;
  - shared memory and warps: the compiled kernel's metadata (what the launch asks the driver for);
  - HMMA (mma.sync) and HGMMA (Hopper wgmma) instructions: counted in the SASS of the cubin
    (`cuobjdump -sass`, shipped with Triton).
scripts/triton_resources.py prints the table; tests/test_triton_resources.py holds it against the
checked-in budget (tests/data/triton_resource_budget.json).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile

import torch

from .launch import PlannedLaunch
from .targets import ArchLimits, arch_limits

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- ResT's shapes
@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str
    embed_dims: tuple[int, ...]
    heads: tuple[int, ...]
    sr_ratios: tuple[int, ...]
    mix: bool  # ResT mixes heads (and InstanceNorms) where heads > 1; ResTv2 never does


# ResT (Zhang & Yang 2021): lite / small share dims (head dim 64), base / large (head dim 96).
# ResTv2 (Zhang & Yang 2022): tiny / small / base dims 96.. (head dim 96), large 128.. (head dim 128).
FAMILIES = (
    ModelFamily("rest_lite/small", (64, 128, 256, 512), (1, 2, 4, 8), (8, 4, 2, 1), True),
    ModelFamily("rest_base/large", (96, 192, 384, 768), (1, 2, 4, 8), (8, 4, 2, 1), True),
    ModelFamily("restv2_t/s/b", (96, 192, 384, 768), (1, 2, 4, 8), (8, 4, 2, 1), False),
    ModelFamily("restv2_l", (128, 256, 512, 1024), (1, 2, 4, 8), (8, 4, 2, 1), False),
)
RESOLUTIONS = {"224": (224, 224), "800x1216": (800, 1216)}
BATCHES = (1, 64)


def _kv_side(n: int, s: int) -> int:
    """Side of the key/value grid: depthwise conv, kernel s + 1, stride s, padding s // 2."""
    return n if s == 1 else (n + 2 * (s // 2) - (s + 1)) // s + 1


@dataclasses.dataclass(frozen=True)
class Shape:
    """One EMSA or PA call of a model stage."""
    label: str
    op: str            # "emsa" or "pa"
    B: int
    heads: int = 0
    N: int = 0
    M: int = 0
    d: int = 0
    mix: bool = False
    C: int = 0
    H: int = 0
    W: int = 0


def rest_shapes(families=FAMILIES, resolutions=RESOLUTIONS, batches=BATCHES) -> list[Shape]:
    """The EMSA and PA calls of each stage of each family, at each resolution and batch."""
    shapes = []
    for fam in families:
        for res, (img_h, img_w) in resolutions.items():
            for batch in batches:
                for i, (dim, heads, s) in enumerate(zip(fam.embed_dims, fam.heads, fam.sr_ratios)):
                    gh, gw = img_h // 2 ** (i + 2), img_w // 2 ** (i + 2)
                    tag = f"{fam.name} {res} B{batch} stage {i + 1}"
                    M = _kv_side(gh, s) * _kv_side(gw, s)
                    shapes.append(Shape(tag, "emsa", batch, heads, gh * gw, M, dim // heads,
                                        fam.mix and heads > 1))
                    shapes.append(Shape(tag, "pa", batch, C=dim, H=gh, W=gw))
    return shapes


def edge_shapes(batches=(1,)) -> list[Shape]:
    """The corners of what the backend accepts: head dims 3..256 (with the mix up to 128), 8 mixed
    heads, tiny N and M."""
    out = []
    for B in batches:
        for h, d, mix in ((1, 3, False), (3, 5, True), (2, 96, True), (8, 64, True), (8, 128, True),
                          (4, 128, True), (1, 256, False), (8, 16, True)):
            for N, M in ((1, 1), (37, 45), (4096, 256)):
                out.append(Shape(f"edge h{h} d{d} N{N} M{M}", "emsa", B, h, N, M, d, mix))
        out.append(Shape("edge pa 1x1", "pa", B, C=3, H=1, W=1))
        out.append(Shape("edge pa 7x300", "pa", B, C=5, H=7, W=300))
    return out


def shape_tensors(shape: Shape, dtype: torch.dtype, device="meta"):
    """Tensors laid out as the model hands them to the op (q, k, v views of the projections): on
    the meta device by default, or e.g. "cuda" under FakeTensorMode."""
    meta = dict(dtype=dtype, device=device)
    if shape.op == "emsa":
        B, h, N, M, d = shape.B, shape.heads, shape.N, shape.M, shape.d
        q = torch.empty(B, N, h, d, **meta).transpose(1, 2)
        kv = torch.empty(B, M, 2, h, d, **meta).permute(2, 0, 3, 1, 4)
        w = torch.empty(h, h, dtype=torch.float32, device=device) if shape.mix else None
        return q, kv[0], kv[1], w
    x = torch.empty(shape.B, shape.C, shape.H, shape.W, **meta)
    return x, torch.empty(shape.C, 1, 3, 3, **meta), torch.empty(shape.C, **meta)


def plan_shape(shape: Shape, dtype: torch.dtype, backward: bool) -> list[PlannedLaunch]:
    from .capability import plan_emsa, plan_pa
    tensors = shape_tensors(shape, dtype)
    return plan_emsa(*tensors, backward) if shape.op == "emsa" else plan_pa(*tensors, backward)


# ----------------------------------------------------------------------------- measuring a kernel
@dataclasses.dataclass
class KernelResources:
    kernel: str
    arch: int
    dtype: str
    config: str          # the constexprs that select the tiles (HP, BN, BM, BD, ...)
    num_warps: int
    registers: int
    spill_stores: int    # bytes
    spill_loads: int     # bytes
    shared: int          # bytes per block
    hmma: int            # mma.sync tensor-core instructions in the SASS
    hgmma: int           # Hopper warpgroup (wgmma) tensor-core instructions in the SASS
    shapes: list[str] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> str:
        return f"sm_{self.arch} {self.dtype} {self.kernel} {self.config}"


def _config(constexprs: dict) -> str:
    def fmt(v):
        return str(v).replace("triton.language.", "").replace("tl.", "")
    return " ".join(f"{k}={fmt(v)}" for k, v in sorted(constexprs.items()) if k not in ("DTYPE",))


def _tool(name: str) -> str:
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(bundled):
        return bundled
    found = shutil.which(name) or (os.path.join("/usr/local/cuda/bin", name)
                                  if os.path.exists(os.path.join("/usr/local/cuda/bin", name)) else None)
    if found is None:
        raise RuntimeError(f"rest_kernels: {name} not found (neither bundled with Triton nor on PATH)")
    return found


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) of the single kernel in `ptx`, from
    `ptxas -v` run with the options of Triton's CUDA backend (line info, --regAllocOptLevel=2)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [_tool("ptxas"), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src,
               "-o", os.path.join(tmp, "k.cubin")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs, spills = _PTXAS_USED.findall(log), _PTXAS_SPILL.findall(log)
    if len(regs) != 1 or len(spills) != 1:
        raise RuntimeError(f"rest_kernels: unexpected ptxas report:\n{log}")
    return int(regs[0]), int(spills[0][0]), int(spills[0][1])


def sass_mma_counts(cubin: bytes) -> tuple[int, int]:
    """(HMMA, HGMMA) instruction counts in the SASS of `cubin`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    return len(re.findall(r"\bHMMA\.", sass)), len(re.findall(r"\bHGMMA\.", sass))


_measured: dict = {}


def measure(launch: PlannedLaunch, arch: int, dtype: str) -> KernelResources:
    """The resources of one planned launch's compiled kernel (cached per compiled kernel)."""
    compiled = launch.compiled
    key = (compiled.hash, arch)
    if key not in _measured:
        regs, stores, loads = ptxas_report(compiled.asm["ptx"], arch)
        hmma, hgmma = sass_mma_counts(compiled.asm["cubin"])
        _measured[key] = (regs, stores, loads, hmma, hgmma)
    regs, stores, loads, hmma, hgmma = _measured[key]
    meta = compiled.metadata
    return KernelResources(launch.name, arch, dtype, _config(launch.constexprs), int(meta.num_warps), regs,
                           stores, loads, int(meta.shared), hmma, hgmma)


def resource_table(shapes, archs, dtypes, directions=(False, True), compile_context=None,
                   progress=None) -> list[KernelResources]:
    """One row per distinct (arch, dtype, kernel, config) over every shape's forward and backward,
    with the shapes that launch it. `compile_context(arch)` makes Triton compile for `arch`
    (default aot.compiling_for)."""
    from .aot import compiling_for
    compile_context = compile_context or compiling_for
    rows: dict[str, KernelResources] = {}
    for arch in archs:
        with compile_context(arch):
            for dname in dtypes:
                for shape in shapes:
                    for backward in directions:
                        for launch in plan_shape(shape, DTYPES[dname], backward):
                            row = merge_row(rows, measure(launch, arch, dname))
                            tag = f"{shape.label} {'bwd' if backward else 'fwd'}"
                            if tag not in row.shapes:
                                row.shapes.append(tag)
                    if progress:
                        progress(arch, dname, shape)
    return list(rows.values())


def merge_row(rows: dict, r: KernelResources) -> KernelResources:
    """Add r to rows by key. One key (kernel + tile constexprs) can compile to several kernels (the
    JIT also specialises on integer arguments divisible by 16): the row keeps the worst of each."""
    row = rows.get(r.key)
    if row is None:
        rows[r.key] = r
        return r
    for f in ("num_warps", "registers", "spill_stores", "spill_loads", "shared"):
        setattr(row, f, max(getattr(row, f), getattr(r, f)))
    if r.hmma + r.hgmma < row.hmma + row.hgmma:
        row.hmma, row.hgmma = r.hmma, r.hgmma
    for tag in r.shapes:
        if tag not in row.shapes:
            row.shapes.append(tag)
    return row


def rows_from_json(paths) -> list[KernelResources]:
    """The rows of earlier --json runs (e.g. one per arch run in parallel), merged."""
    import json
    rows: dict = {}
    for path in paths:
        with open(path) as f:
            for d in json.load(f)["rows"]:
                merge_row(rows, KernelResources(**d))
    return list(rows.values())


def fits(row: KernelResources, limits: ArchLimits) -> bool:
    return row.shared <= limits.max_shared_per_block


# ----------------------------------------------------------------------------- subsets, table, budget
@dataclasses.dataclass(frozen=True)
class Subset:
    archs: tuple[int, ...]
    dtypes: tuple[str, ...]
    families: tuple[ModelFamily, ...]
    resolutions: dict
    batches: tuple[int, ...]
    edges: bool

    def shapes(self) -> list[Shape]:
        shapes = rest_shapes(self.families, self.resolutions, self.batches)
        return shapes + (edge_shapes() if self.edges else [])


#: everything the backend can choose at ResT's shapes and at the edges of what it accepts
FULL = Subset((80, 86, 89, 90), ("fp16", "bf16", "fp32"), FAMILIES, RESOLUTIONS, BATCHES, True)
#: what CI compiles: the A100 and H100 targets, one 16-bit and the fp32 kernels, one size of each
#: model family (head dims 64 and 96), at 224 px and 800 x 1216 (the batch changes grids, not kernels)
CI_SUBSET = Subset((80, 90), ("bf16", "fp32"), (FAMILIES[0], FAMILIES[2]), RESOLUTIONS, BATCHES, False)


def row_dict(r: KernelResources) -> dict:
    return dataclasses.asdict(r)


def toolchain() -> dict:
    import triton
    return {"triton": triton.__version__}


def toolchain_line() -> str:
    return ", ".join(f"{k} {v}" for k, v in toolchain().items())


BUDGET_FIELDS = ("num_warps", "registers", "spill_stores", "spill_loads", "shared", "hmma", "hgmma")


def write_budget(path: str, rows: list[KernelResources]) -> None:
    import json
    budget = {"toolchain": toolchain(),
              "rows": {r.key: {f: getattr(r, f) for f in BUDGET_FIELDS} for r in sorted(rows, key=lambda r: r.key)}}
    with open(path, "w") as f:
        json.dump(budget, f, indent=1, sort_keys=True)
        f.write("\n")


def budget_violations(row: KernelResources, budget: dict) -> list[str]:
    """How `row` is worse than its budget entry: more registers, spill bytes or shared memory, or
    fewer tensor-core instructions (a dot that left the tensor cores)."""
    entry = budget["rows"].get(row.key)
    if entry is None:
        return [f"{row.key}: not in the budget (a new kernel configuration: run "
                "scripts/triton_resources.py --full --update-budget and review the diff)"]
    worse = []
    for field in ("registers", "spill_stores", "spill_loads", "shared"):
        if getattr(row, field) > entry[field]:
            worse.append(f"{row.key}: {field} {getattr(row, field)} > budget {entry[field]}")
    if row.hmma + row.hgmma < entry["hmma"] + entry["hgmma"]:
        worse.append(f"{row.key}: {row.hmma} HMMA + {row.hgmma} HGMMA < budget "
                     f"{entry['hmma']} + {entry['hgmma']}")
    return worse


def format_table(rows: list[KernelResources], with_shapes: bool = False) -> str:
    head = (f"{'arch':6} {'dtype':5} {'kernel':18} {'config':58} {'warps':>5} {'regs':>4} {'spill st':>8} "
            f"{'spill ld':>8} {'smem KiB':>8} {'fits':>4} {'HMMA':>5} {'HGMMA':>5} {'calls':>5}")
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r.arch, r.dtype, r.kernel, r.config)):
        limit = arch_limits(r.arch)
        lines.append(f"sm_{r.arch:<3} {r.dtype:5} {r.kernel:18} {r.config:58} {r.num_warps:5} {r.registers:4} "
                     f"{r.spill_stores:8} {r.spill_loads:8} {r.shared / 1024:8.1f} "
                     f"{'yes' if fits(r, limit) else 'NO':>4} {r.hmma:5} {r.hgmma:5} {len(r.shapes):5}")
        if with_shapes:
            lines.extend(f"{'':12}{s}" for s in r.shapes)
    return "\n".join(lines)

