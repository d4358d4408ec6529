"""The `cpu` backend (fused C++ kernels of csrc/cpu) against the reference and the official cases.

Executes csrc/cpu/emsa_cpu.cpp, csrc/cpu/pa_cpu.cpp and (channels-last inputs) csrc/cpu/pa_cpu_nhwc.cpp,
with their helpers csrc/cpu/simd.h, csrc/cpu/tile_gemm.h, csrc/cpu/parallel.h and csrc/cpu/pa_common.h,
through torch.ops.rest_kernels_C.
"""
import pytest
import torch

from support import conformance
import rest_kernels
from rest_kernels import _extension
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
    if dtype == torch.bfloat16 and _extension.cpu_bf16_products():
        pytest.skip("this build computes the bfloat16 forward on bfloat16 products: test_emsa_bf16_products_forward")
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


BF16_PRODUCT_SIZES = EMSA_SIZES + [(2, 1, 196, 49, 64), (1, 1, 50, 2, 2), (3, 1, 31, 33, 63), (1, 2, 7, 16, 32)]


@pytest.mark.parametrize("mix", [False, True])
@pytest.mark.parametrize("size", BF16_PRODUCT_SIZES, ids=lambda s: "B%d-h%d-N%d-M%d-d%d" % s)
def test_emsa_bf16_products_forward(size, mix):
    """The bfloat16 forward as the selected build computes it (on an avx512bf16 build: bfloat16
    products, float32 sums, the second product's left operand rounded to bfloat16: P without the mix,
    the centred P - 1/M with it; elsewhere in float32), for the contiguous and the model's strided q,
    odd M and d (the pair-interleaved packs' zero padding):
    - out against float64 on the same bfloat16 inputs by the flash-attention rule: at most twice the
      error of the reference run in bfloat16, plus one bfloat16 rounding of out's scale;
    - lse against float64: each logit plane L_j is a float32 dot product of d exact bfloat16 products,
      off by at most d * 2^-24 * scale * sum_c |q_c k_c| (the standard bound for recursive summation);
      the mix S_g = sum_j (W[g,j] scale) L_j adds (h + 2) * 2^-24 * scale * sum_j |W[g,j]| |L_j| (the
      rounded weight, the sum of h terms) to sum_j |W[g,j]| times those errors; lse moves by at most
      the largest error of its row; the softmax sums, exp and log add a few float32 ulps of |lse| + 1,
      bounded by 16 * 2^-24 * (|lse| + 1);
    - rsq and rstd by the statistics contract's bfloat16 bound (conformance.check_emsa_stats)."""
    B, h, N, M, d = size
    if mix and h == 1:
        pytest.skip("the mix needs heads > 1")
    if mix and N * M == 1:
        pytest.skip("the reference cannot normalise a 1 x 1 map")
    g = torch.Generator().manual_seed(11)
    k, v = (torch.randn(B, h, M, d, generator=g).to(torch.bfloat16) for _ in range(2))
    w = torch.randn(h, h, generator=g) if mix else None
    scale = d ** -0.5
    eps32 = 2.0 ** -24
    for q in (torch.randn(B, h, N, d, generator=g).to(torch.bfloat16),
              torch.randn(B, N, h, d, generator=g).to(torch.bfloat16).transpose(1, 2)):
        out, lse, rsq, rstd = torch.ops.rest_kernels_C.emsa_fwd(q, k, v, w, scale, 1e-5)
        assert out.dtype == torch.bfloat16 and out.transpose(1, 2).is_contiguous()
        assert lse.dtype == torch.float32 and (rsq.numel() > 0) == mix and (rstd.numel() > 0) == mix
        wd = None if w is None else w.double()
        oracle = rest_kernels.emsa_attention(q.double(), k.double(), v.double(), wd, backend="reference")
        lowp = rest_kernels.emsa_attention(q, k, v, None if w is None else w.to(torch.bfloat16), backend="reference")
        conformance.assert_lowp_close(out, lowp, oracle, f"out {size} mix={mix}")
        L = (q.double() @ k.double().transpose(-1, -2)) * scale  # (B, h, N, M)
        E = d * eps32 * scale * (q.double().abs() @ k.double().abs().transpose(-1, -2))
        if mix:
            S = torch.einsum("gj,bjnm->bgnm", wd, L)
            E = torch.einsum("gj,bjnm->bgnm", wd.abs(), E + (h + 2) * eps32 * L.abs())
        else:
            S = L
        lse64 = torch.logsumexp(S, -1) - torch.log(torch.tensor(float(M), dtype=torch.float64))
        bound = E.amax(-1) + 16 * eps32 * (lse64.abs() + 1)
        err = (lse.double() - lse64).abs()
        assert bool((err <= bound).all()), f"lse {size}: error {err.max().item():.3e}, bound {bound.min().item():.3e}"
    conformance.check_emsa_stats("cpu", B, h, N, M, d, torch.bfloat16, mix=mix)


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


def _emsa_bf16_forward():
    """The bfloat16 forward (on an avx512bf16 build: its own kernel, bfloat16 products), with the mix."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, 3, n, 40, generator=g).to(torch.bfloat16) for n in (301, 37, 37))
    return torch.ops.rest_kernels_C.emsa_fwd(q, k, v, torch.randn(3, 3, generator=g), 0.2, 1e-5)


def test_thread_count_bitwise_identical():
    threads = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results[n] = [_emsa_run(True), _emsa_run(False), _pa_run(), _pa_run(channels_last=True),
                          _emsa_bf16_forward()]
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
