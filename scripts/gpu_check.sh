#!/usr/bin/env bash
# One command for a GPU machine: build the extension against that machine's torch, run the GPU tests
# (ResT's real shapes on the `triton` and `cuda` backends, plus the other GPU tests), the resource
# reports, and a reduced benchmark. Every step is time-bounded and the run goes on after a failed or
# timed-out step; each result is written under $OUT as soon as it exists, and $OUT/summary.txt is
# rewritten after every step, so a run cut short still returns what it did.
#
#   bash scripts/gpu_check.sh                      # everything, in about 5.5 minutes at most
#   bash scripts/gpu_check.sh --dry-run            # print the steps and their commands; run nothing
#   bash scripts/gpu_check.sh --steps build,tests  # only these steps (env and the summary always run)
#
# It installs nothing: it uses the python3 it finds (torch, triton, pytest and the plugins must be
# there; pytest-xdist and pytest-timeout are used when importable). Steps, in order:
#   env               nvidia-smi, python / torch / triton / nvcc / gcc versions, git commit -> summary.txt
#   build             python3 setup.py build_ext --inplace for the visible arch only
#                     (TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=nproc, CUDA part forced, ONE cpu-kernel build
#                     with -march=native instead of the AVX-512 + AVX2 pair), then
#                     `python -m rest_kernels info` and per-file compile times   -> build.log
#   cuda-resources    scripts/cuda_resources.py: registers / spills of the CUDA kernels -> build.log
#   tests             pytest -m gpu over the GPU test modules, tests/test_gpu_rest_shapes.py first
#                                                                    -> tests.log, tests.xml
#   triton-resources  scripts/triton_resources.py --arch native --dtype bf16 (compiled kernels are cached by the tests step)
#                                                                    -> resources.txt, resources.json
#   gpu-resources     pytest -m gpu_resources over the test files using that marker (when any)
#                                                                    -> appended to tests.log
#   bench             bench/emsa_bench.py --quick, bfloat16, ops only: fused backends beside eager
#                     ("reference") and torch.compile ("compile")   -> bench.log, bench.json
# $OUT receives at most these 8 files: summary.txt build.log tests.log tests.xml resources.txt
# resources.json bench.log bench.json.
#
# Time: the whole run is bounded by GPU_CHECK_DEADLINE seconds (default 320). Each step runs under
# `timeout` with the smaller of its own cap and what is left once the minimum of every later step is
# set aside, so a step that finishes early leaves its time to the next ones. A timed-out step is
# first sent SIGINT (pytest and the benchmark then still write their reports), then killed 10 s later.
#
# Knobs (environment): OUT (default ${TMPDIR:-/tmp}/rest-kernels-gpu-check), PYTHON (default python3,
# else /opt/torch/.venv/bin/python3), GPU_CHECK_DEADLINE, GPU_CHECK_CAP_<STEP> and
# GPU_CHECK_MIN_<STEP> in seconds (STEP upper-cased, '-' as '_', e.g. GPU_CHECK_CAP_BENCH=200),
# GPU_CHECK_XDIST (pytest-xdist workers; 0 = none), GPU_CHECK_BENCH_ARGS (replaces the benchmark's
# options after --quick), GPU_CHECK_DRY_RUN=1 (as --dry-run); the build switches of setup.py
# (TORCH_CUDA_ARCH_LIST, MAX_JOBS, REST_KERNELS_CUDA, REST_KERNELS_CPU_ARCH) when set are kept.
set -uo pipefail

START=$(date +%s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

STEPS=(env build cuda-resources tests triton-resources gpu-resources bench)
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
ONLY=""

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run|-n) DRY_RUN=1 ;;
    --steps) [ $# -ge 2 ] || { echo "gpu_check.sh: --steps needs a list, e.g. build,tests" >&2; exit 2; }
             ONLY=$2; shift ;;
    --steps=*) ONLY=${1#--steps=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$DRY_RUN" = 0 ] || DRY_RUN=1
if [ -n "$ONLY" ]; then
  for s in ${ONLY//,/ }; do
    case " ${STEPS[*]} " in *" $s "*) ;; *) echo "gpu_check.sh: unknown step '$s' (steps: ${STEPS[*]})" >&2; exit 2 ;; esac
  done
fi

OUT=${OUT:-${TMPDIR:-/tmp}/rest-kernels-gpu-check}
OUT_FILES=(summary.txt build.log tests.log tests.xml resources.txt resources.json bench.log bench.json)

# --------------------------------------------------------------------------- python and settings
PY=${PYTHON:-python3}
if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import torch" >/dev/null 2>&1 && [ -x /opt/torch/.venv/bin/python3 ]; then
  PY=/opt/torch/.venv/bin/python3   # the GPU machine's interpreter, should python3 on PATH lack torch
