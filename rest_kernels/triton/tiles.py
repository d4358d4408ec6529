"""Tile configurations of the Triton EMSA kernels, per GPU arch, as data.

A configuration is (BN, BM, num_warps, num_stages): query rows and key rows per tile, warps per
program and the software-pipelining depth of the key (or query) loop. It is looked up by the kernel
family, the arch Triton compiles for, the input precision ("16": fp16 / bf16 on tensor cores, "32":
fp32 "ieee" on CUDA cores) and the padded head dim BD. The numbers were chosen from ahead-of-time
compiles for zero spill bytes and to fit the arch's shared memory (tests/test_triton_resources.py
compiles every configuration ResT's calls pick for sm_80, sm_86, sm_89 and sm_90 and holds them
against tests/data/triton_resource_budget.json: the forward kernels are spill-free there; the mixed
dk / dv kernel still spills a few bytes in some specialisations, listed in docs/gpu_resources.md);
where a tile shape matters for the tensor cores it is said beside it.

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

from ._common import interpreting


@dataclasses.dataclass(frozen=True)
class Tiles:
    BN: int          # query rows per tile
    BM: int          # key rows per tile
    num_warps: int
    num_stages: int
    JG: int = 0      # mixed backward only: input heads whose accumulators one program holds

    def launch_options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


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
#: Kernel families: "fwd" (_stats_kernel, _attn_kernel), "dkdv" (_dkdv_kernel), "dq" (_dq_kernel);
#: below, "dkdv_mix" and "dq_mix" (the mixed backward), keyed also by the padded head count HP.
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

# The mixed backward (rest_kernels/triton/emsa_bwd.py) keeps one fp32 accumulator [BD, width] per
# input head in every program (the dk_j^T of its key block, or the dq_j^T of its query block), JG
# heads per program (the other head groups on grid axis z, each recomputing the logits): the width
# (BM for dk / dv, BN for dq) and JG are the largest that compiled without spills in the ahead-of-
# time compile of each arch (JG first: a smaller JG recomputes the logits HP / JG times), measured
# on 2026-12-04 with Triton 3.8.0 for a (B 2, N 300, M 100) call, head dims 16, 32, 64, 96 (BD 128);
# the edge head dims on sm_80 / sm_86 take BD 64's choice. The long side (the M side of the logit
# dots) is 64 for 16-bit inputs (wgmma on sm_90), 32 (16 at BD 128 on sm_86 / sm_90) for fp32.
# 8 warps. Head dims beyond 128 with the mix spilled in every configuration tried: the backend
# refuses them (TritonBackend.max_mix_head_dim). At ResT's real shapes _dkdv_mixed_kernel still
# spills 8-80 B in some specialisations (docs/gpu_resources.md); the budget holds it there.
#: (arch class, family, precision) -> {(BD, HP): (long side, width, num_warps, JG)}
_MIXED = {
    (80, "dkdv_mix", "16"): {(16, 2): (64, 16, 8, 2), (16, 4): (64, 16, 8, 2), (16, 8): (64, 16, 8, 2), (32, 2): (64, 16, 8, 2), (32, 4): (64, 16, 8, 2), (32, 8): (64, 16, 8, 2), (64, 2): (64, 16, 8, 2), (64, 4): (64, 16, 8, 2), (64, 8): (64, 16, 8, 2), (128, 2): (64, 16, 8, 2), (128, 4): (64, 16, 8, 2), (128, 8): (64, 16, 8, 2)},
    (80, "dq_mix", "16"): {(16, 2): (64, 32, 8, 2), (16, 4): (64, 16, 8, 4), (16, 8): (64, 16, 8, 8), (32, 2): (64, 32, 8, 2), (32, 4): (64, 16, 8, 4), (32, 8): (64, 16, 8, 8), (64, 2): (64, 32, 8, 2), (64, 4): (64, 16, 8, 4), (64, 8): (64, 16, 8, 8), (128, 2): (64, 32, 8, 2), (128, 4): (64, 16, 8, 4), (128, 8): (64, 16, 8, 8)},
    (80, "dkdv_mix", "32"): {(16, 2): (32, 16, 8, 2), (16, 4): (32, 16, 8, 2), (16, 8): (32, 16, 8, 2), (32, 2): (32, 16, 8, 2), (32, 4): (32, 16, 8, 2), (32, 8): (32, 16, 8, 2), (64, 2): (32, 16, 8, 2), (64, 4): (32, 16, 8, 2), (64, 8): (32, 16, 8, 2), (128, 2): (32, 16, 8, 1), (128, 4): (32, 16, 8, 1), (128, 8): (32, 16, 8, 1)},
    (80, "dq_mix", "32"): {(16, 2): (32, 64, 8, 2), (16, 4): (32, 32, 8, 4), (16, 8): (32, 32, 8, 8), (32, 2): (32, 64, 8, 2), (32, 4): (32, 32, 8, 4), (32, 8): (32, 32, 8, 8), (64, 2): (32, 64, 8, 2), (64, 4): (32, 32, 8, 4), (64, 8): (32, 32, 8, 8), (128, 2): (32, 16, 8, 2), (128, 4): (32, 16, 8, 4), (128, 8): (32, 16, 8, 4)},
    (86, "dkdv_mix", "16"): {(16, 2): (64, 16, 8, 2), (16, 4): (64, 16, 8, 2), (16, 8): (64, 16, 8, 4), (32, 2): (64, 16, 8, 2), (32, 4): (64, 16, 8, 2), (32, 8): (64, 16, 8, 4), (64, 2): (64, 16, 8, 2), (64, 4): (64, 16, 8, 2), (64, 8): (64, 16, 8, 4), (128, 2): (64, 16, 8, 2), (128, 4): (64, 16, 8, 4), (128, 8): (64, 16, 8, 4)},
    (86, "dq_mix", "16"): {(16, 2): (64, 32, 8, 2), (16, 4): (64, 16, 8, 4), (16, 8): (64, 16, 8, 4), (32, 2): (64, 32, 8, 2), (32, 4): (64, 16, 8, 4), (32, 8): (64, 16, 8, 4), (64, 2): (64, 32, 8, 2), (64, 4): (64, 16, 8, 4), (64, 8): (64, 16, 8, 4), (128, 2): (64, 16, 8, 2), (128, 4): (64, 16, 8, 4), (128, 8): (64, 16, 8, 4)},
    (86, "dkdv_mix", "32"): {(16, 2): (32, 16, 8, 2), (16, 4): (32, 16, 8, 4), (16, 8): (32, 16, 8, 4), (32, 2): (32, 16, 8, 2), (32, 4): (32, 16, 8, 4), (32, 8): (32, 16, 8, 4), (64, 2): (32, 16, 8, 2), (64, 4): (32, 16, 8, 4), (64, 8): (32, 16, 8, 4), (128, 2): (16, 16, 8, 2), (128, 4): (16, 16, 8, 2), (128, 8): (16, 16, 8, 2)},
    (86, "dq_mix", "32"): {(16, 2): (32, 32, 8, 2), (16, 4): (32, 16, 8, 4), (16, 8): (32, 32, 8, 8), (32, 2): (32, 32, 8, 2), (32, 4): (32, 16, 8, 4), (32, 8): (32, 32, 8, 8), (64, 2): (32, 32, 8, 2), (64, 4): (32, 16, 8, 4), (64, 8): (32, 32, 8, 8), (128, 2): (32, 16, 8, 2), (128, 4): (32, 16, 8, 2), (128, 8): (32, 16, 8, 2)},
    (90, "dkdv_mix", "16"): {(16, 2): (64, 64, 8, 2), (16, 4): (64, 64, 8, 4), (16, 8): (64, 32, 8, 8), (32, 2): (64, 64, 8, 2), (32, 4): (64, 64, 8, 4), (32, 8): (64, 64, 8, 4), (64, 2): (64, 32, 8, 2), (64, 4): (64, 32, 8, 4), (64, 8): (64, 16, 8, 8), (128, 2): (64, 32, 8, 2), (128, 4): (64, 16, 8, 4), (128, 8): (64, 16, 8, 4)},
    (90, "dq_mix", "16"): {(16, 2): (64, 64, 8, 2), (16, 4): (64, 64, 8, 4), (16, 8): (64, 64, 8, 8), (32, 2): (64, 64, 8, 2), (32, 4): (64, 64, 8, 4), (32, 8): (64, 64, 8, 4), (64, 2): (64, 64, 8, 2), (64, 4): (64, 32, 8, 4), (64, 8): (64, 32, 8, 8), (128, 2): (64, 32, 8, 2), (128, 4): (64, 16, 8, 4), (128, 8): (64, 16, 8, 4)},
    (90, "dkdv_mix", "32"): {(16, 2): (32, 32, 8, 2), (16, 4): (32, 32, 8, 4), (16, 8): (32, 16, 8, 8), (32, 2): (32, 32, 8, 2), (32, 4): (32, 32, 8, 4), (32, 8): (32, 32, 8, 4), (64, 2): (32, 16, 8, 2), (64, 4): (32, 16, 8, 2), (64, 8): (32, 16, 8, 2), (128, 2): (16, 16, 8, 2), (128, 4): (16, 16, 8, 2), (128, 8): (16, 16, 8, 2)},
    (90, "dq_mix", "32"): {(16, 2): (32, 64, 8, 2), (16, 4): (32, 64, 8, 4), (16, 8): (32, 16, 8, 8), (32, 2): (32, 64, 8, 2), (32, 4): (32, 32, 8, 4), (32, 8): (32, 32, 8, 4), (64, 2): (32, 32, 8, 2), (64, 4): (32, 16, 8, 4), (64, 8): (32, 16, 8, 4), (128, 2): (32, 16, 8, 2), (128, 4): (32, 16, 8, 2), (128, 8): (32, 16, 8, 2)},
}
for (_arch, _fam, _prec), _rows in _MIXED.items():
    for (_bd, _hp), (_long, _width, _warps, _jg) in _rows.items():
        _bn, _bm = (_long, _width) if _fam == "dkdv_mix" else (_width, _long)
        _TABLE[_arch][(_fam, _prec, _bd, _hp)] = _T(_bn, _bm, _warps, 1, _jg)

#: the interpreter's tiles: NumPy per tile op, no GPU resources
_INTERPRETER = Tiles(64, 128, 4, 1)


def tiles_for(family: str, low_precision: bool, bd: int, arch: int | None = None,
              hp: int | None = None) -> Tiles:
    """The configuration of `family` for the target arch (default: what Triton compiles for now);
    `hp`: the padded head count, for the mixed backward's families ("dkdv_mix", "dq_mix")."""
    if interpreting():  # the mixed backward in head groups of half its heads: both paths tested
        return dataclasses.replace(_INTERPRETER, JG=max(1, hp // 2)) if hp else _INTERPRETER
    arch = target_arch() if arch is None else arch
    key = (family, "16" if low_precision else "32", bd) + ((hp,) if hp is not None else ())
    return _TABLE[arch_class(arch)][key]
