"""The public surface of rest_kernels (API.md): backend choice, reasons, validation, custom ops."""
import logging
import subprocess
import sys

import pytest
import torch

from support import conformance
import rest_kernels
from rest_kernels import BackendUnavailableError, emsa_attention, pa_gate, use_backend
from rest_kernels.backends import registry

#: every backend the registry declares: the tests follow the declarations, not a copy of them
BACKEND_NAMES = list(registry.BACKENDS)


def small_inputs(mix=True, dtype=torch.float32):
    return conformance.emsa_inputs(2, 2, 5, 3, 4, dtype, mix)


# --------------------------------------------------------------------------- backend choice
def test_available_backends_lists_every_backend_with_reason_or_none():
    status = rest_kernels.available_backends()
    assert set(status) == {"reference", "triton", "cuda", "cpu", "cuda-emu", "sdpa"}
    assert status["reference"] is None and status["sdpa"] is None
    for name, reason in status.items():
        assert reason is None or (isinstance(reason, str) and reason), name


def test_default_backend_precedence(monkeypatch):
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    assert rest_kernels.default_backend() == "auto"
    monkeypatch.setenv(registry.ENV_VAR, "reference")
    assert rest_kernels.default_backend() == "reference"
    with use_backend("cpu"):
        assert rest_kernels.default_backend() == "cpu"
        with use_backend("auto"):
            assert rest_kernels.default_backend() == "auto"
        assert rest_kernels.default_backend() == "cpu"
    assert rest_kernels.default_backend() == "reference"


