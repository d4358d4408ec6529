"""Hostile calls to the ops: rest_kernels.emsa_attention / pa_gate in every backend, the custom ops
torch.ops.rest_kernels.* and the raw compiled ops torch.ops.rest_kernels_C.* called directly, and
autograd misuse (inference mode, a second backward, double backward)."""
from __future__ import annotations

import functools

import torch

import rest_kernels
from rest_kernels import emsa_attention, emsa_reference, pa_gate, pa_reference
from rest_kernels.backends.registry import BACKENDS as BACKEND_OBJECTS

from ._common import (BACKENDS, BF16, CORRECT, F16, F32, F64, KERNEL_BACKENDS, RAW_SUFFIXES, Case, Correct, Raises,
                      _rand, _scale, _up, assert_matches, check_emsa, check_emsa_grads, check_pa, emsa_args,
                      emsa_expect, pa_args, pa_expect, type_error, value_error)


def _emsa_bad_inputs():
    """(name, change(args) -> kwargs of emsa_attention, expected): one broken thing each."""
    meta = torch.device("meta")
    return [
        ("q-3d", lambda a: dict(q=a["q"][0]), value_error(r"q must be 4-dimensional")),
        ("k-5d", lambda a: dict(k=a["k"][None]), value_error(r"k must be 4-dimensional")),
        ("v-scalar", lambda a: dict(v=torch.tensor(1.0)), value_error(r"v must be 4-dimensional")),
        ("q-list", lambda a: dict(q=a["q"].tolist()), type_error(r"q must be a torch\.Tensor")),
        ("k-none", lambda a: dict(k=None), type_error(r"k must be a torch\.Tensor")),
        ("v-numpy", lambda a: dict(v=a["v"].numpy()), type_error(r"v must be a torch\.Tensor")),
        ("q-int32", lambda a: dict(q=a["q"].int()), type_error(r"q must have a floating dtype")),
        ("k-int64", lambda a: dict(k=a["k"].long()), type_error(r"k must have a floating dtype")),
        ("v-bool", lambda a: dict(v=a["v"] > 0), type_error(r"v must have a floating dtype")),
        ("q-complex", lambda a: dict(q=torch.complex(a["q"], a["q"])), type_error(r"q must have a floating dtype")),
        ("v-uint8", lambda a: dict(v=a["v"].to(torch.uint8)), type_error(r"v must have a floating dtype")),
        ("k-float64", lambda a: dict(k=a["k"].double()), type_error(r"q, k and v must share one dtype")),
        ("v-float16", lambda a: dict(v=a["v"].half()), type_error(r"q, k and v must share one dtype")),
        ("k-batch", lambda a: dict(k=a["k"][:1], v=a["v"][:1]), value_error(r"agree on batch and heads")),
        ("v-heads", lambda a: dict(v=a["v"][:, :1]), value_error(r"agree on batch and heads")),
        ("k-headdim", lambda a: dict(k=a["k"][..., :3]), value_error(r"k must have head dim 4")),
        ("v-headdim", lambda a: dict(v=torch.cat([a["v"], a["v"]], -1)), value_error(r"v must have head dim 4")),
        ("v-tokens", lambda a: dict(v=a["v"][:, :, :2]), value_error(r"v must have as many tokens as k")),
        ("kv-no-keys", lambda a: dict(k=a["k"][:, :, :0], v=a["v"][:, :, :0]), value_error(r"at least one key")),
        ("mix-3x3", lambda a: dict(mix_weight=torch.randn(3, 3)), value_error(r"mix_weight must have shape \(2, 2\)")),
        ("mix-1d", lambda a: dict(mix_weight=torch.randn(2)), value_error(r"mix_weight must be 2 or 4-dimensional")),
        ("mix-2x2x1x2", lambda a: dict(mix_weight=torch.randn(2, 2, 1, 2)), value_error(r"mix_weight must have shape")),
        ("mix-2x3", lambda a: dict(mix_weight=torch.randn(2, 3)), value_error(r"mix_weight must have shape")),
        ("mix-int", lambda a: dict(mix_weight=torch.ones(2, 2, dtype=torch.int64)),
         type_error(r"mix_weight must have a floating dtype")),
        ("mix-complex", lambda a: dict(mix_weight=torch.ones(2, 2, dtype=torch.complex64)),
         type_error(r"mix_weight must have a floating dtype")),
        ("mix-meta", lambda a: dict(mix_weight=a["mix_weight"].to(meta)), value_error(r"one device.*mix_weight on meta")),
        ("k-meta", lambda a: dict(k=a["k"].to(meta)), value_error(r"one device.*k on meta")),
        ("bias-3", lambda a: dict(mix_bias=torch.randn(3)), value_error(r"mix_bias must have shape \(2,\)")),
        ("bias-2d", lambda a: dict(mix_bias=torch.randn(2, 1)), value_error(r"mix_bias must be 1-dimensional")),
        ("bias-int", lambda a: dict(mix_bias=torch.ones(2, dtype=torch.int32)),
         type_error(r"mix_bias must have a floating dtype")),
        ("bias-without-mix", lambda a: dict(mix_weight=None, mix_bias=torch.randn(2)), value_error(r"mix_bias is given")),
        ("eps-negative", lambda a: dict(eps=-1e-5), value_error(r"eps must be >= 0")),
        ("eps-nan", lambda a: dict(eps=float("nan")), value_error(r"eps must be finite")),
        ("eps-inf", lambda a: dict(eps=float("inf")), value_error(r"eps must be finite")),
        ("eps-str", lambda a: dict(eps="1e-5"), type_error(r"eps must be a real number")),
        ("eps-none", lambda a: dict(eps=None), type_error(r"eps must be a real number")),
        ("eps-bool", lambda a: dict(eps=True), type_error(r"eps must be a real number")),
        ("eps-tensor", lambda a: dict(eps=torch.tensor(1e-5)), type_error(r"eps must be a real number")),
        ("scale-nan", lambda a: dict(scale=float("nan")), value_error(r"scale must be finite")),
        ("scale-inf", lambda a: dict(scale=float("inf")), value_error(r"scale must be finite")),
        ("scale-neginf", lambda a: dict(scale=-float("inf")), value_error(r"scale must be finite")),
        ("scale-complex", lambda a: dict(scale=1j), type_error(r"scale must be a real number")),
        ("scale-str", lambda a: dict(scale="0.5"), type_error(r"scale must be a real number")),
    ]


