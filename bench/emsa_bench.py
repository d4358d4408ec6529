#!/usr/bin/env python
"""Throughput and memory of rest-kernels' EMSA and PA ops and of the ResT models, per backend,
side by side with eager PyTorch and torch.compile of it.

    python bench/emsa_bench.py                   # representative report, under 10 minutes on a 2-core CPU
    python bench/emsa_bench.py --quick           # smoke run, a few minutes on a 2-core CPU
    python bench/emsa_bench.py --full            # every op, shape and model (about an hour on a 2-core CPU)
    python bench/emsa_bench.py --ops emsa-mix --passes fwd+bwd --shapes s1,s2 --models none \\
        --json results.json --plot results.png --markdown
    python bench/emsa_bench.py --list [--quick | --full]   # the rows a run would measure

Rows. Op level: emsa_attention without ("emsa") and with the head mix ("emsa-mix"), and pa_gate
("pa"), forward (inference, no autograd) and forward + backward, at the stages of ResT's two
shape families (lite/small, base/large, v2-large: ResTv2-L's) at 224 x 224 and at a detection-size
800 x 1216 input. Model level: rest_lite / small / base / large and restv2_tiny / small / base / large
inference and one training step (forward, cross-entropy, backward, AdamW step), images/s. Detection
(--detection; every one with --full): one training step of rest.detection's backbone with FPN,
RetinaNet and Mask R-CNN on rest_lite at 800 x 1216 and 800 x 1333, batch 1 on a CPU
(bench/_detection_cases.py).
Which rows run depends on the mode (SELECTIONS below; explicit --ops, --shapes, --models, --dtypes...
override it): with no --quick / --full, the ops as ResT-Lite runs them at its four stages at 224 px
(stage 1 has one head: plain emsa; stages 2-4 mix heads: emsa-mix) and at one detection-size stage,
and rest_lite; --quick: every op at two shapes, rest_lite, small batches; both float32 on a CPU,
every dtype on a GPU; --full: every op at every shape, every model, every dtype the device supports.
Backends, measured in the same run: every fused backend of rest_kernels usable here, "reference"
(eager PyTorch with the official math: the "eager" baseline) and "compile" (torch.compile of the
reference, op or model pinned to backend="reference"). A row a backend cannot run is listed as
skipped with the reason. The cuda-emu backend (an emulator for tests) and the triton backend under
the Triton interpreter (TRITON_INTERPRET=1, also for tests) are only timed when named in --backends.

Methods (also written into the report and the JSON): see bench/_timing.py and bench/_memory.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script: make `bench` and (in a plain checkout) `rest_kernels` importable
    _REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        import rest_kernels  # noqa: F401  (an installed package wins: it has the built extension)
    except ImportError:
        sys.path.insert(0, _REPO)
    if _REPO not in sys.path:
        sys.path.append(_REPO)

import torch  # noqa: E402

import rest_kernels  # noqa: E402
from rest_kernels.backends.registry import BACKENDS  # noqa: E402
from rest_kernels.backends.triton_backend import interpreter_on  # noqa: E402

from bench import _cases, _detection_cases, _engines, _env, _memory, _progress, _report, _timing  # noqa: E402

FUSED = tuple(n for n in BACKENDS if n != "reference")       # triton, cuda, cpu, cuda-emu
ENGINES = _engines.ENGINES                                   # onnxruntime, openvino: exported models
FUSED_COMPILED = _cases.FUSED_COMPILED                       # rest.compile_for_inference: CPU model inference
BACKEND_CHOICES = ("reference", "compile") + FUSED + ENGINES + (FUSED_COMPILED,)
BACKEND_ALIASES = {"eager": "reference", "compiled": "compile", "torch.compile": "compile",
                   "ort": "onnxruntime", "ov": "openvino"}
EMULATORS = ("cuda-emu",)                                    # timed only when named
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
                 "bf16": "bfloat16", "fp64": "float64", "f64": "float64", "double": "float64"}
#: one classification and one detection-size shape; torch.compile dominates a quick run on a small CPU
QUICK_SHAPES = ("224-s1-lite/small", "det-s4-lite/small")


@dataclasses.dataclass
class Defaults:
    """Per-device defaults (and the --quick ones); explicit options override them."""
    batch: int            # op batch at 224 px
    det_batch: int        # op batch at the detection-size input
    model_batch: int
    repeats: int
    warmup: int
    min_time: float       # seconds per repeat at least (short calls run in a loop)


DEFAULTS = {
    "cpu": Defaults(batch=8, det_batch=1, model_batch=4, repeats=5, warmup=1, min_time=0.02),
    "cuda": Defaults(batch=64, det_batch=8, model_batch=64, repeats=20, warmup=5, min_time=0.01),
    ("cpu", "quick"): Defaults(batch=2, det_batch=1, model_batch=2, repeats=3, warmup=1, min_time=0.01),
    ("cuda", "quick"): Defaults(batch=16, det_batch=2, model_batch=16, repeats=5, warmup=2, min_time=0.005),
}


@dataclasses.dataclass(frozen=True)
class Selection:
    """The rows a mode runs where no option names them (None: every choice); explicit --ops,
    --shapes, --models, --dtypes... override it."""
    ops: tuple | None = None
    shapes: tuple | None = None
    models: tuple | None = None
    dtypes: tuple | None = None     # None: default_dtypes(device)
    as_in_model: bool = False       # unless --ops is given: only the ops ResT runs at each stage (_cases.in_model)
    detection: tuple | None = ()    # rest.detection training steps (bench/_detection_cases.py); none by default
    modes: tuple | None = None      # model modes (None: infer and train)
    model_batches: tuple | None = None  # None: the device's default model batch
    min_repeats: int = 1            # unless --repeats is given: at least this many repeats


#: ResT-Lite's four stages at 224 px (one head at stage 1, heads mixed at 2-4) and one detection-size
#: stage, the one quickest to measure (N = M = 950; the larger N of stages 1-3 make eager slow)
DEFAULT_SHAPES = ("224-s1-lite/small", "224-s2-lite/small", "224-s3-lite/small", "224-s4-lite/small",
                  "det-s4-lite/small")
#: the default report: representative, and within 10 minutes on a 2-core CPU with a cold compile
#: cache, where torch.compile dominates (an op case takes 5-20 s with its three backends, rest_lite's
#: two about 3 minutes). float32 only on a CPU, also for --quick: bfloat16 doubles every row's
#: compilation, the models' included.
_DEFAULT_SELECTION = Selection(ops=_cases.OPS, shapes=DEFAULT_SHAPES, models=("lite",), dtypes=("float32",),
                               as_in_model=True)
_QUICK_SELECTION = Selection(shapes=QUICK_SHAPES, models=("lite",), dtypes=("float32",))
#: the deployment comparison: rest_lite and rest_base inference at batch 1 and 16, float32 and
#: bfloat16, eager, compile and the fused model beside ONNX Runtime and OpenVINO on the exported
#: file, interleaved, at least 9 repeats (about 40 minutes on a 2-core CPU, torch.compile included)
_DEPLOY_SELECTION = Selection(ops=(), models=("lite", "base"), dtypes=("float32", "bfloat16"), modes=("infer",),
                              model_batches=(1, 16), min_repeats=9)
SELECTIONS = {
    "default": _DEFAULT_SELECTION,
    "quick": _QUICK_SELECTION,
    "deploy": _DEPLOY_SELECTION,
    "full": Selection(detection=None),
    # a GPU runs these in seconds: every dtype it supports
    ("cuda", "default"): dataclasses.replace(_DEFAULT_SELECTION, dtypes=None),
    ("cuda", "quick"): dataclasses.replace(_QUICK_SELECTION, dtypes=None),
}


# --------------------------------------------------------------------------- options
def _list_type(choices, aliases=None, special=("all", "none")):
    """A comma-separated list of choices; a bad value is an argparse error naming the choices."""
    aliases = aliases or {}

    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty list; choose from {', '.join(choices)}")
        if len(items) == 1 and items[0].lower() in special:
            return list(choices) if items[0].lower() == "all" else []
        out = []
        for item in items:
            key = aliases.get(item.lower(), item.lower())
            if key not in choices:
                raise argparse.ArgumentTypeError(
                    f"invalid choice {item!r} (choose from {', '.join(choices)}"
                    + (f"; or {' / '.join(repr(x) for x in special)}" if special else "") + ")")
            if key not in out:
                out.append(key)
        return out
    return parse


def _shapes_type(text: str):
    labels = [s.label for s in _cases.stage_shapes()]
    tokens = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not tokens:
        raise argparse.ArgumentTypeError("empty list")
    if tokens == ["all"]:
        return labels
    picked = []
    for token in tokens:
        needle = "-s" + token[len("stage"):] + "-" if token.startswith("stage") else token
        if needle.startswith("s") and needle[1:].isdigit():
            needle = "-" + needle + "-"
        hits = [label for label in labels if needle in label.lower()]
        if not hits:
            raise argparse.ArgumentTypeError(
                f"{token!r} matches no shape (a substring of one of: {', '.join(labels)}; or stage1..stage4, s1..s4, all)")
        picked += [h for h in hits if h not in picked]
    return [label for label in labels if label in picked]


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_int_list(text):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected positive integers, comma-separated, got an empty list")
    return list(dict.fromkeys(_positive_int(t) for t in items))


def _nonnegative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


#: longest --min-time accepted: every row repeats its call for at least this long, `repeats` times
MAX_MIN_TIME = 3600.0


def _min_time(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    # inf would make the first row loop forever (a hang, not an error); NaN compares false everywhere
    if not 0 < value <= MAX_MIN_TIME:
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds in (0, {MAX_MIN_TIME:g}], got {value}")
    return value


def _threads(text):
    value = _positive_int(text)
    # the CPUs this process may run on (a container or taskset can allow fewer than the machine has)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if value > cpus:  # more threads than CPUs only measures oversubscription
        raise argparse.ArgumentTypeError(f"expected at most the {cpus} CPUs of this machine, got {value}")
    return value


def _check_output_path(parser, option: str, path: str) -> None:
    """--json / --plot: fail now, not after an hour of measuring, when the file cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"argument --{option}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        parser.error(f"argument --{option}: {path!r} is a folder; give a file name")
    existed = os.path.exists(path)
    try:  # the only sure test of writability (permissions, read-only or pseudo file systems)
        with open(path, "a"):
            pass
    except OSError as e:
        parser.error(f"argument --{option}: cannot write {path!r}: {e.strerror or e}")
    if not existed:
        os.remove(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="emsa_bench.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Lists are comma-separated. Shapes: " + ", ".join(s.label for s in _cases.stage_shapes())
               + ". Ops: " + "; ".join(f"{k}: {v}" for k, v in _cases.OP_HELP.items()) + ".")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (default: cuda when a GPU is visible, else cpu)")
    mode = p.add_mutually_exclusive_group()  # without either: the default selection (SELECTIONS)
    mode.add_argument("--quick", action="store_true",
                      help=f"smoke run: every op at shapes {', '.join(QUICK_SHAPES)}, rest_lite only, "
                           "float32 on a CPU, small batches, few repeats")
    mode.add_argument("--full", action="store_true",
                      help="every op at every shape, every model, every dtype (about an hour on a 2-core CPU)")
    mode.add_argument("--deploy", action="store_true",
                      help="models only: rest_lite and rest_base inference, batch 1 and 16, float32 and bfloat16, "
                           "PyTorch beside ONNX Runtime and OpenVINO, at least 9 interleaved repeats")
    p.add_argument("--ops", type=_list_type(_cases.OPS),
                   help="ops to run (default: the mode's, see --list; 'none' for models only)")
    p.add_argument("--passes", type=_list_type(_cases.PASSES, {"fwdbwd": "fwd+bwd", "bwd": "fwd+bwd"}),
                   help="op passes: fwd (inference), fwd+bwd (default both)")
    p.add_argument("--models", type=_list_type(_cases.MODELS, {_cases.model_name(m): m for m in _cases.MODELS}),
                   help="ResT and ResTv2 variants (lite, ..., v2_tiny, ... or rest_lite, ..., restv2_tiny, ...; "
                        "default lite, all with --full; 'none' for ops only)")
    p.add_argument("--detection", type=_list_type(_detection_cases.DETECTION),
                   help="rest.detection training steps at detection sizes: backbone (ResT + FPN), retinanet, "
                        "maskrcnn (default none; all with --full: an eager step takes 20-60 s on a 2-core CPU)")
    p.add_argument("--det-inputs", type=_list_type(tuple(_detection_cases.DET_INPUTS)),
                   help="input sizes of the --detection rows (default: all)")
    p.add_argument("--det-models", type=_list_type(_detection_cases.DET_MODELS,
                                                   {_cases.model_name(m): m for m in _detection_cases.DET_MODELS}),
                   help="ResT and ResTv2 variants of the --detection rows (lite, ..., v2_tiny, ... or rest_lite, ..., "
                        "restv2_tiny, ...; default lite)")
    p.add_argument("--det-memory", type=_list_type(tuple(_detection_cases.DET_MEMORY)),
                   help="what the --detection rows' backbone keeps for backward: default (the model's default), "
                        "modules (every MLP's modules: the fused step before the lean MLP), lean "
                        "(grad_checkpointing: blocks and FPN recomputed) (default: default)")
    p.add_argument("--modes", type=_list_type(_cases.MODEL_MODES, {"inference": "infer", "training": "train"}),
                   help="model modes: infer, train (default both)")
    p.add_argument("--backends", type=_list_type(BACKEND_CHOICES, BACKEND_ALIASES, special=("all",)),
                   help="backends (default: reference, compile and every fused backend except test emulators)")
    p.add_argument("--dtypes", type=_list_type(tuple(DTYPES), DTYPE_ALIASES, special=("all",)),
                   help="dtypes (default: float32 on the CPU, with --full plus bfloat16 where a fused "
                        "CPU backend takes it; float32, float16, bfloat16 on a GPU; models use autocast for "
                        "float16/bfloat16)")
    p.add_argument("--shapes", type=_shapes_type,
                   help="op shapes: substrings of the shape names (e.g. 224, det, s1, stage2, lite) or all "
                        "(default: the mode's, see --list)")
    p.add_argument("--batch", type=_positive_int, help="op batch size (default 8 on CPU / 64 on GPU at 224 px, "
                                                        "1 / 8 at the detection size)")
    p.add_argument("--model-batch", type=_positive_int_list,
                   help="model batch sizes, comma-separated (default 4 on CPU, 64 on GPU; 1,16 with --deploy)")
    p.add_argument("--image-size", type=_positive_int, default=224, help="model input size (default 224)")
    p.add_argument("--repeats", type=_positive_int, help="timed repeats per row (default 5 on CPU, 20 on GPU; 3 / 5 with --quick)")
    p.add_argument("--warmup", type=_nonnegative_int, help="untimed calls after the first (default 1 CPU, 5 GPU)")
    p.add_argument("--min-time", type=_min_time,
                   help="seconds one repeat lasts at least; short calls repeat in a loop (default 0.02 CPU, 0.01 GPU)")
    p.add_argument("--threads", type=_threads,
                   help="CPU threads for PyTorch (torch.set_num_threads; default: PyTorch's own choice)")
    p.add_argument("--cpu-allocator", choices=("default", "tuned"), default="default",
                   help="glibc malloc for CPU tensors: default, or tuned (rest.tune_cpu_allocator(): freed memory "
                        "reused instead of fresh pages for every large tensor; process-wide, so every row of "
                        "the run gets it; rest/cpu_allocator.py says why)")
    p.add_argument("--json", metavar="PATH", help="write every measurement, versions, device and commit as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of speed-up and memory against eager (needs matplotlib)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--list", action="store_true", help="list the rows that would run, and exit")
    return p


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: 'cuda' asked for but no CUDA device is visible (choose from auto, cpu, cuda)")
    for option in ("json", "plot"):
        path = getattr(args, option)
        if path is not None:
            _check_output_path(parser, option, path)
    if args.plot is not None:
        reason = _report.plot_unavailable_reason()
        if reason:
            parser.error(f"argument --plot: {reason}")
    args.mode = "quick" if args.quick else "full" if args.full else "deploy" if args.deploy else "default"
    d = DEFAULTS[(args.device, "quick") if args.quick else args.device]
    args.det_batch = args.batch or d.det_batch
    args.batch = args.batch or d.batch
    sel = SELECTIONS.get((args.device, args.mode), SELECTIONS[args.mode])
    args.model_batch = args.model_batch or list(sel.model_batches or [d.model_batch])
    args.repeats = args.repeats or max(d.repeats, sel.min_repeats)
    args.warmup = d.warmup if args.warmup is None else args.warmup
    args.min_time = args.min_time or d.min_time
    args.as_in_model = sel.as_in_model and args.ops is None  # ops the user names run at every shape
    if args.ops is None:
        args.ops = list(_cases.OPS if sel.ops is None else sel.ops)
    if args.passes is None:
        args.passes = list(_cases.PASSES)
    if args.models is None:
        args.models = list(sel.models or _cases.MODELS)
    if args.modes is None:
        args.modes = list(sel.modes or _cases.MODEL_MODES)
    if args.detection is None:
        args.detection = list(_detection_cases.DETECTION if sel.detection is None else sel.detection)
    args.det_inputs = args.det_inputs or list(_detection_cases.DET_INPUTS)
    args.det_models = args.det_models or ["lite"]
    args.det_memory = args.det_memory or ["default"]
    if args.shapes is None:
        args.shapes = list(sel.shapes or [s.label for s in _cases.stage_shapes()])
    args.explicit_backends = args.backends is not None
    if args.backends is None:
        # fused-compiled compiles each model case for 15-60 s on a small CPU: the deployment run's row,
        # elsewhere only when named
        args.backends = [b for b in BACKEND_CHOICES if b not in EMULATORS
                         and (b != FUSED_COMPILED or args.mode == "deploy")]
    # detection rows: float32 unless --dtypes names others (each costs minutes on a CPU)
    args.det_dtypes = list(args.dtypes) if args.dtypes is not None else ["float32"]
    if args.dtypes is None:
        args.dtypes = list(sel.dtypes or default_dtypes(args.device))
    return args