fi
NPROC=$(nproc 2>/dev/null || echo 4)
DEADLINE=${GPU_CHECK_DEADLINE:-320}
KILL_AFTER=10     # seconds between the SIGINT of a timeout and the SIGKILL
MARGIN=5          # seconds kept back at the end for the summary

# pytest-xdist workers: Triton compiles each kernel configuration in the process that first needs
# it, on one core, so the GPU tests are bound by compilation on the CPU; processes share the GPU
# (one context each, well under 1 GiB) and the on-disk Triton cache.
if [ -n "${GPU_CHECK_XDIST:-}" ]; then
  XDIST=$GPU_CHECK_XDIST
else
  XDIST=$(( NPROC - 2 > 12 ? 12 : NPROC - 2 ))
  [ "$XDIST" -ge 2 ] || XDIST=0
fi
OMP=$(( XDIST > 0 ? NPROC / XDIST : NPROC )); [ "$OMP" -ge 1 ] || OMP=1   # CPU threads per test process
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---dtypes bfloat16 --models none}

# the test modules of the tests step, the real-shape one first (what a cut-short run should have done)
TEST_FILES="tests/test_gpu_rest_shapes.py tests/test_cuda_gpu.py tests/test_triton_backend.py tests/test_amp.py"

# cap (most seconds the step may take) and min (seconds set aside for it while earlier steps run)
declare -A CAP=([env]=60 [build]=200 [cuda-resources]=30 [tests]=180 [triton-resources]=60 [gpu-resources]=60 [bench]=240)
declare -A MIN=([env]=5 [build]=60 [cuda-resources]=5 [tests]=60 [triton-resources]=15 [gpu-resources]=15 [bench]=45)
for s in "${STEPS[@]}"; do
  key=${s//-/_}; key=${key^^}
  v="GPU_CHECK_CAP_$key"; [ -z "${!v:-}" ] || CAP[$s]=${!v}
  v="GPU_CHECK_MIN_$key"; [ -z "${!v:-}" ] || MIN[$s]=${!v}
done

q() { printf '%q' "$1"; }
O=$(q "$OUT")
P=$(q "$PY")
WORK=""

# --------------------------------------------------------------------------- the steps
# step_cmd NAME prints the step's commands (bash, run with `bash -c` in the repository root under
# `timeout`); what it prints is exactly what runs. `pyrun` is python3 with SIGINT turned back into
# KeyboardInterrupt (a job started in the background inherits SIGINT ignored), so a timeout
# interrupts pytest and the benchmark like Ctrl-C and they still write their reports.
step_cmd() {
  case "$1" in
    env) cat <<EOF
{
echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "(nvidia-smi failed or is missing)"
echo "== versions"
$P - <<'PYEOF' 2>&1
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "CUDA", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, "sm_%d%d" % (p.major, p.minor), p.multi_processor_count, "SMs",
              round(p.total_memory / 2**30, 1), "GiB")
except Exception as e:
    print("torch: not importable:", e)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
from importlib import metadata
for name in ("pytest", "pytest-xdist", "pytest-timeout", "pytest-benchmark", "hypothesis", "numpy", "timm",
             "onnx", "onnxruntime", "onnxscript", "expecttest", "setuptools", "ninja", "tqdm"):
    try:
        print(" ", name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(" ", name, "MISSING")
PYEOF
echo "nvcc: \$(nvcc --version 2>/dev/null | tail -1 || true)"; echo "c++: \$(c++ --version 2>/dev/null | head -1)"
echo "cpus: \$(nproc), \$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"; echo "kernel: \$(uname -srm)"
echo "git commit: \$(git rev-parse HEAD 2>/dev/null || echo unknown)"
git status --short 2>/dev/null | head -20
echo "== what this package asks of torch / triton (read from the tree, nothing installed)"
echo "pyproject build-system pins torch==2.14.1: only an isolated pip build reads it; build_ext --inplace"
echo "  compiles against the torch above, and rest_kernels refuses a build made for another torch."
echo "rest_kernels/triton: tile sizes and the mixed-head shared-memory limits were measured with Triton 3.8"
echo "  on sm_90; another Triton may need more shared memory (an OutOfResources error in the tests)."
} > "\$WORK/env.txt" 2>&1
EOF
    ;;
    build) cat <<EOF