def _call_emsa(args, backend, **override):
    kw = dict(args)
    kw.update(override)
    return emsa_attention(kw.pop("q"), kw.pop("k"), kw.pop("v"), backend=backend, **kw)


def _emsa_valid_cases():
    """(name, make(dtype) -> args, check kwargs, meta) for valid calls with hostile layouts and sizes:
    zero strides, aliasing and overlapping memory, views with offsets, empty dimensions and
    numerical extremes; meta: h, d, mix for the backend expectation, dtypes to run."""
    def expanded_q(dt):
        a = emsa_args(dtype=dt)
        a["q"] = a["q"][:1].expand(2, 2, 5, 4)          # batch stride 0
        return a

    def expanded_kv(dt):
        a = emsa_args(dtype=dt)
        a["k"] = a["k"][:, :, :1].expand(2, 2, 3, 4)    # token stride 0: identical keys
        a["v"] = a["v"][:, :1].expand(2, 2, 3, 4)       # head stride 0
        return a

    def aliased(dt):
        a = emsa_args(N=3, M=3, dtype=dt)
        a["k"] = a["v"] = a["q"]                        # one tensor for q, k and v
        return a

    def overlapping(dt):
        a = emsa_args(dtype=dt)
        base = _rand(torch.Generator().manual_seed(5), 64, dtype=dt)
        a["k"] = base.as_strided((2, 2, 3, 4), (6, 3, 2, 1))   # windows that share elements
        a["v"] = base[3:].as_strided((2, 2, 3, 4), (1, 1, 1, 1))
        return a

    def model_layout(dt):
        a = emsa_args(dtype=dt)
        g = torch.Generator().manual_seed(1)
        a["q"] = _rand(g, 2, 5, 8, dtype=dt).view(2, 5, 2, 4).transpose(1, 2)     # rest.EMSA's views
        kv = _rand(g, 2, 3, 2, 2, 4, dtype=dt)
        a["k"], a["v"] = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        return a

    def transposed_d(dt):
        a = emsa_args(dtype=dt)
        a["q"] = a["q"].transpose(2, 3).contiguous().transpose(2, 3)              # head dim not innermost
        a["v"] = a["v"].transpose(0, 3).contiguous().transpose(0, 3)
        return a

    def offset_views(dt):
        a = emsa_args(dtype=dt)
        big = _rand(torch.Generator().manual_seed(2), 3, 2, 5, 4, dtype=dt)
        a["q"] = big[1:]                                                          # storage offset
        return a

    def mix_views(dt):
        a = emsa_args(dtype=dt)
        a["mix_weight"] = a["mix_weight"].t()                                     # non-contiguous weight
        a["mix_bias"] = _rand(torch.Generator().manual_seed(3), 4, dtype=dt)[::2]
        return a

    def mix_conv_shape(dt):
        a = emsa_args(dtype=dt, bias=True)
        a["mix_weight"] = a["mix_weight"].reshape(2, 2, 1, 1)                    # as the 1x1 Conv2d stores it
        return a

    def mix_expanded(dt):
        a = emsa_args(dtype=dt)
        a["mix_weight"] = a["mix_weight"][:1].expand(2, 2)                        # rank-1 mix, stride 0
        return a

    def mix_other_dtype(dt):
        a = emsa_args(dtype=dt)
        a["mix_weight"] = a["mix_weight"].double() if dt != F64 else a["mix_weight"].float()
        return a

    def huge_logits(dt):
        return emsa_args(N=9, M=7, dtype=dt, scale_q=3e3, seed=4)                # |logits| ~ 1e4

    def uniform(dt):
        a = emsa_args(dtype=dt)
        a["q"] = torch.zeros_like(a["q"])        # every probability 1/M: variance 0 << eps
        return a

    def single_key(dt):
        return emsa_args(M=1, dtype=dt)          # P == 1: the normalised map is exactly zero

    def nan_q(dt):
        a = emsa_args(dtype=dt)
        a["q"][0, 1, 2, 0] = float("nan")
        return a

    def inf_k(dt):
        a = emsa_args(dtype=dt)
        a["k"][1, 0, 1, 2] = float("inf")
        return a

    def one_head(dt):
        return emsa_args(h=1, N=4, M=6, d=3, dtype=dt)

    def many_heads(dt):
        return emsa_args(h=9, N=3, M=2, d=2, dtype=dt)          # beyond triton's fused mix (8)

    def head_dim_1(dt):
        return emsa_args(d=1, dtype=dt)

    def wide_head(dt):
        return emsa_args(B=1, h=1, N=2, M=2, d=130, dtype=dt)  # beyond cuda-emu's 128

    def very_wide_head(dt):
        return emsa_args(B=1, h=1, N=2, M=2, d=300, dtype=dt)  # beyond triton's 256

    def odd_sizes(dt):
        return emsa_args(B=3, h=3, N=17, M=13, d=5, dtype=dt, seed=9)

    def no_mix(dt):
        return emsa_args(mix=False, dtype=dt)

    def empty(shape):
        def make(dt):
            B, h, N, M, d = shape
            return emsa_args(B=B, h=h, N=N, M=M, d=d, dtype=dt, mix=h > 0)
        return make

    all_dtypes = (F32, F64, BF16, F16)
    return [
        ("expanded-q", expanded_q, {}, dict(), (F32, BF16)),
        ("expanded-kv", expanded_kv, {}, dict(), (F32, F64)),
        ("aliased-qkv", aliased, {}, dict(), (F32,)),
        ("overlapping-kv", overlapping, {}, dict(), (F32, F16)),
        ("model-layout", model_layout, {}, dict(), all_dtypes),
        ("transposed-headdim", transposed_d, {}, dict(), (F32,)),
        ("offset-view", offset_views, {}, dict(), (F32,)),
        ("mix-strided-views", mix_views, {}, dict(), (F32, F64)),
        ("mix-conv-shape-bias", mix_conv_shape, {}, dict(), (F32,)),
        ("mix-expanded", mix_expanded, {}, dict(), (F32,)),
        ("mix-other-dtype", mix_other_dtype, {}, dict(), (F32, BF16, F64)),
        ("huge-logits", huge_logits, dict(scale=0.5), dict(), all_dtypes),
        ("uniform-below-eps", uniform, {}, dict(), all_dtypes),
        ("single-key", single_key, {}, dict(), all_dtypes),
        ("nan-in-q", nan_q, {}, dict(), (F32, F64)),
        ("inf-in-k", inf_k, {}, dict(), (F32,)),
        ("eps-zero", odd_sizes, dict(eps=0.0), dict(), (F32, F64)),
        ("eps-huge", odd_sizes, dict(eps=1e30), dict(), (F32,)),
        ("scale-zero", odd_sizes, dict(scale=0.0), dict(), (F32,)),
        ("scale-negative-int", odd_sizes, dict(scale=-1), dict(), (F32,)),
        ("one-head", one_head, {}, dict(h=1, d=3), (F32,)),
        ("nine-heads", many_heads, {}, dict(h=9, d=2), (F32,)),
        ("head-dim-1", head_dim_1, {}, dict(d=1), (F32,)),
        ("head-dim-130", wide_head, {}, dict(d=130), (F32,)),
        ("head-dim-300", very_wide_head, {}, dict(d=300), (F32,)),
        ("odd-sizes", odd_sizes, {}, dict(h=3, d=5), (F32, F64, BF16)),
        ("no-mix", no_mix, {}, dict(mix=False), all_dtypes),
        ("empty-batch", empty((0, 2, 5, 3, 4)), {}, dict(), (F32,)),
        ("empty-heads", empty((2, 0, 5, 3, 4)), {}, dict(h=0, mix=False), (F32,)),
        ("empty-queries", empty((2, 2, 0, 3, 4)), {}, dict(), (F32,)),
        ("empty-headdim", empty((2, 2, 5, 3, 0)), {}, dict(d=0), (F32,)),
        ("empty-queries-and-keys", empty((1, 2, 0, 0, 4)), {}, dict(), (F32,)),
    ]


