"""Hostile calls to the model zoo: the modules rest.EMSA / rest.PA, the ResT models and the variants'
constructors, and checkpoint loading (rest.load_checkpoint, pretrained=)."""
from __future__ import annotations

import functools
import os
import tempfile

import torch

from ._common import (BACKENDS, BF16, CORRECT, F16, F32, F64, Case, Raises, _rand, _scale, assert_matches,
                      emsa_expect, pa_expect, type_error, value_error)


# --------------------------------------------------------------------------- modules
def module_cases():
    from rest import EMSA, PA
    cases = []
    ctor_bad = [
        ("EMSA/dim-zero", lambda: EMSA(0, 1), value_error(r"dim must be an integer >= 1")),
        ("EMSA/dim-negative", lambda: EMSA(-8, 2), value_error(r"dim must be an integer >= 1")),
        ("EMSA/dim-float", lambda: EMSA(8.0, 2), type_error(r"dim must be an integer")),
        ("EMSA/heads-zero", lambda: EMSA(8, 0), value_error(r"num_heads must be an integer >= 1")),
        ("EMSA/heads-negative", lambda: EMSA(8, -2), value_error(r"num_heads must be an integer >= 1")),
        ("EMSA/heads-not-dividing", lambda: EMSA(10, 3), value_error(r"dim \(10\) must be divisible by num_heads \(3\)")),
        ("EMSA/sr-zero", lambda: EMSA(8, 2, sr_ratio=0), value_error(r"sr_ratio must be an integer >= 1")),
        ("EMSA/sr-negative", lambda: EMSA(8, 2, sr_ratio=-2), value_error(r"sr_ratio must be an integer >= 1")),
        ("EMSA/sr-float", lambda: EMSA(8, 2, sr_ratio=1.5), type_error(r"sr_ratio must be an integer")),
        ("EMSA/attn-drop", lambda: EMSA(8, 2, attn_drop=1.5), value_error(r"attn_drop must be in \[0")),
        ("EMSA/proj-drop-nan", lambda: EMSA(8, 2, proj_drop=float("nan")), value_error(r"proj_drop must be finite")),
        ("EMSA/qk-scale-str", lambda: EMSA(8, 2, qk_scale="x"), type_error(r"qk_scale must be a real number")),
        ("EMSA/backend", lambda: EMSA(8, 2, backend="gpu"), value_error(r"backend must be one of")),
        ("PA/dim-zero", lambda: PA(0), value_error(r"dim must be an integer >= 1")),
        ("PA/dim-negative", lambda: PA(-3), value_error(r"dim must be an integer >= 1")),
        ("PA/dim-float", lambda: PA(3.5), type_error(r"dim must be an integer")),
        ("PA/backend-int", lambda: PA(3, backend=1), type_error(r"backend must be a string")),
    ]
    for name, call, expected in ctor_bad:
        cases.append(Case(f"module-bad/{name}", call, expected))

    def emsa_forward(backend, x=None, H=3, W=4, sr=2, dtype=F32, mode="eval"):
        torch.manual_seed(0)
        m = EMSA(8, 2, qkv_bias=True, sr_ratio=sr, apply_transform=True, backend=backend).to(dtype)
        getattr(m, mode)()
        x = torch.randn(2, 12, 8, dtype=dtype) if x is None else x
        return m(x, H, W)

    def pa_forward(backend, x=None, dtype=F32):
        torch.manual_seed(0)
        m = PA(3, backend=backend).to(dtype)
        return m(torch.randn(2, 3, 5, 6, dtype=dtype) if x is None else x)

    fwd_bad = [
        ("EMSA/x-2d", lambda b: emsa_forward(b, x=torch.randn(12, 8)), value_error(r"x must be 3-dimensional \(B, N, dim\)")),
        ("EMSA/x-channels", lambda b: emsa_forward(b, x=torch.randn(2, 12, 6)), value_error(r"x must have 8 channels")),
        ("EMSA/x-int", lambda b: emsa_forward(b, x=torch.ones(2, 12, 8, dtype=torch.int64)),
         type_error(r"x must have a floating dtype")),
        ("EMSA/x-float64", lambda b: emsa_forward(b, x=torch.randn(2, 12, 8, dtype=F64)), type_error(r"x must have the module's dtype")),
        ("EMSA/x-meta", lambda b: emsa_forward(b, x=torch.randn(2, 12, 8, device="meta")), value_error(r"x must be on")),
        ("EMSA/x-list", lambda b: emsa_forward(b, x=[[1.0]]), type_error(r"x must be a torch\.Tensor")),
        ("EMSA/hw-mismatch", lambda b: emsa_forward(b, H=4, W=4), value_error(r"x has 12 tokens but H\*W")),
        ("EMSA/hw-negative", lambda b: emsa_forward(b, H=-3, W=-4), value_error(r"H must be >= 1")),
        ("EMSA/hw-float", lambda b: emsa_forward(b, H=3.0, W=4), type_error(r"H must be an int")),
        ("EMSA/hw-negative-sr1", lambda b: emsa_forward(b, H=-3, W=-4, sr=1), value_error(r"H must be >= 1")),
        ("PA/x-3d", lambda b: pa_forward(b, x=torch.randn(3, 5, 6)), value_error(r"x must be 4-dimensional")),
        ("PA/x-channels", lambda b: pa_forward(b, x=torch.randn(2, 4, 5, 6)), value_error(r"x must have 3 channels")),
        ("PA/x-uint8", lambda b: pa_forward(b, x=torch.ones(2, 3, 5, 6, dtype=torch.uint8)), type_error(r"x must have a floating")),
        ("PA/x-float64", lambda b: pa_forward(b, x=torch.randn(2, 3, 5, 6, dtype=F64)), type_error(r"x must have the module's dtype")),
    ]
    for name, call, expected in fwd_bad:
        for backend in BACKENDS:
            cases.append(Case(f"module-bad/{name}/{backend}", functools.partial(call, backend), expected))

    def emsa_matches(backend, dtype=F32, transposed=False, B=2, mode="eval"):
        x = _rand(torch.Generator().manual_seed(1), B, 12, 8, dtype=dtype)
        if transposed:
            x = x.transpose(0, 1).contiguous().transpose(0, 1)
        with torch.no_grad():
            got = emsa_forward(backend, x=x, dtype=dtype, mode=mode)
            want = emsa_forward("reference", x=x.double(), dtype=F64, mode=mode)
            lowp = emsa_forward("reference", x=x, dtype=dtype, mode=mode) if dtype in (F16, BF16) else None
        assert_matches(got, want, lowp, floor=_scale(want))

    def pa_matches(backend, dtype=F32):
        x = _rand(torch.Generator().manual_seed(1), 2, 3, 5, 6, dtype=dtype)
        with torch.no_grad():
            got, want = pa_forward(backend, x=x, dtype=dtype), pa_forward("reference", x=x.double(), dtype=F64)
            lowp = pa_forward("reference", x=x, dtype=dtype) if dtype in (F16, BF16) else None
        assert_matches(got, want, lowp, floor=_scale(x))

    for backend in BACKENDS:
        for dtype in (F32, BF16):
            cases.append(Case(f"module-ok/EMSA/{str(dtype)[6:]}/{backend}", functools.partial(emsa_matches, backend, dtype),
                              emsa_expect(backend, dtype)))
            cases.append(Case(f"module-ok/PA/{str(dtype)[6:]}/{backend}", functools.partial(pa_matches, backend, dtype),
                              pa_expect(backend, dtype)))
        cases.append(Case(f"module-ok/EMSA-non-contiguous-x/{backend}",
                          functools.partial(emsa_matches, backend, transposed=True), emsa_expect(backend)))
        cases.append(Case(f"module-ok/EMSA-empty-batch/{backend}", functools.partial(emsa_matches, backend, B=0),
                          emsa_expect(backend)))
    return cases


