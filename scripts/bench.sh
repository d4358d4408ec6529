#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the benchmark report. Extra arguments go to bench/emsa_bench.py
# (e.g. --quick, --json results.json, --markdown).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" bench/emsa_bench.py "$@"
