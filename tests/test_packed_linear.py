"""The models' float32 CPU inference linear kernel (csrc/cpu/packed_linear.cpp, through
torch.ops.rest_kernels_C.pack_linear_weight / packed_linear) and the rule of rest/dense.py that gives a
prepacked layer its panels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rest
from rest import dense
from conftest import require_backend
from support.cpu_builds import every_build
from support.module_copies import deep_and_pickled_copies

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def _kernels():
    require_backend("cpu")
    dense.packed_kernel_unavailable_reason()  # registers the ops' fake implementations


def pack(w):
    return torch.ops.rest_kernels_C.pack_linear_weight(w)


def packed_linear(x, panels, b, n, gelu=False):
    return torch.ops.rest_kernels_C.packed_linear(x, panels, b, n, gelu)


def problem(lead, K, N, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g)
    w = torch.randn(N, K, generator=g) / max(K, 1) ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    return x, w, b


def error_bound(x, w, b):
    """|fl(x w^T + b) - (x w^T + b)| <= gamma_{K+1} (|x| |w|^T + |b|), gamma_n = n u / (1 - n u), u = eps / 2:
    the forward error bound of a float32 dot product of K terms plus the bias (Higham, Accuracy and
    Stability of Numerical Algorithms, 2nd ed., eq. 3.5), whatever the summation order or FMA use, so
    it holds for every build, CPU and blocking. Computed in float64."""
    K = x.shape[-1]
    u = EPS32 / 2
    gamma = (K + 1) * u / (1 - (K + 1) * u)
    mag = x.double().abs() @ w.double().abs().t()
    if b is not None:
        mag = mag + b.double().abs()
    return gamma * mag


def gelu_bound(y64, lin_bound):
    """GELU'(y) lies in [-0.17, 1.13], so the product's error passes through times 1.13; then erf's
    approximation (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7, times |y| / 2) and a few float32
    roundings of the GELU's own arithmetic (8 ulps of the result, plus the absolute error of
    exp's last bits near 0)."""
    out = F.gelu(y64)
    return 1.13 * lin_bound + 0.75e-7 * y64.abs() + 8 * EPS32 * out.abs() + 1e-7


