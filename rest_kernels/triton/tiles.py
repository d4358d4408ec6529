"""Tile configurations of the Triton EMSA kernels, per GPU arch, as data.

A configuration is (BN, BM, num_warps, num_stages): query rows and key rows per tile, warps per
program and the software-pipelining depth of the key (or query) loop. It is looked up by the kernel
family, the arch Triton compiles for, the input precision ("16": fp16 / bf16 on tensor cores, "32":
fp32 "ieee" on CUDA cores) and the padded head dim BD. The numbers are chosen so that every
configuration the backend can pick compiles with zero spill bytes and within the arch's shared
memory (tests/test_triton_resources.py compiles them all for sm_80, sm_86, sm_89 and sm_90 and holds
them against tests/data/triton_resource_budget.json); where a tile shape matters for the tensor
cores it is said beside it.

Why these shapes:
- Every EMSA tile is 2-D ([BN, BD] x [BD, BM] and [BN, BM] x [BM, BD]): on sm_90 Triton lowers a 2-D
  dot whose M side is a multiple of 64 per warpgroup (4 warps) to wgmma (HGMMA); on sm_80-89 to
  mma.sync (HMMA). BN = 64 with 4 warps is the smallest wgmma tile.
- Registers: a [64, BD] fp32 accumulator costs BD / 2 registers per thread at 4 warps; the logit
  tile [BN, BM] fp32 BM / 2. With BD = 128 (head dim 96) and 64 x 64 tiles the forward is at ~240 of
  255 registers; BD = 256 halves BN.
- Shared memory: the staged operands (num_stages copies of the k and v tiles) plus the layout
  conversions; sm_86 / sm_89 allow 99 KiB per block, which the 16-bit tiles below use less than half
  of (the budget table lists every number).
- fp32 ("ieee" dots on CUDA cores): no tensor-core shape constraint, twice the bytes per operand.

The interpreter (TRITON_INTERPRET=1) runs each tile op in NumPy: its tiles are larger (fewer
Python-level steps) and bounded so the tests stay fast; it has no resources to respect.
"""
from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Tiles:
    BN: int          # query rows per tile
    BM: int          # key rows per tile
    num_warps: int
    num_stages: int

    def launch_options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def target_arch() -> int:
    """The arch Triton compiles for now: the current device's, or the target of
    rest_kernels/triton/aot.py's compile-only driver."""
    from triton.runtime import driver
    return int(driver.active.get_current_target().arch)


def arch_class(arch: int) -> int:
    """Tables are kept for 80 (A100: 163 KiB shared), 86 (sm_86 / sm_89: 99 KiB) and 90 (227 KiB, wgmma)."""
    if arch >= 90:
        return 90
    if arch >= 86:
        return 86
    return 80


#: (kernel family, precision, BD) -> Tiles, for arch class 80 and 86 (mma.sync) and 90 (wgmma).
#: Kernel families: "fwd" (_stats_kernel, _attn_kernel), "dkdv" (_dkdv_kernel), "dq" (_dq_kernel).
_T = Tiles
_TABLE: dict[int, dict[tuple[str, str, int], Tiles]] = {}


def _fill(arch: int, rows: dict[tuple[str, str], dict[int, Tiles]]):
    table = _TABLE.setdefault(arch, {})
    for (family, precision), by_bd in rows.items():
        for bd, tiles in by_bd.items():
            table[(family, precision, bd)] = tiles


# 16-bit inputs: BN = 64 rows per warpgroup (wgmma on sm_90). BD 128 (head dim 96) takes 8 warps:
# at 4 warps the [64, 128] fp32 accumulator plus the logit tile reach 252 registers on sm_90 and
# spill on sm_80 / sm_86. BD 256 (no ResT head dim) takes 8 warps and narrower key tiles.
_FWD16 = {16: _T(64, 64, 4, 2), 32: _T(64, 64, 4, 2), 64: _T(64, 64, 4, 2), 128: _T(64, 64, 8, 2),
          256: _T(64, 32, 8, 1)}
# fp32 ("ieee" dots on CUDA cores): no wgmma shape to respect; 8 warps from BD 32 on keep the fp32
# operands (twice the registers of 16-bit ones) without spills.
_FWD32 = {16: _T(64, 32, 4, 2), 32: _T(64, 32, 8, 2), 64: _T(64, 32, 8, 2), 128: _T(32, 16, 8, 2),
          256: _T(16, 16, 4, 1)}
# backward: two [BM, BD] fp32 accumulators (dk, dv) per program; 8 warps for BD 128 keep BM = 64,
# the wgmma side of dS^T q.
_BWD16 = {16: _T(64, 64, 4, 1), 32: _T(64, 64, 4, 1), 64: _T(64, 64, 4, 1), 128: _T(64, 64, 8, 1),
          256: _T(32, 16, 4, 1)}
_DKDV32 = {16: _T(32, 32, 4, 1), 32: _T(32, 32, 4, 1), 64: _T(32, 32, 4, 1), 128: _T(32, 16, 8, 1),
           256: _T(16, 16, 4, 1)}
# ptxas spills a few bytes of the fp32 dq at 32 x 32 for BD 32 and BD 128 (sm_80, sm_90): 32 x 16
_DQ32 = {16: _T(32, 32, 4, 1), 32: _T(32, 16, 4, 1), 64: _T(32, 32, 4, 1), 128: _T(32, 16, 4, 1),
         256: _T(16, 16, 4, 1)}
for _arch in (80, 86, 90):
    _fill(_arch, {("fwd", "16"): _FWD16, ("fwd", "32"): _FWD32,
                  ("dkdv", "16"): _BWD16, ("dkdv", "32"): _DKDV32,
                  ("dq", "16"): _BWD16, ("dq", "32"): _DQ32})
# sm_80 / sm_86: at BD 256 the 64-row tiles spill without wgmma's register-resident accumulators
_TABLE[80][("fwd", "16", 256)] = _TABLE[86][("fwd", "16", 256)] = _T(32, 64, 8, 1)

#: the interpreter's tiles: NumPy per tile op, no GPU resources
_INTERPRETER = Tiles(64, 128, 4, 1)


def tiles_for(family: str, low_precision: bool, bd: int, arch: int | None = None) -> Tiles:
    """The configuration of `family` for the target arch (default: what Triton compiles for now)."""
    if interpreting():
        return _INTERPRETER
    arch = target_arch() if arch is None else arch
    return _TABLE[arch_class(arch)][(family, "16" if low_precision else "32", bd)]