def default_dtypes(device: str) -> list[str]:
    if device == "cuda":
        return ["float32", "float16", "bfloat16"]
    out = ["float32"]
    for name in FUSED:  # bfloat16 on the CPU only where a timed fused CPU backend takes it
        b = BACKENDS[name]
        if (name not in EMULATORS and not (name == "triton") and b.device_type == "cpu"
                and rest_kernels.available_backends()[name] is None and torch.bfloat16 in b.dtypes):
            out.append("bfloat16")
            break
    return out


# --------------------------------------------------------------------------- plan
def plan(args) -> list:
    """The cases, in report order: ops (per shape, op, pass, dtype), then models, then detection."""
    shapes = {s.label: s for s in _cases.stage_shapes()}
    cases = []
    for label in args.shapes:
        shape = shapes[label]
        batch = args.det_batch if shape.input == "det" else args.batch
        for op in args.ops:
            if args.as_in_model and not _cases.in_model(op, shape):
                continue
            for pass_ in args.passes:
                for dt in args.dtypes:
                    cases.append(_cases.OpCase(op, pass_, shape, batch, DTYPES[dt], args.device))
    for model in args.models:
        for mode in args.modes:
            for batch in args.model_batch:
                for dt in args.dtypes:
                    cases.append(_cases.ModelCase(model, mode, batch, args.image_size, DTYPES[dt], args.device))
    for what in args.detection:
        for model in args.det_models:
            for inp in args.det_inputs:
                for dt in args.det_dtypes:
                    for memory in args.det_memory:
                        cases.append(_detection_cases.DetectionCase(what, model, inp, args.det_batch, DTYPES[dt],
                                                                    args.device, memory))
    return cases


