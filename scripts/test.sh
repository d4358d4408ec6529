#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
#   REST_KERNELS_TEST_WORKERS: pytest-xdist worker processes (default: the CPUs this process may
#   use, at most 4; 0 runs the tests in this process). On CI's 2 cores two workers halve the
#   suite's time: most of it is single-threaded Python (the Triton interpreter, inductor's
#   compiles). "worksteal" rebalances the long tests; arguments given here come after these, so
#   `bash scripts/test.sh -n 0` runs in-process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
WORKERS=${REST_KERNELS_TEST_WORKERS:-$("$PY" -c "import os; print(min(4, len(os.sched_getaffinity(0))))")}
exec "$PY" -m pytest -n "$WORKERS" --dist worksteal "$@"
