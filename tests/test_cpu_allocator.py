"""rest.tune_cpu_allocator: after it, a large CPU tensor reuses freed memory instead of faulting in
fresh pages (counted as minor page faults, in a subprocess: the setting is process-wide)."""
import json
import os
import subprocess
import sys

import pytest

import rest
from rest.cpu_allocator import cpu_allocator_unsupported_reason

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 64 MiB tensor is above glibc's largest mmap threshold (32 MiB), so with the defaults each one is a
# fresh mapping: one minor fault per 4 KiB page when filled (16,384). Tuned, the heap keeps freed
# blocks and later tensors reuse them: the first few fills grow the heap (here it settles on two
# blocks used in turn, the interpreter's own small allocations sitting between them), then none fault.
_CHILD = r"""
import json, resource, sys, torch
import rest
applied = rest.tune_cpu_allocator() if sys.argv[1] == "tuned" else None
def faults_of_fill():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(64 * 2**20 // 4)
    t.fill_(1.0)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "again": rest.tune_cpu_allocator() if applied else None,
                  "faults": [faults_of_fill() for _ in range(10)]}))
"""
PAGES = 64 * 2 ** 20 // 4096


def _run(mode):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, env=env,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(cpu_allocator_unsupported_reason() is not None, reason=str(cpu_allocator_unsupported_reason()))
def test_tuned_allocator_reuses_freed_memory():
    default, tuned = _run("default"), _run("tuned")
    # glibc's defaults: every 64 MiB tensor faults in (nearly) all of its pages again
    assert all(f >= 0.9 * PAGES for f in default["faults"][-4:]), default
    assert tuned["applied"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2 ** 31 - 1}
    assert tuned["again"] == tuned["applied"]  # idempotent
    # tuned: once the heap has grown, the freed block is reused: no page faults to speak of
    assert all(f <= 0.01 * PAGES for f in tuned["faults"][-4:]), tuned


def test_unsupported_c_library_is_an_error_that_says_why(monkeypatch):
    from rest import cpu_allocator
    monkeypatch.setattr(cpu_allocator, "_applied", [])
    monkeypatch.setattr(cpu_allocator.platform, "libc_ver", lambda: ("", ""))
    assert "needs glibc's malloc" in cpu_allocator.cpu_allocator_unsupported_reason()
    with pytest.raises(RuntimeError, match="needs glibc's malloc .* preload jemalloc or tcmalloc instead"):
        rest.tune_cpu_allocator()