# --------------------------------------------------------------------------- the kernel
@pytest.mark.parametrize("lead, K, N", [
    ((49,), 768, 64),      # batch-1 stage-4 rows: 49 = blocks of 5 and 6
    ((2, 7), 300, 40),     # K over one slice (256), N not a multiple of the 16-column panel
    ((1,), 1, 1),
    ((5, 3, 2), 17, 15),
    ((97,), 33, 200),      # 97 rows: two row tasks, a ragged panel
    ((0,), 8, 16),         # no rows
    ((3,), 0, 16),         # K = 0: bias only
], ids=["49x768x64", "2x7x300x40", "1x1x1", "5x3x2x17x15", "97x33x200", "empty-rows", "K0"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu"])
def test_matches_float64_within_the_dot_product_bound_on_every_build(lead, K, N, bias, gelu):
    x, w, b = problem(lead, K, N, bias=bias)
    y64 = F.linear(x.double(), w.double(), None if b is None else b.double())
    bound = error_bound(x, w, b)
    if gelu:
        bound, y64 = gelu_bound(y64, bound), F.gelu(y64)
    def check(isa):
        y = packed_linear(x, pack(w), b, N, gelu)
        assert y.shape == (*lead, N) and y.dtype == torch.float32 and y.is_contiguous()
        assert bool(((y.double() - y64).abs() <= bound).all()), \
            f"{isa}: error {(y.double() - y64).abs().max().item():.3e} over the bound"

    every_build(check)


@pytest.mark.parametrize("N", [64, 72, 96, 100], ids=["4-panels", "4+1-ragged", "4+2", "4+3-ragged"])
def test_multi_panel_tiles_on_every_build(N):
    """On AVX-512 a micro-kernel tile holds up to four 16-column panels, each one vector, the panels
    K * 16 floats apart in the packed weight (csrc/cpu/packed_linear.cpp kTilePanels): a block of
    4, 5, 6 and 7 panels runs tiles of 4 then 1, 2 or 3 panels, the last panel's columns partly past N.
    One thread and 300 rows (5 row tasks, at least kTasksPerThread) keep the block's panels whole, so
    every tile width runs; two K slices (300 > 256) take the accumulate-then-epilogue path."""
    x, w, b = problem((300,), 300, N)
    linear64 = F.linear(x.double(), w.double(), b.double())
    y64, bound = F.gelu(linear64), gelu_bound(linear64, error_bound(x, w, b))

    def check(isa):
        y = packed_linear(x, pack(w), b, N, True)
        assert bool(((y.double() - y64).abs() <= bound).all()), \
            f"{isa}: error {(y.double() - y64).abs().max().item():.3e} over the bound"

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        every_build(check)
    finally:
        torch.set_num_threads(threads)


def test_panels_layout():
    """Panel p holds weight[16 p + j, k] at [p, k, j], zero past the last output column."""
    w = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)
    panels = pack(w)
    assert panels.shape == (3, 3, 16)
    want = torch.zeros(48, 3)
    want[:40] = w
    torch.testing.assert_close(panels, want.reshape(3, 16, 3).transpose(1, 2), rtol=0, atol=0)


def test_non_contiguous_input_gives_the_contiguous_result():
    _, w, b = problem((1,), 24, 32)
    panels = pack(w)
    base = torch.randn(24, 40)
    for x in (base.t(), torch.randn(40, 48)[:, 5:29]):  # a transposed view, a column slice
        assert not x.is_contiguous()
        assert torch.equal(packed_linear(x, panels, b, 32), packed_linear(x.contiguous(), panels, b, 32))


def test_results_do_not_depend_on_the_thread_count():
    """Every output is a sum over k in increasing order, whatever the task blocking (which follows the
    thread count): the same bits with one thread and with several."""
    x, w, b = problem((131,), 520, 100)
    panels = pack(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = packed_linear(x, panels, b, 100, True)
        torch.set_num_threads(max(2, threads))
        many = packed_linear(x, panels, b, 100, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("lead, K, N", [((131,), 520, 100), ((7,), 0, 20), ((3, 5), 64, 16)],
                         ids=["3-slices-ragged", "K0", "one-slice"])
def test_bias_is_added_once_to_the_finished_sum_on_every_build(lead, K, N):
    """The kernel adds the bias to each tile's accumulators after its last K slice (the epilogue in
    registers, csrc/cpu/packed_linear.cpp BiasGelu): one float32 addition to the finished sum, so the
    same bits as the product without bias plus the bias, also past a 256-wide K slice and in the
    columns of a panel that N does not fill."""
    x, w, b = problem(lead, K, N)
    panels = pack(w)
    def check(isa):
        assert torch.equal(packed_linear(x, panels, b, N), packed_linear(x, panels, None, N) + b), isa

    every_build(check)


@pytest.mark.parametrize("gelu", [False, True])
def test_opcheck(gelu):
    x, w, b = problem((2, 9), 24, 40)
    torch.library.opcheck(torch.ops.rest_kernels_C.pack_linear_weight.default, (w,))
    torch.library.opcheck(torch.ops.rest_kernels_C.packed_linear.default, (x, pack(w), b, 40, gelu))


@pytest.mark.parametrize("call, message", [
    (lambda: pack(torch.zeros(4, 3, dtype=torch.float64)), "weight must be float32"),
    (lambda: pack(torch.zeros(4)), "weight must be 2-dimensional"),
    (lambda: packed_linear(torch.zeros(2, 3, dtype=torch.bfloat16), pack(torch.zeros(4, 3)), None, 4), "x must be float32"),
    (lambda: packed_linear(torch.zeros(2, 5), pack(torch.zeros(4, 3)), None, 4), r"x must be \(\.\.\., 3\)"),
    (lambda: packed_linear(torch.zeros(2, 3), torch.zeros(1, 3, 8), None, 4), "packed_weight must be"),
    (lambda: packed_linear(torch.zeros(2, 3), pack(torch.zeros(4, 3)), None, 17), "out_features must be in"),
    (lambda: packed_linear(torch.zeros(2, 3), pack(torch.zeros(20, 3)), None, 16), "out_features must be in"),
    (lambda: packed_linear(torch.zeros(2, 3), pack(torch.zeros(4, 3)), torch.zeros(5), 4), "bias must have shape"),
    (lambda: packed_linear(torch.zeros(2, 3), pack(torch.zeros(4, 3)), torch.zeros(4).double(), 4), "bias must be float32"),
], ids=["weight-dtype", "weight-rank", "x-dtype", "x-width", "panel-width", "out-too-many", "out-too-few",
        "bias-shape", "bias-dtype"])
def test_bad_arguments_raise_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- when a layer uses it
def test_switch_and_capability_rule(monkeypatch):
    layer = dense.Linear(24, 40)
    monkeypatch.setenv(dense.PACKED_KERNEL_ENV_VAR, "0")
    assert dense.packed_kernel_unavailable_reason() == f"{dense.PACKED_KERNEL_ENV_VAR}=0"
    layer.prepack()
    assert not layer.packed.for_kernel
    monkeypatch.setenv(dense.PACKED_KERNEL_ENV_VAR, "1")
    assert dense.packed_kernel_unavailable_reason() is None
    layer.prepack()
    assert layer.packed.for_kernel
    monkeypatch.delenv(dense.PACKED_KERNEL_ENV_VAR)
    capability = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(dense, "PACKED_KERNEL_ON", frozenset({capability}))
    assert dense.packed_kernel_unavailable_reason() is None
    monkeypatch.setattr(dense, "PACKED_KERNEL_ON", frozenset())
    assert capability in dense.packed_kernel_unavailable_reason()
    layer.bfloat16().prepack()
    assert not layer.packed.for_kernel or dense.packed_kernel_unavailable_reason() is None  # float32 only
    monkeypatch.setenv(dense.PACKED_KERNEL_ENV_VAR, "1")
    layer.prepack()
    assert not layer.packed.for_kernel  # a bfloat16 weight keeps oneDNN's copy


@pytest.fixture
def kernel_on(monkeypatch):
    monkeypatch.setenv(dense.PACKED_KERNEL_ENV_VAR, "1")
    calls = []
    real = dense.kernel_linear

    def counting(x, panels, bias, out_features, gelu=False):
        calls.append(gelu)
        return real(x, panels, bias, out_features, gelu)

    monkeypatch.setattr(dense, "kernel_linear", counting)
    return calls


def test_prepacked_layer_runs_the_kernel_and_follows_the_weight(kernel_on):
    torch.manual_seed(3)
    layer, plain = dense.Linear(24, 40), dense.Linear(24, 40, linear_impl="aten")
    assert layer.prepack() is True and layer.packed.for_kernel
    x = torch.randn(3, 7, 24)

    def check():
        plain.load_state_dict(layer.state_dict())
        with torch.no_grad():
            got = layer(x)
            assert bool(((got.double() - plain(x).double()).abs()
                         <= 2 * error_bound(x, layer.weight, layer.bias)).all())
    check()
    assert kernel_on == [False]
    with torch.no_grad():
        layer.weight.mul_(-0.5)  # in place: the panels are remade
    check()
    layer.load_state_dict({"weight": torch.randn(40, 24), "bias": torch.randn(40)})
    check()
    assert len(kernel_on) == 3
    y = layer(x.clone().requires_grad_())  # with gradients: the trainable path, not the kernel
    y.sum().backward()
    assert len(kernel_on) == 3 and layer.weight.grad is not None


def test_mlp_gelu_runs_inside_the_kernel(kernel_on):
    torch.manual_seed(5)
    fc, act = dense.Linear(16, 64), torch.nn.GELU()
    fc.prepack()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        got = dense.linear_gelu(fc, act, x)
        y64 = F.linear(x.double(), fc.weight.double(), fc.bias.double())
    assert kernel_on == [True]
    assert bool(((got.double() - F.gelu(y64)).abs() <= gelu_bound(y64, error_bound(x, fc.weight, fc.bias))).all())


def test_optimized_model_on_the_kernel_matches_the_model_and_survives_copies(kernel_on):
    model = rest.ResT(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1),
                      num_classes=10).eval()
    optimized = rest.optimize_for_inference(model)
    layers = [m for m in optimized.modules() if isinstance(m, dense.Linear)]
    assert layers and all(m.packed.for_kernel for m in layers)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.double()(x.double())
        got = optimized(x)
        assert kernel_on, "the optimized model never called the kernel"
        # float32 against float64 end to end
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        for other in deep_and_pickled_copies(optimized):
            assert all(m.packed.for_kernel and m.packed._packed is None
                       for m in other.modules() if isinstance(m, dense.Linear))
            assert torch.equal(other(x), got)
