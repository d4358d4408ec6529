"""Checks every fused backend must pass, written once and called by each backend's test module.

- official cases: rest.EMSA / rest.PA with the fixture weights, through a backend, against the
  official float64 outputs and gradients (tests/data);
- op level: emsa_attention / pa_gate against the reference on random inputs with the strides the
  model produces, awkward sizes, every dtype the backend takes;
- the statistics contract of rest_kernels/backends/stats.py (lse, rsq, rstd);
- torch.library.opcheck and float64 gradcheck.

Tolerances: float64 about 1e-9 relative, float32 about 1e-4 relative to the scale of the tensor.
float16 / bfloat16 follow the flash-attention rule: the backend's error against the float64 oracle
is at most 2x the error of the reference run in that dtype, plus a rounding allowance.
"""
from __future__ import annotations

import torch

import rest_kernels
from rest_kernels.backends.stats import stat_dtype
from rest_kernels.diagnostics import saved_tensor_bytes, saved_tensors_of  # noqa: F401 (re-exported)
from rest import EMSA, PA
from support.reference_data import attention_cases, fill_weights, pa_cases

RTOL = {torch.float64: 1e-9, torch.float32: 1e-4}
# Gradients that are exactly zero in exact arithmetic (see tests/data/README.md): compare
# them against the scale of the case, not against themselves.
ZERO_GRAD_KEYS = ("transform_conv.bias", "kv.bias", "sr_norm.bias")