def skip_reason(backend: str, device: str, explicit: bool) -> str | None:
    """Why a backend cannot have rows on this device at all (None: try it, per case)."""
    if backend in ("reference", "compile"):
        return None
    if backend == FUSED_COMPILED:  # the fused model on the cpu kernels, compiled
        if device != "cpu":
            return f"{backend} rows run on the CPU; this run is on {device} (--device)"
        return rest_kernels.available_backends()["cpu"]
    if backend in ENGINES:
        return _engines.unavailable_reason(backend, device)
    reason = rest_kernels.available_backends()[backend]
    if reason is not None:
        return reason
    b = BACKENDS[backend]
    if b.device_type and b.device_type != device:
        return f"{backend} serves {b.device_type} tensors; this run is on {device} (--device)"
    if backend in EMULATORS and not explicit:
        return "a test emulator of the cuda kernels on the CPU, not timed unless named in --backends"
    if backend == "triton" and interpreter_on() and not explicit:
        return ("runs under the Triton interpreter here (TRITON_INTERPRET=1), an emulator for tests; "
                "not timed unless named in --backends")
    return None


# --------------------------------------------------------------------------- measuring
def base_row(case, backend: str) -> dict:
    return dict(kind=case.kind, name=case.name, **{"pass": case.pass_},
                shape_label=(case.shape.label if case.kind == "op" else case.input if case.kind == "detection"
                             else f"{case.image}px"),
                shape=case.dims(), dtype=_cases.dtype_name(case.dtype), device=case.device,
                autocast=(case.kind != "op" and case.dtype in (torch.float16, torch.bfloat16)
                          and backend not in ENGINES and not _cases.runs_cast_model(case, backend)),
                # an engine's precision: its row's engine_settings; a cast model: its dtype, no autocast
                cast_model=_cases.runs_cast_model(case, backend),
                backend=backend, status="ok", reason=None, group=case.group())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def measure_row(case, backend: str, args) -> dict:
    row = base_row(case, backend)
    reason = skip_reason(backend, args.device, args.explicit_backends)
    if reason is not None:
        return dict(row, status="skipped", reason=reason)
    runner = None
    try:
        runner = (_detection_cases.detection_runner(case, backend) if case.kind == "detection"
                  else _cases.runner(case, backend))
        timing = _timing.measure(runner.fn, device=args.device, warmup=args.warmup,
                                 repeats=args.repeats, min_time=args.min_time)
        row.update(timing.as_dict())
        row["throughput"] = runner.items / timing.median
        row["throughput_unit"] = runner.unit
        try:
            row["peak_memory_bytes"] = _memory.peak_memory(runner.fn, args.device)
        except Exception as e:  # the row keeps its time; say why the memory is missing
            row["peak_memory_bytes"], row["peak_memory_error"] = None, _first_line(e)
        row["saved_bytes"] = runner.saved_bytes() if runner.saved_bytes is not None else None
    except (rest_kernels.BackendUnavailableError, _cases.ModelUnavailable) as e:
        row.update(status="skipped", reason=str(e))
    except torch.OutOfMemoryError as e:
        row.update(status="skipped", reason="out of memory: " + _first_line(e))
    except Exception as e:  # a failing backend is a row of the report, not the end of the run
        row.update(status="error", reason=_first_line(e), traceback=traceback.format_exc())
    finally:
        del runner
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return row


