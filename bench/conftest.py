"""pytest-benchmark suite of the ops (bench/test_bench_ops.py), run apart from the tests:

    python -m pytest bench/ --benchmark-only                          # time every op row
    python -m pytest bench/ --benchmark-only --benchmark-autosave     # ... and keep the run in .benchmarks/
    python -m pytest bench/ --benchmark-only --benchmark-compare      # ... against the last saved run
    pytest-benchmark compare 0001 0002 --group-by=group               # two saved runs side by side

pyproject's addopts carry --benchmark-disable so that the test suite never spends time timing, and
pytest-benchmark refuses --benchmark-only together with --benchmark-disable. Benchmarks being the
point of this folder, the hook below turns them back on for runs that load this conftest (exactly
what --benchmark-enable does); `-k`, `--benchmark-*` options work as usual.
"""
import pytest


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own pytest_configure (trylast) reads the options
def pytest_configure(config):
    if hasattr(config.option, "benchmark_enable"):
        config.option.benchmark_enable = True
