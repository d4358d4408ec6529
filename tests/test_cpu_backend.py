"""The `cpu` backend (fused C++ kernels of csrc/cpu) against the reference and the official cases.

Executes csrc/cpu/emsa_cpu.cpp, csrc/cpu/pa_cpu.cpp and (channels-last inputs) csrc/cpu/pa_cpu_nhwc.cpp,
with their helpers csrc/cpu/simd.h, csrc/cpu/tile_gemm.h, csrc/cpu/parallel.h and csrc/cpu/pa_common.h,
through torch.ops.rest_kernels_C.
"""
import pytest
import torch

from support import conformance
import rest_kernels
from conftest import require_backend

DTYPES = [torch.float64, torch.float32]


@pytest.fixture(autouse=True)
def _cpu_backend():
    require_backend("cpu")


# (B, h, N, M, d): tiny and awkward sizes; N not a multiple of the 6-row tile or of a block,
# M not a multiple of the vector width and larger than a GEMM K panel (256), odd head dims.
EMSA_SIZES = [
    (1, 1, 1, 1, 1),
    (1, 2, 1, 5, 3),
    (2, 3, 7, 1, 5),
    (1, 2, 13, 17, 64),
    (2, 8, 9, 6, 3),
    (1, 2, 101, 300, 5),
    (1, 3, 25, 19, 96),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mix", [True, False])
@pytest.mark.parametrize("size", EMSA_SIZES, ids=lambda s: "B%d-h%d-N%d-M%d-d%d" % s)
def test_emsa_op_sizes(size, mix, dtype):
    try:
        conformance.check_emsa_op("cpu", *size, dtype, mix=mix)
    except ValueError as e:  # a reference without the 1 x 1 map rule: F.instance_norm refuses it
        if mix and size[2] * size[3] == 1 and "spatial element" in str(e):
            pytest.skip("the reference cannot normalise a 1 x 1 map here")
        raise


@pytest.mark.parametrize("layout", ["model", "contiguous", "transposed"])
@pytest.mark.parametrize("mix", [True, False])
def test_emsa_op_layouts(layout, mix):
    for dtype in DTYPES:
        conformance.check_emsa_op("cpu", 2, 2, 11, 7, 8, dtype, mix=mix, layout=layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mix", [True, False])
def test_emsa_op_low_precision(dtype, mix):
    # computed in float32 inside: held to the flash-attention rule against the float64 oracle
    conformance.check_emsa_op("cpu", 2, 2, 37, 19, 16, dtype, mix=mix)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mix", [False, True])
@pytest.mark.parametrize("size", EMSA_SIZES, ids=lambda s: "B%d-h%d-N%d-M%d-d%d" % s)
def test_emsa_low_precision_forward_reads_its_inputs_as_float32_copies_would(dtype, mix, size):
    """The kernel reads bfloat16 / float16 q, k, v in place and rounds out once as it writes it (with
    the mix, from a float32 buffer of the unscaled rows in the rstd pass); widening is exact, so the
    result must equal, bit for bit, the float32 kernel on float32 copies rounded once (what the
    kernel did before), for the model's strided q too, and the statistics too."""
    B, h, N, M, d = size
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(B, h, M, d, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(h, h, generator=g) if mix else None
    for q in (torch.randn(B, h, N, d, generator=g).to(dtype),
              torch.randn(B, N, h, d, generator=g).to(dtype).transpose(1, 2)):  # the model's layout
        got = torch.ops.rest_kernels_C.emsa_fwd(q, k, v, w, 0.3, 1e-5)
        want = torch.ops.rest_kernels_C.emsa_fwd(q.float(), k.float(), v.float(), w, 0.3, 1e-5)
        assert got[0].dtype == dtype and torch.equal(got[0], want[0].to(dtype))
        assert got[0].stride() == want[0].stride()  # (B, N, h, d) in memory, as every backend
        for a, b in zip(got[1:], want[1:]):  # lse, rsq, rstd: float32 either way
            assert a.dtype == torch.float32 and torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 9, 7), (1, 64, 56, 56), (3, 37, 5, 1), (1, 19, 1, 6), (2, 512, 7, 7),
                                   (1, 96, 33, 2)])
