"""The MLP branch as one autograd function (rest/lean_mlp.py): the modules' results and gradients, less
kept for the backward (exactly the widths its docstring says), and the modules wherever the function
may not run."""
import pytest
import torch
import torch.nn as nn

from rest.lean_mlp import MLP_RECOMPUTE, check_mlp_recompute, norm_mlp
from rest.layers import Block
from rest.models import ResT
from rest.models_v2 import ResTV2
from rest_kernels.diagnostics import saved_tensor_bytes

SMALL_V1 = dict(num_classes=5, embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), depths=(1, 1, 1, 1))
SMALL_V2 = dict(num_classes=5, embed_dims=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), depths=(1, 1, 1, 1))


def saved_storage_bytes(fn, x):
    return saved_tensor_bytes(fn, x)[1]


def _run(cls, cfg, mode, dtype, x, autocast=False, **kwargs):
    torch.manual_seed(0)
    model = cls(**cfg, backend="cpu", mlp_recompute=mode, drop_path_rate=0.1, **kwargs).to(dtype).train()
    torch.manual_seed(1)  # the same stochastic-depth draws in every mode
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x.to(dtype))
    out.float().square().sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("cls, cfg", [(ResT, SMALL_V1), (ResTV2, SMALL_V2)], ids=["v1", "v2"])
@pytest.mark.parametrize("dtype, linear_impl, autocast", [
    (torch.float64, "auto", False), (torch.float32, "onednn", False), (torch.float32, "aten", False),
    (torch.float32, "auto", True)], ids=["f64", "f32-onednn", "f32-aten", "bf16-autocast"])
@pytest.mark.parametrize("mode", ["gelu", "hidden"])
def test_results_and_gradients_are_the_modules(cls, cfg, dtype, linear_impl, autocast, mode):
    # The function runs the modules' own ops (native_layer_norm on the same input, the same products,
    # aten's gelu_backward), so the results agree to rounding; the bound allows the products' order of
    # summation (rows reshaped differently) to differ: 1e-12 of the largest value in float64, 1e-5 in
    # float32, one bf16 unit (2^-8) under autocast.
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}[dtype] if not autocast else 2 ** -8
    x = torch.randn(2, 3, 61, 45, generator=torch.Generator().manual_seed(2))
    out0, g0 = _run(cls, cfg, "none", dtype, x, autocast, linear_impl=linear_impl)
    out, g = _run(cls, cfg, mode, dtype, x, autocast, linear_impl=linear_impl)
    torch.testing.assert_close(out, out0, rtol=0, atol=tol * out0.abs().max().item())
    assert g.keys() == g0.keys()
    for k in g0:
        torch.testing.assert_close(g[k], g0[k], rtol=0, atol=tol * g0[k].abs().max().item() + 1e-30, msg=k)


def _block(mode, C=24, drop=0.0):
    torch.manual_seed(0)
    blk = Block(C, 2, sr_ratio=2, drop=drop, backend="cpu").double()
    blk.mlp_recompute = mode
    return blk


@pytest.mark.parametrize("mode", ["gelu", "hidden"])
def test_gradcheck(mode):
    blk = _block(mode, C=8)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    params = (blk.norm2.weight, blk.norm2.bias, blk.mlp.fc1.weight, blk.mlp.fc1.bias, blk.mlp.fc2.weight,
              blk.mlp.fc2.bias)

    def branch(x, *ps):
        return norm_mlp(x, blk.norm2, blk.mlp, mode)
    assert torch.autograd.gradcheck(branch, (x,) + params)


def test_what_each_mode_keeps_for_the_backward():
    """Bytes of the distinct storages autograd keeps for one MLP branch (T tokens, C wide, float64):
    "none" keeps the LayerNorm input, fc1's input, the GELU's input and fc2's input (C + C + 4C + 4C),
    "gelu" the LayerNorm input and fc1's output (C + 4C), "hidden" the LayerNorm input (C); every mode
    keeps the LayerNorm statistics and the weights it multiplies by."""
    B, N, C = 2, 35, 24
    T, el = B * N, 8
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    kept = {mode: saved_storage_bytes(_block(mode, C)._mlp_branch, x) for mode in ("none", "gelu", "hidden")}
    assert kept["none"] - kept["gelu"] == (C + 4 * C) * T * el
    # "hidden" also holds fc1's bias, to recompute fc1 (a parameter: counted here, alive anyway)
    assert kept["gelu"] - kept["hidden"] == 4 * C * T * el - 4 * C * el


def test_the_modules_run_where_the_function_may_not():
    x = torch.randn(2, 35, 24, dtype=torch.float64, requires_grad=True)
    seen = []
    blk = _block("gelu")
    handle = blk.mlp.fc1.register_forward_hook(lambda *a: seen.append("hook"))
    blk._mlp_branch(x)
    handle.remove()
    assert seen == ["hook"]  # a hook on a module: the modules run, so the hook does
    # dropout in training: the modules (the function has no dropout)
    blk = _block("gelu", drop=0.5).train()
    assert saved_storage_bytes(blk._mlp_branch, x) == saved_storage_bytes(_block("none", drop=0.5).train()._mlp_branch, x)
    # the reference backend's "auto" is "none": its model is the official modules
    ref = Block(24, 2, sr_ratio=2, backend="reference").double()
    assert saved_storage_bytes(ref._mlp_branch, x) == saved_storage_bytes(_block("none")._mlp_branch, x)


def test_double_backward_needs_mode_none():
    x = torch.randn(2, 35, 24, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(_block("none")._mlp_branch(x).square().sum(), x, create_graph=True)
    g.sum().backward()  # the modules: a double backward
    (g,) = torch.autograd.grad(_block("gelu")._mlp_branch(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_the_option_is_checked_and_reaches_every_block():
    assert MLP_RECOMPUTE == ("auto", "none", "gelu", "hidden")
    with pytest.raises(ValueError, match="mlp_recompute"):
        ResT(**SMALL_V1, mlp_recompute="all")
    with pytest.raises(TypeError, match="mlp_recompute"):
        check_mlp_recompute(1)
    model = ResTV2(**SMALL_V2, mlp_recompute="hidden")
    blocks = [m for m in model.modules() if hasattr(m, "mlp")]
    assert blocks and all(b.mlp_recompute == "hidden" for b in blocks)
    model.set_mlp_recompute("none")
    assert all(b.mlp_recompute == "none" for b in blocks) and model.mlp_recompute == "none"
    assert isinstance(model.stage1[0].norm2, nn.LayerNorm)