def emsa_cases():
    cases = []
    for name, change, expected in _emsa_bad_inputs():
        for backend in BACKENDS:
            def fn(change=change, backend=backend):
                args = emsa_args()
                args.update(change(args))
                return _call_emsa(args, backend)
            cases.append(Case(f"emsa-bad/{name}/{backend}", fn, expected))
    for backend in ("auto", "cpu"):  # the backend argument itself
        cases.append(Case(f"emsa-bad/backend-name/{backend}", lambda: _call_emsa(emsa_args(), "fastest"),
                          value_error(r"backend must be one of")))
    cases.append(Case("emsa-bad/backend-int", lambda: _call_emsa(emsa_args(), 3), type_error(r"backend must be a string")))
    for name, make, kwargs, meta, dtypes in _emsa_valid_cases():
        for dtype in dtypes:
            for backend in BACKENDS:
                expect = emsa_expect(backend, dtype, meta.get("h", 2), meta.get("d", 4), meta.get("mix", True))
                # |logits| ~ 1e4 carry an absolute rounding of ~1e-3 in float32 (~1e-12 in float64)
                tol = {F32: 5e-3, F64: 1e-6}.get(dtype) if name == "huge-logits" else None

                def fn(make=make, dtype=dtype, backend=backend, kwargs=kwargs, tol=tol):
                    with torch.no_grad():
                        check_emsa(backend, make(dtype), tol=tol, **kwargs)
                cases.append(Case(f"emsa-ok/{name}/{str(dtype)[6:]}/{backend}", fn, expect))
    # gradients through hostile layouts: zero-stride dout (out.sum()), expanded and aliased inputs
    for name, make, dout_kind, dtypes, mix in [
            ("grad-with-bias", lambda dt: emsa_args(dtype=dt, bias=True), "random", (F32, F64), True),
            ("grad-sum-backward", lambda dt: emsa_args(dtype=dt), "ones", (F32,), True),
            ("grad-no-mix", lambda dt: emsa_args(dtype=dt, mix=False), "random", (F32,), False),
            ("grad-single-key", lambda dt: emsa_args(M=1, dtype=dt), "random", (F32,), True)]:
        for dtype in dtypes:
            for backend in BACKENDS:
                def fn(make=make, dtype=dtype, backend=backend, dout_kind=dout_kind):
                    check_emsa_grads(backend, make(dtype), dout_kind)
                cases.append(Case(f"emsa-ok/{name}/{str(dtype)[6:]}/{backend}", fn,
                                  emsa_expect(backend, dtype, mix=mix)))
    # tensors on the meta device: shapes only (reference / auto), a reason elsewhere
    for backend in BACKENDS:
        def fn(backend=backend):
            check_emsa(backend, emsa_args(device="meta"))
        cases.append(Case(f"emsa-ok/meta-device/{backend}", fn, emsa_expect(backend, device="meta")))
    return cases