# --------------------------------------------------------------------------- models
def _tiny(backend=None, **kw):
    from rest import ResT
    torch.manual_seed(0)
    cfg = dict(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=5, apply_transform=True)
    cfg.update(kw)
    return ResT(backend=backend, **cfg)


def model_cases():
    from rest import ResT, rest_base, rest_lite, rest_small

    cases = []
    ctor_bad = [
        ("ResT/heads-not-dividing", lambda: ResT(embed_dims=(64, 128, 256, 500)),
         value_error(r"embed_dims\[3\] \(500\) must be divisible by num_heads\[3\] \(8\)")),
        ("ResT/sr-zero", lambda: ResT(sr_ratios=(0, 4, 2, 1)), value_error(r"sr_ratios\[0\] must be an integer >= 1")),
        ("ResT/sr-negative", lambda: ResT(sr_ratios=(8, 4, -2, 1)), value_error(r"sr_ratios\[2\] must be")),
        ("ResT/heads-zero", lambda: ResT(num_heads=(0, 2, 4, 8)), value_error(r"num_heads\[0\] must be an integer >= 1")),
        ("ResT/depth-negative", lambda: ResT(depths=(2, -1, 2, 2)), value_error(r"depths\[1\] must be an integer >= 0")),
        ("ResT/dim-negative", lambda: ResT(embed_dims=(-64, 128, 256, 512)), value_error(r"embed_dims\[0\] must be")),
        ("ResT/dim-float", lambda: ResT(embed_dims=(64.5, 128, 256, 512)), type_error(r"embed_dims\[0\] must be an integer")),
        ("ResT/mlp-ratio-zero", lambda: ResT(mlp_ratios=(4, 0, 4, 4)), value_error(r"mlp_ratios\[1\] must be > 0")),
        ("ResT/three-stages", lambda: ResT(depths=(2, 2, 2)), value_error(r"depths must have 4 entries")),
        ("ResT/dims-int", lambda: ResT(embed_dims=64), type_error(r"embed_dims must be a sequence of 4")),
        ("ResT/in-chans-zero", lambda: ResT(in_chans=0), value_error(r"in_chans must be an integer >= 1")),
        ("ResT/num-classes-negative", lambda: ResT(num_classes=-1), value_error(r"num_classes must be an integer >= 0")),
        ("ResT/drop-path-one", lambda: ResT(drop_path_rate=1.0), value_error(r"drop_path_rate must be in \[0")),
        ("ResT/drop-rate-negative", lambda: ResT(drop_rate=-0.1), value_error(r"drop_rate must be in \[0")),
        ("ResT/attn-drop-nan", lambda: ResT(attn_drop_rate=float("nan")), value_error(r"attn_drop_rate must be finite")),
        ("ResT/qk-scale-inf", lambda: ResT(qk_scale=float("inf")), value_error(r"qk_scale must be finite")),
        ("ResT/backend", lambda: ResT(backend="tpu"), value_error(r"backend must be one of")),
        ("rest_lite/fixed-config", lambda: rest_lite(embed_dims=(8, 16, 32, 64)), type_error(r"rest_lite\(\) fixes embed_dims")),
        ("rest_lite/unknown-kwarg", lambda: rest_lite(colour="red"), type_error(r"colour")),
        ("rest_small/num-classes-negative", lambda: rest_small(num_classes=-3), value_error(r"num_classes must be")),
        ("rest_base/pretrained-true", lambda: rest_base(pretrained=True), value_error(r"pretrained=True")),
        ("rest_lite/drop-path", lambda: rest_lite(drop_path_rate=2), value_error(r"drop_path_rate must be in")),
    ]
    for name, call, expected in ctor_bad:
        cases.append(Case(f"model-bad/{name}", call, expected))

    def forward(backend, x, mode="eval", model=None):
        m = (model or _tiny)(backend)
        getattr(m, mode)()
        return m(x)

    fwd_bad = [
        ("x-3d", lambda b: forward(b, torch.randn(3, 64, 64)), value_error(r"x must be 4-dimensional")),
        ("x-5d", lambda b: forward(b, torch.randn(1, 1, 3, 64, 64)), value_error(r"x must be 4-dimensional")),
        ("x-channels", lambda b: forward(b, torch.randn(1, 4, 64, 64)), value_error(r"x must have 3 channels")),
        ("x-grey", lambda b: forward(b, torch.randn(1, 1, 64, 64)), value_error(r"x must have 3 channels")),
        ("x-uint8", lambda b: forward(b, torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)),
         type_error(r"x must have a floating dtype")),
        ("x-complex", lambda b: forward(b, torch.randn(1, 3, 8, 8, dtype=torch.complex64)), type_error(r"x must have a floating")),
        ("x-float64", lambda b: forward(b, torch.randn(1, 3, 64, 64, dtype=F64)), type_error(r"x must have the module's dtype")),
        ("x-meta", lambda b: forward(b, torch.randn(1, 3, 64, 64, device="meta")), value_error(r"x must be on")),
        ("x-numpy", lambda b: forward(b, torch.randn(1, 3, 8, 8).numpy()), type_error(r"x must be a torch\.Tensor")),
        ("x-empty-height", lambda b: forward(b, torch.randn(1, 3, 0, 64)), value_error(r"too small")),
        ("train-batch-1-too-small", lambda b: forward(b, torch.randn(1, 3, 32, 32), mode="train"),
         value_error(r"x: a batch of 1 image of 32x32 gives a 1x1 last stage map")),
        ("rest_lite-x-channels", lambda b: forward(b, torch.randn(1, 2, 32, 32), model=lambda b_: rest_lite(backend=b_)),
         value_error(r"x must have 3")),
    ]
    for name, call, expected in fwd_bad:
        for backend in BACKENDS:
            cases.append(Case(f"model-bad/{name}/{backend}", functools.partial(call, backend), expected))

    # small images: the float64 oracle's depthwise convolutions are slow on the CPU
    def model_matches(backend, shape=(2, 3, 23, 19), dtype=F32, channels_last=False, nan=False):
        x = _rand(torch.Generator().manual_seed(3), *shape)
        if nan:
            x[0, 0, 5, 5] = float("nan")
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        with torch.no_grad():
            got = forward(backend, x.to(dtype), model=lambda b: _tiny(b).to(dtype))
            want = forward("reference", x.double(), model=lambda b: _tiny(b).double())
            lowp = forward("reference", x.to(dtype), model=lambda b: _tiny(b).to(dtype)) if dtype in (F16, BF16) else None
        assert got.shape == (shape[0], 5)
        if nan:  # a NaN pixel spreads through attention to the whole sample, as in the reference
            assert torch.equal(torch.isnan(got), torch.isnan(want)), "NaN pattern differs from the reference"
            return
        assert_matches(got, want, lowp, floor=_scale(want), tol=1e-3 if dtype == F32 else None)

    for backend in BACKENDS:
        for name, kw in [("odd-size", {}), ("channels-last", dict(channels_last=True)),
                         ("empty-batch", dict(shape=(0, 3, 20, 20))), ("one-pixel-image", dict(shape=(2, 3, 1, 1))),
                         ("nan-pixel", dict(nan=True)), ("bf16", dict(dtype=BF16))]:
            # the model's first op is its stem's PA: a backend that serves no PA refuses there
            expect = pa_expect(backend, kw.get("dtype", F32))
            cases.append(Case(f"model-ok/{name}/{backend}", functools.partial(model_matches, backend, **kw),
                              emsa_expect(backend, kw.get("dtype", F32)) if expect is CORRECT else expect,
                              timeout=120))
    return cases