def assert_close_scaled(actual, expected, rtol, what, floor=None):
    """max|a - e| <= rtol * max(max|e|, floor): an error relative to the tensor's scale."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    if floor is not None:
        scale = max(scale, floor)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30), f"{what}: max abs error {err:.3e} > {rtol:.1e} x scale {scale:.3e}"


# For the exactly-zero gradients: the rule of tests/data/README.md, norms against the larger of their own
# norm and 1e-3 of the largest gradient norm (official float32 code lands near 1e-4 of that floor).
ZERO_GRAD_RTOL = {torch.float64: 1e-9, torch.float32: 1e-3}


def assert_zero_grad_close(actual, expected, largest_norm, dtype, what):
    scale = max(expected.norm().item(), 1e-3 * largest_norm)
    err = (actual.double() - expected.double()).norm().item()
    assert err <= ZERO_GRAD_RTOL[dtype] * scale, f"{what}: error norm {err:.3e} > {ZERO_GRAD_RTOL[dtype]:.0e} x {scale:.3e}"


def assert_lowp_close(actual, ref_lowp, oracle, what, atol_rounding=None):
    """flash-attention rule: |actual - oracle| <= 2 |ref_lowp - oracle| + rounding."""
    eps = torch.finfo(actual.dtype).eps
    oracle = oracle.double()
    err = (actual.double() - oracle).abs().max().item()
    ref_err = (ref_lowp.double() - oracle).abs().max().item()
    allowance = atol_rounding if atol_rounding is not None else eps * oracle.abs().max().item()
    assert err <= 2 * ref_err + allowance, (
        f"{what}: error {err:.3e} > 2 x reference error {ref_err:.3e} + rounding {allowance:.3e}")


# --------------------------------------------------------------------------- official cases
def run_attention_case(case, backend, dtype, device="cpu"):
    """Outputs and gradients of one official case, returned on the CPU."""
    cfg = case["config"]
    m = EMSA(cfg["dim"], cfg["num_heads"], qkv_bias=True, sr_ratio=cfg["sr_ratio"],
             apply_transform=cfg["apply_transform"], backend=backend).double()
    fill_weights(m, cfg["seed"])
    m = m.to(device=device, dtype=dtype)
    x = case["x"].detach().to(device=device, dtype=dtype, copy=True).requires_grad_(True)
    out = m(x, cfg["H"], cfg["W"])
    out.backward(case["dout"].to(device=device, dtype=dtype))
    return out.cpu(), x.grad.cpu(), {n: p.grad.cpu() for n, p in m.named_parameters()}


def check_attention_cases(backend, dtype, cases=None, device="cpu"):
    """Every official attention case through `backend` in `dtype` (float32 or float64)."""
    rtol = RTOL[dtype]
    for case in cases if cases is not None else attention_cases():
        cfg = case["config"]
        out, grad_x, grads = run_attention_case(case, backend, dtype, device)
        tag = f"{backend} {dtype} {cfg}"
        assert_close_scaled(out, case["out"], rtol, f"out [{tag}]")
        assert_close_scaled(grad_x, case["grad_x"], rtol, f"grad_x [{tag}]")
        largest = max(g.norm().item() for g in case["grads"].values())
        for name, expected in case["grads"].items():
            if name in ZERO_GRAD_KEYS:
                assert_zero_grad_close(grads[name], expected, largest, dtype, f"grad {name} [{tag}]")
            else:
                assert_close_scaled(grads[name], expected, rtol, f"grad {name} [{tag}]")


def check_pa_cases(backend, dtype, device="cpu"):
    rtol = RTOL[dtype]
    for case in pa_cases():
        cfg = case["config"]
        m = PA(cfg["C"], backend=backend).double()
        fill_weights(m, cfg["seed"])
        m = m.to(device=device, dtype=dtype)
        x = case["x"].detach().to(device=device, dtype=dtype, copy=True).requires_grad_(True)
        out = m(x)
        out.backward(case["dout"].to(device=device, dtype=dtype))
        tag = f"{backend} {dtype} {cfg}"
        assert_close_scaled(out.cpu(), case["out"], rtol, f"out [{tag}]")
        assert_close_scaled(x.grad.cpu(), case["grad_x"], rtol, f"grad_x [{tag}]")
        for name, p in m.named_parameters():
            assert_close_scaled(p.grad.cpu(), case["grads"][name], rtol, f"grad {name} [{tag}]")


# --------------------------------------------------------------------------- op level
def emsa_inputs(B, h, N, M, d, dtype=torch.float32, mix=True, layout="model", device="cpu", seed=0,
                logit_scale=1.0):
    """q, k, v, mix_weight, mix_bias as leaves. layout "model": q, k, v are strided views of
    (B, N, h*d) / (B, M, 2, h, d) projection outputs as rest.EMSA passes them; "contiguous":
    plain (B,h,*,d) tensors; "transposed": views with the last dim not contiguous."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if layout == "model":
        q = (rnd(B, N, h * d) * logit_scale).view(B, N, h, d).transpose(1, 2)
        kv = rnd(B, M, 2, h, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    elif layout == "contiguous":
        q, k, v = rnd(B, h, N, d) * logit_scale, rnd(B, h, M, d), rnd(B, h, M, d)
    elif layout == "transposed":
        q = (rnd(B, h, d, N) * logit_scale).transpose(2, 3)
        k, v = rnd(B, h, d, M).transpose(2, 3), rnd(B, h, d, M).transpose(2, 3)
    else:
        raise ValueError(layout)

    def leaf(t):
        t = t.to(device)
        # keep the view's strides while making it a leaf of the wanted dtype
        base = t.to(dtype) if t.dtype != dtype else t
        return base.detach().requires_grad_(True)

    if layout != "contiguous":
        # rebuild the same strided views in the target dtype
        def leaf(t, _device=device):  # noqa: F811
            storage = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=_device)
            storage.copy_(t)
            return storage.detach().requires_grad_(True)

    q, k, v = leaf(q), leaf(k), leaf(v)
    w = b = None
    if mix:
        w = (rnd(h, h) * h ** -0.5).to(device=device, dtype=dtype).requires_grad_(True)
        b = (0.1 * rnd(h)).to(device=device, dtype=dtype).requires_grad_(True)
    return q, k, v, w, b


def _emsa_outputs_and_grads(fn, q, k, v, w, b, dout):
    leaves = [t for t in (q, k, v, w, b) if t is not None]
    out = fn(q, k, v, w, b)
    grads = torch.autograd.grad(out, leaves, dout)
    return out, grads