# --------------------------------------------------------------------------- PA
def _pa_bad_inputs():
    meta = torch.device("meta")
    return [
        ("x-3d", lambda a: dict(x=a["x"][0]), value_error(r"x must be 4-dimensional")),
        ("x-5d", lambda a: dict(x=a["x"][None]), value_error(r"x must be 4-dimensional")),
        ("x-list", lambda a: dict(x=a["x"].tolist()), type_error(r"x must be a torch\.Tensor")),
        ("x-int", lambda a: dict(x=a["x"].int()), type_error(r"x must have a floating dtype")),
        ("x-complex", lambda a: dict(x=torch.complex(a["x"], a["x"])), type_error(r"x must have a floating dtype")),
        ("weight-5x5", lambda a: dict(weight=torch.randn(3, 1, 5, 5)), value_error(r"weight must have shape \(3, 1, 3, 3\)")),
        ("weight-channels", lambda a: dict(weight=torch.randn(4, 1, 3, 3)), value_error(r"weight must have shape \(3, 1, 3, 3\)")),
        ("weight-3d", lambda a: dict(weight=torch.randn(3, 3, 3)), value_error(r"weight must be 4-dimensional")),
        ("weight-dense", lambda a: dict(weight=torch.randn(3, 3, 3, 3)), value_error(r"weight must have shape")),
        ("weight-int", lambda a: dict(weight=torch.ones(3, 1, 3, 3, dtype=torch.int32)),
         type_error(r"weight must have a floating dtype")),
        ("weight-float64", lambda a: dict(weight=a["weight"].double()), type_error(r"weight must have x's dtype")),
        ("weight-none", lambda a: dict(weight=None), type_error(r"weight must be a torch\.Tensor")),
        ("bias-4", lambda a: dict(bias=torch.randn(4)), value_error(r"bias must have shape \(3,\)")),
        ("bias-2d", lambda a: dict(bias=torch.randn(3, 1)), value_error(r"bias must be 1-dimensional")),
        ("bias-float16", lambda a: dict(bias=a["bias"].half()), type_error(r"bias must have x's dtype")),
        ("bias-int", lambda a: dict(bias=torch.ones(3, dtype=torch.int64)), type_error(r"bias must have a floating dtype")),
        ("weight-meta", lambda a: dict(weight=a["weight"].to(meta)), value_error(r"one device.*weight on meta")),
        ("bias-meta", lambda a: dict(bias=a["bias"].to(meta)), value_error(r"one device.*bias on meta")),
    ]


def _pa_valid_cases():
    def channels_last(dt):
        a = pa_args(dtype=dt)
        a["x"] = a["x"].to(memory_format=torch.channels_last)
        return a

    def expanded_x(dt):
        a = pa_args(dtype=dt)
        a["x"] = a["x"][:1].expand(2, 3, 5, 6)             # batch stride 0
        return a

    def transposed_hw(dt):
        a = pa_args(dtype=dt)
        a["x"] = a["x"].transpose(2, 3)                      # W x H view
        return a

    def strided_params(dt):
        a = pa_args(dtype=dt)
        g = torch.Generator().manual_seed(4)
        a["bias"] = _rand(g, 6, dtype=dt)[::2]                               # stride 2
        a["weight"] = _rand(g, 3, 1, 3, 6, dtype=dt)[..., ::2]               # stride 2 in the taps
        return a

    def offset_params(dt):
        a = pa_args(dtype=dt)
        g = torch.Generator().manual_seed(6)
        a["bias"] = _rand(g, 4, dtype=dt)[1:]
        a["weight"] = _rand(g, 28, dtype=dt)[1:].view(3, 1, 3, 3)
        return a

    def saturated(dt):
        a = pa_args(dtype=dt)
        a["x"] = a["x"] * 1e4                                # sigmoid saturates at 0 and 1
        return a

    def nan_inf(dt):
        a = pa_args(dtype=dt)
        a["x"][0, 1, 2, 3] = float("nan")
        a["x"][1, 2, 0, 0] = float("inf")
        return a

    def no_bias(dt):
        return pa_args(dtype=dt, bias=False)

    def one_pixel(dt):
        return pa_args(B=1, C=2, H=1, W=1, dtype=dt)

    def thin(dt):
        return pa_args(B=1, C=5, H=1, W=37, dtype=dt)

    def empty(shape):
        def make(dt):
            B, C, H, W = shape
            return pa_args(B=B, C=C, H=H, W=W, dtype=dt)
        return make

    all_dtypes = (F32, F64, BF16, F16)
    return [
        ("channels-last", channels_last, all_dtypes),
        ("expanded-x", expanded_x, (F32,)),
        ("transposed-hw", transposed_hw, (F32,)),
        ("strided-bias-weight", strided_params, (F32, BF16)),
        ("offset-bias-weight", offset_params, (F32,)),
        ("saturated", saturated, (F32, F16)),
        ("nan-inf", nan_inf, (F32,)),
        ("no-bias", no_bias, (F32, F64)),
        ("one-pixel", one_pixel, (F32,)),
        ("thin-plane", thin, (F32,)),
        ("empty-batch", empty((0, 3, 5, 6)), (F32,)),
        ("empty-channels", empty((2, 0, 5, 6)), (F32,)),
        ("empty-height", empty((2, 3, 0, 6)), (F32,)),
        ("empty-width", empty((2, 3, 5, 0)), (F32,)),
    ]


def pa_cases():
    cases = []
    for name, change, expected in _pa_bad_inputs():
        for backend in BACKENDS:
            def fn(change=change, backend=backend):
                a = pa_args()
                a.update(change(a))
                return pa_gate(a["x"], a["weight"], a["bias"], backend=backend)
            cases.append(Case(f"pa-bad/{name}/{backend}", fn, expected))
    for name, make, dtypes in _pa_valid_cases():
        for dtype in dtypes:
            for backend in BACKENDS:
                def fn(make=make, dtype=dtype, backend=backend):
                    with torch.no_grad():
                        check_pa(backend, make(dtype))
                cases.append(Case(f"pa-ok/{name}/{str(dtype)[6:]}/{backend}", fn, pa_expect(backend, dtype)))
    # small planes: the Triton interpreter's PA backward recomputes 9 x 9 taps per pixel in numpy
    for name, make, dtypes in [("grad", lambda dt: pa_args(B=1, C=2, H=4, W=5, dtype=dt), (F32, F64)),
                               ("grad-strided-bias", lambda dt: _pa_valid_cases()[3][1](dt), (F32,))]:
        for dtype in dtypes:
            for backend in BACKENDS:
                def fn(make=make, dtype=dtype, backend=backend):
                    check_pa(backend, make(dtype), grad=True)
                cases.append(Case(f"pa-ok/{name}/{str(dtype)[6:]}/{backend}", fn, pa_expect(backend, dtype)))
    return cases


# --------------------------------------------------------------------------- custom ops, called directly
def _stats_of(backend, a):
    w = a["mix_weight"]
    return torch.ops.rest_kernels.emsa_fwd(a["q"], a["k"], a["v"], w, None, 0.5, 1e-5, backend)


