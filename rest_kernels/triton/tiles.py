"""Tile configurations of the Triton EMSA kernels, per GPU arch, as data.

A configuration is (BN, BM, num_warps, num_stages, JG, G): query rows and key rows per tile, warps
per program, the software-pipelining depth of the key (or query) loop; for the mixed backward how
many input heads' accumulators one program holds (JG); for the mixed forward how many output heads'
logit tiles it forms together from one product per input head (G, at most). It is looked up by the
kernel family, the arch class Triton compiles for, the input precision ("16": fp16 / bf16 on tensor
cores, "32": fp32 "ieee" on CUDA cores), the padded head dim BD and, for the mixed families, the
padded head count HP.

The numbers live in rest_kernels/triton/data/tiles.json, written by scripts/tune_triton_tiles.py:
for every key it compiles the candidates below in order of preference, ahead of time for each arch
of the class, on probe calls that cover the JIT's specialisations (N, M multiples of 16 or not, or
1; both 16-bit dtypes), and keeps the first that spills no register, fits the arch's shared memory
and (16-bit, sm_90, BD >= 64) runs its dots as wgmma only. tests/test_triton_resources.py then
compiles what ResT's calls pick and holds it against tests/data/triton_resource_budget.json.

Why the candidates look as they do:
- Every EMSA tile is 2-D ([BN, BD] x [BD, BM] and [BN, BM] x [BM, BD]): on sm_90 Triton lowers a 2-D
  dot whose M side is a multiple of 64 per warpgroup (4 warps) to wgmma (HGMMA); on sm_80-89 to
  mma.sync (HMMA). So 16-bit tiles keep 64 rows on the M side of their dots.
- Registers: a [64, BD] fp32 accumulator costs BD / 2 registers per thread at 4 warps, the logit
  tile [BN, BM] fp32 BM / 2; BD 128 (head dim 96) takes 8 warps or narrower tiles.
- The mixed backward keeps one fp32 accumulator [BD, width] per input head (width BM for dk / dv,
  BN for dq; transposed so that BD is the M side); JG heads per program, the other head groups on
  grid axis z, each recomputing the logits: a larger JG first (fewer recomputations), then a wider
  tile (fewer programs re-reading q and dO).
- Output-head groups G (mixed forward, family "fwd_mix"): one product q_j k_j^T per input head
  serves the logit tiles of G output heads, held together (G [BN, BM] fp32 logit tiles and G
  [BN, BD] accumulators): the logit products shrink by G for G tiles' worth of registers; tuned
  from the largest G down. Rows of the other families have no sixth entry (G = 0).
- "fwd_split" (16-bit only): the same groups for the forward's one-pass range kernel
  (emsa_fwd._flash_range_kernel: G [BN, BD] accumulators besides G logit tiles, so a G of its
  own), tuned wider key tiles first, then the largest G >= 2, G = 1 last.
- Shared memory: the staged operands (num_stages copies of the k and v tiles) plus the layout
  conversions; sm_86 / sm_89 allow 99 KiB per block, sm_80 163 KiB, sm_90 227 KiB.
- fp32 ("ieee" dots on CUDA cores): no tensor-core shape constraint, twice the bytes per operand.

The interpreter (TRITON_INTERPRET=1) runs each tile op in NumPy: its tiles are larger (fewer
Python-level steps) and bounded so the tests stay fast; it has no resources to respect.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import threading

from ._common import interpreting

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiles.json")

#: the arch classes a table is kept for: 80 (A100: 163 KiB shared), 86 (sm_86 / sm_89: 99 KiB),
#: 90 (227 KiB, wgmma); and the archs compiled for each
ARCH_CLASSES = {80: (80,), 86: (86, 89), 90: (90,)}
FAMILIES = ("fwd", "fwd_mix", "fwd_split", "dkdv", "dq", "dkdv_mix", "dq_mix")
MIXED_FAMILIES = ("dkdv_mix", "dq_mix")
#: the mixed forward's tiles with output-head groups (G), tuned for the padded head dims of ResT's
#: mixed stages only (head dims 64 and 96); other head dims run the "fwd" tiles, G = 1. "fwd_split":
#: the same forward with its key range split (one pass per range, emsa_fwd._flash_range_kernel,
#: which holds each head's statistics and output sum together: its own G), 16-bit only
FWD_MIX_BDS = (64, 128)
GROUPED_FAMILIES = ("fwd_mix", "fwd_split")
#: padded head dims the backend can ask for (head dims 1..256), and with the mix (up to 128)
BDS = (16, 32, 64, 128, 256)
MIX_BDS = (16, 32, 64, 128)
#: padded head counts of the mixed backward (2..8 heads; TritonBackend.max_mix_heads)
HPS = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Tiles:
    BN: int          # query rows per tile
    BM: int          # key rows per tile
    num_warps: int
    num_stages: int
    JG: int = 0      # mixed backward only: input heads whose accumulators one program holds
    G: int = 0       # mixed forward only: output heads whose logits one program forms together

    def launch_options(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages)


def key_name(family: str, precision: str, bd: int, hp: int | None = None) -> str:
    """The table's key, e.g. "dkdv_mix 16 BD=128 HP=8"."""
    return f"{family} {precision} BD={bd}" + (f" HP={hp}" if hp is not None else "")


