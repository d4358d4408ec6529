"""rest/packed_conv.py: convolutions that keep oneDNN's blocked weight for inference, against F.conv2d
(the cpu backend's own convolution kernels switched off here: tests/test_conv_kernels.py has them)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rest import dense, packed_conv
from rest.packed_conv import PackedConv2d

pytestmark = pytest.mark.skipif(dense.onednn_unavailable_reason() is not None,
                                reason=f"oneDNN unavailable: {dense.onednn_unavailable_reason()}")


@pytest.fixture(autouse=True)
def _onednn_copies(monkeypatch):
    """from_conv keeps oneDNN's copy, whatever the CPU (rest/dense.py's switch of its own kernels)."""
    monkeypatch.setenv(dense.PACKED_KERNEL_ENV_VAR, "0")


@pytest.fixture
def packed_calls(monkeypatch):
    """Counts the calls that take the kept copy."""
    calls = []
    real = packed_conv._packed_path

    def counting(x, weight):
        taken = real(x, weight)
        calls.append(taken)
        return taken
    monkeypatch.setattr(packed_conv, "_packed_path", counting)
    return calls


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("cfg", [dict(in_channels=5, out_channels=12, kernel_size=3, stride=2, padding=1),
                                 dict(in_channels=3, out_channels=8, kernel_size=3, stride=1, padding=1, bias=False),
                                 dict(in_channels=16, out_channels=24, kernel_size=5, stride=4, padding=2)])
def test_matches_conv2d_and_follows_shape_and_weight(dtype, cfg, packed_calls):
    if dtype == torch.bfloat16 and dense.onednn_bf16_unavailable_reason() is not None:
        pytest.skip(dense.onednn_bf16_unavailable_reason())
    torch.manual_seed(0)
    conv = nn.Conv2d(**cfg).to(dtype).eval()
    packed = PackedConv2d.from_conv(copy.deepcopy(conv))
    assert type(packed) is PackedConv2d and packed.state_dict().keys() == conv.state_dict().keys()

    def check(x):
        with torch.no_grad():
            got, want = packed(x), conv(x)
        assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(memory_format=torch.channels_last)
        # another oneDNN algorithm for a pre-reordered weight: float32 / bfloat16 rounding apart
        torch.testing.assert_close(got, want)
    # awkward sizes, one after another: the copy is remade for each new input shape
    for shape in [(2, cfg["in_channels"], 17, 23), (1, cfg["in_channels"], 9, 9), (2, cfg["in_channels"], 17, 23)]:
        check(cl(torch.randn(shape).to(dtype)))
    assert packed_calls == [True, True, True]
    # the weight changes: in place and replaced
    with torch.no_grad():
        conv.weight.mul_(-2.0)
        packed.weight.mul_(-2.0)
    check(cl(torch.randn(2, cfg["in_channels"], 17, 23).to(dtype)))
    with torch.no_grad():
        new = torch.randn_like(conv.weight)
        conv.weight.data = new.clone()
        packed.weight.data = new.clone()
    check(cl(torch.randn(2, cfg["in_channels"], 17, 23).to(dtype)))
    assert all(packed_calls)


def test_plain_convolution_where_the_copy_does_not_apply(packed_calls):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    packed = PackedConv2d.from_conv(copy.deepcopy(conv))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), conv(x))  # NCHW input
    # gradients: the plain convolution, the same gradients as nn.Conv2d
    xa, xb = cl(x).requires_grad_(), cl(x).requires_grad_()
    packed(xa).sum().backward()
    conv(xb).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(packed.weight.grad, conv.weight.grad)
    assert packed_calls == [False, False]
    # padding given as a string, another padding mode: left as they are
    for other in (nn.Conv2d(4, 6, 3, padding="same"), nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")):
        assert PackedConv2d.from_conv(other) is other


def test_copies_and_fx():
    conv = PackedConv2d.from_conv(nn.Conv2d(4, 6, 3, stride=2, padding=1).eval())
    x = cl(torch.randn(2, 4, 10, 10))
    with torch.no_grad():
        want = conv(x)
        for other in (copy.deepcopy(conv), torch.fx.symbolic_trace(nn.Sequential(conv))):
            torch.testing.assert_close(other(x), want)


def test_traced_graphs_take_the_standard_convolution(monkeypatch):
    """torch.export (and torch.compile, ONNX export) record F.conv2d: the copy is an eager detail."""
    conv = PackedConv2d.from_conv(nn.Conv2d(4, 6, 3, stride=2, padding=1).eval())
    x = cl(torch.randn(2, 4, 10, 10))
    program = torch.export.export(nn.Sequential(conv), (x,))
    assert "mkldnn" not in str(program.graph)
    # nor the cpu backend's depthwise kernel where the layer has its taps
    monkeypatch.setenv(dense.PACKED_KERNEL_ENV_VAR, "1")
    if dense.packed_kernel_unavailable_reason() is None:
        kernel = PackedConv2d.from_conv(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4).eval())
        assert kernel.weight._rest_onednn_packed.for_kernel
        graph = str(torch.export.export(nn.Sequential(kernel), (x,)).graph)
        assert "rest_kernels" not in graph and "mkldnn" not in graph
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), conv(x))