def check_custom_emsa(backend, a, expand_stats=False):
    """emsa_fwd's output and statistics, then emsa_bwd's gradients, against the reference backend."""
    ref = BACKEND_OBJECTS["reference"]
    w = a["mix_weight"]
    out, lse, rsq, rstd = _stats_of(backend, a)
    up = {n: _up(t) for n, t in a.items()}
    oracle = emsa_reference(up["q"], up["k"], up["v"], up["mix_weight"], None, 0.5, 1e-5)
    assert_matches(out, oracle, floor=_scale(a["v"]))
    r_out, r_lse, r_rsq, r_rstd = ref.emsa_forward(up["q"], up["k"], up["v"], _up(w.reshape(2, 2)) if w is not None else None,
                                                   0.5, 1e-5)
    assert_matches(lse, r_lse, what="lse", tol=1e-5)
    if w is not None:
        assert_matches(rsq, r_rsq, what="rsq", tol=1e-5)
        assert_matches(rstd, r_rstd, what="rstd", tol=1e-4)
    dout = _rand(torch.Generator().manual_seed(3), *out.shape)
    if expand_stats:  # non-contiguous statistics: views of transposed copies
        lse, rsq = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (lse, rsq))
        rstd = rstd.t().contiguous().t()
    dq, dk, dv, dmix = torch.ops.rest_kernels.emsa_bwd(dout, a["q"], a["k"], a["v"], w, out, lse, rsq, rstd, 0.5,
                                                       1e-5, backend)
    leaves = {n: up[n].requires_grad_(True) for n in ("q", "k", "v", "mix_weight") if up[n] is not None}
    ref_out = emsa_reference(leaves["q"], leaves["k"], leaves["v"], leaves.get("mix_weight"), None, 0.5, 1e-5)
    grads = torch.autograd.grad(ref_out, list(leaves.values()), dout.double())
    got = [dq, dk, dv] + ([dmix] if w is not None else [])
    for n, g_, r_ in zip(leaves, got, grads):
        assert_matches(g_.reshape(r_.shape), r_, floor=_scale(*grads), what=f"d{n}", tol=2e-4)
    if w is None:
        assert dmix.numel() == 0