# --------------------------------------------------------------------------- checkpoints
class NotAllowed:
    """An object that torch.load(weights_only=True) refuses to unpickle (module level: picklable)."""


def _with_file(writer):
    """Run writer(path) in a fresh temporary folder; return the path (the folder lives with the child)."""
    folder = tempfile.mkdtemp(prefix="hostile-ckpt-")
    path = writer(folder)
    return path


def checkpoint_cases():
    from rest import CheckpointError, load_checkpoint, rest_lite, save_checkpoint

    def load(source, model=None):
        return load_checkpoint(model or _tiny(), source)

    def state(**edit):
        sd = _tiny().state_dict()
        for k, v in edit.items():
            sd[k.replace("__", ".")] = v
        return sd

    def saved(obj, name="ckpt.pth"):
        def write(folder):
            p = os.path.join(folder, name)
            torch.save(obj, p)
            return p
        return _with_file(write)

    def raw_file(data: bytes, name="ckpt.pth"):
        def write(folder):
            p = os.path.join(folder, name)
            with open(p, "wb") as f:
                f.write(data)
            return p
        return _with_file(write)

    def truncated(name):
        def write(folder):
            p = os.path.join(folder, name)
            save_checkpoint(_tiny(), p)
            with open(p, "rb") as f:
                data = f.read()
            with open(p, "wb") as f:
                f.write(data[: len(data) // 2])
            return p
        return _with_file(write)

    def recursive():
        d = {}
        d["model"] = d
        return d

    def deep_recursive():
        d = {"state_dict": {}}
        d["state_dict"]["model"] = d
        return d

    def fifo():
        folder = tempfile.mkdtemp(prefix="hostile-ckpt-")
        p = os.path.join(folder, "pipe.pth")
        os.mkfifo(p)  # torch.load would block on it forever
        return p

    wrong_dtype = lambda: state(head__weight=torch.zeros(5, 64, dtype=torch.int64))  # noqa: E731
    ck = lambda m: Raises((CheckpointError,), m)  # noqa: E731
    bad = [
        ("missing-file", lambda: load("/nonexistent/rest.pth"), ck(r"not found: '/nonexistent/rest\.pth'")),
        ("directory", lambda: load(tempfile.mkdtemp()), ck(r"not a file")),
        ("fifo", lambda: load(fifo()), ck(r"not a file")),
        ("dev-zero", lambda: load("/dev/zero"), ck(r"not a file")),
        ("empty-file", lambda: load(raw_file(b"")), ck(r"cannot read checkpoint")),
        ("garbage", lambda: load(raw_file(os.urandom(4096))), ck(r"cannot read checkpoint")),
        ("garbage-safetensors", lambda: load(raw_file(b"\xff" * 64, "x.safetensors")), ck(r"cannot read checkpoint.*safetensors")),
        ("huge-header-safetensors", lambda: load(raw_file((2 ** 62).to_bytes(8, "little") + b"{}", "x.safetensors")),
         ck(r"cannot read checkpoint")),
        ("truncated-pth", lambda: load(truncated("t.pth")), ck(r"cannot read checkpoint")),
        ("truncated-safetensors", lambda: load(truncated("t.safetensors")), ck(r"cannot read checkpoint")),
        ("pickled-object", lambda: load(saved({"model": NotAllowed()})), ck(r"cannot read checkpoint")),
        ("list", lambda: load(saved([1, 2, 3])), ck(r"expected a state_dict.*found list")),
        ("tensor", lambda: load(saved(torch.zeros(3))), ck(r"expected a state_dict.*found Tensor")),
        ("int-in-memory", lambda: load(5), ck(r"expected a state_dict.*found int")),
        ("none-in-memory", lambda: load(None), ck(r"expected a state_dict.*found NoneType")),
        ("wrapper-of-int", lambda: load({"model": 5}), ck(r"found int under \['model'\]")),
        ("empty-dict", lambda: load({}), ck(r"not a state_dict")),
        ("no-wrapper-key", lambda: load({"weights": state()}), ck(r"no 'model' or 'state_dict' entry")),
        ("int-keys", lambda: load({1: torch.zeros(1)}), ck(r"not a state_dict")),
        ("self-referencing", lambda: load(recursive()), ck(r"self-referencing")),
        ("self-referencing-nested", lambda: load(deep_recursive()), ck(r"self-referencing")),
        ("self-referencing-file", lambda: load(saved(recursive())), ck(r"self-referencing")),
        ("missing-key", lambda: load({k: v for k, v in state().items() if k != "head.weight"}), ck(r"(?s)missing keys.*head\.weight")),
        ("unexpected-key", lambda: load(state(extra__weight=torch.zeros(1))), ck(r"(?s)unexpected keys.*extra\.weight")),
        ("wrong-shape", lambda: load(state(head__weight=torch.zeros(7, 64))), ck(r"(?s)shape mismatches.*head\.weight")),
        ("integer-weights", lambda: load(wrong_dtype()), ck(r"(?s)dtype mismatches.*head\.weight: integer vs floating")),
        ("complex-weights", lambda: load(state(head__bias=torch.zeros(5, dtype=torch.complex64))), ck(r"head\.bias: complex")),
        ("meta-weights", lambda: load(state(head__bias=torch.zeros(5, device="meta"))), ck(r"head\.bias: meta")),
        ("other-variant", lambda: load(saved(_tiny(embed_dims=(16, 32, 64, 128)).state_dict())), ck(r"shape mismatches")),
        ("pretrained-missing", lambda: rest_lite(pretrained="/nonexistent.pth"), ck(r"not found")),
        ("pretrained-int", lambda: rest_lite(pretrained=3), ck(r"expected a state_dict.*found int")),
    ]
    cases = [Case(f"checkpoint-bad/{name}", call, expected, timeout=90) for name, call, expected in bad]

    def round_trip(wrap, name="ckpt.pth"):
        src = _tiny()
        for p in src.parameters():
            p.data.normal_()
        sd = src.state_dict()
        if wrap is None:  # written by rest.save_checkpoint in the format the suffix names
            path = _with_file(lambda folder: save_checkpoint(src, os.path.join(folder, name)))
        else:
            path = saved(wrap(sd), name)
        dst = load(path)
        for k, v in dst.state_dict().items():
            assert torch.equal(v, sd[k]), k

    for name, wrap, fname in [("plain", lambda sd: sd, "ckpt.pth"), ("model-wrapper", lambda sd: {"model": sd}, "ckpt.pth"),
                              ("ddp-prefix", lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}}, "ckpt.pth"),
                              ("safetensors", None, "ckpt.safetensors")]:
        cases.append(Case(f"checkpoint-ok/{name}", functools.partial(round_trip, wrap, fname), CORRECT, timeout=90))
    return cases

