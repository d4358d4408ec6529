#!/usr/bin/env python3
"""Choose the Triton EMSA kernels' tiles per arch by compiling them: rest_kernels/triton/data/tiles.json.

    python scripts/tune_triton_tiles.py --classes 80,86 --out a.json      # tune (no GPU needed)
    python scripts/tune_triton_tiles.py --classes 90 --out b.json
    python scripts/tune_triton_tiles.py --merge a.json b.json --write     # into the package's table
    python scripts/tune_triton_tiles.py --classes 90 --keys "dkdv_mix 16 BD=128 HP=8"   # one key

For every key of the table (kernel family, precision, padded head dim BD, padded head count HP) the
candidates (`candidates`) are compiled in order of preference, ahead of time, for every arch of the
class (rest_kernels/triton/aot.py: no GPU), through the backend's own host code with the candidate
forced (tiles.overriding), on probe calls (`probes`) that cover what the JIT specialises on: N and M
multiples of 16, not, or 1; head dims with and without a factor of 16; both 16-bit dtypes. The first
candidate that spills no register (ptxas -v), fits the arch's shared memory and, for fp16 / bf16 on
sm_90 at BD 64 and 128 (ResT's head dims), runs its dots as wgmma only, is kept. A key with no such candidate is reported
and keeps its current entry (the resource gate, tests/test_triton_resources.py, then shows it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # compile for real targets, even from an interpreting shell
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from rest_kernels.triton import resources as R  # noqa: E402
from rest_kernels.triton import tiles as T  # noqa: E402
from rest_kernels.triton.aot import compiling_for  # noqa: E402
from rest_kernels.triton.targets import arch_limits  # noqa: E402

KERNELS = {"fwd": ("_stats_kernel", "_attn_kernel"), "fwd_mix": ("_stats_kernel", "_attn_kernel"),
           "fwd_split": ("_flash_range_kernel",),
           "dkdv": ("_dkdv_kernel",), "dq": ("_dq_kernel",),
           "dkdv_mix": ("_dkdv_mixed_kernel",), "dq_mix": ("_dq_mixed_kernel",)}
#: head dims probed per padded head dim (a multiple of 16 and, where the class has one, not)
HEAD_DIMS = {16: (16, 5), 32: (32, 24), 64: (64, 48), 128: (96, 128), 256: (256,)}
#: (N, M): both multiples of 16, neither, one of each, and 1 (the JIT specialises on divisibility
#: by 16 and on the value 1; a resource row merges every specialisation of one tile configuration)
SIZES = ((1024, 256), (37, 45), (784, 49), (1, 1))
_T = T.Tiles


def candidates(family: str, precision: str, bd: int, hp: int | None) -> list[T.Tiles]:
    """The configurations tried, most preferred first."""
    if family in T.MIXED_FAMILIES:
        longs = (64,) if precision == "16" else (32, 16)  # the M side of the dots: wgmma needs 64
        out = []
        jg = hp
        while jg >= 1:  # more heads per program first: each head group recomputes the logits
            for long in longs:
                for width in (64, 32, 16):
                    bn, bm = (long, width) if family == "dkdv_mix" else (width, long)
                    out.append(_T(bn, bm, 8, 1, jg))
            jg //= 2
        return out
    if family in T.GROUPED_FAMILIES:  # more output heads per program first (h dots per tile pair serve G heads)
        if family == "fwd_split":  # 16-bit only; G [BN, BD] accumulators beside G logit tiles: 8 warps
            tiles = [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 1), (64, 16, 8, 1)]
        elif precision == "16":
            tiles = [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 1)]
        else:
            tiles = [(64, 32, 8, 2), (32, 32, 8, 2), (32, 16, 8, 2), (32, 16, 8, 1)]
        if family == "fwd_split":
            # wider key tiles before more heads: with G >= 2 the product work per key is already
            # shared, and a 16-key tile pays the per-block statistics and rescale of [BN, BD] for
            # 16 keys (the performance model: sm_90 BD 64 G 4 BM 16 modelled slower than G 2 BM
            # 64 at ResT's detection-size stages 3-4); G = 1 last
            gs = [hp >> i for i in range(hp.bit_length()) if hp >> i >= 2]
            return [_T(*t, 0, g) for t in tiles for g in gs] + [_T(*t, 0, 1) for t in tiles]
        out, g = [], hp
        while g >= 1:
            out += [_T(*t, 0, g) for t in tiles]
            g //= 2
        return out
    if family == "fwd":
        if precision == "16":
            return [_T(64, 64, 4, 2), _T(64, 64, 8, 2), _T(64, 32, 4, 2), _T(64, 32, 8, 2), _T(64, 32, 8, 1),
                    _T(64, 16, 8, 1), _T(32, 64, 8, 1), _T(32, 32, 4, 1), _T(16, 16, 4, 1)]
        return [_T(64, 32, 4, 2), _T(64, 32, 8, 2), _T(32, 32, 4, 2), _T(32, 16, 8, 2), _T(32, 16, 4, 1),
                _T(16, 16, 4, 1)]
    if precision == "16":
        return [_T(64, 64, 4, 1), _T(64, 64, 8, 1), _T(64, 32, 8, 1), _T(64, 32, 4, 1), _T(32, 64, 8, 1),
                _T(32, 32, 4, 1), _T(32, 16, 4, 1), _T(16, 16, 4, 1)]
    return [_T(32, 32, 4, 1), _T(32, 16, 4, 1), _T(16, 32, 4, 1), _T(32, 16, 8, 1), _T(16, 16, 4, 1)]


def probes(family: str, precision: str, bd: int, hp: int | None):
    """(Shape, dtype name, backward) of the calls that compile this key's kernels."""
    dtypes = ("bf16", "fp16") if precision == "16" else ("fp32",)
    backward = family not in ("fwd", "fwd_mix", "fwd_split")
    out = []
    if family == "fwd_split":
        # batch 1 with few query blocks and many key blocks, so that every candidate's grid splits
        # the key range (emsa_fwd.forward_plan): N and M multiples of 16 and not; both 16-bit
        # dtypes (sm_90 BD 128 G 2 BM 32: bf16 252 registers, no spill; fp16 28 B spilled)
        d = {64: 64, 128: 96}[bd]
        for N, M in ((256, 1024), (200, 1000)):
            for dt in dtypes:
                out.append((R.Shape(f"probe h{hp} d{d} N{N} M{M}", "emsa", 1, hp, N, M, d, True), dt, False))
        return out
    if family == "fwd_mix":
        # ResT's head dim of the class, N and M multiples of 16 and not; batch 256 so that the
        # grid keeps the candidate's G (emsa_fwd.forward_plan); one 16-bit dtype (the two
        # compile to the same registers, which the resource gate checks on every dtype)
        d = {64: 64, 128: 96}[bd]
        for N, M in SIZES[:2]:
            for dt in dtypes[:1]:
                out.append((R.Shape(f"probe h{hp} d{d} N{N} M{M}", "emsa", 256, hp, N, M, d, True), dt, False))
        return out
    for d in HEAD_DIMS[bd]:
        for N, M in SIZES:
            if family in T.MIXED_FAMILIES:
                variants = ((hp, True),)
            elif family == "fwd" and bd <= 128:
                variants = ((1, False), (2, True))  # the plain and the mixed forward share the tiles
            else:
                variants = ((1, False),)
            for heads, mix in variants:
                for dt in dtypes:
                    out.append((R.Shape(f"probe h{heads} d{d} N{N} M{M}", "emsa", 2, heads, N, M, d, mix), dt,
                                backward))
    return out