env TORCH_CUDA_ARCH_LIST=$(q "${TORCH_CUDA_ARCH_LIST:-9.0}") MAX_JOBS=$(q "${MAX_JOBS:-$NPROC}") \\
    REST_KERNELS_CUDA=$(q "${REST_KERNELS_CUDA:-1}") REST_KERNELS_CPU_ARCH=$(q "${REST_KERNELS_CPU_ARCH:-native}") \\
    REST_KERNELS_PTXAS_VERBOSE=1 $P setup.py build_ext --inplace > $O/build.log 2>&1
rc=\$?
echo "== setup.py exit status \$rc; seconds per compiled file (build/temp*/.ninja_log)" >> $O/build.log
for f in build/temp*/.ninja_log; do [ -f "\$f" ] && awk 'NR > 1 { printf "%7.1f s  %s\n", (\$2 - \$1) / 1000, \$4 }' "\$f"; done >> $O/build.log 2>&1
echo "== python -m rest_kernels info" >> $O/build.log
$P -m rest_kernels info >> $O/build.log 2>&1
exit \$rc
EOF
    ;;
    cuda-resources) cat <<EOF
echo "== scripts/cuda_resources.py (registers, shared memory, spills of the CUDA kernels)" >> $O/build.log
$P scripts/cuda_resources.py >> $O/build.log 2>&1
EOF
    ;;
    tests)
      local n=""
      [ "$XDIST" -le 0 ] || n=" -n $XDIST --dist loadgroup"
      cat <<EOF
xdist=""; $P -c "import xdist" 2>/dev/null && xdist="$n"
to=""; $P -c "import pytest_timeout" 2>/dev/null && to=" --timeout=120"
echo "== pytest -m gpu (\${xdist:-no xdist}\${to:+,\$to})" > $O/tests.log
OMP_NUM_THREADS=$OMP pyrun -m pytest $TEST_FILES -m gpu -v -p no:cacheprovider --durations=15 \\
  --junitxml=$O/tests.xml\$xdist\$to >> $O/tests.log 2>&1
EOF
    ;;
    triton-resources) cat <<EOF
$P scripts/triton_resources.py --arch native --dtype bf16 --json $O/resources.json > $O/resources.txt 2> "\$WORK/resources.err"
rc=\$?
[ -s "\$WORK/resources.err" ] && { echo "== stderr"; cat "\$WORK/resources.err"; } >> $O/resources.txt
exit \$rc
EOF
    ;;
    gpu-resources) cat <<EOF
echo "== pytest -m gpu_resources" >> $O/tests.log
pyrun -m pytest $(gpu_resources_files) -m gpu_resources -v -p no:cacheprovider >> $O/tests.log 2>&1
EOF
    ;;
    bench) cat <<EOF
pyrun bench/emsa_bench.py --quick $BENCH_ARGS --no-progress --json $O/bench.json > $O/bench.log 2>&1
EOF
    ;;
  esac
}