def test_bad_backend_names_are_refused(monkeypatch):
    q, k, v, w, b = small_inputs()
    with pytest.raises(ValueError, match="backend must be one of"):
        emsa_attention(q, k, v, backend="fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("nope"):
            pass
    monkeypatch.setenv(registry.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="REST_KERNELS_BACKEND"):
        emsa_attention(q, k, v)


def test_named_backend_that_cannot_serve_raises_with_reason():
    q, k, v, w, b = small_inputs()
    # The cuda backend never serves CPU tensors: the error says why.
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot serve"):
        emsa_attention(q, k, v, w, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot serve"):
        pa_gate(torch.randn(1, 2, 3, 3), torch.randn(2, 1, 3, 3), backend="cuda")


def test_auto_falls_back_to_reference_and_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(registry, "AUTO_ORDER", ("cuda",))  # never serves CPU tensors
    registry._logged_fallbacks.clear()
    q, k, v, w, b = small_inputs()
    with caplog.at_level(logging.WARNING, logger="rest_kernels"):
        out1 = emsa_attention(q, k, v, w, b, backend="auto")
        out2 = emsa_attention(q, k, v, w, b, backend="auto")
    messages = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(messages) == 1 and "reference" in messages[0]
    torch.testing.assert_close(out1, out2)
    torch.testing.assert_close(out1, rest_kernels.emsa_reference(q, k, v, w, b, scale=4 ** -0.5))


# --------------------------------------------------------------------------- semantics
def test_output_layout_is_bnhd_view():
    q, k, v, w, b = small_inputs()
    out = emsa_attention(q, k, v, w, b, backend="reference")
    assert out.shape == (2, 2, 5, 4)
    assert out.transpose(1, 2).is_contiguous()
    flat = out.transpose(1, 2).reshape(2, 5, 8)
    assert flat.data_ptr() == out.data_ptr()  # a view, not a copy


def test_mix_weight_conv_shape_and_default_scale_match_explicit():
    q, k, v, w, b = small_inputs()
    a = emsa_attention(q, k, v, w.reshape(2, 2, 1, 1), b, backend="reference")
    c = emsa_attention(q, k, v, w, b, scale=4 ** -0.5, backend="reference")
    torch.testing.assert_close(a, c)


def test_mix_bias_gradient_is_zero_in_exact_arithmetic():
    q, k, v, w, b = small_inputs(dtype=torch.float64)
    emsa_attention(q, k, v, w, b, backend="reference").sum().backward()
    assert b.grad.abs().max() < 1e-12


def test_empty_inputs_give_empty_results():
    q = torch.randn(0, 2, 5, 4)
    k = v = torch.randn(0, 2, 3, 4)
    assert emsa_attention(q, k, v).shape == (0, 2, 5, 4)
    q = torch.randn(1, 2, 0, 4)
    k = v = torch.randn(1, 2, 3, 4)
    assert emsa_attention(q, k, v, torch.eye(2)).shape == (1, 2, 0, 4)
    assert pa_gate(torch.randn(0, 2, 3, 3), torch.randn(2, 1, 3, 3)).shape == (0, 2, 3, 3)


# --------------------------------------------------------------------------- validation
BAD_EMSA = [
    (lambda q, k, v, w: dict(q=q[0]), ValueError, "q must be 4-dimensional"),
    (lambda q, k, v, w: dict(k=k.int()), TypeError, "k must have a floating dtype"),
    (lambda q, k, v, w: dict(v=torch.complex(v, v)), TypeError, "v must have a floating dtype"),
    (lambda q, k, v, w: dict(q=q.double()), TypeError, "must share one dtype"),
    (lambda q, k, v, w: dict(k=k[:1]), ValueError, "agree on batch and heads"),
    (lambda q, k, v, w: dict(v=v[:, :1]), ValueError, "agree on batch and heads"),
    (lambda q, k, v, w: dict(k=k[..., :3]), ValueError, "k must have head dim 4"),
    (lambda q, k, v, w: dict(v=v[:, :, :2]), ValueError, "v must have as many tokens as k"),
    (lambda q, k, v, w: dict(k=k[:, :, :0], v=v[:, :, :0]), ValueError, "at least one key"),
    (lambda q, k, v, w: dict(mix_weight=torch.randn(3, 3)), ValueError, "mix_weight must have shape"),
    (lambda q, k, v, w: dict(mix_bias=torch.randn(3)), ValueError, "mix_bias must have shape"),
    (lambda q, k, v, w: dict(mix_weight=None, mix_bias=torch.randn(2)), ValueError, "mix_bias is given"),
    (lambda q, k, v, w: dict(eps=-1.0), ValueError, "eps must be >= 0"),
    (lambda q, k, v, w: dict(eps=float("nan")), ValueError, "eps must be finite"),
    (lambda q, k, v, w: dict(scale=float("inf")), ValueError, "scale must be finite"),
    (lambda q, k, v, w: dict(scale="big"), TypeError, "scale must be a real number"),
    (lambda q, k, v, w: dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v, w: dict(mix_weight=w.to("meta")), ValueError, "one device"),
]


@pytest.mark.parametrize("change,exc,message", BAD_EMSA)
@pytest.mark.parametrize("backend", ["auto", *BACKEND_NAMES])
def test_emsa_bad_input_names_the_argument(change, exc, message, backend):
    q, k, v, w, b = small_inputs()
    args = dict(q=q.detach(), k=k.detach(), v=v.detach(), mix_weight=w.detach(), mix_bias=b.detach())
    args.update(change(args["q"], args["k"], args["v"], args["mix_weight"]))
    with pytest.raises(exc, match=message):
        emsa_attention(args.pop("q"), args.pop("k"), args.pop("v"), backend=backend, **args)


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(x=torch.randn(2, 3, 4)), ValueError, "x must be 4-dimensional"),
    (dict(weight=torch.randn(3, 1, 5, 5)), ValueError, r"weight must have shape \(3, 1, 3, 3\)"),
    (dict(weight=torch.randn(2, 1, 3, 3)), ValueError, r"weight must have shape \(3, 1, 3, 3\)"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(3,\)"),
    (dict(x=torch.randint(0, 3, (1, 3, 4, 4))), TypeError, "x must have a floating dtype"),
])
def test_pa_bad_input_names_the_argument(kwargs, exc, message):
    args = dict(x=torch.randn(1, 3, 4, 4), weight=torch.randn(3, 1, 3, 3), bias=torch.randn(3))
    args.update(kwargs)
    with pytest.raises(exc, match=message):
        pa_gate(args["x"], args["weight"], args["bias"])


# --------------------------------------------------------------------------- emsa_attention_map, check_backend_name
@pytest.mark.parametrize("mix", [True, False])
def test_attention_map_times_v_is_emsa_attention(mix):
    q, k, v, w, b = small_inputs(mix=mix, dtype=torch.float64)
    amap = rest_kernels.emsa_attention_map(q, k, w, b)  # default scale d ** -0.5, like emsa_attention
    assert amap.shape == (2, 2, 5, 3) and amap.dtype == torch.float64
    torch.testing.assert_close(amap @ v, emsa_attention(q, k, v, w, b, backend="reference"))
    if not mix:
        torch.testing.assert_close(amap.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))
    # (h, h, 1, 1) as a 1x1 Conv2d stores it, and an explicit scale
    if mix:
        torch.testing.assert_close(rest_kernels.emsa_attention_map(q, k, w.reshape(2, 2, 1, 1), b, scale=0.3),
                                   rest_kernels.emsa_attention_map(q, k, w, b, scale=0.3))


