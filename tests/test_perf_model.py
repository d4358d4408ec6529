"""The static performance model (bench/perf_model.py, scripts/perf_model.py): byte and FLOP counts of
tiny cases against hand computations, the fused kernels moving fewer bytes than eager PyTorch at
ResT's shapes, occupancy and wave factor of hand-made resource rows, the script (--help, a small
run, the measured column from a synthetic bench JSON). Nothing is compiled or run on a GPU."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `bench`

from bench import _perf_aten, _perf_fused, _perf_inputs  # noqa: E402
from bench import perf_model as PM  # noqa: E402
from rest_kernels.triton.resources import Shape  # noqa: E402

SCRIPT = os.path.join(ROOT, "scripts", "perf_model.py")


def _sum(kernels, field):
    return sum(getattr(k, field) for k in kernels)


# ----------------------------------------------------------------------------- hand computations
def test_triton_plain_emsa_forward_by_hand():
    # B 1, h 1, N = M = 64, d 64, bf16, no mix. Host code: no rsq or rstd without the mix (empty
    # tensors, rest_kernels/backends/stats.py), then one _attn_kernel program (GPU tiles BN = BM = 64, BD 64):
    # reads q, k, v (64 x 64 x 2 B = 8192 B each), writes out (8192 B) and lse (64 x 4 = 256 B).
    # Dots: QK^T and PV, 2 x (2 x BD) FLOPs per logit, 64 x 64 logits -> 1,048,576 on tensor cores;
    # other FLOPs (6 + BD / BM) = 7 per logit -> 28,672; one exp per logit -> 4096 SFU ops.
    ks = _perf_fused.triton_kernels(Shape("t", "emsa", 1, 1, 64, 64, 64, False), "bf16", backward=False)
    assert [k.name for k in ks] == ["_attn_kernel"]
    assert [k.bytes for k in ks] == [4 * 8192 + 256]
    attn = ks[0]
    assert (attn.grid, attn.dot_flops, attn.dot_unit, attn.fp32, attn.sfu) == (1, 1_048_576, "tc16", 28_672, 4096)
    assert attn.resource_key == "bf16 _attn_kernel BD=64 BM=64 BN=64 DOT=2 G=1 NORM=False num_stages=2 num_warps=4"


def test_triton_records_the_gpu_tiles_under_the_interpreter(monkeypatch):
    # the interpreter picks 64 x 128 tiles; a GPU 64 x 64 (rest_kernels/triton/tiles.py)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ks = _perf_fused.triton_kernels(Shape("t", "emsa", 1, 2, 64, 128, 64, True), "bf16", backward=False)
    stats = next(k for k in ks if k.name == "_stats_kernel")
    # one query block at batch 1: far below FWD_TARGET_PROGRAMS even with its 2 key blocks split
    # (emsa_fwd.forward_plan), so the "fwd" tiles, one output head per program (G 1), unsplit
    assert stats.resource_key == "bf16 _stats_kernel BD=64 BM=64 BN=64 DOT=2 G=1 num_stages=2 num_warps=4"
    # the 2-D mixed forward: one program per (query block, b, output head), one dot per input head
    # per logit tile (h = 2): grid 1 x 1 x 2, 2 key blocks of 64 x 64, 2 dots of 2 x 64 FLOPs each
    assert stats.grid == 2
    assert stats.dot_flops == 2 * 2 * 64 * (2 * 64 * 64 * 2)
    assert os.environ["TRITON_INTERPRET"] == "1"  # restored


def test_triton_mixed_forward_groups_output_heads_by_hand():
    # ResT-Lite stage 4 at 224 px, batch 64: h 8, N = M = 49, d 64, bf16, sm_90. The table's G for
    # (BD 64, 8 heads) is used since the grid keeps FWD_TARGET_PROGRAMS programs: 1 query block x 64 x 8 / G.
    from rest_kernels.triton import emsa_fwd, tiles
    with _perf_fused._gpu_tiles(90):  # the GPU's table, also under the interpreter
        t = tiles.tiles_for("fwd_mix", True, 64, hp=8)
    G = t.G
    assert G > 1 and 64 * (8 // G) >= emsa_fwd.FWD_TARGET_PROGRAMS, "the table groups heads at ResT-Lite stage 4"
    ks = _perf_fused.triton_kernels(Shape("t", "emsa", 64, 8, 49, 49, 64, True), "bf16", backward=False)
    stats = next(k for k in ks if k.name == "_stats_kernel")
    attn = next(k for k in ks if k.name == "_attn_kernel")
    assert f" G={G} " in stats.resource_key and f" G={G} " in attn.resource_key
    programs = 64 * (8 // G)
    tile = t.BN * t.BM * -(-49 // t.BM)  # logits per program and output head
    assert stats.grid == attn.grid == programs
    # per tile pair: 8 products q_j k_j^T (2 x 64 FLOPs per logit) serve the G heads; the attention
    # adds G products with v; 2 FLOPs per input head and output head mix them in fp32
    assert stats.dot_flops == programs * tile * 8 * 2 * 64
    assert attn.dot_flops == programs * tile * (8 + G) * 2 * 64
    assert stats.fp32 == programs * tile * G * (7 + 2 * 8)
    assert stats.sfu == attn.sfu == programs * tile * G


def test_pa_eager_compile_and_triton_by_hand():
    # x (1, 2, 4, 4) fp32 = 128 B, weight (2,1,3,3) = 72 B, bias 8 B.
    shape = Shape("t", "pa", 1, C=2, H=4, W=4)
    ops = _perf_aten.reference_ops(shape, "fp32", backward=False)
    assert [op.name for op in ops] == ["convolution", "sigmoid", "mul"]
    eager = _perf_aten.eager_kernels(ops)
    # conv reads x, w, b writes z: 336; sigmoid 128 + 128; mul reads x and s, writes out: 384
    assert [k.bytes for k in eager] == [336, 256, 384]
    # depthwise conv: 2 x 32 outputs x 9 taps = 576 FLOPs on CUDA cores (+32 bias adds); sigmoid
    # 2 FLOPs + 2 SFU ops per element; mul 1 per element
    assert (eager[0].dot_flops, eager[0].dot_unit, eager[0].fp32) == (576, "fp32", 32)
    assert (eager[1].fp32, eager[1].sfu, eager[2].fp32) == (64, 64, 32)
    # torch.compile: the conv stays a library kernel; sigmoid and mul fuse: read z and x, write out
    compiled = _perf_aten.compiled_kernels(ops)
    assert [k.bytes for k in compiled] == [336, 384]
    # Triton: one program of 2 x 4 x 4 elements (BC 2, BH 4, BW 4): reads x, w, b, writes out;
    # 20 FLOPs (9 taps, bias, sigmoid, product) and 2 SFU ops (exp, reciprocal) per element
    (k,) = _perf_fused.triton_kernels(shape, "fp32", backward=False)
    assert (k.name, k.grid, k.bytes, k.fp32, k.sfu) == ("_pa_fwd_kernel", 1, 336, 640, 64)


def test_compile_materialises_the_logits_and_splits_at_the_instance_norm():
    ops = _perf_aten.reference_ops(Shape("t", "emsa", 2, 2, 64, 16, 8, True), "fp32", backward=False)
    names = [k.name for k in _perf_aten.compiled_kernels(ops)]
    assert names.count("extern bmm") == 2 and "extern convolution" in names
    # the InstanceNorm statistics (a reduction over N x M = 1024 elements... per (b, g)) end a kernel
    # only above 1024 elements: here they fuse with the softmax and the elementwise pass
    assert any("native_batch_norm.stats" in n and "native_batch_norm.elemt" in n for n in names)
    big = _perf_aten.reference_ops(Shape("t", "emsa", 1, 2, 256, 16, 8, True), "fp32", backward=False)
    names = [k.name for k in _perf_aten.compiled_kernels(big)]
    assert any(n.endswith("native_batch_norm.stats") for n in names)
    assert any(n.startswith("fused native_batch_norm.elemt") for n in names)


@pytest.mark.parametrize("shape", [
    Shape("lite 224 B64 s1", "emsa", 64, 1, 3136, 49, 64, False),
    Shape("lite 224 B64 s2", "emsa", 64, 2, 784, 49, 64, True),
    Shape("lite det B1 s2", "emsa", 1, 2, 15200, 950, 64, True),
], ids=lambda s: s.label)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_fused_move_fewer_bytes_than_eager(shape, dtype):
    for backward in (False, True):
        ops = _perf_aten.reference_ops(shape, dtype, backward)
        eager = _sum(_perf_aten.eager_kernels(ops), "bytes")
        compiled = _sum(_perf_aten.compiled_kernels(ops), "bytes")
        triton = _sum(_perf_fused.triton_kernels(shape, dtype, backward), "bytes")
        cuda = _sum(_perf_fused.cuda_kernels(shape, dtype, backward), "bytes")
        # eager and compile write and read the N x M map several times; the fused kernels never do.
        # At 224 px M = 49 keys, fewer than the head dim: the map is not much bigger than q, and
        # the fused backward reads q and dO twice (dk/dv and dq kernels), so the margin is small
        # there; at 800 x 1216 (M = 950) it is 30-100x.
        nm = shape.B * shape.heads * shape.N * shape.M * 4
        assert compiled < eager and eager > 3 * nm
        assert triton < compiled and cuda < compiled, (triton, cuda, compiled)
        if shape.M > 10 * shape.d:
            assert triton < eager / 25 and cuda < eager / 25, (triton, cuda, eager)


# ----------------------------------------------------------------------------- occupancy
def test_occupancy_of_hand_made_rows():
    a100 = PM.arch_limits(80)
    # 255 registers: 255 x 32 = 8160 per warp, allocated in units of 256 -> 8192; 4 warps -> 32768
    # of the 65536 registers per SM: 2 blocks. No shared memory, 128 threads.
    occ = PM.occupancy(PM.Resources(255, 0), 128, a100)
    assert (occ.blocks_per_sm, occ.limiter, occ.warps_per_sm) == (2, "registers", 8)
    # 32 registers: 1024 per warp, 4096 per block -> 16 blocks; 2048 threads / 128 -> 16 as well
    assert PM.occupancy(PM.Resources(32, 0), 128, a100).by["registers"] == 16
    # 64 KiB shared: (65536 + 1024 reserved) rounded to 128 B = 66560; 164 KiB per SM -> 2 blocks
    occ = PM.occupancy(PM.Resources(40, 64 * 1024), 128, a100)
    assert (occ.by["shared"], occ.blocks_per_sm) == (2, 2)
    # 96 KiB: one block on an A100 (164 KiB), two on an H100 (228 KiB)
    assert PM.occupancy(PM.Resources(40, 96 * 1024), 128, a100).blocks_per_sm == 1
    assert PM.occupancy(PM.Resources(40, 96 * 1024), 128, PM.arch_limits(90)).blocks_per_sm == 2


def test_wave_factor():
    # a full wave, and many waves: no loss
    assert PM.wave_factor(216, 2, 108) == 1.0 and PM.waves(216, 2, 108) == 1
    # one block past a full wave (216 slots): a second wave of 1 block on one SM, which runs it in
    # half a wave's time (it holds 1 of its 2 slots): 1.5 waves for 217/216 of the work
    assert PM.waves(217, 2, 108) == 2
    assert PM.wave_factor(217, 2, 108) == pytest.approx(1.5 * 216 / 217)
    # 64 blocks on 108 SMs: 64 SMs busy -> 108 / 64, whatever the blocks per SM
    assert PM.wave_factor(64, 6, 108) == pytest.approx(108 / 64)


def test_kernel_time_memory_bound_and_sass_override():
    gpu, a = PM.GPU_BY_NAME["H200"], PM.DEFAULT
    k = PM.Kernel("k", bytes=1e9, dot_flops=1e9, dot_unit="tc16", grid=132 * 2, threads=128)
    t = PM.kernel_time(k, gpu, PM.Resources(255, 0, 128, hmma=10, hgmma=0))
    assert t.bound == "mem" and t.factor == 1.0
    assert t.seconds == pytest.approx(1e9 / (4.8e12 * a.eta_mem) + a.launch_s)
    # a row whose SASS has no tensor-core instruction: the dots are charged to the CUDA cores
    t = PM.kernel_time(k, gpu, PM.Resources(255, 0, 128, hmma=0, hgmma=0))
    assert t.dot_unit == "fp32"
    # no resources: no occupancy, wave factor 1, and the reason
    t = PM.kernel_time(k, gpu, None, "no row")
    assert t.occupancy is None and t.why_no_occupancy == "no row"


def test_resource_files(tmp_path):
    row = dict(kernel="_pa_fwd_kernel", arch=80, dtype="fp32", config="BC=1 BH=16 BW=64 HAS_BIAS=True", num_warps=4,
               registers=80, spill_stores=0, spill_loads=0, shared=0, hmma=0, hgmma=0, shapes=[])
    (tmp_path / "rows.json").write_text(json.dumps({"toolchain": {"triton": "x"}, "rows": [row]}))
    fields = ("num_warps", "registers", "spill_stores", "spill_loads", "shared", "hmma", "hgmma")
    budget = {"rows": {"sm_90 fp32 _pa_fwd_kernel BC=1 BH=16 BW=64 HAS_BIAS=True": {k: row[k] for k in fields}}}
    (tmp_path / "budget.json").write_text(json.dumps(budget))
    table, _ = _perf_inputs.triton_resources([str(tmp_path / "rows.json"), str(tmp_path / "budget.json")])
    assert set(table) == {(80, "fp32 _pa_fwd_kernel BC=1 BH=16 BW=64 HAS_BIAS=True"),
                          (90, "fp32 _pa_fwd_kernel BC=1 BH=16 BW=64 HAS_BIAS=True")}
    assert table[(80, "fp32 _pa_fwd_kernel BC=1 BH=16 BW=64 HAS_BIAS=True")].threads == 128
    assert _perf_inputs.cuda_key("void rest_cuda::emsa_bwd_kernel<float, 64, true>(rest_cuda::BwdArgs<float>, "
                                 "float*, float*, float*)") == "emsa_bwd_kernel<float, 64, true>"


# ----------------------------------------------------------------------------- the script
def test_script_help_and_small_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, env=env, check=True)
    assert "--measured" in out.stdout and "--resources" in out.stdout
    path = tmp_path / "m.json"
    out = subprocess.run([sys.executable, SCRIPT, "--families", "lite", "--inputs", "224", "--stages", "4",
                          "--passes", "fwd", "--dtypes", "fp32", "--json", str(path)],
                         capture_output=True, text=True, env=env, check=True)
    assert "MODEL" in out.stdout and "emsa-mix fwd lite 224 B64 s4 fp32" in out.stdout
    doc = json.loads(path.read_text())
    rows = {(r["case"], r["impl"]): r for r in doc["rows"]}
    assert set(r[1] for r in rows) == {"triton", "cuda", "eager", "compile"}
    assert all(r["status"] == "ok" and r["seconds"]["H100"] > 0 for r in rows.values())


def test_measured_column(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("perf_model_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up
    spec.loader.exec_module(script)
    bench = {"environment": {"device_name": "NVIDIA H200"}, "results": [
        dict(kind="op", name="pa", shape_label="224-s4-lite/small", shape=dict(B=8, C=512, H=7, W=7), dtype="float32",
             backend="triton", status="ok", time_median_s=20e-6, **{"pass": "fwd"}),
        dict(kind="op", name="pa", shape_label="224-s4-lite/small", shape=dict(B=8, C=512, H=7, W=7), dtype="float32",
             backend="reference", status="ok", time_median_s=40e-6, **{"pass": "fwd"}),
        dict(kind="model", name="rest_lite", status="ok", backend="triton", time_median_s=1.0)]}
    bpath, jpath = tmp_path / "bench.json", tmp_path / "model.json"
    bpath.write_text(json.dumps(bench))
    assert script.main(["--families", "lite", "--inputs", "224", "--stages", "4", "--ops", "pa", "--passes", "fwd",
                        "--dtypes", "fp32", "--impls", "triton,eager", "--measured", str(bpath),
                        "--json", str(jpath)]) == 0
    text = capsys.readouterr().out
    assert "measured (model/measured)" in text and "(measured)" in text  # the B8 shape, added from the bench rows
    rows = [r for r in json.loads(jpath.read_text())["rows"] if r["dims"]["B"] == 8]
    assert {r["impl"] for r in rows} == {"triton", "eager"}
    for r in rows:
        (m,) = r["measured"]
        expected = 20e-6 if r["impl"] == "triton" else 40e-6
        assert m["gpu"] == "H200" and m["seconds"] == expected
        assert m["model_over_measured"] == pytest.approx(r["seconds"]["H200"] / expected)
    # rows of the default shapes have no measurement
    assert all(not r["measured"] for r in json.loads(jpath.read_text())["rows"] if r["dims"]["B"] == 64)


def test_recording_leaves_the_interpreted_kernels_interpreted():
    # the model flips TRITON_INTERPRET off while it records; kernels must not be defined meanwhile
    import subprocess
    import sys
    code = ("import os; os.environ['TRITON_INTERPRET'] = '1'\n"
            "import sys; sys.path.insert(0, '.')\n"
            "from bench import _perf_fused\n"
            "with _perf_fused._gpu_tiles(90):\n"
            "    from rest_kernels.triton import emsa_fwd  # first imported where the model records\n"
            "from triton.runtime.interpreter import InterpretedFunction\n"
            "assert isinstance(emsa_fwd._attn_kernel, InterpretedFunction), type(emsa_fwd._attn_kernel)\n")
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