def custom_op_cases():
    cases = []
    ops = torch.ops.rest_kernels

    def good():
        return emsa_args()

    def fwd(backend, **over):
        a = good()
        a.update(over)
        return ops.emsa_fwd(a["q"], a["k"], a["v"], a["mix_weight"], a.get("mix_bias"), a.get("scale", 0.5),
                            a.get("eps", 1e-5), backend)

    def bwd(backend, **over):
        a = good()
        B, h, N, _ = a["q"].shape
        kw = dict(dout=torch.randn(a["q"].shape), q=a["q"], k=a["k"], v=a["v"], w=a["mix_weight"],
                  out=torch.randn(a["q"].shape), lse=torch.zeros(B, h, N), rsq=torch.zeros(B, h, N),
                  rstd=torch.ones(B, h))
        kw.update(over)
        return ops.emsa_bwd(kw["dout"], kw["q"], kw["k"], kw["v"], kw["w"], kw["out"], kw["lse"], kw["rsq"],
                            kw["rstd"], 0.5, 1e-5, backend)

    def pfwd(backend, **over):
        a = pa_args()
        a.update(over)
        return ops.pa_fwd(a["x"], a["weight"], a["bias"], backend)

    def pbwd(backend, **over):
        a = pa_args()
        kw = dict(dout=torch.randn(a["x"].shape), **a)
        kw.update(over)
        return ops.pa_bwd(kw["dout"], kw["x"], kw["weight"], kw["bias"], backend)

    bad = [
        ("emsa_fwd/q-int", lambda b: fwd(b, q=good()["q"].int()), type_error(r"q must have a floating dtype")),
        ("emsa_fwd/k-3d", lambda b: fwd(b, k=good()["k"][0]), value_error(r"k must be 4-dimensional")),
        ("emsa_fwd/k-float64", lambda b: fwd(b, k=good()["k"].double()), type_error(r"share one dtype")),
        ("emsa_fwd/mix-3x3", lambda b: fwd(b, mix_weight=torch.randn(3, 3)), value_error(r"mix_weight must have shape")),
        ("emsa_fwd/mix-int", lambda b: fwd(b, mix_weight=torch.ones(2, 2, dtype=torch.int32)),
         type_error(r"mix_weight must have a floating dtype")),
        ("emsa_fwd/no-keys", lambda b: fwd(b, k=good()["k"][:, :, :0], v=good()["v"][:, :, :0]),
         value_error(r"at least one key")),
        ("emsa_fwd/eps-nan", lambda b: fwd(b, eps=float("nan")), value_error(r"eps must be finite")),
        ("emsa_fwd/eps-negative", lambda b: fwd(b, eps=-1.0), value_error(r"eps must be >= 0")),
        ("emsa_fwd/scale-inf", lambda b: fwd(b, scale=float("inf")), value_error(r"scale must be finite")),
        ("emsa_fwd/v-meta", lambda b: fwd(b, v=good()["v"].to("meta")), value_error(r"one device")),
        ("emsa_fwd/scale-str", lambda b: fwd(b, scale="x"), Raises((RuntimeError, TypeError), r"argument 'scale'")),
        ("emsa_fwd/q-list", lambda b: fwd(b, q=[1.0]), Raises((RuntimeError, TypeError), r"argument 'q'")),
        ("emsa_bwd/dout-shape", lambda b: bwd(b, dout=torch.randn(2, 2, 5, 3)), value_error(r"dout must have the shape of q")),
        ("emsa_bwd/dout-int", lambda b: bwd(b, dout=torch.ones(2, 2, 5, 4, dtype=torch.int64)),
         type_error(r"dout must have a floating dtype")),
        ("emsa_bwd/dout-float64", lambda b: bwd(b, dout=torch.randn(2, 2, 5, 4, dtype=F64)), type_error(r"dout must have q's dtype")),
        ("emsa_bwd/out-3d", lambda b: bwd(b, out=torch.randn(2, 5, 4)), value_error(r"out must be 4-dimensional")),
        ("emsa_bwd/lse-shape", lambda b: bwd(b, lse=torch.zeros(2, 2, 4)), value_error(r"lse must have shape \(2, 2, 5\)")),
        ("emsa_bwd/rsq-float64", lambda b: bwd(b, rsq=torch.zeros(2, 2, 5, dtype=F64)), type_error(r"rsq must be float32")),
        ("emsa_bwd/rstd-shape", lambda b: bwd(b, rstd=torch.ones(2, 2, 1)), value_error(r"rstd must have shape \(2, 2\)")),
        ("emsa_bwd/rstd-meta", lambda b: bwd(b, rstd=torch.ones(2, 2, device="meta")), value_error(r"one device.*rstd on meta")),
        ("emsa_bwd/k-heads", lambda b: bwd(b, k=torch.randn(2, 3, 3, 4)), value_error(r"agree on batch and heads")),
        ("pa_fwd/x-3d", lambda b: pfwd(b, x=torch.randn(3, 5, 6)), value_error(r"x must be 4-dimensional")),
        ("pa_fwd/weight-shape", lambda b: pfwd(b, weight=torch.randn(3, 1, 2, 2)), value_error(r"weight must have shape")),
        ("pa_fwd/bias-shape", lambda b: pfwd(b, bias=torch.randn(5)), value_error(r"bias must have shape \(3,\)")),
        ("pa_fwd/weight-float64", lambda b: pfwd(b, weight=torch.randn(3, 1, 3, 3, dtype=F64)),
         type_error(r"weight must have x's dtype")),
        ("pa_bwd/dout-shape", lambda b: pbwd(b, dout=torch.randn(2, 3, 5, 5)), value_error(r"dout must have the shape of x")),
        ("pa_bwd/dout-bf16", lambda b: pbwd(b, dout=torch.randn(2, 3, 5, 6, dtype=BF16)), type_error(r"dout must have x's dtype")),
        ("pa_bwd/bias-int", lambda b: pbwd(b, bias=torch.ones(3, dtype=torch.int64)), type_error(r"bias must have a floating")),
    ]
    for name, call, expected in bad:
        for backend in KERNEL_BACKENDS:
            cases.append(Case(f"custom-op-bad/{name}/{backend}", functools.partial(call, backend), expected))
    for backend in ("auto", "fastest"):
        cases.append(Case(f"custom-op-bad/emsa_fwd/backend-{backend}", functools.partial(fwd, backend),
                          value_error(r"backend must be one of")))
        cases.append(Case(f"custom-op-bad/pa_fwd/backend-{backend}", functools.partial(pfwd, backend),
                          value_error(r"backend must be one of")))

    def pa_custom(backend, make, grad=True):
        a = make()
        out = ops.pa_fwd(a["x"], a["weight"], a["bias"], backend)
        ups = [_up(t) for t in (a["x"], a["weight"], a["bias"])]
        assert_matches(out, pa_reference(*ups), floor=_scale(a["x"]))
        if grad:
            dout = _rand(torch.Generator().manual_seed(2), *out.shape)
            got = ops.pa_bwd(dout, a["x"], a["weight"], a["bias"], backend)
            leaves = [u.requires_grad_(True) for u in ups if u is not None]
            grads = torch.autograd.grad(pa_reference(*ups), leaves, dout.double())
            for n, g_, r_ in zip(("dx", "dweight", "dbias"), got, grads):
                assert_matches(g_, r_, floor=_scale(r_), what=n, tol=2e-4)

    def strided_bias():
        a = pa_args()
        a["bias"] = _rand(torch.Generator().manual_seed(9), 6)[::2]
        return a

    def empty_emsa(backend):
        a = emsa_args(B=0)
        out, lse, rsq, rstd = _stats_of(backend, a)
        assert out.shape == (0, 2, 5, 4) and lse.shape == (0, 2, 5) and rstd.shape == (0, 2)
        dq, dk, dv, dmix = ops.emsa_bwd(out, a["q"], a["k"], a["v"], a["mix_weight"], out, lse, rsq, rstd, 0.5,
                                        1e-5, backend)
        assert dq.shape == a["q"].shape and dk.shape == a["k"].shape and torch.count_nonzero(dmix) == 0

    def empty_pa(backend):
        a = pa_args(C=0)
        out = ops.pa_fwd(a["x"], a["weight"], a["bias"], backend)
        dx, dw, db = ops.pa_bwd(out, a["x"], a["weight"], a["bias"], backend)
        assert out.shape == dx.shape == (2, 0, 5, 6) and dw.shape == (0, 1, 3, 3) and db.shape == (0,)

    def mix_transposed():
        a = emsa_args()
        a["mix_weight"] = a["mix_weight"].t()
        return a

    def mix_conv():
        a = emsa_args()
        a["mix_weight"] = a["mix_weight"].reshape(2, 2, 1, 1)
        return a

    def q_expanded():
        a = emsa_args()
        a["q"] = a["q"][:1].expand(2, 2, 5, 4)
        return a

    valid = [
        ("emsa/mix", lambda b: check_custom_emsa(b, emsa_args())),
        ("emsa/no-mix", lambda b: check_custom_emsa(b, emsa_args(mix=False))),
        ("emsa/mix-transposed", lambda b: check_custom_emsa(b, mix_transposed())),
        ("emsa/mix-conv-shape", lambda b: check_custom_emsa(b, mix_conv())),
        ("emsa/q-expanded", lambda b: check_custom_emsa(b, q_expanded())),
        ("emsa/strided-stats", lambda b: check_custom_emsa(b, emsa_args(), expand_stats=True)),
        ("emsa/empty", empty_emsa),
        ("pa/bias", lambda b: pa_custom(b, pa_args)),
        ("pa/no-bias", lambda b: pa_custom(b, lambda: pa_args(bias=False))),
        ("pa/strided-bias", lambda b: pa_custom(b, strided_bias)),
        ("pa/empty", empty_pa),
    ]
    for name, call in valid:
        for backend in KERNEL_BACKENDS:
            # what the backend declares it serves: the op, and the head mix or not
            expect = (pa_expect(backend) if name.startswith("pa/")
                      else emsa_expect(backend, mix=name != "emsa/no-mix"))
            cases.append(Case(f"custom-op-ok/{name}/{backend}", functools.partial(call, backend), expect))
    return cases


