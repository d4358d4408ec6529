"""Test-session setup.

Without a GPU the Triton kernels run under the interpreter, which must be switched on before
triton is first imported: that happens here, before any test module imports rest_kernels.
"""
import os
import sys

# The Triton interpreter runs tl.dot as numpy matmul; numpy's multithreaded OpenBLAS spins on busy
# small machines and makes those small matmuls ~1000x slower. One thread; set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _TESTS)  # the helpers (`from support import conformance`) and the hostile corpus
# Helpers moved into tests/support/; code written against their former top-level names
# (`import conformance`, `import isolated`) still finds them.
sys.path.append(os.path.join(_TESTS, "support"))

from rest_kernels import available_backends  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-full-resources", action="store_true", default=False,
                     help="run the full ahead-of-time Triton resource table (~65 min on 2 cores, cold Triton cache)")


def require_backend(name: str):
    """Skip (with the backend's own reason) when `name` is not usable here."""
    reason = available_backends()[name]
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")


@pytest.fixture(autouse=True)
def _seed_and_fresh_dynamo():
    torch.manual_seed(0)
    # Each test compiles its own models; compiled frames left by earlier tests would count toward
    # dynamo's recompile limit for the shared forward() code objects and fail fullgraph compiles.
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _no_measured_reference_preference(monkeypatch):
    """The suite runs "auto" without the fused backends' measured crossovers (data/*_crossover.json,
    measured on one machine; rest_kernels/backends/preference.py): tests that exercise a fused
    backend through "auto" on small inputs keep doing so on any machine. tests/test_auto_preference.py
    sets its own rules and checks the shipped ones against their measurements."""
    from rest_kernels.backends.registry import BACKENDS
    for backend in BACKENDS.values():
        if backend.reference_rules:
            monkeypatch.setattr(backend, "reference_rules", ())
