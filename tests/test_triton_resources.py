"""The Triton kernels' GPU resources, compiled ahead of time for real targets, held against a budget;
and "auto" on fake GPUs of each arch.

- test_resource_gate_ci_subset: sm_90 bf16 and sm_80 fp32 at both model families' shapes (224 px and
  800 x 1216) compiled by scripts/triton_resources.py, every kernel held against
  tests/data/triton_resource_budget.json (today's numbers: more registers, spill bytes or shared
  memory, or fewer tensor-core instructions, fail; a new kernel configuration fails until the
  budget is regenerated and reviewed).
- test_resource_gate_full: the same for every arch, dtype, shape and edge shape (~65 min on 2 cores):
  `pytest --run-full-resources tests/test_triton_resources.py`.
- test_auto_on_fake_gpus: tests/support/triton_aot_checks.py on fake sm_80/86/89/90 devices.
- test_native_gpu_*: on a real GPU, the accepted calls launch and the refused ones name a kernel
  that really exceeds the device.
These compile with TRITON_INTERPRET=0, so they run in subprocesses (the session interprets Triton).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BUDGET = os.path.join(ROOT, "tests", "data", "triton_resource_budget.json")


def _toolchain_or_skip():
    try:
        import triton
    except Exception as e:  # noqa: BLE001 (any broken install)
        pytest.skip(f"triton cannot be imported ({e})")
    from rest_kernels.triton import resources as R
    try:
        R._tool("ptxas"), R._tool("cuobjdump")
    except RuntimeError as e:
        pytest.skip(str(e))
    with open(BUDGET) as f:
        budget = json.load(f)
    if budget["toolchain"] != R.toolchain():
        pytest.skip(f"the budget was measured with {budget['toolchain']}, this is {R.toolchain()}: "
                    "registers and spills are the compiler's, compare like with like")
    return budget


def _compiled_env():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def _resource_rows(tmp_path, runs: list[list[str]]):
    """Run scripts/triton_resources.py once per argument list, in parallel (one per core)."""
    from rest_kernels.triton import resources as R

    def one(i_args):
        i, args = i_args
        out = tmp_path / f"rows{i}.json"
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "triton_resources.py"), "--quiet",
                               "--json", str(out), *args], env=_compiled_env(), capture_output=True, text=True,
                              timeout=3600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return str(out)

    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(runs), os.cpu_count() or 1))) as pool:
        paths = list(pool.map(one, enumerate(runs)))
    return R.rows_from_json(paths)


def _assert_within_budget(rows, budget):
    from rest_kernels.triton import resources as R
    assert rows, "no kernel was compiled"
    violations = [v for r in rows for v in R.budget_violations(r, budget)]
    assert not violations, "\n".join(violations)


KERNELS = {"_stats_kernel", "_rowsum_kernel", "_attn_kernel", "_row_terms_kernel", "_vbar_kernel", "_split_sum_kernel",
           "_dkdv_kernel", "_dq_kernel", "_dkdv_mixed_kernel", "_dq_mixed_kernel", "_pa_fwd_kernel",
           "_pa_bwd_kernel", "_flash_range_kernel", "_flash_merge_kernel", "_attn_range_kernel",
           "_key_split_row_terms_kernel"}
#: the EMSA kernels whose products are dots (on tensor cores for fp16 / bf16)
DOT_KERNELS = {"_stats_kernel", "_attn_kernel", "_dkdv_kernel", "_dq_kernel", "_dkdv_mixed_kernel",
               "_dq_mixed_kernel", "_flash_range_kernel", "_attn_range_kernel"}


#: kernels held to zero spill bytes: all of them (the tiles are chosen by compiling,
#: scripts/tune_triton_tiles.py; the PA backward runs its 9 x 9 taps as loops, not unrolled)
NO_SPILL_KERNELS = KERNELS


def _assert_redesign_targets(rows):
    """What the Triton redesign holds at ResT's shapes, on every arch compiled: no kernel spills,
    no kernel exceeds the arch's shared memory, and for fp16 / bf16 every dot kernel runs
    on tensor cores: wgmma (HGMMA) on sm_90 with no mma.sync left there, mma.sync (HMMA) on
    sm_80 / 86 / 89."""
    from rest_kernels.triton.targets import arch_limits
    spilling = [f"{r.key}: {r.spill_stores} B" for r in rows
                if r.kernel in NO_SPILL_KERNELS and (r.spill_stores or r.spill_loads)]
    assert not spilling, "spills:\n" + "\n".join(spilling)
    over = [f"{r.key}: {r.shared} B" for r in rows if r.shared > arch_limits(r.arch).max_shared_per_block]
    assert not over, "over the arch's shared memory:\n" + "\n".join(over)
    for r in rows:
        if r.kernel not in DOT_KERNELS or r.dtype == "fp32" or "BD=256" in r.config:
            continue
        if r.arch >= 90:
            assert r.hgmma > 0 and r.hmma == 0, f"{r.key}: {r.hgmma} HGMMA, {r.hmma} HMMA"
        else:
            assert r.hmma > 0, f"{r.key}: no HMMA"


@pytest.mark.slow
def test_resource_gate_ci_subset(tmp_path):
    budget = _toolchain_or_skip()
    rows = _resource_rows(tmp_path, [["--arch", "90", "--dtype", "bf16"], ["--arch", "80", "--dtype", "fp32"]])
    assert {r.kernel for r in rows} == KERNELS, "every kernel of the backend is compiled and measured"
    assert {(r.arch, r.dtype) for r in rows} == {(90, "bf16"), (80, "fp32")}
    # bf16 dots on sm_90 run on wgmma; fp32 dots are "ieee" fp32 (no tensor core) by contract
    _assert_redesign_targets(rows)
    assert all(r.hmma + r.hgmma == 0 for r in rows if r.dtype == "fp32")
    _assert_within_budget(rows, budget)


@pytest.mark.full_resources
def test_resource_gate_full(tmp_path, request):
    if not request.config.getoption("--run-full-resources"):
        pytest.skip("the full table takes ~65 min on 2 cores (cold Triton cache): pytest --run-full-resources")
    budget = _toolchain_or_skip()
    rows = _resource_rows(tmp_path, [["--full", "--arch", "80,86"], ["--full", "--arch", "89,90"]])
    assert len(rows) == len(budget["rows"]), "the full table and the budget list the same kernels"
    _assert_redesign_targets([r for r in rows if any(not t.startswith("edge") for t in r.shapes)])
    _assert_within_budget(rows, budget)


def test_tile_table_has_every_key_for_every_arch_class():
    """Every configuration tiles_for can be asked for on a GPU is in the tuned table, and is
    well-formed: the tensor-core side of the 16-bit mixed backward's dots is 64 rows, JG divides HP,
    output-head groups G only on the mixed forward, at most HP."""
    from rest_kernels.triton import tiles as T
    with open(T.TABLE_PATH) as f:
        table = json.load(f)
    assert set(table["archs"]) == {str(c) for c in T.ARCH_CLASSES}
    for cls, rows in table["archs"].items():
        assert set(rows) == set(T.table_keys()), cls
        for key, row in rows.items():
            assert len(row) in (5, 6), (cls, key)
            bn, bm, warps, stages, jg = row[:5]
            g = T.Tiles(*row).G
            assert warps in (4, 8) and stages in (1, 2) and bn >= 16 and bm >= 16, (cls, key)
            hp = int(key.split("HP=")[1]) if "HP=" in key else 1
            if key.startswith(("dkdv_mix", "dq_mix")):
                assert 1 <= jg <= hp and hp % jg == 0 and g == 0, (cls, key)
                if " 16 " in key:
                    assert (bn if key.startswith("dkdv_mix") else bm) == 64, (cls, key)
            elif key.startswith(("fwd_mix", "fwd_split")):
                assert jg == 0 and 1 <= g <= hp and hp % g == 0, (cls, key)
                if key.startswith("fwd_split"):  # 16-bit only; on tensor cores: 64 query rows
                    assert " 16 " in key and bn == 64, (cls, key)
            else:
                assert jg == 0 and g == 0, (cls, key)


def test_budget_covers_every_arch_and_dtype():
    with open(BUDGET) as f:
        budget = json.load(f)
    seen = {tuple(key.split()[:2]) for key in budget["rows"]}
    assert seen == {(f"sm_{a}", d) for a in (80, 86, 89, 90) for d in ("fp16", "bf16", "fp32")}


@pytest.mark.slow
def test_auto_on_fake_gpus():
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "support", "triton_aot_checks.py"), "auto"],
                          env=_compiled_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {(r["arch"], r["case"]): r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    for (arch, case), r in results.items():
        # "auto" takes triton exactly when triton has no reason, else falls back (here: the reference)
        assert (r["chosen"] == "triton") == (r["reason"] is None), r
        if r["reason"] is not None:
            assert f"sm_{arch}" in r["reason"] or "grid" in r["reason"], r
    # Anchors, from the budget table of today's tiles (rest_kernels/triton/tiles.py): every ResT
    # case of the list fits every arch, training included (ResT-base stage 4 bf16 needed 320 KiB of
    # shared memory per block and sm_86 / sm_89 could not run the mixed stages before the 2-D
    # redesign); what exceeds a grid axis is refused on every arch
    refused = {k for k, r in results.items() if r["reason"] is not None}
    for arch in (80, 86, 89, 90):
        for case in ("rest_lite stage 1 bf16 train", "rest_lite stage 4 bf16 train", "rest_lite stage 4 bf16 infer",
                     "rest_base stage 4 bf16 train", "rest_base stage 3 fp32 infer", "pa batch 100000 stage 2"):
            assert (arch, case) not in refused, results[(arch, case)]
        assert (arch, "emsa batch 70000 (grid y)") in refused  # batch on grid axis y
        assert (arch, "pa plane 16384 x 8192 (grid y)") in refused  # plane tiles on grid axis y


# --------------------------------------------------------------------------- on a real GPU
def _native_gpu_or_skip():
    from rest_kernels.backends.triton_backend import interpreter_on
    if not torch.cuda.is_available() or interpreter_on():
        pytest.skip("needs a CUDA device (interpreter off)")


@pytest.mark.gpu
@pytest.mark.gpu_resources
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_gpu_capability_matches_launch(stage, dtype):
    """What the capability check accepts launches; what it refuses names a kernel that does not fit."""
    _native_gpu_or_skip()
    import rest_kernels
    from rest_kernels.backends.registry import BACKENDS, BackendUnavailableError
    from rest_kernels.triton import resources as R
    fam = R.FAMILIES[1]  # ResT-base/large: head dim 96, the largest tiles of ResT
    h, d, s = fam.heads[stage], fam.embed_dims[stage] // fam.heads[stage], fam.sr_ratios[stage]
    side = 56 // 2 ** stage
    N, M = side * side, R._kv_side(side, s) ** 2
    q = torch.randn(2, N, h, d, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, h, M, d, device="cuda", dtype=dtype)
    w = torch.randn(h, h, device="cuda") if h > 1 else None
    reason = BACKENDS["triton"].emsa_unsupported_reason(q, k, k, w, needs_backward=True)
    if reason is None:
        out = rest_kernels.emsa_attention(q, k, k, w, backend="triton")
        out.float().sum().backward()
        torch.cuda.synchronize()
    else:
        assert "KiB of shared memory" in reason and torch.cuda.get_device_name() in reason, reason
        with pytest.raises(BackendUnavailableError, match="shared memory"):
            rest_kernels.emsa_attention(q, k, k, w, backend="triton")


# --------------------------------------------------------------------------- the rules, on stubs
class _Compiled:
    """Stands in for a compiled kernel: the metadata the capability rules read."""

    def __init__(self, shared, num_warps=4):
        self.metadata = type("Meta", (), {"shared": shared, "num_warps": num_warps})()


def _launch(name, shared, grid=(1, 1, 1), num_warps=4):
    from rest_kernels.triton.launch import PlannedLaunch
    return PlannedLaunch(name, grid, _Compiled(shared, num_warps), {})


@pytest.mark.parametrize("arch,limit_kib", [(80, 163), (86, 99), (89, 99), (90, 227)])
def test_shared_memory_rule_names_arch_need_and_limit(arch, limit_kib):
    from rest_kernels.triton.capability import launch_reasons
    from rest_kernels.triton.targets import arch_limits
    limits = arch_limits(arch)
    assert launch_reasons([_launch("_k", limit_kib * 1024)], limits) == []  # exactly the limit fits
    reasons = launch_reasons([_launch("_k", limit_kib * 1024 + 1)], limits, "backward")
    assert len(reasons) == 1
    assert reasons[0].startswith("backward _k needs") and f"sm_{arch}" in reasons[0] and f"{limit_kib} KiB" in reasons[0]


def test_grid_and_thread_rules():
    from rest_kernels.triton.capability import launch_reasons
    from rest_kernels.triton.targets import GRID_X_MAX, GRID_YZ_MAX, arch_limits
    limits = arch_limits(90)
    assert launch_reasons([_launch("_k", 0, (GRID_X_MAX, GRID_YZ_MAX, GRID_YZ_MAX))], limits) == []
    assert "grid x" in launch_reasons([_launch("_k", 0, (GRID_X_MAX + 1, 1, 1))], limits)[0]
    assert "grid y" in launch_reasons([_launch("_k", 0, (1, GRID_YZ_MAX + 1, 1))], limits)[0]
    assert "grid z" in launch_reasons([_launch("_k", 0, (1, 1, GRID_YZ_MAX + 1))], limits)[0]
    # without the driver's answer, 255 registers a thread bound a block to 8 warps
    assert launch_reasons([_launch("_k", 0, num_warps=8)], limits) == []
    assert "threads per block" in launch_reasons([_launch("_k", 0, num_warps=16)], limits)[0]
    # two launches with the same problem give one reason
    assert len(launch_reasons([_launch("_k", 10 ** 6), _launch("_k", 10 ** 6)], limits)) == 1


def test_unknown_arch_takes_the_nearest_lower_limits():
    from rest_kernels.triton.targets import arch_limits
    assert arch_limits(87).max_shared_per_block == arch_limits(86).max_shared_per_block
    assert arch_limits(100).max_shared_per_block == arch_limits(90).max_shared_per_block
    with pytest.raises(ValueError, match="sm_75"):
        arch_limits(75)


def test_planning_does_not_nest():
    from rest_kernels.triton.launch import planning
    with planning():
        with pytest.raises(RuntimeError, match="nest"):
            with planning():
                pass


def test_a_kernel_the_driver_refuses_is_a_reason():
    from rest_kernels.triton.capability import launch_reasons
    from rest_kernels.triton.targets import arch_limits

    class Unloadable(_Compiled):
        def _init_handles(self):
            raise RuntimeError("out of resource: threads, Required: 256, Hardware limit: 128")

    launch = _launch("_k", 0)
    launch.compiled = Unloadable(0)
    reasons = launch_reasons([launch], arch_limits(90), "forward", load=True)
    assert reasons == ["forward _k cannot be loaded on sm_90 (H100 / H200): "
                       "out of resource: threads, Required: 256, Hardware limit: 128"]
