"""The models' float32 CPU inference depthwise convolution, EMSA's key/value reduction
(csrc/cpu/depthwise_conv.cpp, through torch.ops.rest_kernels_C.depthwise_conv2d), and the layer that
runs it (rest/packed_conv.py PackedConv2d, by rest/dense.py's rule for the cpu backend's own inference
kernels)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import rest
from rest import dense, packed_conv
from rest.packed_conv import PackedConv2d
from conftest import require_backend
from support.cpu_builds import every_build
from support.module_copies import deep_and_pickled_copies

EPS32 = torch.finfo(torch.float32).eps
ops = torch.ops.rest_kernels_C


@pytest.fixture(autouse=True)
def _kernels():
    require_backend("cpu")
    dense.packed_kernel_unavailable_reason()  # registers the ops' fake implementations


def depthwise_taps(w):
    return w.reshape(w.shape[0], -1).t().contiguous()


def conv_bound(x, w, b, stride, padding, groups=1):
    """|fl(conv) - conv| <= gamma_{n+1} (|x| * |w| + |b|) elementwise, n = the terms of one output
    (in_channels / groups x kh x kw, the weight's last three sizes), gamma_n = n u / (1 - n u),
    u = eps / 2: the forward error bound of a float32 dot product plus the bias (Higham, Accuracy and
    Stability of Numerical Algorithms, 2nd ed., eq. 3.5), whatever the summation order or FMA use, so
    it holds for every build, CPU and blocking. Computed in float64."""
    n = w.shape[1] * w.shape[2] * w.shape[3] + 1
    u = EPS32 / 2
    gamma = n * u / (1 - n * u)
    mag = F.conv2d(x.double().abs(), w.double().abs(), None if b is None else b.double().abs(), stride, padding,
                   groups=groups)
    return gamma * mag


DEPTHWISE_CASES = {
    # (batch, channels, (kh, kw), stride, padding, (H, W)): EMSA's reduction is kernel sr + 1, stride sr
    "sr8": (1, 64, (9, 9), (8, 8), (4, 4), (56, 56)),
    "sr4-awkward": (2, 13, (5, 5), (4, 4), (2, 2), (10, 15)),   # 13 channels: a vector and a scalar tail
    "sr2": (1, 24, (3, 3), (2, 2), (1, 1), (7, 7)),
    "non-square": (2, 9, (2, 3), (1, 2), (0, 1), (5, 6)),
    "window-larger-than-image": (1, 8, (9, 9), (8, 8), (4, 4), (3, 2)),
    "empty-batch": (0, 8, (3, 3), (2, 2), (1, 1), (6, 6)),
}


@pytest.mark.parametrize("case", DEPTHWISE_CASES.values(), ids=DEPTHWISE_CASES.keys())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_depthwise_matches_float64_within_the_dot_product_bound_on_every_build(case, bias, layout):
    B, C, k, stride, padding, (H, W) = case
    g = torch.Generator().manual_seed(C)
    x = torch.randn(B, C, H, W, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C, 1, *k, generator=g)
    b = torch.randn(C, generator=g) if bias else None
    want = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding, groups=C)
    bound = conv_bound(x, w, b, stride, padding, groups=C)

    def check(isa):
        y = ops.depthwise_conv2d(x, depthwise_taps(w), b, list(k), list(stride), list(padding))
        assert y.shape == want.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert bool(((y.double() - want).abs() <= bound).all()), \
            f"{isa}: error {(y.double() - want).abs().max().item():.3e} over the bound"
    every_build(check)


def test_results_do_not_depend_on_the_thread_count():
    """Every output is bias + a sum over its taps in one order whatever the tasks, which follow the
    thread count: the same bits with one thread and with several."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 40, 33, 29, generator=g), torch.randn(40, 1, 5, 5, generator=g)
    b, taps = torch.randn(40, generator=g), depthwise_taps(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.depthwise_conv2d(x, taps, b, [5, 5], [4, 4], [2, 2])
        torch.set_num_threads(max(2, threads))
        many = ops.depthwise_conv2d(x, taps, b, [5, 5], [4, 4], [2, 2])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(bias):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 9, 7, generator=g)
    wd = torch.randn(6, 1, 3, 3, generator=g)
    bd = torch.randn(6, generator=g) if bias else None
    for xl in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(ops.depthwise_conv2d.default, (xl, depthwise_taps(wd), bd, [3, 3], [2, 1], [1, 0]))


def _depthwise(x=None, taps=None, bias=None, k=(3, 3), stride=(1, 1), padding=(1, 1)):
    x = torch.zeros(1, 3, 5, 5) if x is None else x
    taps = torch.zeros(9, 3) if taps is None else taps
    return ops.depthwise_conv2d(x, taps, bias, list(k), list(stride), list(padding))


@pytest.mark.parametrize("call, message", [
    (lambda: _depthwise(x=torch.zeros(1, 3, 5, 5, dtype=torch.bfloat16)), "x must be float32"),
    (lambda: _depthwise(x=torch.zeros(3, 5, 5)), r"x must be \(batch, channels, height, width\)"),
    (lambda: _depthwise(taps=torch.zeros(9, 4)), "taps must have shape"),
    (lambda: _depthwise(taps=torch.zeros(9, 3, dtype=torch.float64)), "taps must be float32"),
    (lambda: _depthwise(k=(0, 3)), "kernel_size must be two integers >= 1"),
    (lambda: _depthwise(stride=(0, 1)), "stride must be two integers >= 1"),
    (lambda: _depthwise(padding=(-1, 0)), "padding must be two integers >= 0"),
    (lambda: _depthwise(bias=torch.zeros(4)), "bias must have shape"),
    (lambda: _depthwise(bias=torch.zeros(3, dtype=torch.float64)), "bias must be float32"),
    (lambda: _depthwise(x=torch.zeros(1, 3, 2, 2), padding=(0, 0)), "padded size"),
], ids=["x-dtype", "x-rank", "taps-shape", "taps-dtype", "kernel-size", "stride", "padding", "bias-shape",
        "bias-dtype", "too-small"])
def test_bad_arguments_raise_naming_them(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --------------------------------------------------------------------------- when a layer uses them
@pytest.fixture
def kernels_on(monkeypatch):
    """The cpu backend's inference kernels on whatever the CPU (the rule's switch), and the calls that
    take them counted."""
    monkeypatch.setenv(dense.PACKED_KERNEL_ENV_VAR, "1")
    calls = []
    real = packed_conv._kernel_path

    def counting(x, weight, packed):
        taken = real(x, weight, packed)
        calls.append(taken)
        return taken
    monkeypatch.setattr(packed_conv, "_kernel_path", counting)
    return calls


def test_layer_runs_the_kernel_and_follows_the_weight(kernels_on):
    torch.manual_seed(4)
    plain = nn.Conv2d(24, 24, 5, stride=4, padding=2, groups=24).eval()  # EMSA's reduction at sr 4
    layer = PackedConv2d.from_conv(copy.deepcopy(plain))
    assert type(layer) is PackedConv2d and layer.weight._rest_onednn_packed.for_kernel

    def check(x):
        with torch.no_grad():
            got, want = layer(x), plain(x)
        bound = conv_bound(x, plain.weight, plain.bias, plain.stride, plain.padding, plain.groups)
        assert bool(((got.double() - want.double()).abs() <= 2 * bound).all())
    x = torch.randn(2, plain.in_channels, 17, 13).contiguous(memory_format=torch.channels_last)
    check(x)
    check(torch.randn(1, plain.in_channels, 9, 10))  # another size, NCHW
    with torch.no_grad():  # the weight changes in place: the copy is remade
        layer.weight.mul_(-0.5)
        plain.weight.mul_(-0.5)
    check(x)
    assert kernels_on == [True, True, True]
    y = layer(x.clone().requires_grad_())  # with gradients: nn.Conv2d's own convolution
    y.sum().backward()
    assert kernels_on[-1] is False and layer.weight.grad is not None
    for other in deep_and_pickled_copies(layer):
        with torch.no_grad():
            assert torch.equal(other(x), layer(x))


def test_layers_that_keep_other_paths(kernels_on):
    # dense, grouped but not depthwise, dilated, bfloat16: oneDNN's copy
    for other in (nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                  nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8),
                  nn.Conv2d(8, 8, 3, padding=1, groups=8).bfloat16()):
        assert not PackedConv2d.from_conv(other).weight._rest_onednn_packed.for_kernel
    # a float32 layer cast to bfloat16 after packing: the taps are never used for it
    layer = PackedConv2d.from_conv(nn.Conv2d(6, 6, 3, padding=1, groups=6)).bfloat16()
    x = torch.randn(1, 6, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, 1, 1, 1, 6))
    assert kernels_on == [False]


