"""Mixed precision: the ops under torch.autocast run in the autocast dtype with float32 logits, softmax
and InstanceNorm statistics, and stay close to the float32 results (op and model level).

CUDA float16 / bfloat16 cases skip without a GPU; CPU bfloat16 always runs. Measured figures are in
docs/ecosystem.md ("Mixed precision").
"""
from __future__ import annotations

import pytest
import torch

import rest
import rest_kernels
from rest_kernels.backends import registry

from support import conformance
from support.fused_route import ReferenceKernelsAsCpu, fused_cpu_route

CASES = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=pytest.mark.gpu),
]


def need(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def rel_err(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def inputs(device, logit_scale=1.0, mix=True):
    # float32 leaves, as a float32 model hands them to the op; values from a float64 draw
    q, k, v, w, b = conformance.emsa_inputs(2, 4, 64, 16, 32, torch.float64, mix, logit_scale=logit_scale)
    return [t.detach().to(device=device, dtype=torch.float32).requires_grad_(True) if t is not None else None
            for t in (q, k, v, w, b)]


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("logit_scale", [1.0, 0.01])  # 0.01: near-uniform attention, variance ~ eps
def test_emsa_under_autocast_keeps_float32_statistics(device, dtype, logit_scale):
    need(device)
    q, k, v, w, b = inputs(device, logit_scale)
    with torch.autocast(device, dtype=dtype):
        out = rest_kernels.emsa_attention(q, k, v, w, b)
    assert out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    # exactly the op on inputs rounded to the autocast dtype, run outside autocast: autocast did not
    # push the logits / softmax / InstanceNorm of the official math down to 16 bits
    lowp = rest_kernels.emsa_attention(q.to(dtype), k.to(dtype), v.to(dtype), w, b)
    torch.testing.assert_close(out, lowp, rtol=0, atol=0)
    # and so within input rounding of the float64 result. The official math with autocast applied to
    # its matmul and conv (16-bit statistics) is 0.21 off at logit_scale 0.01 in bfloat16.
    oracle = rest_kernels.emsa_attention(*(t.double() for t in (q, k, v, w, b)))
    assert rel_err(out, oracle) <= 2 * torch.finfo(dtype).eps


@pytest.mark.parametrize("device,dtype", CASES)
def test_emsa_autocast_gradients(device, dtype):
    need(device)
    q, k, v, w, b = inputs(device)
    dout = torch.randn(q.shape, device=device, generator=torch.Generator(device).manual_seed(1))
    with torch.autocast(device, dtype=dtype):
        out = rest_kernels.emsa_attention(q, k, v, w, b)
    grads = torch.autograd.grad((out.float() * dout).sum(), (q, k, v, w))
    ref = torch.autograd.grad((rest_kernels.emsa_attention(q, k, v, w, b) * dout).sum(), (q, k, v, w))
    for name, g, r in zip("qkvw", grads, ref):
        assert g.dtype == torch.float32, name  # gradients of the float32 leaves come back in float32
        assert rel_err(g, r) <= 8 * torch.finfo(dtype).eps, name


@pytest.mark.parametrize("device,dtype", CASES)
def test_pa_under_autocast(device, dtype):
    need(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 7, generator=g).to(device)
    weight, bias = torch.randn(8, 1, 3, 3, generator=g).to(device), torch.randn(8, generator=g).to(device)
    with torch.autocast(device, dtype=dtype):
        out = rest_kernels.pa_gate(x, weight, bias)
    assert out.dtype == dtype  # like the depthwise conv2d inside it under autocast
    torch.testing.assert_close(out, rest_kernels.pa_gate(x.to(dtype), weight.to(dtype), bias.to(dtype)))
    assert rel_err(out, rest_kernels.pa_gate(x.double(), weight.double(), bias.double())) <= 4 * torch.finfo(dtype).eps


def test_autocast_hands_fused_kernels_lowp_inputs_and_float32_mix(monkeypatch):
    # what a fused backend's kernels receive under autocast: q, k, v in bfloat16, the mix weight in float32
    seen = {}

    class Spy(ReferenceKernelsAsCpu):
        def _emsa_forward(self, p):
            seen["emsa"] = (p.q.dtype, p.k.dtype, p.v.dtype, p.kernel_weight.dtype)
            return super()._emsa_forward(p)

        def _pa_forward(self, p):
            seen["pa"] = (p.x.dtype, p.weight.dtype, p.bias.dtype)
            return super()._pa_forward(p)

    monkeypatch.setitem(registry.BACKENDS, "cpu", Spy())
    monkeypatch.setitem(registry._availability, "cpu", None)
    q, k, v, w, b = inputs("cpu")
    x, pw, pb = torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.randn(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rest_kernels.emsa_attention(q, k, v, w, b, backend="cpu")
        gate = rest_kernels.pa_gate(x, pw, pb, backend="cpu")
    assert seen["emsa"] == (torch.bfloat16,) * 3 + (torch.float32,)
    assert seen["pa"] == (torch.bfloat16,) * 3
    assert out.dtype == gate.dtype == torch.bfloat16
    out.float().sum().backward()  # the custom op's backward runs on the saved bfloat16 tensors
    assert q.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_float64_inputs_are_left_alone_by_autocast():
    q, k, v, w, b = (t.double() for t in inputs("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rest_kernels.emsa_attention(q, k, v, w, b)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("device,dtype", CASES)
def test_model_under_autocast_stays_close_to_float32(monkeypatch, device, dtype):
    need(device)
    torch.manual_seed(0)
    model = rest.rest_lite().to(device).eval()  # the official init
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    with fused_cpu_route(monkeypatch), torch.no_grad():
        expected = model.double()(x.double())
        model.float()
        reference32 = model(x)
        with torch.autocast(device, dtype=dtype):
            logits = model(x)
    assert logits.dtype == dtype
    # measured on the CPU in bfloat16: 2.6e-2 .. 4.2e-2 over three seeds, the same order as running
    # the whole network in bfloat16 (2.7e-2 .. 3.6e-2) and as autocast with the EMSA / PA ops kept
    # in float32 (2.1e-2 .. 2.8e-2): the 16-bit linear and conv layers dominate, not the attention
    assert rel_err(logits, expected) <= 0.1
    assert rel_err(reference32, expected) <= 1e-3


def test_model_autocast_training_step():
    # a training step under autocast: loss finite, float32 parameter gradients everywhere
    torch.manual_seed(0)
    model = rest.ResT(embed_dims=(16, 32, 64, 128), num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1),
                      apply_transform=True, qkv_bias=True, num_classes=5)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
