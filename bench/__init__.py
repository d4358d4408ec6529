"""Benchmarks of rest-kernels (not part of the installed package).

    python bench/emsa_bench.py --help                       # the report: ops and models, every backend
    python -m pytest bench/ --benchmark-only                # pytest-benchmark suite of the ops

Modules, one job each: _cases (what is measured: shapes, inputs, callables), _timing (how long),
_memory (how much memory), _env (versions, device, commit), _progress (progress line),
_report (table, JSON, plot); emsa_bench.py ties them together.
"""