def verdict(row: R.KernelResources, bd: int, precision: str) -> str | None:
    """Why this compiled kernel is not acceptable, or None."""
    if row.spill_stores or row.spill_loads:
        return f"{row.key}: spills {row.spill_stores} B"
    if row.shared > arch_limits(row.arch).max_shared_per_block:
        return f"{row.key}: {row.shared} B of shared memory"
    if precision == "16" and 64 <= bd <= 128:  # ResT's head dims (BD 256: spill-free first)
        if row.arch >= 90 and (row.hmma or not row.hgmma):
            return f"{row.key}: {row.hgmma} HGMMA, {row.hmma} HMMA"
        if row.arch < 90 and not row.hmma:
            return f"{row.key}: no HMMA"
    return None


def try_candidate(key: str, tiles: T.Tiles, archs, family, precision, bd, hp) -> str | None:
    """None if `tiles` is acceptable for `key` on every arch of `archs` and every probe, else why not."""
    for arch in archs:
        compiled = 0
        with compiling_for(arch), T.overriding({key: tiles}):
            for shape, dt, backward in probes(family, precision, bd, hp):
                for launch in R.plan_shape(shape, R.DTYPES[dt], backward):
                    if launch.name in KERNELS[family]:
                        compiled += 1
                        why = verdict(R.measure(launch, arch, dt), bd, precision)
                        if why:
                            return why
        if not compiled:  # a probe that stops launching the kernel must not pass a candidate unseen
            return f"no probe launched {KERNELS[family]} on sm_{arch}"
    return None


