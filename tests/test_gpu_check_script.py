"""scripts/gpu_check.sh, the one command for a GPU machine, checked here without a GPU: its syntax
(bash -n, shellcheck where installed), its dry run (every step named with its command, nothing
written), the device's limits on what comes back ($OUT: at most 8 files, plain names), and a real run
with a stand-in python that makes one step fail and one time out: the run goes on, and summary.txt
lists every step with its status, exit status and wall time."""
import os
import re
import shutil
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STEPS = ("env", "build", "cuda-resources", "tests", "triton-resources", "gpu-resources", "bench")
#: what the device machine returns from $OUT: at most 8 files, names of letters, digits, '.', '_', '-'
MAX_FILES = 8
NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path))
    env.update(extra)
    return env


def _run(args, env, timeout=120):
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_bash_syntax():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    res = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dry_run_names_every_step_and_runs_nothing(tmp_path):
    res = _run(["--dry-run"], _env(tmp_path))
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for step in STEPS:
        assert f"## step {step} " in text, f"dry run does not name step {step}"
    # the commands the issue asks for
    for needle in ("TORCH_CUDA_ARCH_LIST=9.0", "setup.py build_ext --inplace", "REST_KERNELS_CPU_ARCH=native",
                   "-m pytest tests/test_gpu_rest_shapes.py", "-m gpu ", "--junitxml=", "-p no:cacheprovider",
                   "scripts/triton_resources.py --arch native --dtype bf16 --json", "-m gpu_resources",
                   "bench/emsa_bench.py --quick", "--json", "nvidia-smi", "git rev-parse HEAD", "summary.txt"):
        assert needle in text, f"dry run lacks {needle!r}"
    assert not (tmp_path / "out").exists(), "a dry run must write nothing"
    # the environment variable does the same
    res_env = _run([], _env(tmp_path, GPU_CHECK_DRY_RUN="1"))
    assert res_env.returncode == 0 and res_env.stdout == text


def test_outputs_fit_what_the_device_returns(tmp_path):
    out = str(tmp_path / "out")
    text = _run(["--dry-run"], _env(tmp_path)).stdout
    listed = re.search(r"at most (\d+) files: (.*)\)", text)
    files = listed.group(2).split()
    assert int(listed.group(1)) == len(files) <= MAX_FILES
    assert all(NAME.match(f) for f in files), files
    written = set(re.findall(re.escape(out) + r"/([^\s\"'>;):$]+)", text))
    assert written <= set(files), f"commands write {written - set(files)} under $OUT, beyond the list"


def test_steps_option(tmp_path):
    res = _run(["--dry-run", "--steps", "bench"], _env(tmp_path))
    assert res.returncode == 0
    assert re.search(r"## step build .*would be skipped: not in --steps bench", res.stdout)
    assert not re.search(r"## step bench .*would be skipped", res.stdout)
    bad = _run(["--dry-run", "--steps", "bild"], _env(tmp_path))
    assert bad.returncode == 2 and "unknown step 'bild'" in bad.stderr
    assert _run(["--bogus"], _env(tmp_path)).returncode == 2
    assert _run(["--help"], _env(tmp_path)).stdout.startswith("One command for a GPU machine")


STUB = r"""#!/usr/bin/env bash
# stand-in for python3: the pytest steps fail, the benchmark outlives its timeout, the rest succeeds
echo "$*" >> "$STUB_LOG"
case "$*" in
  *" -m pytest "*) echo "========== 3 passed, 1 failed, 2 skipped in 0.12s =========="; exit 1 ;;
  *"emsa_bench.py"*) sleep 60; exit 0 ;;
  *"import xdist"*|*"import pytest_timeout"*) exit 1 ;;
  *) echo "stub python $*"; exit 0 ;;
esac
"""


def test_run_goes_on_after_failures_and_timeouts(tmp_path):
    stub = tmp_path / "python3"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "stub.log"
    env = _env(tmp_path, PYTHON=str(stub), STUB_LOG=str(log), GPU_CHECK_CAP_BENCH="2")
    res = _run([], env, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and all(NAME.match(f) for f in files), files
    summary = (out / "summary.txt").read_text()
    rows = {line.split()[0]: line.split() for line in summary.splitlines()
            if line.split() and line.split()[0] in STEPS}
    assert set(rows) == set(STEPS), summary
    assert rows["env"][1:3] == ["ok", "0"] and rows["build"][1:3] == ["ok", "0"]
    assert rows["tests"][1:3] == ["failed", "1"] and "3 passed, 1 failed, 2 skipped" in summary
    assert rows["bench"][1:3] == ["timeout", "124"], summary
    # both exist now (scripts/triton_resources.py, the gpu_resources marker): they run on the stub,
    # whose pytest reports a failure like the tests step's
    assert rows["triton-resources"][1:3] == ["ok", "0"], summary
    assert rows["gpu-resources"][1:3] == ["failed", "1"], summary
    assert re.search(r"^commit: \S+", summary, re.M)
    assert "(nvidia-smi failed or is missing)" in summary or "NVIDIA" in summary
    calls = log.read_text()
    assert "setup.py build_ext --inplace" in calls and "bench/emsa_bench.py --quick" in calls
    assert "tests/test_gpu_rest_shapes.py" in calls
    assert "scripts/triton_resources.py --arch native" in calls and "-m gpu_resources" in calls
    assert (out / "build.log").exists() and (out / "tests.log").exists()