# the test files that use the gpu_resources marker (another engineer's; none yet is fine)
gpu_resources_files() {
  grep -lE "mark\.gpu_resources" tests/*.py 2>/dev/null | tr '\n' ' ' | sed 's/ $//'
}

# skip_reason NAME: why the step cannot run here (empty: it runs)
skip_reason() {
  case "$1" in
    cuda-resources) [ -f scripts/cuda_resources.py ] || { echo "scripts/cuda_resources.py is not in this tree"; return; } ;;
    triton-resources) [ -f scripts/triton_resources.py ] || { echo "scripts/triton_resources.py is not in this tree (yet)"; return; } ;;
    gpu-resources) [ -n "$(gpu_resources_files)" ] || { echo "no test file in tests/ uses the gpu_resources marker (yet)"; return; } ;;
  esac
  if [ -n "$ONLY" ] && [ "$1" != env ]; then
    case ",$ONLY," in *",$1,"*) ;; *) echo "not in --steps $ONLY" ;; esac
  fi
}

outputs_of() {
  case "$1" in
    env) echo "summary.txt" ;;
    build|cuda-resources) echo "build.log" ;;
    tests) echo "tests.log tests.xml" ;;
    triton-resources) echo "resources.txt resources.json" ;;
    gpu-resources) echo "tests.log" ;;
    bench) echo "bench.log bench.json" ;;
  esac
}

# --------------------------------------------------------------------------- dry run
if [ "$DRY_RUN" = 1 ]; then
  echo "gpu_check.sh --dry-run: the steps a run would take, in order (nothing is run)"
  echo "repository: $ROOT"
  echo "OUT: $OUT (at most ${#OUT_FILES[@]} files: ${OUT_FILES[*]})"
  echo "python: $PY; deadline ${DEADLINE}s for all steps; pytest-xdist workers: $XDIST"
  echo "pyrun = $PY with SIGINT restored, so that a timeout interrupts it like Ctrl-C"
  for s in "${STEPS[@]}"; do
    echo
    reason=$(skip_reason "$s")
    echo "## step $s (cap ${CAP[$s]}s, min ${MIN[$s]}s) -> $(outputs_of "$s")${reason:+; would be skipped: $reason}"
    step_cmd "$s" | sed 's/^/    /'
  done
  echo
  echo "## summary -> $OUT/summary.txt: each step's status, exit status and wall time, then the env step's report"
  exit 0
fi

# --------------------------------------------------------------------------- run
mkdir -p "$OUT" || { echo "gpu_check.sh: cannot create OUT=$OUT" >&2; exit 2; }
for f in "${OUT_FILES[@]}"; do rm -f "$OUT/$f"; done   # this script's own files from an earlier run
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
export WORK ROOT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET REST_KERNELS_BACKEND

# shellcheck disable=SC2089,SC2090  # Python source in a variable, not words to split
PY_LAUNCH='import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")'
# shellcheck disable=SC2090
export PY PY_LAUNCH
pyrun() { "$PY" -c "$PY_LAUNCH" "$@"; }
export -f pyrun

now() { echo $(( $(date +%s) - START )); }
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
ROWS=()
RUNNING=""

write_summary() {
  {
    echo "rest-kernels GPU check (scripts/gpu_check.sh), started $(date -u -d "@$START" '+%Y-%m-%d %H:%M:%S UTC' 2>/dev/null || date -u)"
    echo "commit: $COMMIT"
    echo "deadline ${DEADLINE}s, elapsed $(now)s; OUT holds: ${OUT_FILES[*]}"
    echo
    printf '%-17s %-8s %4s %7s %9s  %s\n' step status rc wall_s timeout_s "outputs / note"
    for row in "${ROWS[@]}"; do echo "$row"; done
    [ -z "$RUNNING" ] || echo "$RUNNING"
    echo
    if [ -s "$WORK/env.txt" ]; then cat "$WORK/env.txt"; fi
  } > "$WORK/summary.txt" 2>&1
  cat "$WORK/summary.txt" > "$OUT/summary.txt"
}

add_row() {  # step status rc wall timeout note
  ROWS+=("$(printf '%-17s %-8s %4s %7s %9s  %s' "$1" "$2" "$3" "$4" "$5" "$6")")
}

# a pytest log's closing line ("=== 120 passed, 4 skipped in 81.2s ===")
pytest_tally() {
  grep -E '^=+ .*(passed|failed|error|skipped|deselected|no tests ran|interrupted).* =+$' "$1" 2>/dev/null | tail -1 | tr -s '=' | sed 's/^= //; s/ =$//'
}

echo "gpu_check.sh: OUT=$OUT, deadline ${DEADLINE}s"
write_summary
for i in "${!STEPS[@]}"; do
  s=${STEPS[$i]}
  reason=$(skip_reason "$s")
  if [ -n "$reason" ]; then
    add_row "$s" skipped - 0 - "$reason"; write_summary; continue
  fi
  # time left once the minimum of every later step that will run is set aside
  reserve=0
  for later in "${STEPS[@]:$((i + 1))}"; do
    [ -n "$(skip_reason "$later")" ] || reserve=$(( reserve + MIN[$later] ))
  done
  left=$(( DEADLINE - $(now) - MARGIN - KILL_AFTER - reserve ))
  if [ "$left" -lt 5 ]; then
    add_row "$s" skipped - 0 - "no time left (deadline ${DEADLINE}s)"; write_summary; continue
  fi
  budget=$(( left < CAP[$s] ? left : CAP[$s] ))
  RUNNING=$(printf '%-17s %-8s %4s %7s %9s  %s' "$s" running - - "$budget" "started at $(now)s")
  write_summary
  echo "gpu_check.sh: step $s (timeout ${budget}s)"
  t0=$(date +%s%N)
  timeout -s INT -k "$KILL_AFTER" "$budget" bash -c "$(step_cmd "$s")"
  rc=$?
  wall=$(( ($(date +%s%N) - t0) / 1000000 ))
  wall=$(printf '%d.%d' $(( wall / 1000 )) $(( wall % 1000 / 100 )))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout ;;
    *) status=failed ;;
  esac
  note=$(outputs_of "$s")
  case "$s" in
    tests|gpu-resources) tally=$(pytest_tally "$OUT/tests.log"); [ -z "$tally" ] || note="$note: $tally" ;;
  esac
  RUNNING=""
  add_row "$s" "$status" "$rc" "$wall" "$budget" "$note"
  write_summary
  echo "gpu_check.sh: step $s: $status (exit status $rc, ${wall}s)"
done
echo "gpu_check.sh: done in $(now)s; summary:"
cat "$OUT/summary.txt"
