"""Which part of the fused ResT model carries float32 gradient error: a table per part.

One train-mode step of rest_lite (the official fixture's input, weights and output gradient) in
float32, with each fused part switched on alone and everything else on the official eager math:
the `cpu` EMSA kernels, the `cpu` PA kernels, the oneDNN linear layers, the channels-last maps;
then all of them together (what the model does by default on a CPU). Each run's error is measured
against a float64 run of the official math (the reference backend) on the same float32-rounded
weights and input, taking the same ReLU branches as the float32 run (tests/support/grad_errors.py says why),
so the table shows arithmetic error only.

Statistic, per gradient g of one parameter (and for the logits and the input gradient):
    err(g) = ||g - g64||_F / ||g64||_F
except for the gradients that are exactly zero in exact arithmetic (the mix bias, kv.bias,
sr_norm.bias, the PatchEmbed conv biases in train mode), whose float64 value is rounding noise:
those divide by max(||g64||, 1e-3 x the largest gradient norm). The ratio column divides by
PyTorch's own float32 error: that of the official math in float32 on NCHW maps, and the largest over
four such runs (NCHW and channels-last maps, each batch order), which is what tests/test_models.py
bounds by (ratio <= 2; the test says why four).

    python scripts/grad_error_table.py                 # the table, worst 8 gradients per part
    python scripts/grad_error_table.py --op-level      # and each EMSA call alone, per cpu kernel build
    REST_KERNELS_CPU_ISA=avx2 python scripts/grad_error_table.py   # the AVX2 kernels on an AVX-512 CPU
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import rest  # noqa: E402
import rest_kernels  # noqa: E402
from rest import EMSA, PA, rest_lite  # noqa: E402
from rest import batchnorm  # noqa: E402
from rest.dense import Linear  # noqa: E402
from rest_kernels import _extension, use_backend  # noqa: E402
from support.reference_data import fill_weights, load  # noqa: E402
from support.grad_errors import relative_errors, train_step  # noqa: E402


def model_for(parts: set[str], dtype=torch.float32):
    """rest_lite with the fixture weights; `parts` names the fused parts switched on."""
    case = load("rest_v1_models.zip")["rest_lite"]
    model = rest_lite().double()
    fill_weights(model, case["seed"])
    model = model.float().to(dtype)  # float32-rounded weights for every run, the float64 one too
    model.set_backend("reference")
    for m in model.modules():
        if isinstance(m, EMSA) and "emsa" in parts:
            m.backend = "cpu"
        if isinstance(m, PA) and "pa" in parts:
            m.backend = "cpu"
        if isinstance(m, Linear) and "onednn" in parts:
            m.backend = "cpu"  # the oneDNN rule looks only at the layer's backend
    if "channels_last" in parts:
        model.backend = "cpu"  # the layout rule looks only at the model's backend
    return model


def errors_of(parts, layout, x32, dlogits, reverse=False):
    """err of one float32 run against the float64 official math on the branch its ReLUs took
    (reverse: the batch in reverse order, the same math with other roundings)."""
    if reverse:
        order = torch.arange(x32.shape[0] - 1, -1, -1)
        x32, dlogits = x32[order], dlogits[order]
    with use_backend("reference"):
        grads, masks = train_step(model_for(parts), x32.contiguous(memory_format=layout), dlogits)
        oracle, _ = train_step(model_for(set()).double(), x32.double(), dlogits, relu_masks=masks)
    return relative_errors(grads, oracle)


NCHW, CL = torch.contiguous_format, torch.channels_last
PYTORCH_RUNS = {  # the official math in float32: four roundings of the same computation
    "pytorch NCHW": (set(), NCHW, False),
    "pytorch NCHW, batch reversed": (set(), NCHW, True),
    "pytorch channels-last": (set(), CL, False),
    "pytorch channels-last, batch reversed": (set(), CL, True),
}
RUNS = {
    **PYTORCH_RUNS,
    "cpu EMSA only": ({"emsa"}, NCHW, False),
    "cpu PA only": ({"pa"}, NCHW, False),
    "oneDNN linear only": ({"onednn"}, NCHW, False),
    "channels-last maps only": ({"channels_last"}, NCHW, False),
    "all fused (model default)": ({"emsa", "pa", "onednn", "channels_last"}, NCHW, False),
}


def captured_emsa_calls(x32, dlogits):
    """The inputs and output gradient of every emsa_attention call of the float64 train step."""
    calls, original = [], rest.modules.rest_kernels.emsa_attention

    def spy(q, k, v, w, b, **kw):
        out = original(q, k, v, w, b, **kw)
        rec = dict(q=q.detach(), k=k.detach(), v=v.detach(), w=w, b=b,
                   kw={n: kw[n] for n in ("scale", "eps")})
        out.register_hook(lambda g: rec.__setitem__("dout", g.detach()))
        calls.append(rec)
        return out

    rest.modules.rest_kernels.emsa_attention = spy
    try:
        with use_backend("reference"):
            train_step(model_for(set()).double(), x32.double(), dlogits)
    finally:
        rest.modules.rest_kernels.emsa_attention = original
    return calls


def op_level_errors(call, backend):
    """err of emsa_attention's output and gradients in float32 against float64, on a call's inputs
    rounded to float32 (both sides)."""
    def run(dtype):
        t = {n: call[n].float().to(dtype).detach().requires_grad_(True) for n in ("q", "k", "v", "w", "b")}
        out = rest_kernels.emsa_attention(t["q"], t["k"], t["v"], t["w"], t["b"], **call["kw"],
                                          backend=backend if dtype == torch.float32 else "reference")
        out.backward(call["dout"].float().to(dtype))
        return {"out": out.detach(), **{f"d{n}": t[n].grad for n in ("q", "k", "v", "w")}}
    got, want = run(torch.float32), run(torch.float64)
    return {n: ((got[n].double() - want[n]).norm() / want[n].norm()).item() for n in want}


def print_op_level(x32, dlogits):
    """Each mixing EMSA call of the model at the op level: the cpu kernels of every build this CPU can
    run, and PyTorch's float32 (the reference backend), against float64."""
    status = _extension.cpu_kernels_status()
    builds = _extension.runnable_cpu_builds()
    print("\n| EMSA call (B, h, N, d; M) | output / gradient | PyTorch float32 | "
          + " | ".join(f"cpu {isa}" for isa in builds) + " |")
    print("|---|---|---:|" + "---:|" * len(builds))
    try:
        for call in captured_emsa_calls(x32, dlogits):
            if call["w"] is None:
                continue
            rows = {"reference": op_level_errors(call, "reference")}
            for isa in builds:
                _extension.select_cpu_kernels(isa)
                rows[isa] = op_level_errors(call, "cpu")
            shape = f"{tuple(call['q'].shape)}; {call['k'].shape[2]}"
            for n in rows["reference"]:
                print(f"| {shape} | {n} | {rows['reference'][n]:.2e} | "
                      + " | ".join(f"{rows[isa][n]:.2e}" for isa in builds) + " |")
    finally:
        _extension.select_cpu_kernels(status["selected"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worst", type=int, default=8, help="gradients listed per part")
    p.add_argument("--op-level", action="store_true",
                   help="also each mixing EMSA call at the op level, on every cpu kernel build this CPU runs")
    p.add_argument("--native-batchnorm", action="store_true",
                   help="channels-last maps use PyTorch's own BatchNorm kernel (as before rest/batchnorm.py)")
    args = p.parse_args(argv)
    if args.native_batchnorm:
        batchnorm._accurate_path_applies = lambda x: False
    ref = load("rest_v1_models.zip")
    x32, dlogits = ref["input"].float(), ref["rest_lite"]["dlogits"]
    errors = {name: errors_of(parts, layout, x32, dlogits, rev) for name, (parts, layout, rev) in RUNS.items()}
    pytorch = {k: max(errors[run][k] for run in PYTORCH_RUNS) for k in errors["pytorch NCHW"]}
    print(f"cpu kernels: {_extension.cpu_isa_description()}")
    nchw = errors["pytorch NCHW"]
    print("| run | max err | max ratio to PyTorch (NCHW run, largest of the four PyTorch runs) "
          "| worst gradients (error, ratio to the largest PyTorch run) |")
    print("|---|---:|---:|---|")
    for name, err in errors.items():
        ratio = {k: err[k] / pytorch[k] if pytorch[k] > 0 else float("inf") for k in err}
        ratio_nchw = max(err[k] / nchw[k] for k in err if nchw[k] > 0)
        worst = sorted(ratio, key=ratio.get, reverse=True)[:args.worst]
        cells = ", ".join(f"{k} {err[k]:.2e} ({ratio[k]:.2f}x)" for k in worst)
        print(f"| {name} | {max(err.values()):.2e} | {ratio_nchw:.2f}x, {max(ratio.values()):.2f}x | {cells} |")
    if args.op_level:
        print_op_level(x32, dlogits)


if __name__ == "__main__":
    main()
