#!/usr/bin/env bash
# Set up a fresh machine: torch 2.14.1 (the CUDA 13.0 build CI uses), build tools, and this package in
# editable mode with the compiled extension (C++ CPU kernels, the CUDA kernels when nvcc is present,
# and their CPU emulation). Idempotent: re-running only rebuilds what changed.
#   MAX_JOBS, TORCH_CUDA_ARCH_LIST, REST_KERNELS_CUDA=0|1: see setup.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install --quiet --disable-pip-version-check "torch==2.14.1" ninja "setuptools>=64" wheel
# --no-build-isolation: compile against the torch installed above (an isolated build would fetch
# another copy, and the extension must match the torch it runs with).
"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-build-isolation -e ".[test,bench]"
"$PYTHON" -m rest_kernels info