def test_attention_map_gradients_and_low_precision():
    q, k, v, w, b = small_inputs(dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, w: rest_kernels.emsa_attention_map(q, k, w, scale=0.7), (q, k, w))
    q32, k32, w32 = q.detach().float(), k.detach().float(), w.detach().float()
    want = rest_kernels.emsa_attention_map(q32, k32, w32)
    for dtype in (torch.bfloat16, torch.float16):
        got = rest_kernels.emsa_attention_map(q32.to(dtype), k32.to(dtype), w32)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rest_kernels.emsa_attention_map(q32, k32, w32).dtype == torch.bfloat16


def test_attention_map_empty_inputs_and_bad_input():
    w = torch.eye(2)
    assert rest_kernels.emsa_attention_map(torch.randn(0, 2, 5, 4), torch.randn(0, 2, 3, 4), w).shape == (0, 2, 5, 3)
    assert rest_kernels.emsa_attention_map(torch.randn(1, 2, 0, 4), torch.randn(1, 2, 3, 4), w).shape == (1, 2, 0, 3)
    q, k, v, w, b = small_inputs()
    with pytest.raises(ValueError, match="q must be 4-dimensional"):
        rest_kernels.emsa_attention_map(q[0], k, w, b)
    with pytest.raises(ValueError, match="k must have head dim 4"):
        rest_kernels.emsa_attention_map(q, k[..., :3], w, b)
    with pytest.raises(ValueError, match="mix_weight must have shape"):
        rest_kernels.emsa_attention_map(q, k, torch.randn(3, 3))
    with pytest.raises(ValueError, match="eps must be >= 0"):
        rest_kernels.emsa_attention_map(q, k, w, b, eps=-1.0)


def test_check_backend_name():
    for name in ["auto", *BACKEND_NAMES]:
        assert rest_kernels.check_backend_name(name) == name
    with pytest.raises(ValueError, match="backend must be one of"):
        rest_kernels.check_backend_name("fast")
    with pytest.raises(ValueError, match="backend must be one of 'reference'"):
        rest_kernels.check_backend_name("auto", allow_auto=False)
    with pytest.raises(TypeError, match="backend must be a string"):
        rest_kernels.check_backend_name(None)


# --------------------------------------------------------------------------- the custom-op layer
def test_custom_op_autograd_matches_reference_gradients():
    q, k, v, w, b = small_inputs(dtype=torch.float64)
    out = torch.ops.rest_kernels.emsa_fwd(q, k, v, w, b, 0.5, 1e-5, "reference")[0]
    grads = torch.autograd.grad(out.sum(), (q, k, v, w, b))
    ref = torch.autograd.grad(rest_kernels.emsa_reference(q, k, v, w, b, 0.5, 1e-5).sum(), (q, k, v, w, b))
    for g, r in zip(grads[:4], ref[:4]):
        torch.testing.assert_close(g, r)
    assert torch.count_nonzero(grads[4]) == 0  # the mix bias gradient is exactly zero


def test_gradcheck_reference_pa():
    # EMSA's gradcheck runs for every backend in tests/test_conformance.py
    conformance.gradcheck_pa("reference")


def test_torch_compile_fullgraph_no_graph_break():
    q, k, v, w, b = small_inputs()

    def fn(q, k, v, w, b):
        return emsa_attention(q, k, v, w, b) * 2

    explanation = torch._dynamo.explain(fn)(q, k, v, w, b)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, w, b), fn(q, k, v, w, b))


def test_info_command_runs():
    out = subprocess.run([sys.executable, "-m", "rest_kernels", "info"], capture_output=True, text=True, check=True)
    assert "backends:" in out.stdout and "reference  available" in out.stdout