def _as_leaves(tensors, dtype):
    res = []
    for t in tensors:
        if t is None:
            res.append(None)
            continue
        c = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=t.device)
        c.copy_(t.detach())
        res.append(c.requires_grad_(True))
    return res


def check_emsa_op(backend, B, h, N, M, d, dtype, mix=True, layout="model", device="cpu", seed=0, logit_scale=1.0):
    """emsa_attention through `backend` against the reference: output, dq, dk, dv, dmix, dbias."""
    q, k, v, w, b = emsa_inputs(B, h, N, M, d, torch.float64, mix, layout, device, seed, logit_scale)
    dout = torch.randn(B, h, N, d, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64).to(device)

    def ref(q, k, v, w, b):
        return rest_kernels.emsa_attention(q, k, v, w, b, backend="reference")

    def fused(q, k, v, w, b):
        return rest_kernels.emsa_attention(q, k, v, w, b, backend=backend)

    oracle = _emsa_outputs_and_grads(ref, q, k, v, w, b, dout)
    lq = _as_leaves((q, k, v, w, b), dtype)
    got = _emsa_outputs_and_grads(fused, *lq, dout.to(dtype))
    assert got[0].shape == (B, h, N, d) and got[0].dtype == dtype
    assert got[0].transpose(1, 2).is_contiguous(), "output must be laid out as (B, N, h, d)"
    names = ["out", "dq", "dk", "dv", "dmix", "dbias"][: len(got[1]) + 1]
    tag = f"{backend} B{B} h{h} N{N} M{M} d{d} {dtype} mix={mix} {layout}"
    if dtype in RTOL:
        # Gradients that vanish in exact arithmetic (dbias always; dq, dk, dmix when M = 1) are
        # compared against the scale of the case, as tests/data/README.md prescribes.
        largest = max(t.abs().max().item() for t in oracle[1])
        for name, a, e in zip(names, (got[0],) + tuple(got[1]), (oracle[0],) + tuple(oracle[1])):
            floor = 1e-3 * largest if name != "out" else None
            assert_close_scaled(a, e, RTOL[dtype], f"{name} [{tag}]", floor=floor)
    else:
        lr = _as_leaves((q, k, v, w, b), dtype)
        ref_lowp = _emsa_outputs_and_grads(ref, *lr, dout.to(dtype))
        for name, a, r, e in zip(names, (got[0],) + tuple(got[1]), (ref_lowp[0],) + tuple(ref_lowp[1]),
                                 (oracle[0],) + tuple(oracle[1])):
            if name == "dbias":  # exactly zero in exact arithmetic; the reference holds noise
                assert a.abs().max().item() <= 2 * r.abs().max().item() + 1e-3 * e.abs().max().item() + 1e-6
                continue
            assert_lowp_close(a, r, e, f"{name} [{tag}]")


def check_emsa_stats(backend, B, h, N, M, d, dtype=torch.float32, mix=True, device="cpu"):
    """The backend's (lse, rsq, rstd) equal the reference's: the contract of backends/stats.py."""
    from rest_kernels.backends.registry import BACKENDS
    q, k, v, w, _ = emsa_inputs(B, h, N, M, d, dtype, mix, "model", device)
    w32 = w.detach().float().contiguous() if w is not None else None
    scale = d ** -0.5
    with torch.no_grad():
        exp = BACKENDS["reference"].emsa_forward(q.double(), k.double(), v.double(),
                                                 w32.double() if w32 is not None else None, scale, 1e-5)
        got = BACKENDS[backend].emsa_forward(q, k, v, w32, scale, 1e-5)
    tol = 1e-9 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, e in zip(("out", "lse", "rsq", "rstd"), got, exp):
        if not mix and name in ("rsq", "rstd"):
            assert a.shape == (0,), f"{name} must be empty without the mix, got {tuple(a.shape)}"
            continue
        assert a.dtype == (dtype if name == "out" else stat_dtype(dtype)), f"{name} dtype {a.dtype}"
        # the statistics are float32 (float64 for float64 inputs): float32 rounding bounds them
        assert_close_scaled(a, e, tol if name == "out" else max(tol, 1e-6), f"stat {name} [{backend}]")


