"""The `cuda` backend's kernel source run on the CPU by the emulation of CUDA's execution model
(backend "cuda-emu", csrc/emu). Every CUDA kernel goes through the shared checks of
tests/support/conformance.py, plus the emulation's own guarantees: results identical under every thread
schedule, and a planted race / divergent barrier detected.

Executes csrc/cuda/emsa_kernels.cuh and csrc/cuda/pa_kernels.cuh (with csrc/cuda/portability.cuh) as
compiled into csrc/emu/ops_emu.cpp against csrc/emu/cuda_emu.h.
"""
import pytest
import torch

from conftest import require_backend
from support.conformance import check_emsa_op, check_pa_op

BACKEND = "cuda-emu"


@pytest.fixture(autouse=True)
def _needs_backend():
    require_backend(BACKEND)


@pytest.fixture
def schedule():
    """Set the emulation's thread schedule for one test, restoring it afterwards."""
    ops = torch.ops.rest_kernels_emu_test
    before = ops.emu_get_schedule()
    yield ops.emu_set_schedule
    ops.emu_set_schedule(before)


# ------------------------------------------------------------------------------ official cases
# ------------------------------------------------------------------------------- op level EMSA
# (B, h, N, M, d): partial tiles, several key tiles (M > 32), several query tiles, N or M of 1,
# head dims 3..128 including 96 and odd sizes, h 1..8
SHAPES = [
    (1, 1, 1, 3, 32),
    (2, 3, 37, 45, 32),
    (1, 2, 70, 33, 96),
    (1, 8, 9, 7, 64),
    (2, 1, 33, 1, 3),
    (1, 4, 1, 65, 128),
    (1, 5, 40, 70, 17),
]


@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}h{}N{}M{}d{}".format(*s))
def test_emsa_op_float32(shape, mix):
    check_emsa_op(BACKEND, *shape, torch.float32, mix=mix)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("mix", [True, False])
def test_emsa_op_layouts(layout, mix):
    check_emsa_op(BACKEND, 2, 3, 35, 34, 24, torch.float32, mix=mix, layout=layout)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
# the 16-bit forward runs on 64-row, 32-key mma tiles: N > 64 and M > 32 span several of each; the
# mixed backward keeps up to 8 heads' logit tiles (5: part of the group; 8 at d 96: the dk / dv
# accumulator's upper half in shared memory; 9: more heads than the group, SIMT). Few key blocks
# split the dk / dv walk over the query tiles (csrc/cuda/emsa_mma.cuh bwd_key_splits): (1, 8, 70, 49,
# 64) mixed in 2 shares, (1, 1, 300, 20, 16) in 3, (1, 2, 200, 30, 32) mixed in 4
@pytest.mark.parametrize("shape", [(2, 3, 37, 45, 32), (1, 2, 40, 17, 96), (1, 1, 5, 1, 3), (1, 8, 70, 49, 64),
                                   (1, 2, 65, 40, 128), (1, 5, 33, 17, 128), (1, 8, 40, 20, 96), (1, 9, 20, 12, 16),
                                   (1, 1, 300, 20, 16), (1, 2, 200, 30, 32)],
                         ids=lambda s: "B{}h{}N{}M{}d{}".format(*s))
@pytest.mark.parametrize("mix", [True, False])
def test_emsa_op_low_precision(shape, dtype, mix):
    check_emsa_op(BACKEND, *shape, dtype, mix=mix)


@pytest.mark.parametrize("mix", [True, False])
def test_emsa_large_logits(mix):
    # logits far from 0: the online softmax's running max and rescaling carry the result
    check_emsa_op(BACKEND, 1, 2, 33, 70, 16, torch.float32, mix=mix, logit_scale=8.0)


# --------------------------------------------------------------------------------- op level PA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_pa_op(dtype, bias):
    check_pa_op(BACKEND, 2, 5, 7, 9, dtype, bias=bias)


# (2, 3, 70, 65): 9,100 elements per channel, two uneven slices of the dweight reduction
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 4, 1, 9), (1, 2, 17, 3), (2, 3, 70, 65)], ids=str)
def test_pa_op_shapes(shape):
    check_pa_op(BACKEND, *shape, torch.float32, channels_last=True)