def interleaved(case) -> bool:
    """Model inference rows: every backend of the case is timed in one interleaved loop, its output
    first checked against the float64 reference (measure_model_group)."""
    return case.kind == "model" and case.mode == "infer"


#: how far from the float64 logits a row may be: this many times eager PyTorch's own error in the
#: case's precision (float32; bfloat16 under autocast), the rule of the accuracy tests
ACCURACY_FACTOR = 2.0


def _check_accuracy(row: dict, out, exact, eager_error: float | None) -> None:
    error = (out.double() - exact).abs().max().item()
    tolerance = None if eager_error is None else ACCURACY_FACTOR * eager_error
    accuracy = ("unchecked: eager PyTorch did not run" if tolerance is None
                else "ok" if error <= tolerance else "over tolerance")
    row.update(error_vs_float64=error, error_scale=exact.abs().max().item(), error_tolerance=tolerance,
               accuracy=accuracy)


def measure_model_group(case, backends: list, args) -> list:
    """The rows of one model inference case: each backend's runner built and its output checked
    against the float64 logits (error_vs_float64, tolerance = ACCURACY_FACTOR x eager's error at this
    precision; a row over it is timed and marked, so the report shows what the speed costs), then
    all of them timed interleaved (bench/_timing.py: measure_interleaved)."""
    rows, runners = {}, {}
    try:
        exact = _cases.reference_logits(case)
    except _cases.ModelUnavailable as e:
        return [dict(base_row(case, b), status="skipped", reason=str(e)) for b in backends]
    eager_error = None
    for backend in ["reference"] + [b for b in backends if b != "reference"]:
        row = rows[backend] = base_row(case, backend)
        reason = skip_reason(backend, args.device, args.explicit_backends)
        if reason is not None:
            row.update(status="skipped", reason=reason)
            continue
        try:
            runner = _cases.runner(case, backend)
            start = time.perf_counter()
            with torch.no_grad():
                out = runner.fn()  # the first call: compilation, the engine's first inference
            row["first_call_s"] = time.perf_counter() - start
            if backend == "reference":
                eager_error = (out.double() - exact).abs().max().item()
            _check_accuracy(row, out, exact, eager_error)
            if runner.settings is not None:
                row["engine_settings"] = runner.settings
            runners[backend] = runner
        except (rest_kernels.BackendUnavailableError, _cases.ModelUnavailable) as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:
            row.update(status="error", reason=_first_line(e), traceback=traceback.format_exc())
    timed = {b: r for b, r in runners.items() if b in backends}
    try:
        timings = _timing.measure_interleaved({b: r.fn for b, r in timed.items()}, device=args.device,
                                              warmup=args.warmup, repeats=args.repeats, min_time=args.min_time)
    except Exception as e:  # one failing call fails the loop: every row of the case says why
        for b in timed:
            rows[b].update(status="error", reason=_first_line(e), traceback=traceback.format_exc())
        timings = {}
    for b, timing in timings.items():
        row, runner = rows[b], timed[b]
        first_call_s = row["first_call_s"]
        row.update(timing.as_dict(), interleaved=True, throughput=runner.items / timing.median,
                   throughput_unit=runner.unit, saved_bytes=None, first_call_s=first_call_s)
        if b in ENGINES:  # their allocations are not PyTorch's: the profiler would see only the output
            row.update(peak_memory_bytes=None, peak_memory_error="allocated outside PyTorch (not measured)")
        else:
            try:
                row["peak_memory_bytes"] = _memory.peak_memory(runner.fn, args.device)
            except Exception as e:
                row["peak_memory_bytes"], row["peak_memory_error"] = None, _first_line(e)
    del runners, timed
    gc.collect()
    return [rows[b] for b in backends]