def table_keys() -> list[str]:
    """Every key tiles_for can be asked for."""
    keys = []
    for family in FAMILIES:
        for precision in ("16", "32"):
            if family in MIXED_FAMILIES:
                keys += [key_name(family, precision, bd, hp) for bd in MIX_BDS for hp in HPS]
            elif family == "fwd_split":  # 16-bit only (fp32 at these shapes goes to eager, forward_plan)
                keys += [key_name(family, precision, bd, hp) for bd in FWD_MIX_BDS for hp in HPS
                         if precision == "16"]
            elif family == "fwd_mix":
                keys += [key_name(family, precision, bd, hp) for bd in FWD_MIX_BDS for hp in HPS]
            else:
                keys += [key_name(family, precision, bd) for bd in BDS]
    return keys


@functools.lru_cache(maxsize=1)
def _table() -> dict[int, dict[str, Tiles]]:
    with open(TABLE_PATH) as f:
        data = json.load(f)
    return {int(arch): {key: Tiles(*row) for key, row in rows.items()} for arch, rows in data["archs"].items()}


def target_arch() -> int:
    """The arch Triton compiles for now: the current device's, or the target of
    rest_kernels/triton/aot.py's compile-only driver."""
    from triton.runtime import driver
    return int(driver.active.get_current_target().arch)


def arch_class(arch: int) -> int:
    if arch >= 90:
        return 90
    if arch >= 86:
        return 86
    return 80


_override = threading.local()


@contextlib.contextmanager
def overriding(rows: dict[str, Tiles]):
    """Inside the block (this thread), tiles_for answers `rows` (by key_name) before the table:
    how scripts/tune_triton_tiles.py compiles a candidate through the backend's own host code."""
    previous = getattr(_override, "rows", None)
    _override.rows = {**(previous or {}), **rows}
    try:
        yield
    finally:
        _override.rows = previous


#: the interpreter's tiles: NumPy per tile op, no GPU resources
_INTERPRETER = Tiles(64, 128, 4, 1)


def tiles_for(family: str, low_precision: bool, bd: int, arch: int | None = None,
              hp: int | None = None) -> Tiles | None:
    """The configuration of `family` for the target arch (default: what Triton compiles for now);
    `hp`: the padded head count, for the mixed families ("fwd_mix", "fwd_split", "dkdv_mix", "dq_mix").
    "fwd_mix" and "fwd_split" answer None for head dims outside FWD_MIX_BDS (the caller runs "fwd",
    G = 1), "fwd_split" also for fp32 on a GPU (not tuned: the forward does not split fp32 there)."""
    key = key_name(family, "16" if low_precision else "32", bd, hp)
    rows = getattr(_override, "rows", None)
    if rows and key in rows:
        return rows[key]
    if interpreting():  # the mixed kernels in head groups of half their heads: both paths tested
        return dataclasses.replace(_INTERPRETER, JG=max(1, hp // 2), G=max(1, hp // 2)) if hp else _INTERPRETER
    if family in GROUPED_FAMILIES and bd not in FWD_MIX_BDS:
        return None
    if family == "fwd_split" and not low_precision:
        return None
    arch = target_arch() if arch is None else arch
    return _table()[arch_class(arch)][key]
