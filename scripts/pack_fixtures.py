"""Convert torch.save'd fixtures (.pt) into the lossless container of tests/support/fixture_container.py.

    python scripts/pack_fixtures.py tests/data/attention_cases.pt tests/data/pa_cases.pt \\
        tests/data/rest_tiny.pt tests/data/rest_v1_models.pt

writes tests/data/<name>.zip next to each (or into --out-dir), loads it back and checks it against
torch.load of the .pt bit for bit (fixture_container.differences: types, keys and their order,
values, every tensor's dtype, shape, stride, storage offset, storage bytes, torch.equal, storage
sharing); exits with status 1 on any difference. The .pt files of tests/data were converted this
way (they are in the git history before the commit that removed them, see tests/data/README.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from support import fixture_container  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pt", nargs="+", help=".pt files (torch.save of nested dicts/lists of tensors)")
    parser.add_argument("--out-dir", help="where the .zip files go (default: next to each .pt)")
    parser.add_argument("--seeds", type=int, default=4096,
                        help="tensors equal to torch.randn(shape, seed) for a seed in [0, SEEDS) are stored "
                             "as the seed (default 4096; 0: store every tensor's bytes)")
    args = parser.parse_args(argv)

    failed = False
    for src in args.pt:
        stem = os.path.splitext(os.path.basename(src))[0]
        dst = os.path.join(args.out_dir or os.path.dirname(src), stem + ".zip")
        obj = torch.load(src, weights_only=False)
        start = time.perf_counter()
        header = fixture_container.save(obj, dst, randn_seeds=range(args.seeds))
        packed = time.perf_counter()
        back = fixture_container.load(dst)
        loaded = time.perf_counter()
        diffs = fixture_container.differences(obj, back)
        seeded = sum("randn_seed" in t for t in header["tensors"])
        print(f"{src} ({os.path.getsize(src):,} B) -> {dst} ({os.path.getsize(dst):,} B): "
              f"{len(header['tensors'])} tensors, {seeded} as randn seeds; "
              f"pack {packed - start:.1f} s, load {loaded - packed:.2f} s; "
              + ("identical" if not diffs else f"{len(diffs)} DIFFERENCES"))
        for d in diffs[:20]:
            print("   ", d)
        failed |= bool(diffs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