# --------------------------------------------------------------------------- raw compiled ops
def raw_op_cases():
    """torch.ops.rest_kernels_C.* called directly: checked by csrc/op_checks.h (ValueError naming
    the argument) or, for what only a kernel refuses, a RuntimeError; valid calls must be correct."""
    cases = []
    ref = BACKEND_OBJECTS["reference"]

    def op(name, suffix):
        rest_kernels.available_backends()  # loads the extension, which registers the ops
        return getattr(torch.ops.rest_kernels_C, name + suffix)

    def fwd(suffix, **over):
        a = emsa_args()
        a.update(over)
        return op("emsa_fwd", suffix)(a["q"], a["k"], a["v"], a["mix_weight"], a.get("scale", 0.5), a.get("eps", 1e-5))

    def pfwd(suffix, **over):
        a = pa_args()
        a.update(over)
        return op("pa_fwd", suffix)(a["x"], a["weight"], a["bias"])

    checked = (ValueError, RuntimeError)
    bad = [
        ("emsa_fwd/q-int", lambda s: fwd(s, q=emsa_args()["q"].int()), Raises(checked, r"q must be a floating tensor")),
        ("emsa_fwd/q-3d", lambda s: fwd(s, q=emsa_args()["q"][0]), Raises(checked, r"q must be 4-dimensional")),
        ("emsa_fwd/k-shape", lambda s: fwd(s, k=emsa_args()["k"][..., :3]), Raises(checked, r"k must have shape")),
        ("emsa_fwd/v-dtype", lambda s: fwd(s, v=emsa_args()["v"].double()), Raises(checked, r"share one dtype")),
        ("emsa_fwd/mix-shape", lambda s: fwd(s, mix_weight=torch.randn(3, 3)), Raises(checked, r"mix_weight must have shape")),
        ("emsa_fwd/mix-conv-shape", lambda s: fwd(s, mix_weight=torch.randn(2, 2, 1, 1)),
         Raises(checked, r"mix_weight must have shape")),
        ("emsa_fwd/no-keys", lambda s: fwd(s, k=emsa_args()["k"][:, :, :0], v=emsa_args()["v"][:, :, :0]),
         Raises(checked, r"at least one key")),
        ("emsa_fwd/eps-nan", lambda s: fwd(s, eps=float("nan")), Raises(checked, r"eps must be finite")),
        ("emsa_fwd/scale-inf", lambda s: fwd(s, scale=float("inf")), Raises(checked, r"scale must be finite")),
        # a meta tensor makes PyTorch's dispatcher look for a Meta kernel: the cpu ops' is their fake
        # (registered for rest_kernels.direct_kernels_in_traces), whose device check names the
        # arguments; the emulation's ops have none, and the dispatcher refuses the call before
        # op_checks.h runs
        ("emsa_fwd/k-meta", lambda s: fwd(s, k=emsa_args()["k"].to("meta")),
         {"": Raises((ValueError,), r"all tensors must be on one device, got q on cpu, k on meta"),
          "_emu": Raises((NotImplementedError,), r"rest_kernels_C::emsa_fwd_emu.*Meta tensors")}),
        ("pa_fwd/x-3d", lambda s: pfwd(s, x=torch.randn(3, 5, 6)), Raises(checked, r"x must be 4-dimensional")),
        ("pa_fwd/weight-shape", lambda s: pfwd(s, weight=torch.randn(3, 1, 5, 5)), Raises(checked, r"weight must have shape")),
        ("pa_fwd/bias-shape", lambda s: pfwd(s, bias=torch.randn(4)), Raises(checked, r"bias must have shape")),
        ("pa_fwd/weight-dtype", lambda s: pfwd(s, weight=torch.randn(3, 1, 3, 3, dtype=F64)),
         Raises(checked, r"weight must have x's dtype")),
        ("pa_bwd/dout-shape", lambda s: op("pa_bwd", s)(torch.randn(2, 3, 5, 5), *pa_args().values()),
         Raises(checked, r"dout must have shape")),
        ("emsa_bwd/lse-shape", lambda s: op("emsa_bwd", s)(
            torch.randn(2, 2, 5, 4), *[emsa_args()[n] for n in ("q", "k", "v", "mix_weight")], torch.randn(2, 2, 5, 4),
            torch.zeros(2, 2, 4), torch.zeros(2, 2, 5), torch.ones(2, 2), 0.5, 1e-5), Raises(checked, r"lse must have shape")),
        ("emsa_bwd/rstd-dtype", lambda s: op("emsa_bwd", s)(
            torch.randn(2, 2, 5, 4), *[emsa_args()[n] for n in ("q", "k", "v", "mix_weight")], torch.randn(2, 2, 5, 4),
            torch.zeros(2, 2, 5), torch.zeros(2, 2, 5), torch.ones(2, 2, dtype=F64), 0.5, 1e-5),
         Raises(checked, r"rstd must be float32")),
    ]

    def raw_emsa(suffix, a):
        out, lse, rsq, rstd = op("emsa_fwd", suffix)(a["q"], a["k"], a["v"], a["mix_weight"], 0.5, 1e-5)
        w = a["mix_weight"]
        oracle = emsa_reference(_up(a["q"]), _up(a["k"]), _up(a["v"]), _up(w), None, 0.5, 1e-5)
        assert_matches(out, oracle, floor=_scale(a["v"]))
        r = ref.emsa_forward(_up(a["q"]), _up(a["k"]), _up(a["v"]), _up(w), 0.5, 1e-5)
        assert_matches(lse, r[1], what="lse", tol=1e-5)

    def with_mix(transform):
        a = emsa_args()
        a["mix_weight"] = transform(a["mix_weight"])
        return a

    def expanded_q():
        a = emsa_args()
        a["q"] = a["q"][:1].expand(2, 2, 5, 4)
        return a

    def raw_pa(suffix, a):
        out = op("pa_fwd", suffix)(a["x"], a["weight"], a["bias"])
        assert_matches(out, pa_reference(*[_up(t) for t in (a["x"], a["weight"], a["bias"])]), floor=_scale(a["x"]))

    def raw_empty(suffix):
        a = emsa_args(B=0)
        out = op("emsa_fwd", suffix)(a["q"], a["k"], a["v"], a["mix_weight"], 0.5, 1e-5)[0]
        assert out.shape == (0, 2, 5, 4)
        x = pa_args(H=0)
        assert op("pa_fwd", suffix)(x["x"], x["weight"], x["bias"]).shape == (2, 3, 0, 6)

    def strided_bias():
        a = pa_args()
        a["bias"] = _rand(torch.Generator().manual_seed(1), 6)[::2]
        a["x"] = a["x"].to(memory_format=torch.channels_last)
        return a

    # The cuda-emu (and cuda) raw ops of builds before d90066e refuse a mix_weight that is not a
    # contiguous float32 (h, h) tensor with a RuntimeError although op_checks.h accepts it (a clean
    # refusal, not a wrong answer); builds since make the dense copy and must give the right result.
    emu_mix_refusal = Raises((RuntimeError,), r"mix_weight must be a contiguous float32")
    valid = [
        ("emsa_fwd/mix", lambda s: raw_emsa(s, emsa_args()), False),
        ("emsa_fwd/no-mix", lambda s: raw_emsa(s, emsa_args(mix=False)), False),
        ("emsa_fwd/q-expanded", lambda s: raw_emsa(s, expanded_q()), False),
        ("emsa_fwd/mix-transposed", lambda s: raw_emsa(s, with_mix(lambda w: w.t())), True),
        ("emsa_fwd/mix-float64", lambda s: raw_emsa(s, with_mix(lambda w: w.double())), True),
        ("emsa_fwd/mix-expanded", lambda s: raw_emsa(s, with_mix(lambda w: w[:1].expand(2, 2))), True),
        ("pa_fwd/strided-bias-channels-last", lambda s: raw_pa(s, strided_bias()), False),
        ("empty", raw_empty, False),
    ]
    for suffix, backend in RAW_SUFFIXES.items():
        if rest_kernels.available_backends()[backend] is not None:
            continue  # the extension (or this backend's part of it) is not built: no raw ops to call
        label = backend
        for name, call, expected in bad:
            expected = expected[suffix] if isinstance(expected, dict) else expected  # per op family
            cases.append(Case(f"raw-op-bad/{name}/{label}", functools.partial(call, suffix), expected))
        for name, call, mix_refusal in valid:
            expect = Correct(or_raises=emu_mix_refusal) if (mix_refusal and suffix == "_emu") else CORRECT
            cases.append(Case(f"raw-op-ok/{name}/{label}", functools.partial(call, suffix), expect))
    return cases


