"""Hostile options of the benchmark (bench/emsa_bench.py) and hostile default-backend settings
(REST_KERNELS_BACKEND, use_backend)."""
from __future__ import annotations

import functools
import os
import re
import sys
import tempfile

import torch

import rest_kernels

from ._common import CORRECT, ROOT, Case, Raises, type_error, value_error
from .ops import _call_emsa
from ._common import emsa_args


# --------------------------------------------------------------------------- benchmark options
def _bench_parse(*argv):
    import sys
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from bench import emsa_bench
    return emsa_bench.parse_args(list(argv))


def _bench_list(*argv):
    import contextlib
    import io
    import sys
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from bench import emsa_bench
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = emsa_bench.main(["--list", *argv])
    assert rc == 0 and out.getvalue().strip(), (rc, out.getvalue())
    return out.getvalue()


def bench_cases():
    folder = "/tmp"  # any existing folder: a path that is a folder must be refused
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    def usage(option):
        return Raises((SystemExit,), r"^2$", output=rf"error: argument {re.escape(option)}")

    bad = [
        ("shapes-unknown", ["--shapes", "s9"], "--shapes"),
        ("shapes-empty", ["--shapes", ""], "--shapes"),
        ("shapes-commas", ["--shapes", ",,"], "--shapes"),
        ("threads-zero", ["--threads", "0"], "--threads"),
        ("threads-negative", ["--threads", "-2"], "--threads"),
        ("threads-word", ["--threads", "many"], "--threads"),
        ("threads-above-cpus", ["--threads", str(cpus + 1)], "--threads"),
        ("threads-huge", ["--threads", str(10 ** 9)], "--threads"),
        ("min-time-inf", ["--min-time", "inf"], "--min-time"),
        ("min-time-nan", ["--min-time", "nan"], "--min-time"),
        ("min-time-negative", ["--min-time", "-1"], "--min-time"),
        ("min-time-zero", ["--min-time", "0"], "--min-time"),
        ("min-time-huge", ["--min-time", "1e300"], "--min-time"),
        ("json-folder", ["--json", folder], "--json"),
        ("json-missing-folder", ["--json", "/nonexistent/out.json"], "--json"),
        ("json-unwritable", ["--json", "/proc/rest-kernels-bench.json"], "--json"),
        ("json-under-a-file", ["--json", "/etc/hostname/out.json"], "--json"),
        ("plot-folder", ["--plot", folder], "--plot"),
        ("plot-unwritable", ["--plot", "/proc/rest-kernels-bench.png"], "--plot"),
        ("repeats-zero", ["--repeats", "0"], "--repeats"),
        ("warmup-negative", ["--warmup", "-1"], "--warmup"),
        ("batch-zero", ["--batch", "0"], "--batch"),
        ("model-batch-word", ["--model-batch", "x"], "--model-batch"),
        ("image-size-negative", ["--image-size", "-224"], "--image-size"),
        ("ops-unknown", ["--ops", "conv"], "--ops"),
        ("dtypes-int8", ["--dtypes", "int8"], "--dtypes"),
        ("backends-unknown", ["--backends", "tpu"], "--backends"),
        ("models-unknown", ["--models", "huge"], "--models"),
        ("modes-unknown", ["--modes", "serve"], "--modes"),
        ("passes-unknown", ["--passes", "bwd-only"], "--passes"),
        ("device-tpu", ["--device", "tpu"], "--device"),
    ]
    if not torch.cuda.is_available():
        bad.append(("device-cuda-without-gpu", ["--device", "cuda"], "--device"))
    cases = [Case(f"bench-bad/{name}", functools.partial(_bench_parse, *argv), usage(option))
             for name, argv, option in bad]
    cases.append(Case("bench-bad/unknown-option", functools.partial(_bench_parse, "--fast"),
                      Raises((SystemExit,), r"^2$", output=r"unrecognized arguments: --fast")))

    def json_path_accepted():
        path = os.path.join(tempfile.mkdtemp(prefix="hostile-bench-"), "out.json")
        args = _bench_parse("--json", path, "--threads", str(cpus), "--min-time", "0.5")
        assert args.json == path and args.min_time == 0.5
        assert not os.path.exists(path), "the writability probe left a file behind"

    cases += [
        Case("bench-ok/list", functools.partial(_bench_list, "--ops", "pa", "--shapes", "s1", "--models", "none"), CORRECT),
        Case("bench-ok/list-quick", functools.partial(_bench_list, "--quick"), CORRECT),
        Case("bench-ok/json-path", json_path_accepted, CORRECT),
    ]
    return cases


def environment_cases():
    """The default backend's sources: use_backend and REST_KERNELS_BACKEND."""
    def env_backend(value):
        os.environ["REST_KERNELS_BACKEND"] = value
        return _call_emsa(emsa_args(), None)

    def use(name):
        with rest_kernels.use_backend(name):
            pass

    return [
        Case("default-bad/env-var", functools.partial(env_backend, "quantum"), value_error(r"REST_KERNELS_BACKEND"),
             alone=True),
        Case("default-bad/use-backend-name", functools.partial(use, "quantum"), value_error(r"backend must be one of")),
        Case("default-bad/use-backend-none", functools.partial(use, None), type_error(r"backend must be a string")),
    ]