def opcheck_emsa(backend, dtype=torch.float32, device="cpu", mix=True, N=5, M=3):
    """torch.library.opcheck of the public custom ops (fwd and its autograd, bwd) on `backend`."""
    q, k, v, w, b = emsa_inputs(2, 2, N, M, 8, dtype, mix, "model", device)
    scale = 8 ** -0.5
    torch.library.opcheck(torch.ops.rest_kernels.emsa_fwd.default, (q, k, v, w, b, scale, 1e-5, backend))
    out, lse, rsq, rstd = torch.ops.rest_kernels.emsa_fwd(q, k, v, w, b, scale, 1e-5, backend)
    dout = torch.randn_like(out)
    w32 = w.detach().float() if w is not None else None
    torch.library.opcheck(torch.ops.rest_kernels.emsa_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), w32, out.detach(), lse, rsq, rstd,
                           scale, 1e-5, backend))


def opcheck_pa(backend, dtype=torch.float32, device="cpu", bias=True, channels_last=False):
    # channels_last: the fake implementations must promise the real results' strides (channels-last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 5, 7, dtype=dtype, device=device).contiguous(memory_format=fmt).requires_grad_(True)
    w = torch.randn(3, 1, 3, 3, dtype=dtype, device=device, requires_grad=True)
    b = torch.randn(3, dtype=dtype, device=device, requires_grad=True) if bias else None
    torch.library.opcheck(torch.ops.rest_kernels.pa_fwd.default, (x, w, b, backend))
    torch.library.opcheck(torch.ops.rest_kernels.pa_bwd.default,
                          (torch.randn_like(x), x.detach(), w.detach(), b.detach() if b is not None else None, backend))


def gradcheck_emsa(backend, mix=True, device="cpu", B=1, h=2, N=4, M=3, d=3):
    q, k, v, w, b = emsa_inputs(B, h, N, M, d, torch.float64, mix, "model", device)
    fn = lambda q, k, v, w: rest_kernels.emsa_attention(q, k, v, w, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, w), eps=1e-6, atol=1e-7, rtol=1e-5)


def gradcheck_pa(backend, device="cpu", channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, device=device).contiguous(memory_format=fmt).requires_grad_(True)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: rest_kernels.pa_gate(x, w, b, backend=backend), (x, w, b))


def check_pa_op(backend, B, C, H, W, dtype, bias=True, device="cpu", channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(C, 1, 3, 3, generator=g, dtype=torch.float64) / 3
    b = 0.1 * torch.randn(C, generator=g, dtype=torch.float64) if bias else None
    dout = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def run(dt, bk):
        leaves = _as_leaves([t.to(device) if t is not None else None for t in (x, w, b)], dt)
        out = rest_kernels.pa_gate(*leaves, backend=bk)
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None], dout.to(device, dt))
        return (out,) + tuple(grads)

    oracle = run(torch.float64, "reference")
    got = run(dtype, backend)
    names = ["out", "dx", "dweight", "dbias"]
    tag = f"{backend} B{B} C{C} H{H} W{W} {dtype} bias={bias} channels_last={channels_last}"
    # out and dx keep x's layout (channels-last in, channels-last out), as PyTorch's own ops do
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for name, t in zip(names[:2], got[:2]):
        assert t.is_contiguous(memory_format=fmt), f"{name} [{tag}]: not {fmt}, strides {t.stride()}"
    if dtype in RTOL:
        for name, a, e in zip(names, got, oracle):
            assert_close_scaled(a, e, RTOL[dtype], f"{name} [{tag}]")
    else:
        ref_lowp = run(dtype, "reference")
        for name, a, r, e in zip(names, got, ref_lowp, oracle):
            assert_lowp_close(a, r, e, f"{name} [{tag}]")