# --------------------------------------------------------------------------- autograd misuse
def autograd_cases():
    """Inference mode, a second backward without retain_graph, double backward."""
    cases = []

    def inference_mode(backend):
        a = emsa_args()
        with torch.inference_mode():
            check_emsa(backend, a)
            x = pa_args()
            out = pa_gate(x["x"], x["weight"], x["bias"], backend=backend)
        assert_matches(out, pa_reference(*[_up(t) for t in x.values()]), floor=_scale(x["x"]))

    def backward_twice(backend):
        a = {n: t.requires_grad_(True) for n, t in emsa_args().items() if t is not None}
        out = emsa_attention(a["q"], a["k"], a["v"], a["mix_weight"], backend=backend)
        loss = out.sum()
        loss.backward()
        loss.backward()  # the graph was freed by the first backward

    def retain_graph(backend):
        a = {n: t.requires_grad_(True) for n, t in emsa_args().items() if t is not None}
        out = emsa_attention(a["q"], a["k"], a["v"], a["mix_weight"], backend=backend)
        first = torch.autograd.grad(out.sum(), a["q"], retain_graph=True)[0]
        second = torch.autograd.grad(out.sum(), a["q"])[0]
        assert torch.equal(first, second)
        check_emsa_grads(backend, emsa_args())

    def double_backward(backend):
        a = {n: t.requires_grad_(True) for n, t in emsa_args(dtype=F64).items() if t is not None}
        out = emsa_attention(a["q"], a["k"], a["v"], a["mix_weight"], backend=backend)
        g = torch.autograd.grad(out.pow(2).sum(), a["q"], create_graph=True)[0]
        gg = torch.autograd.grad(g.sum(), a["q"])[0]
        up = {n: _up(t.detach()).requires_grad_(True) for n, t in a.items()}
        ref = emsa_reference(up["q"], up["k"], up["v"], up["mix_weight"], None, 0.5)
        rg = torch.autograd.grad(ref.pow(2).sum(), up["q"], create_graph=True)[0]
        assert_matches(gg, torch.autograd.grad(rg.sum(), up["q"])[0], what="second derivative", tol=1e-8)

    # the fused kernels have a first derivative only: asking for a second one is a clear error
    no_second = Raises((RuntimeError,), r"no autograd formula was registered")
    for backend in BACKENDS:
        cases.append(Case(f"autograd-ok/inference-mode/{backend}", functools.partial(inference_mode, backend),
                          emsa_expect(backend)))
        cases.append(Case(f"autograd-ok/retain-graph/{backend}", functools.partial(retain_graph, backend),
                          emsa_expect(backend)))
        twice = emsa_expect(backend)
        cases.append(Case(f"autograd-bad/backward-twice/{backend}", functools.partial(backward_twice, backend),
                          Raises((RuntimeError,), r"backward through the graph a second time")
                          if twice is CORRECT else twice))
        expect = emsa_expect(backend, F64)
        if expect is CORRECT and backend != "reference" and not (backend == "auto" and _auto_is_reference(F64)):
            expect = no_second
        cases.append(Case(f"autograd-bad/double-backward/{backend}", functools.partial(double_backward, backend),
                          expect))
    return cases


def _auto_is_reference(dtype) -> bool:
    """Whether "auto" serves CPU tensors of `dtype` with the reference (no fused CPU backend here)."""
    return emsa_expect("cpu", dtype) is not CORRECT

