"""rest.batchnorm.BatchNorm2d: nn.BatchNorm2d with accurate training statistics on channels-last CPU
maps (rest/batchnorm.py says why), the same module in every other respect."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rest.batchnorm import BatchNorm2d
from support.reference_data import randn

CL = torch.channels_last


def pair(C=6, **kwargs):
    """Ours and nn.BatchNorm2d with the same (non-trivial) affine parameters, in float64."""
    ours, theirs = BatchNorm2d(C, **kwargs).double(), nn.BatchNorm2d(C, **kwargs).double()
    if ours.affine:
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(torch.linspace(0.5, 1.5, C, dtype=torch.float64))
                m.bias.copy_(torch.linspace(-1, 1, C, dtype=torch.float64))
    return ours, theirs


def run(module, x, dy):
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    grads = [p.grad for p in module.parameters()]
    return y, x.grad, grads


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}],
                         ids=["default", "cumulative", "no-affine", "no-running-stats"])
def test_matches_nn_batchnorm_in_float64(kwargs):
    ours, theirs = pair(**kwargs)
    for step in range(2):  # two steps: the running averages move twice
        x = (3 + 2 * randn((3, 6, 7, 5), step)).contiguous(memory_format=CL)
        dy = randn((3, 6, 7, 5), 10 + step).contiguous(memory_format=CL)
        y, dx, grads = run(ours, x, dy)
        y_ref, dx_ref, grads_ref = run(theirs, x, dy)
        assert y.is_contiguous(memory_format=CL) and dx.is_contiguous(memory_format=CL)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
        for name, buf in theirs.named_buffers():
            torch.testing.assert_close(dict(ours.named_buffers())[name], buf, rtol=1e-12, atol=1e-12)
        for m in (ours, theirs):
            m.zero_grad()
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_eval_and_nchw_take_nn_batchnorms_own_path():
    ours, theirs = pair()
    ours.load_state_dict(theirs.state_dict())
    x = randn((2, 6, 5, 4), 3)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))  # NCHW, training
        ours.eval(), theirs.eval()
        assert torch.equal(ours(x.contiguous(memory_format=CL)), theirs(x.contiguous(memory_format=CL)))


def test_float32_channels_last_is_as_accurate_as_nchw():
    """The reason for the module: on a channels-last map in training, its float32 output and
    gradients err no more than twice nn.BatchNorm2d's own float32 error on the NCHW map (the rule of
    the project), same statistic, against float64 on the same float32 input."""
    x = (3 + 2 * randn((4, 32, 56, 56), 21)).float()
    dy = randn((4, 32, 56, 56), 22).float()
    exact = run(pair(32)[1], x.double(), dy.double())

    def errors(module, layout):
        y, dx, grads = run(module.float(), x.contiguous(memory_format=layout), dy.contiguous(memory_format=layout))
        return [((a.double() - e).norm() / e.norm()).item() for a, e in zip([y, dx, *grads], [exact[0], exact[1], *exact[2]])]

    ours = errors(pair(32)[0], CL)
    nchw = errors(pair(32)[1], torch.contiguous_format)
    eps = torch.finfo(torch.float32).eps
    for what, a, b in zip(["y", "dx", "dweight", "dbias"], ours, nchw):
        assert a <= 2 * b + 4 * eps, f"{what}: relative error {a:.2e} > 2 x NCHW's {b:.2e} + rounding"


def test_gradcheck_channels_last_float64():
    m = pair(3)[0]
    x = randn((2, 3, 4, 5), 31).contiguous(memory_format=CL).requires_grad_(True)

    def f(t, w, b):
        assert t.is_contiguous(memory_format=CL)  # the accurate path, not nn.BatchNorm2d's
        return torch.func.functional_call(m, {"weight": w, "bias": b}, (t,))

    assert torch.autograd.gradcheck(f, (x, m.weight, m.bias))
    assert torch.autograd.gradgradcheck(f, (x, m.weight, m.bias))


def test_inplace_relu_after_it_and_one_value_per_channel_refused():
    m = pair(4)[0]
    x = randn((2, 4, 3, 3), 41).contiguous(memory_format=CL).requires_grad_(True)
    F.relu(m(x), inplace=True).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(randn((1, 4, 1, 1), 42).contiguous(memory_format=CL))