def test_custom_op_called_first_loads_the_extension():
    # torch.ops.rest_kernels.emsa_fwd(..., "cpu") as the first call of a process: the compiled backends
    # are only registered once rest_kernels._C is imported, which used to happen only through the
    # public ops (an AttributeError on torch.ops.rest_kernels_C otherwise).
    code = ("import torch, rest_kernels\n"
            "q = torch.randn(1, 2, 3, 4)\n"
            "out = torch.ops.rest_kernels.emsa_fwd(q, q, q, None, None, 0.5, 1e-5, 'cpu')[0]\n"
            "ref = rest_kernels.emsa_reference(q, q, q, None, None, 0.5)\n"
            "torch.testing.assert_close(out, ref)\n"
            "print('ok')\n")
    if rest_kernels.available_backends()["cpu"] is not None:
        pytest.skip("backend 'cpu' unavailable: " + rest_kernels.available_backends()["cpu"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("call,exc,message", [
    (lambda q, w: torch.ops.rest_kernels.emsa_fwd(q.int(), q, q, w, None, 0.5, 1e-5, "cpu"), TypeError,
     "q must have a floating dtype"),
    (lambda q, w: torch.ops.rest_kernels.emsa_fwd(q, q, q, torch.eye(3), None, 0.5, 1e-5, "reference"), ValueError,
     "mix_weight must have shape"),
    (lambda q, w: torch.ops.rest_kernels.emsa_fwd(q, q, q, w, None, 0.5, float("nan"), "triton"), ValueError,
     "eps must be finite"),
    (lambda q, w: torch.ops.rest_kernels.emsa_fwd(q, q, q, w, None, 0.5, 1e-5, "auto"), ValueError,
     "backend must be one of"),
    (lambda q, w: torch.ops.rest_kernels.emsa_fwd(q, q, q, w, None, 0.5, 1e-5, "cuda"), BackendUnavailableError,
     "backend 'cuda' cannot serve"),
    (lambda q, w: torch.ops.rest_kernels.emsa_bwd(q, q, q, q, w, q, torch.zeros(1, 2, 3), torch.zeros(1, 2, 3),
                                                  torch.zeros(2, 1), 0.5, 1e-5, "cpu"), ValueError,
     r"rstd must have shape \(1, 2\)"),
    (lambda q, w: torch.ops.rest_kernels.emsa_bwd(q[..., :2], q, q, q, w, q, torch.zeros(1, 2, 3),
                                                  torch.zeros(1, 2, 3), torch.zeros(1, 2), 0.5, 1e-5, "triton"),
     ValueError, "dout must have the shape of q"),
    (lambda q, w: torch.ops.rest_kernels.pa_fwd(q, torch.randn(2, 1, 3, 3), torch.randn(3), "cuda-emu"),
     ValueError, r"bias must have shape \(2,\)"),
    (lambda q, w: torch.ops.rest_kernels.pa_bwd(q.double(), q, torch.randn(2, 1, 3, 3), None, "cpu"), TypeError,
     "dout must have x's dtype"),
])
def test_custom_ops_check_their_arguments(call, exc, message):
    q, w = torch.randn(1, 2, 3, 4), torch.randn(2, 2)
    with pytest.raises(exc, match=message):
        call(q, w)


def test_non_string_backend_is_a_type_error():
    q, k, v, w, b = small_inputs()
    with pytest.raises(TypeError, match="backend must be a string"):
        emsa_attention(q, k, v, backend=3)


def test_head_dim_zero_and_named_backend_on_empty_inputs():
    # d = 0: the default scale d ** -0.5 used to raise ZeroDivisionError; the result is empty
    q = torch.randn(2, 2, 5, 0)
    k = v = torch.randn(2, 2, 3, 0)
    assert emsa_attention(q, k, v, torch.eye(2), backend="reference").shape == (2, 2, 5, 0)
    # a named backend that cannot serve says so whatever the size of the inputs
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot serve"):
        emsa_attention(q, k, v, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot serve"):
        pa_gate(torch.randn(0, 2, 3, 3), torch.randn(2, 1, 3, 3), backend="cuda")


def test_custom_op_with_one_meta_tensor_names_the_devices():
    # one meta tensor routes the whole call to the fake implementation: it checks devices too
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="one device.*v on meta"):
        torch.ops.rest_kernels.emsa_fwd(q, q, q.to("meta"), None, None, 0.5, 1e-5, "cpu")
    with pytest.raises(ValueError, match="one device.*bias on meta"):
        torch.ops.rest_kernels.pa_fwd(q, torch.randn(2, 1, 3, 3), torch.randn(2, device="meta"), "cpu")