def test_the_rule_off_keeps_onednn(monkeypatch):
    monkeypatch.setenv(dense.PACKED_KERNEL_ENV_VAR, "0")
    depthwise = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)
    assert not PackedConv2d.from_conv(depthwise).weight._rest_onednn_packed.for_kernel
    model = rest.optimize_for_inference(rest.ResT(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8),
                                                  depths=(1, 1, 1, 1), num_classes=10))
    # the reductions stay nn.Conv2d off the kernel (oneDNN's copy of them was not measured)
    assert all(type(m.sr) is nn.Conv2d for m in model.modules() if hasattr(m, "sr_norm"))


def test_optimized_model_runs_the_kernels(kernels_on):
    model = rest.ResT(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1),
                      num_classes=10).eval()
    optimized = rest.optimize_for_inference(model)
    convs = [m for m in optimized.modules() if isinstance(m, PackedConv2d)]
    # the reductions of stages 1-3 on the kernel; the stem's and patch embeddings' on oneDNN's copy
    kernel = [m for m in convs if m.weight._rest_onednn_packed.for_kernel]
    assert len(kernel) == 3 and all(m.groups == m.in_channels > 1 for m in kernel)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model.double()(x.double())
        got = optimized(x)
    assert kernels_on.count(True) == 3  # one reduction per stage 1-3 (depth 1); the dense ones on oneDNN
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)  # float32 against float64 end to end