def test_raw_op_takes_any_mix_weight_layout_and_dtype():
    # op_checks.h admits any floating (h, h) mix weight; the CUDA host code makes the dense float32
    # copy its kernels read (it used to refuse a transposed weight).
    from support.conformance import emsa_inputs
    q, k, v, w, _ = emsa_inputs(1, 2, 7, 5, 4, torch.float32, True)
    q, k, v, w = q.detach(), k.detach(), v.detach(), w.detach()
    ops = torch.ops.rest_kernels_C
    want = ops.emsa_fwd_emu(q, k, v, w, 0.5, 1e-5)
    for other in (w.t().contiguous().t(), w.double()):
        got = ops.emsa_fwd_emu(q, k, v, other, 0.5, 1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        dout = torch.ones_like(q)
        torch.testing.assert_close(ops.emsa_bwd_emu(dout, q, k, v, other, *want, 0.5, 1e-5),
                                   ops.emsa_bwd_emu(dout, q, k, v, w, *want, 0.5, 1e-5), rtol=0, atol=0)


def test_batch_times_heads_beyond_the_grid_is_refused_with_reason():
    import rest_kernels
    from rest_kernels import BackendUnavailableError
    q = torch.randn(32768, 2, 1, 1)  # B x h = 65536 > 65535, the grid's y dimension
    with pytest.raises(BackendUnavailableError, match="batch x heads up to 65535"):
        rest_kernels.emsa_attention(q, q, q, backend=BACKEND)
    assert rest_kernels.emsa_attention(q[:32767], q[:32767], q[:32767], backend=BACKEND).shape == (32767, 2, 1, 1)


# ------------------------------------------------------------------------- the emulation itself
SCHEDULES = ["forward", "reverse", "shuffle:1", "shuffle:2"]


def _all_kernels(mix):
    """Outputs of every EMSA and PA kernel on one fixed input (no autograd)."""
    from support.conformance import emsa_inputs
    q, k, v, w, _ = emsa_inputs(2, 3, 37, 45, 24, torch.float32, mix, "model")
    ops = torch.ops.rest_kernels_C
    w32 = w.detach() if w is not None else None
    q, k, v = q.detach(), k.detach(), v.detach()
    out, lse, rsq, rstd = ops.emsa_fwd_emu(q, k, v, w32, 24 ** -0.5, 1e-5)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = ops.emsa_bwd_emu(dout, q, k, v, w32, out, lse, rsq, rstd, 24 ** -0.5, 1e-5)
    g = torch.Generator().manual_seed(4)
    x, pw, pb = torch.randn(2, 3, 9, 11, generator=g), torch.randn(3, 1, 3, 3, generator=g), torch.randn(3, generator=g)
    pa = ops.pa_fwd_emu(x, pw, pb)
    pa_grads = ops.pa_bwd_emu(torch.randn(x.shape, generator=g), x, pw, pb)
    return (out, lse, rsq, rstd) + tuple(grads) + (pa,) + tuple(pa_grads)


@pytest.mark.parametrize("mix", [True, False])
def test_kernels_identical_under_every_schedule(schedule, mix):
    results = {}
    for spec in SCHEDULES:
        schedule(spec)
        results[spec] = _all_kernels(mix)
    first = results[SCHEDULES[0]]
    for spec in SCHEDULES[1:]:
        for a, b in zip(first, results[spec]):
            assert torch.equal(a, b), f"result differs between schedules {SCHEDULES[0]} and {spec}"


@pytest.mark.parametrize("mix", [True, False])
def test_tensor_core_backward_identical_under_every_schedule(schedule, mix):
    """bf16 backward on the mma kernels, with the dk / dv walk split over the query tiles (1 key block,
    2 heads: 4 shares with the mix, 2 without): the shares' float32 partials are summed in a fixed
    order, so every schedule gives the same bits."""
    from support.conformance import emsa_inputs
    q, k, v, w, _ = emsa_inputs(1, 2, 200, 30, 32, torch.bfloat16, mix, "model")
    q, k, v = q.detach(), k.detach(), v.detach()
    w = w.detach() if w is not None else None
    ops = torch.ops.rest_kernels_C
    saved = ops.emsa_fwd_emu(q, k, v, w, 32 ** -0.5, 1e-5)
    dout = torch.randn(saved[0].shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    results = {}
    for spec in SCHEDULES:
        schedule(spec)
        results[spec] = ops.emsa_bwd_emu(dout, q, k, v, w, *saved, 32 ** -0.5, 1e-5)
    for spec in SCHEDULES[1:]:
        for a, b in zip(results[SCHEDULES[0]], results[spec]):
            assert torch.equal(a, b), f"result differs between schedules {SCHEDULES[0]} and {spec}"


def test_planted_race_is_detected(schedule):
    x = torch.randn(6, 128, dtype=torch.float32)
    expected = x.double().sum(1)
    ops = torch.ops.rest_kernels_emu_test
    for spec in SCHEDULES:
        schedule(spec)
        good = ops.emu_selftest_reduce(x, True)
        torch.testing.assert_close(good.double(), expected, rtol=1e-5, atol=1e-5)
    detected = []
    for spec in SCHEDULES:
        schedule(spec)
        racy = ops.emu_selftest_reduce(x, False)
        ok = torch.isfinite(racy).all() and torch.allclose(racy.double(), expected, rtol=1e-5, atol=1e-5)
        detected.append(not ok)
    # the racy reduction reads slots nobody has written yet (poisoned with NaN) unless every
    # writer happens to run first (the reverse order): the forward and shuffled orders expose it
    assert detected[0] and detected[2] and detected[3], detected


def test_divergent_barrier_is_an_error():
    with pytest.raises(RuntimeError, match="barrier divergence"):
        torch.ops.rest_kernels_emu_test.emu_selftest_diverge(torch.zeros(128))


def test_error_inside_a_thread_surfaces():
    # raised on a fiber's stack (shared memory over the 228 KiB of a block), rethrown by the scheduler
    with pytest.raises(RuntimeError, match="shared memory"):
        torch.ops.rest_kernels_emu_test.emu_selftest_oversized_shared(torch.zeros(128))
    # and the emulation still works afterwards
    x = torch.randn(2, 128)
    torch.testing.assert_close(torch.ops.rest_kernels_emu_test.emu_selftest_reduce(x, True), x.sum(1))


def test_unknown_schedule_rejected(schedule):
    with pytest.raises(RuntimeError, match="unknown schedule"):
        schedule("sideways")


def test_selftest_ops_live_outside_the_production_namespace():
    # the backends call torch.ops.rest_kernels_C; the emulation's test machinery has its own namespace
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rest_kernels_emu_test::emu_selftest_reduce", "CPU")
    for op in ("emu_selftest_reduce", "emu_selftest_diverge", "emu_selftest_oversized_shared", "emu_set_schedule"):
        with pytest.raises((AttributeError, RuntimeError)):
            getattr(torch.ops.rest_kernels_C, op)


# ------------------------------------------------------------------------- tensor-core fragments
def _mma_operands(dtype):
    # small integers: every product and every partial sum is exact in fp32, whatever the order
    g = torch.Generator().manual_seed(0)
    return (torch.randint(-4, 5, (16, 16), generator=g).to(dtype),
            torch.randint(-4, 5, (16, 8), generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mma_fragments_give_the_product(schedule, dtype):
    """csrc/cuda/mma.cuh's fragment loaders and mma_16816, emulated: D = A B exactly, under every
    schedule; loading the fragments of another lane (a permuted lane layout) gives a wrong D."""
    a, b = _mma_operands(dtype)
    want = a.float() @ b.float()
    mma = torch.ops.rest_kernels_selftest.mma_fragments
    for spec in SCHEDULES:
        schedule(spec)
        assert torch.equal(mma(a, b, 0), want), spec
    for shift in (1, 4, 8, 31):  # same group / other group / the +8 rows
        assert not torch.equal(mma(a, b, shift), want), shift


def _mma_count():
    return torch.ops.rest_kernels_emu_test.emu_mma_count()


@pytest.mark.parametrize("mix", [True, False], ids=["mix", "nomix"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_emsa_forward_runs_on_the_tensor_core_kernels(dtype, mix):
    """fp16 / bf16 forward: the mma.sync instructions the emulation executes are exactly those of
    csrc/cuda/emsa_mma.cuh's tiling (64-row blocks, 32-key tiles, 4 warps; logits: 4 n-tiles per
    16-wide head-dim chunk and per input head; P V: 2 key steps x one n-tile per 8 head-dim
    columns), so the 16-bit outputs checked elsewhere in this file come from those kernels.
    float32 stays on the SIMT kernels (fp32 means fp32): no mma at all."""
    B, h, N, M, d = 2, 3, 70, 45, 24
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, d, generator=g).to(dtype) for n in (N, M, M))
    w = torch.randn(h, h, generator=g) if mix else None
    before = _mma_count()
    torch.ops.rest_kernels_C.emsa_fwd_emu(q, k, v, w, d ** -0.5, 1e-5)
    ran = _mma_count() - before
    blocks, key_tiles, warps = -(-N // 64) * B * h, -(-M // 32), 4
    logits = key_tiles * (h if mix else 1) * -(-d // 16) * 4 * warps
    pv = key_tiles * 2 * -(-d // 8) * warps
    want = blocks * ((2 * logits if mix else logits) + pv)  # mix: the stats kernel recomputes the logits
    assert ran == (0 if dtype == torch.float32 else want)


def _backward_mma_count(dtype, mix, B, h, N, M, d):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, h, n, d, generator=g).to(dtype) for n in (N, M, M))
    w = torch.randn(h, h, generator=g) if mix else None
    ops = torch.ops.rest_kernels_C
    saved = ops.emsa_fwd_emu(q, k, v, w, d ** -0.5, 1e-5)
    dout = torch.randn(B, h, N, d, generator=g).to(dtype)
    before = _mma_count()
    ops.emsa_bwd_emu(dout, q, k, v, w, *saved, d ** -0.5, 1e-5)
    return _mma_count() - before


@pytest.mark.parametrize("mix", [True, False], ids=["mix", "nomix"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("h,d", [(3, 24), (8, 96)])
def test_emsa_backward_runs_on_the_tensor_core_kernels(dtype, mix, h, d):
    """fp16 / bf16 backward: the emulated mma.sync count of one emsa_bwd call is exactly that of
    csrc/cuda/emsa_mma.cuh's tiling. With the mix, first the float32 rebuild of O: the forward's
    tiling (64-query blocks, 32-key tiles: each input head's logits, then P V in two 16-bit halves).
    Then emsa_bwd_mma_kernel; tiles of the other side: 16 rows with the mix, 32 without. dk / dv
    kernel: 64-key blocks walking the query tiles twice (dv: each head of the group's logits once,
    then Y^T dO; then each head's logits once, per output head dO V^T, and dS^T Q); dq kernel:
    64-query blocks walking the key tiles (each head's logits once, per output head dO V^T, then
    dS K). So the logits cost h products per tile pair, not h (h + 1) as when each output head
    recomputed them. float32: the SIMT kernels, no mma."""
    B, N, M = 2, 70, 45
    ran = _backward_mma_count(dtype, mix, B, h, N, M, d)
    warps, hm, kt = 4, (h if mix else 1), (16 if mix else 32)

    def xyt():  # one 16 x kt tile of X Y^T per warp
        return -(-d // 16) * (kt // 8) * warps

    def az():  # one tile x (kt x d) per warp
        return (kt // 16) * -(-d // 8) * warps

    g = h if mix else 1  # output heads per tile
    keys = -(-M // 64) * B * h * -(-N // kt) * ((hm * xyt() + az()) + hm * xyt() + g * xyt() + az())
    rows = -(-N // 64) * B * h * -(-M // kt) * (hm * xyt() + g * xyt() + az())
    rebuild = -(-N // 64) * B * h * -(-M // 32) * (h * -(-d // 16) * 4 * warps + 2 * 2 * -(-d // 8) * warps) if mix else 0
    assert ran == (0 if dtype == torch.float32 else rebuild + keys + rows)


def test_emsa_backward_mixing_more_heads_than_the_group_runs_simt():
    """The mixed tensor-core backward keeps up to 8 heads' logit tiles in registers; a 16-bit call
    mixing more heads runs the SIMT kernels for dq, dk, dv (its outputs are checked with the other
    op tests): only the rebuild of O, 9 heads' logits and two P V halves per tile, runs mma."""
    warps, d = 4, 16
    rebuild = 9 * (-(-d // 16) * 4 * warps) + 2 * 2 * -(-d // 8) * warps  # one block, one key tile
    assert _backward_mma_count(torch.bfloat16, True, 1, 9, 40, 20, d) == 9 * rebuild
    rebuild8 = 8 * (-(-d // 16) * 4 * warps) + 2 * 2 * -(-d // 8) * warps
    assert _backward_mma_count(torch.bfloat16, True, 1, 8, 40, 20, d) > 8 * rebuild8  # 8 heads: all on mma


def test_mma_fragments_bad_input_names_the_argument():
    mma = torch.ops.rest_kernels_selftest.mma_fragments
    a, b = _mma_operands(torch.bfloat16)
    with pytest.raises(RuntimeError, match="a must be \\(16, 16\\)"):
        mma(a[:8], b, 0)
    with pytest.raises(RuntimeError, match="both be bfloat16 or both float16"):
        mma(a.float(), b.float(), 0)
    with pytest.raises(RuntimeError, match="lane_shift"):
        mma(a, b, 32)