def test_pa_low_precision_forward_reads_its_input_as_a_float32_copy_would(dtype, channels_last, shape):
    """The channels-last forward reads bfloat16 / float16 maps in place (a task's rows plus the halo,
    widened) and rounds out once; widening is exact, so the result must equal, bit for bit, the float32
    kernel on a float32 copy rounded once (what it did before, and what the NCHW forward still does),
    with and without bias, in the input's layout. The shapes cross the NHWC kernel's task boundaries
    (rows per task from the shape), its channel-vector tail and 1-pixel rows and columns."""
    g = torch.Generator().manual_seed(7)
    B, C, H, W = shape
    x = torch.randn(B, C, H, W, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(C, 1, 3, 3, generator=g), torch.randn(C, generator=g)
    for bias in (b, None):
        got = rest_kernels.pa_gate(x, w.to(dtype), None if bias is None else bias.to(dtype), backend="cpu")
        want = rest_kernels.pa_gate(x.float(), w.to(dtype).float(), None if bias is None else bias.to(dtype).float(),
                                    backend="cpu").to(dtype)
        assert got.dtype == dtype and torch.equal(got, want)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pa_op_low_precision(dtype):
    conformance.check_pa_op("cpu", 2, 3, 9, 7, dtype)
    conformance.check_pa_op("cpu", 1, 4, 5, 6, dtype, bias=False, channels_last=True)


def test_emsa_op_many_blocks_and_chunks():
    # Enough rows for many query blocks and several backward chunks per batch.
    conformance.check_emsa_op("cpu", 1, 2, 700, 33, 16, torch.float64, mix=True)


def test_emsa_sharp_logits():
    # Large logits: peaked softmax rows, exp far into the clamped range.
    conformance.check_emsa_op("cpu", 2, 2, 19, 23, 8, torch.float32, mix=True, logit_scale=30.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pa_op(dtype, bias, channels_last):
    # (1, 70, 10, 130): channels-last inputs are split into 4-row tasks there (csrc/cpu/pa_cpu_nhwc.cpp),
    # so task boundaries and their halo rows are crossed; C = 13 and 70 leave a vector tail.
    for shape in [(1, 1, 1, 1), (2, 3, 5, 7), (1, 4, 17, 33), (2, 13, 1, 6), (1, 70, 10, 130)]:
        conformance.check_pa_op("cpu", *shape, dtype, bias=bias, channels_last=channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_pa(channels_last):
    conformance.gradcheck_pa("cpu", channels_last=channels_last)


def _emsa_run(mix):
    q, k, v, w, b = conformance.emsa_inputs(2, 2, 301, 29, 16, torch.float32, mix)
    out = rest_kernels.emsa_attention(q, k, v, w, b, backend="cpu")
    leaves = [t for t in (q, k, v, w) if t is not None]
    return (out,) + torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))


def _pa_run(channels_last=False):
    g = torch.Generator().manual_seed(5)
    if channels_last:  # several row tasks per image (csrc/cpu/pa_cpu_nhwc.cpp), their partials reduced
        x = torch.randn(2, 70, 13, 130, generator=g).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        C = 70
    else:
        x = torch.randn(2, 8, 13, 11, generator=g).requires_grad_(True)
        C = 8
    w = torch.randn(C, 1, 3, 3, generator=g).requires_grad_(True)
    b = torch.randn(C, generator=g).requires_grad_(True)
    out = rest_kernels.pa_gate(x, w, b, backend="cpu")
    return (out,) + torch.autograd.grad(out, (x, w, b), torch.randn(out.shape, generator=g))


def test_thread_count_bitwise_identical():
    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results[n] = [_emsa_run(True), _emsa_run(False), _pa_run(), _pa_run(channels_last=True)]
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3):
        for got, ref in zip(results[n], results[1]):
            for a, e in zip(got, ref):
                assert torch.equal(a, e), f"{n} threads differ from 1 thread"


def test_auto_picks_cpu_for_cpu_tensors():
    from rest import EMSA, PA
    from rest_kernels.backends.registry import BACKENDS

    calls = []
    backend = BACKENDS["cpu"]
    orig_e, orig_p = backend._emsa_forward, backend._pa_forward  # the kernels, on validated problems
    backend._emsa_forward = lambda *a: calls.append("emsa") or orig_e(*a)
    backend._pa_forward = lambda *a: calls.append("pa") or orig_p(*a)
    try:
        attn = EMSA(16, num_heads=2, sr_ratio=2, apply_transform=True).eval()
        pa = PA(16).eval()
        with torch.no_grad():
            attn(torch.randn(2, 36, 16), 6, 6)
            pa(torch.randn(2, 16, 6, 6))
    finally:
        del backend._emsa_forward, backend._pa_forward
    assert calls == ["emsa", "pa"]