def parse_key(key: str):
    parts = key.split()
    family, precision, bd = parts[0], parts[1], int(parts[2].split("=")[1])
    hp = int(parts[3].split("=")[1]) if len(parts) > 3 else None
    return family, precision, bd, hp


def tune(classes, keys, log) -> dict:
    chosen: dict = {}
    for cls in classes:
        for key in keys:
            family, precision, bd, hp = parse_key(key)
            start, picked = time.time(), None
            for tiles in candidates(family, precision, bd, hp):
                why = try_candidate(key, tiles, T.ARCH_CLASSES[cls], family, precision, bd, hp)
                if why is None:
                    picked = tiles
                    break
                log(f"  class {cls} {key}: {tuple(tiles.__dict__.values())} rejected: {why}")
            log(f"class {cls} {key}: {'NONE' if picked is None else tuple(picked.__dict__.values())} "
                f"({time.time() - start:.0f} s)")
            if picked is not None:
                chosen.setdefault(str(cls), {})[key] = list(dataclasses_astuple(picked))
    return chosen


def dataclasses_astuple(t: T.Tiles):
    row = (t.BN, t.BM, t.num_warps, t.num_stages, t.JG)
    return row + (t.G,) if t.G else row


def write_table(path: str, chosen: dict, provenance: str) -> None:
    """Update the package's table with `chosen` (one JSON line per key: reviewable diffs)."""
    with open(path) as f:
        data = json.load(f)
    for cls, rows in chosen.items():
        data["archs"].setdefault(cls, {}).update(rows)
    import triton
    data["made_by"] = provenance
    data["toolchain"] = {"triton": triton.__version__}
    lines = ["{", f' "made_by": {json.dumps(data["made_by"])},', f' "toolchain": {json.dumps(data["toolchain"])},',
             ' "archs": {']
    classes = sorted(data["archs"], key=int)
    for i, cls in enumerate(classes):
        rows = data["archs"][cls]
        lines.append(f'  "{cls}": {{')
        names = sorted(rows)
        for j, name in enumerate(names):
            lines.append(f'   {json.dumps(name)}: {json.dumps(rows[name])}' + ("," if j < len(names) - 1 else ""))
        lines.append("  }" + ("," if i < len(classes) - 1 else ""))
    lines += [" }", "}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--classes", default="80,86,90", help="arch classes to tune (80, 86 = sm_86 + sm_89, 90)")
    p.add_argument("--keys", help="comma-separated table keys (default: every key)")
    p.add_argument("--families", help="comma-separated families (default: all)")
    p.add_argument("--out", help="write the chosen rows as JSON")
    p.add_argument("--merge", nargs="+", metavar="PATH", help="compile nothing: take the rows of earlier --out runs")
    p.add_argument("--write", action="store_true", help=f"update {os.path.relpath(T.TABLE_PATH)}")
    args = p.parse_args(argv)

    if args.merge:
        chosen = {}
        for path in args.merge:
            with open(path) as f:
                for cls, rows in json.load(f).items():
                    chosen.setdefault(cls, {}).update(rows)
    else:
        keys = args.keys.split(",") if args.keys else T.table_keys()
        if args.families:
            keys = [k for k in keys if k.split()[0] in args.families.split(",")]
        chosen = tune([int(c) for c in args.classes.split(",")], keys,
                      lambda msg: print(msg, file=sys.stderr, flush=True))
        print(json.dumps(chosen, indent=1, sort_keys=True))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(chosen, f, indent=1, sort_keys=True)
    if args.write:
        write_table(T.TABLE_PATH, chosen, "python scripts/tune_triton_tiles.py (see its docstring)")
        print(f"updated {os.path.relpath(T.TABLE_PATH)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
