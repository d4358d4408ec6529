"""Smoke test of bench/emsa_bench.py: its main entry in-process with a tiny configuration (one small
shape, one repeat), the JSON it writes, clean errors for bad options, skipped rows with reasons
for backends that cannot run, and the rows each mode (default, --quick, --full) selects, read from
the parser and --list without measuring. No timed asserts: only that times are positive."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `bench`

from bench import _cases, _report, _timing, emsa_bench  # noqa: E402

TINY = ["--shapes", "224-s4-lite/small", "--batch", "1", "--repeats", "1", "--warmup", "0",
        "--min-time", "0.0001", "--models", "none", "--dtypes", "float32", "--no-progress"]


def _run(tmp_path, *extra):
    path = tmp_path / "bench.json"
    rc = emsa_bench.main(TINY + ["--json", str(path), *extra])
    with open(path) as f:
        return rc, json.load(f)


def test_rows_fields_and_positive_times(tmp_path, capsys):
    rc, doc = _run(tmp_path, "--ops", "emsa-mix,pa", "--backends", "reference")
    assert rc == 0
    env = doc["environment"]
    for key in ("python", "torch", "triton", "device", "device_name", "cpu_model", "git_commit", "date_utc"):
        assert key in env
    assert doc["settings"]["memory_method"] and doc["settings"]["timing_method"]
    rows = doc["results"]
    assert {(r["name"], r["pass"]) for r in rows} == {(op, p) for op in ("emsa-mix", "pa") for p in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["backend"] == "reference" and r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["shape_label"] == "224-s4-lite/small" and r["shape"]["B"] == 1
        assert r["time_median_s"] > 0 and r["time_min_s"] <= r["time_median_s"] <= r["time_max_s"]
        assert r["throughput"] > 0 and r["throughput_unit"] == "calls/s"
        assert r["peak_memory_bytes"] > 0
        assert r["speedup_vs_eager"] == pytest.approx(1.0)
        if r["pass"] == "fwd+bwd":
            assert r["saved_bytes"] > 0
        else:
            assert r["saved_bytes"] is None
    out = capsys.readouterr().out
    assert "emsa-mix fwd 224-s4-lite/small f32" in out and "vs compiled" in out


def test_unavailable_backends_are_skipped_rows(tmp_path, capsys):
    # cuda-emu named explicitly: served, or skipped with the extension's reason; cuda: no GPU here,
    # or (on a GPU node) a backend for other tensors than this cpu run's
    rc, doc = _run(tmp_path, "--ops", "pa", "--passes", "fwd", "--backends", "reference,cuda,cuda-emu",
                   "--device", "cpu")
    assert rc == 0
    rows = {r["backend"]: r for r in doc["results"]}
    assert rows["reference"]["status"] == "ok"
    assert rows["cuda"]["status"] == "skipped" and rows["cuda"]["reason"]
    assert rows["cuda-emu"]["status"] in ("ok", "skipped")
    if rows["cuda-emu"]["status"] == "skipped":
        assert rows["cuda-emu"]["reason"]
    assert "Skipped:" in capsys.readouterr().out


def test_models_run_or_skip_with_reason(tmp_path):
    path = tmp_path / "m.json"
    rc = emsa_bench.main(["--ops", "none", "--models", "lite", "--modes", "infer", "--model-batch", "1",
                          "--image-size", "64", "--backends", "reference", "--dtypes", "float32",
                          "--repeats", "1", "--warmup", "0", "--min-time", "0.0001", "--no-progress",
                          "--json", str(path)])
    assert rc == 0
    (row,) = json.loads(path.read_text())["results"]
    assert row["kind"] == "model" and row["name"] == "rest_lite"
    if row["status"] == "ok":
        assert row["throughput"] > 0 and row["throughput_unit"] == "images/s"
    else:
        assert row["status"] == "skipped" and "rest_lite" in row["reason"]


@pytest.mark.parametrize("argv, option", [
    (["--backends", "nope"], "--backends"),
    (["--dtypes", "float8"], "--dtypes"),
    (["--ops", "softmax"], "--ops"),
    (["--shapes", "s9"], "--shapes"),
    (["--repeats", "0"], "--repeats"),
    (["--device", "tpu"], "--device"),
])
def test_bad_options_are_argparse_errors(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        emsa_bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err
    if option in ("--backends", "--dtypes", "--ops", "--device"):
        assert "choose from" in err


def test_plot_without_matplotlib_is_a_clean_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as e:
        emsa_bench.main(TINY + ["--plot", str(tmp_path / "x.png")])
    assert e.value.code == 2
    assert "argument --plot" in capsys.readouterr().err


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "x.png"
    rc = emsa_bench.main(TINY + ["--ops", "pa", "--passes", "fwd", "--backends", "reference,compile",
                                 "--plot", str(png)])
    assert rc == 0 and png.stat().st_size > 0


# --------------------------------------------------------------------------- modes
def _selected(*argv):
    """Options and planned cases of a CPU run (pinned to the CPU: a GPU node's defaults are wider)."""
    args = emsa_bench.parse_args(["--device", "cpu", *argv])
    return args, emsa_bench.plan(args)


def test_default_is_one_family_at_every_stage_one_detection_shape_and_one_model():
    args, cases = _selected()
    assert args.mode == "default"
    ops = [c for c in cases if c.kind == "op"]
    shapes = {c.shape.label: c.shape for c in ops}
    at_224 = [s for s in shapes.values() if s.input == "224"]
    assert sorted(s.stage for s in at_224) == [1, 2, 3, 4] and len({s.family for s in at_224}) == 1
    assert [s.input for s in shapes.values()].count("det") == 1 and len(shapes) == 5
    for label, s in shapes.items():  # as ResT runs them: one head at stage 1 (no mix), heads mixed after
        assert {c.op for c in ops if c.shape.label == label} == {"emsa-mix" if s.h > 1 else "emsa", "pa"}, label
        assert {c.pass_ for c in ops if c.shape.label == label} == set(_cases.PASSES)
    assert {(c.model, c.mode) for c in cases if c.kind == "model"} == {("lite", m) for m in _cases.MODEL_MODES}
    assert {c.dtype for c in cases} == {torch.float32}
    assert {"reference", "compile"} <= set(args.backends)
    assert args.batch == emsa_bench.DEFAULTS["cpu"].batch


def test_quick_is_every_op_at_two_shapes_rest_lite_and_small_batches():
    args, cases = _selected("--quick")
    assert args.mode == "quick"
    assert {(c.op, c.shape.label) for c in cases if c.kind == "op"} == {
        (op, s) for op in _cases.OPS for s in emsa_bench.QUICK_SHAPES}
    assert {c.model for c in cases if c.kind == "model"} == {"lite"}
    assert {c.dtype for c in cases} == {torch.float32}
    assert args.batch == emsa_bench.DEFAULTS[("cpu", "quick")].batch < emsa_bench.DEFAULTS["cpu"].batch


def test_full_is_every_op_shape_model_and_dtype():
    args, cases = _selected("--full")
    assert args.mode == "full"
    dtypes = [emsa_bench.DTYPES[d] for d in emsa_bench.default_dtypes("cpu")]
    assert {(c.op, c.pass_, c.shape.label, c.dtype) for c in cases if c.kind == "op"} == {
        (op, p, s.label, dt) for op in _cases.OPS for p in _cases.PASSES for s in _cases.stage_shapes() for dt in dtypes}
    assert {(c.model, c.mode, c.dtype) for c in cases if c.kind == "model"} == {
        (m, mode, dt) for m in _cases.MODELS for mode in _cases.MODEL_MODES for dt in dtypes}


def test_deploy_is_lite_and_base_inference_at_batch_1_and_16_in_float32_and_bfloat16():
    args, cases = _selected("--deploy")
    assert args.mode == "deploy" and args.repeats >= 9
    assert all(c.kind == "model" and c.mode == "infer" for c in cases)
    assert {(c.model, c.batch, c.dtype) for c in cases} == {
        (m, b, dt) for m in ("lite", "base") for b in (1, 16) for dt in (torch.float32, torch.bfloat16)}
    assert {"reference", "compile", "cpu", "onnxruntime", "openvino", "fused-compiled"} <= set(args.backends)
    # the compiled fused model costs a compilation per case: the deployment run's row, elsewhere when named
    assert "fused-compiled" not in _selected()[0].backends and "fused-compiled" not in _selected("--full")[0].backends


@pytest.mark.parametrize("mode", [[], ["--quick"], ["--full"], ["--deploy"]], ids=["default", "quick", "full", "deploy"])
def test_list_shows_the_rows_of_each_mode(mode, capsys):
    assert emsa_bench.main(["--list", "--device", "cpu", *mode]) == 0
    *rows, summary = capsys.readouterr().out.splitlines()
    args, cases = _selected(*mode)
    assert len(rows) == len(cases) * len(args.backends)
    assert {row[:50].rstrip() for row in rows} == {_report.case_cell(emsa_bench.base_row(c, "reference")) for c in cases}
    assert summary.startswith(f"{args.mode} run: {len(cases)} cases, ")


def test_explicit_options_override_the_default_selection():
    # named ops run at every shape (stage 1 included), whatever the model runs there
    args, cases = _selected("--ops", "emsa-mix", "--shapes", "s1", "--models", "small", "--dtypes", "bf16")
    assert {(c.op, c.shape.stage) for c in cases if c.kind == "op"} == {("emsa-mix", 1)}
    # stage 1 of every family (ResT's two, ResTv2-L's) at 224 px and at the detection size
    assert len(args.shapes) == 2 * len(_cases.FAMILIES) == 6
    assert {c.model for c in cases if c.kind == "model"} == {"small"}
    assert {c.dtype for c in cases} == {torch.bfloat16}


def test_full_and_quick_together_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        emsa_bench.parse_args(["--full", "--quick"])
    assert e.value.code == 2
    assert "argument --quick: not allowed with argument --full" in capsys.readouterr().err


# --------------------------------------------------------------------------- detection rows
def test_detection_rows_only_with_full_or_when_named():
    from bench import _detection_cases
    assert not [c for c in _selected()[1] if c.kind == "detection"]
    assert not [c for c in _selected("--quick")[1] if c.kind == "detection"]
    full = [c for c in _selected("--full")[1] if c.kind == "detection"]
    assert {(c.what, c.input, c.variant, c.dtype, c.batch) for c in full} == {
        (w, i, "lite", torch.float32, 1) for w in _detection_cases.DETECTION for i in _detection_cases.DET_INPUTS}
    named = [c for c in _selected("--detection", "backbone", "--det-inputs", "800x1216", "--ops", "none",
                                  "--models", "none")[1]]
    assert [(c.kind, c.what, c.input) for c in named] == [("detection", "backbone", "800x1216")]
    v2 = [c for c in _selected("--detection", "maskrcnn", "--det-inputs", "800x1216", "--det-models", "restv2_tiny",
                               "--ops", "none", "--models", "none")[1]]
    assert [(c.variant, c.name) for c in v2] == [("v2_tiny", "maskrcnn restv2_tiny")]


def test_detection_rows_measure_a_training_step(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    from bench import _detection_cases
    monkeypatch.setitem(_detection_cases.DET_INPUTS, "64x96", (64, 96))  # a small stand-in for 800 x 1216
    path = tmp_path / "d.json"
    rc = emsa_bench.main(["--ops", "none", "--models", "none", "--detection", "backbone,maskrcnn", "--det-inputs",
                          "64x96", "--backends", "reference", "--repeats", "1", "--warmup", "0", "--min-time",
                          "0.0001", "--no-progress", "--json", str(path)])
    assert rc == 0
    rows = json.loads(path.read_text())["results"]
    assert [(r["kind"], r["name"], r["status"]) for r in rows] == [
        ("detection", "backbone rest_lite", "ok"), ("detection", "maskrcnn rest_lite", "ok")]
    for r in rows:
        assert r["time_median_s"] > 0 and r["saved_bytes"] > 0 and r["shape"] == dict(B=1, C=3, H=64, W=96)


# --------------------------------------------------------------------------- deployment engines, interleaving
def test_interleaved_timing_rotates_the_order_and_times_every_callable():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    timings = _timing.measure_interleaved(fns, device="cpu", warmup=1, repeats=4, min_time=1e-9)
    assert {k: len(t.times) for k, t in timings.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t.inner == 1 and t.median > 0 for t in timings.values())
    # after the first call, warm-up and calibration of each: 4 rounds of 3 repeats, each repeat on the
    # CPU an untimed lead-in call and the timed one (_start_quiet)
    rounds = calls[-24:]
    assert all(rounds[i] == rounds[i + 1] for i in range(0, 24, 2))  # lead-in, then the same callable
    repeats = rounds[::2]
    assert [repeats[i * 3] for i in range(4)] == ["a", "b", "c", "a"]  # each round starts one place on
    assert all(sorted(repeats[i * 3:i * 3 + 3]) == ["a", "b", "c"] for i in range(4))


class _FakeProcess:
    """A process whose threads use `busy` of the CPU (fraction of one core) until `quiet_at` seconds."""

    def __init__(self, quiet_at: float, busy: float = 1.0):
        self.now, self.cpu, self.quiet_at, self.busy = 0.0, 0.0, quiet_at, busy

    def sleep(self, s: float) -> None:
        spinning = max(0.0, min(self.now + s, self.quiet_at) - self.now)
        self.cpu += self.busy * spinning
        self.now += s


def test_settle_waits_for_a_spinning_thread_pool_to_go_quiet():
    p = _FakeProcess(quiet_at=0.040)  # ONNX Runtime's ~40 ms of spin after a call
    assert _timing.settle_cpu(cpu_time=lambda: p.cpu, wall_time=lambda: p.now, sleep=p.sleep)
    assert 0.040 <= p.now <= 0.040 + 2 * _timing.SETTLE_WINDOW_S  # returns in the first quiet window
    q = _FakeProcess(quiet_at=0.0)
    assert _timing.settle_cpu(cpu_time=lambda: q.cpu, wall_time=lambda: q.now, sleep=q.sleep)
    assert q.now == pytest.approx(_timing.SETTLE_WINDOW_S)  # already quiet: one window


def test_settle_gives_up_on_a_thread_that_never_stops():
    p = _FakeProcess(quiet_at=float("inf"), busy=0.5)
    assert not _timing.settle_cpu(cpu_time=lambda: p.cpu, wall_time=lambda: p.now, sleep=p.sleep)
    assert _timing.SETTLE_MAX_S <= p.now <= _timing.SETTLE_MAX_S + _timing.SETTLE_WINDOW_S


def test_engine_rows_beside_pytorch_checked_against_float64(tmp_path):
    pytest.importorskip("onnxruntime")
    path = tmp_path / "e.json"
    rc = emsa_bench.main(["--ops", "none", "--models", "lite", "--modes", "infer", "--model-batch", "2",
                          "--image-size", "64", "--backends", "reference,onnxruntime,openvino", "--dtypes",
                          "float32,bfloat16", "--repeats", "2", "--warmup", "0", "--min-time", "0.0001",
                          "--no-progress", "--json", str(path)])
    assert rc == 0
    doc = json.loads(path.read_text())
    assert "order rotated" in doc["settings"]["interleaving"]
    assert doc["settings"]["float32_math"]["float32_matmul_precision"] == "highest"
    rows = {(r["backend"], r["dtype"]): r for r in doc["results"]}
    for (backend, dtype), r in rows.items():
        if r["status"] == "skipped":  # not installed, or no bfloat16 mode: said why
            assert r["reason"], r
            continue
        assert r["status"] == "ok" and r["interleaved"] and r["repeats"] == 2, r
        assert r["error_vs_float64"] >= 0 and r["error_tolerance"] > 0
        if dtype == "float32":  # the export form keeps the engines' float32 within 2x of PyTorch's
            assert r["accuracy"] == "ok", r
    assert rows[("onnxruntime", "bfloat16")]["status"] == "skipped"
    ort = rows[("onnxruntime", "float32")]["engine_settings"]
    assert ort["graph_optimization_level"] == "ORT_ENABLE_ALL" and ort["intra_op_num_threads"] == torch.get_num_threads()
    ov = rows[("openvino", "float32")]
    if ov["status"] == "ok":  # float32 stated: OpenVINO's default on bf16-capable CPUs is bf16
        assert ov["engine_settings"]["INFERENCE_PRECISION_HINT"] == "f32"
        assert ov["engine_settings"]["INFERENCE_NUM_THREADS"] == torch.get_num_threads()
        assert ov["engine_settings"]["PERFORMANCE_HINT"] == "THROUGHPUT"  # batch 2


@pytest.mark.slow
def test_fused_compiled_rows_checked_against_float64_and_skipped_elsewhere(tmp_path):
    """rest.compile_for_inference as a deployment row: compiled on its first call (timed apart),
    checked against the float64 logits, then timed interleaved with eager; op rows say why not."""
    rc, doc = _run(tmp_path, "--ops", "pa", "--passes", "fwd", "--shapes", "s4", "--models", "lite", "--modes",
                   "infer", "--model-batch", "1", "--image-size", "64", "--backends", "reference,fused-compiled",
                   "--dtypes", "float32")
    assert rc == 0
    rows = {(r["kind"], r["backend"]): r for r in doc["results"]}
    op = [r for (kind, b), r in rows.items() if kind == "op" and b == "fused-compiled"]
    assert op and all(r["status"] == "skipped" and "whole-model inference rows only" in r["reason"] for r in op)
    r = rows[("model", "fused-compiled")]
    assert r["status"] == "ok" and r["interleaved"] and r["accuracy"] == "ok", r
    assert r["first_call_s"] > r["time_median_s"] > 0
    assert r["engine_settings"]["torch_compile"].startswith("dynamic=True")


def test_engines_skip_what_they_cannot_run(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    rc, doc = _run(tmp_path, "--ops", "pa", "--passes", "fwd", "--backends", "reference,onnxruntime,openvino")
    assert rc == 0
    rows = {r["backend"]: r for r in doc["results"]}
    assert "openvino cannot be imported" in rows["openvino"]["reason"] and "pip install" in rows["openvino"]["reason"]
    assert rows["onnxruntime"]["status"] == "skipped"  # installed: not an op row's engine; else: not installed
    assert any(why in rows["onnxruntime"]["reason"] for why in ("model infer rows", "cannot be imported"))
