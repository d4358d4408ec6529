"""Benchmarks of rest-kernels (not part of the installed package).

    python bench/emsa_bench.py --help                       # the report: ops and models, every backend
    python -m pytest bench/ --benchmark-only                # pytest-benchmark suite of the ops

Modules, one job each: _cases (what is measured: shapes, inputs, callables), _timing (how long),
_memory (how much memory), _env (versions, device, commit), _progress (progress line),
_report (table, JSON, plot); emsa_bench.py ties them together.

The static performance model (a model, not a measurement; scripts/perf_model.py prints it):
perf_model (GPU specs, assumptions, occupancy, a kernel's time), _perf_fused (the kernels of the
triton and cuda backends), _perf_aten (eager PyTorch and torch.compile of the reference),
_perf_inputs (resource rows and bench measurements it reads).
"""
