"""EMSA and PA forward at sizes whose element counts pass 2**31: every offset is computed in 64 bits.

An offset kept in 32 bits would wrap past 2**31 elements: reads from and writes to the wrong place
(wrong answers where the writes land in the tensor, a crash where they do not). Each case runs the
op once on a tensor of more than 2**31 elements, then compares batches of the result bitwise with
the same op run on that batch alone (a small problem whose offsets are far below 2**31): the first
batch, middle ones, and the last ones, which lie entirely beyond element 2**31.

Memory: the output (over 2**31 float32 values, 8 GiB) is written in full. The input is allocated but
only the compared batches are written: the rest stays untouched address space (the kernel's reads of
it map the kernel's shared zero page), so a case needs about 8.6 GiB of memory, not 17. The cases
skip (saying how much they need) when /proc/meminfo's MemAvailable is short of that, and run in a
process of their own (tests/support/isolated.py): a crash there fails the test instead of ending the run,
and the memory is returned when that process ends.

cuda-emu and triton are skipped: the CUDA emulation runs each CUDA thread as a fiber and the Triton
interpreter runs each program in numpy, both thousands of times slower than the cpu kernels, which
take ~10-20 s here; over 2**31 elements they would take hours. Their offset arithmetic is the same
64-bit code reviewed in csrc/cuda and rest_kernels/triton/_common.py (load_2d / store_2d: head_offset).
"""
import sys

import pytest
import torch

from support import isolated
from conftest import require_backend

GIB = 1 << 30
LIMIT = 2 ** 31

# EMSA: B * h * N * d = 8195 * 2 * 512 * 256 = 2**31 + 3 * 2**18 elements, the last two batches wholly
# past element 2**31; M = 2 keys and a wide head keep the work per element light. Batches are
# independent problems (the head mix couples heads, InstanceNorm the rows of one batch).
EMSA_SHAPE = dict(B=8195, h=2, N=512, M=2, d=256)
# PA: B * C * H * W = 4098 * 8 * 256 * 256 = 2**31 + 2**20 elements; planes are independent.
PA_SHAPE = dict(B=4098, C=8, H=256, W=256)


def _needed_bytes(numel_out: int, extra: int) -> int:
    return numel_out * 4 + extra + GIB // 2  # the output, the op's buffers, slack for the process


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _require_memory(need: int):
    have = _mem_available()
    if have is None:
        pytest.skip("cannot read MemAvailable from /proc/meminfo to check for the "
                    f"{need / GIB:.1f} GiB this case needs")
    if have < need:
        pytest.skip(f"needs {need / GIB:.1f} GiB of available memory (an output of more than 2**31 float32 "
                    f"values), MemAvailable is {have / GIB:.1f} GiB")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # bitwise, so that NaN payloads read from never-written (garbage) input compare equal too
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _emsa_big(B, h, N, M, d, mix):
    """Child process: one EMSA forward over more than 2**31 output elements, batches checked."""
    import rest_kernels
    g = torch.Generator().manual_seed(0)
    q = torch.empty(B, h, N, d)  # address space only, except the batches written below
    picked = [0, 1, B // 2, B - 2, B - 1]
    for b in picked:
        q[b] = torch.randn(h, N, d, generator=g)
    k, v = torch.randn(B, h, M, d, generator=g), torch.randn(B, h, M, d, generator=g)
    w = torch.randn(h, h, generator=g) if mix else None
    with torch.no_grad():
        out = rest_kernels.emsa_attention(q, k, v, w, backend="cpu")
        assert out.numel() > LIMIT and out.shape == (B, h, N, d)
        assert (B - 2) * h * N * d >= LIMIT  # the last two batches lie entirely past element 2**31
        for b in picked + [2, B - 3]:  # the written batches, and two that read untouched memory
            alone = rest_kernels.emsa_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], w, backend="cpu")
            assert _same_bits(out[b:b + 1], alone), f"batch {b} differs from the same batch computed alone"
        for b in picked:
            assert torch.isfinite(out[b]).all(), f"batch {b}: non-finite output"
    return "ok"


def _pa_big(B, C, H, W, channels_last=False):
    """Child process: one PA forward over more than 2**31 elements, batches checked. channels_last:
    the channels-last kernel (csrc/cpu/pa_cpu_nhwc.cpp), whose offsets are rows of W x C values."""
    import rest_kernels
    g = torch.Generator().manual_seed(0)
    x = torch.empty(B, C, H, W, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    picked = [0, B // 2, B - 2, B - 1]
    for b in picked:
        x[b] = torch.randn(C, H, W, generator=g)
    weight, bias = torch.randn(C, 1, 3, 3, generator=g), torch.randn(C, generator=g)
    with torch.no_grad():
        out = rest_kernels.pa_gate(x, weight, bias, backend="cpu")
        assert out.numel() > LIMIT and (B - 2) * C * H * W >= LIMIT  # the last two batches: past 2**31
        for b in picked + [1]:
            alone = rest_kernels.pa_gate(x[b:b + 1], weight, bias, backend="cpu")
            assert _same_bits(out[b:b + 1], alone), f"batch {b} differs from the same batch computed alone"
        for b in picked:
            assert torch.isfinite(out[b]).all(), f"batch {b}: non-finite output"
    return "ok"


def _run(fn, *args):
    outcome = isolated.run(fn, *args, timeout=600)
    assert outcome.status == "returned" and outcome.value == "ok", outcome.describe() + "\n" + outcome.traceback


SLOW_EMULATORS = [
    pytest.param("cuda-emu", marks=pytest.mark.skip(reason="the CUDA emulation (a fiber per CUDA thread) would take "
                                                           "hours over 2**31 elements")),
    pytest.param("triton", marks=pytest.mark.skip(reason="the Triton interpreter (numpy per program) would take "
                                                         "hours over 2**31 elements")),
]


# With the head mix: that path writes the output with the same offsets as plain attention (one
# forward pass over query blocks, csrc/cpu/emsa_cpu.cpp forward_tasks) and then rescales every
# (batch, head) slice in a second pass, so it covers both; plain attention at this size would add
# another ~17 s for no new offset arithmetic.
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu"] + SLOW_EMULATORS)
def test_emsa_forward_past_2_31_elements(backend, mix=True):
    require_backend(backend)
    s = EMSA_SHAPE
    rows = s["B"] * s["h"] * s["N"]
    _require_memory(_needed_bytes(rows * s["d"], extra=3 * rows * 4))  # lse, rsq and their accumulator
    _run(_emsa_big, s["B"], s["h"], s["N"], s["M"], s["d"], mix)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", ["cpu"] + SLOW_EMULATORS)
def test_pa_forward_past_2_31_elements(backend, channels_last):
    require_backend(backend)
    s = PA_SHAPE
    _require_memory(_needed_bytes(s["B"] * s["C"] * s["H"] * s["W"], extra=0))
    _run(_pa_big, s["B"], s["C"], s["H"], s["W"], channels_last)


def test_offsets_of_the_shapes_pass_2_31():
    # the premise of the cases above, checked without running them
    e, p = EMSA_SHAPE, PA_SHAPE
    assert (e["B"] - 2) * e["h"] * e["N"] * e["d"] >= LIMIT
    assert (p["B"] - 2) * p["C"] * p["H"] * p["W"] >= LIMIT


def test_short_memory_skips_with_the_need_stated(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "_mem_available", lambda: 2 * GIB)
    with pytest.raises(pytest.skip.Exception, match=r"needs 9\.0 GiB of available memory.*MemAvailable is 2\.0 GiB"):
        _require_memory(9 * GIB)