def float32_math() -> dict:
    """The settings that decide whether float32 rows compute in float32 (no TF32 / bf16 math modes)."""
    out = dict(float32_matmul_precision=torch.get_float32_matmul_precision())
    for name in ("matmul", "conv", "rnn"):
        sub = getattr(torch.backends.mkldnn, name, None)
        if sub is not None and hasattr(sub, "fp32_precision"):
            out[f"mkldnn_{name}_fp32_precision"] = sub.fp32_precision
    return out


def settings_of(args) -> dict:
    return dict(device=args.device, mode=args.mode, quick=args.quick, ops=args.ops, passes=args.passes, models=args.models,
                modes=args.modes, detection=args.detection, det_inputs=args.det_inputs, det_models=args.det_models, det_memory=args.det_memory, backends=args.backends, dtypes=args.dtypes, shapes=args.shapes,
                batch=args.batch, det_batch=args.det_batch, model_batch=args.model_batch,
                image_size=args.image_size, threads=torch.get_num_threads(), repeats=args.repeats, warmup=args.warmup, min_time_s=args.min_time,
                float32_math=float32_math(),
                interleaving=("model inference rows: every backend of a case timed in one loop, one repeat "
                              "of each per round, the order rotated each round (interleaved), each repeat on the CPU "
                              "started once the previous backend's threads stopped spinning (settle_cpu), after an "
                              "untimed lead-in call; outputs checked against the "
                              f"float64 logits first (tolerance {ACCURACY_FACTOR:g}x eager's error at the precision)"),
                timing_method=_timing.__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
                memory_method=_memory.method(args.device),
                saved_bytes_method=("rest_kernels.diagnostics.saved_tensor_bytes: the distinct storages "
                                    "autograd saves for backward during one forward (inputs and weights "
                                    "included); fwd+bwd op rows and train model rows"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_allocator == "tuned" and not args.list:
        import rest
        rest.tune_cpu_allocator()
    cases = plan(args)
    jobs = [(case, backend) for case in cases for backend in args.backends]
    if args.list:
        skipped = 0
        for case, backend in jobs:
            reason = skip_reason(backend, args.device, args.explicit_backends)
            print(f"{_report.case_cell(base_row(case, backend)):50s} {backend:10s}"
                  + (f" skipped: {reason}" if reason else ""))
            skipped += reason is not None
        print(f"{args.mode} run: {len(cases)} cases, {len(jobs) - skipped} rows to measure, {skipped} skipped")
        return 0
    env = dict(_env.environment(args.device, argv), cpu_allocator=args.cpu_allocator)
    settings = settings_of(args)
    rows, interrupted = [], False
    bar = _progress.progress(len(jobs), enabled=not args.no_progress)
    try:
        for case in cases:
            if interleaved(case):
                bar.set_description(f"{case.label} (interleaved)")
                rows.extend(measure_model_group(case, args.backends, args))
                bar.update(len(args.backends))
                continue
            for backend in args.backends:
                bar.set_description(f"{case.label} {backend}")
                rows.append(measure_row(case, backend, args))
                bar.update(1)
    except KeyboardInterrupt:  # report what was measured so far
        interrupted = True
    finally:
        bar.close()
    _report.add_ratios(rows)
    settings["interrupted"] = interrupted
    env["load_average_end"] = _env.load_average()
    print(_report.table(rows, env, settings, markdown=args.markdown))
    if args.json:
        _report.write_json(args.json, env, settings, rows)
        print(f"\nwrote {args.json}")
    if args.plot:
        _report.write_plot(args.plot, rows, env)
        print(f"wrote {args.plot}")
    if interrupted:
        return 130
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
