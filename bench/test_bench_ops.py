"""pytest-benchmark suite: emsa_attention (without and with the head mix) and pa_gate, forward and
forward + backward, at two ResT stage shapes, on every fused backend usable here, eager PyTorch
("reference") and torch.compile of it ("compile"). Same cases and callables as bench/emsa_bench.py.

Run (see bench/conftest.py):  python -m pytest bench/ --benchmark-only [--benchmark-autosave]
Compare commits:              python -m pytest bench/ --benchmark-only --benchmark-compare=0001
Benchmarks of one case share a pytest-benchmark group, so each table compares the backends.
"""
import pytest
import torch

import rest_kernels
from rest_kernels import _extension
from bench import _cases, emsa_bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 32 if DEVICE == "cuda" else 2
SHAPES = ("224-s1-lite/small", "224-s3-lite/small")
DTYPES = ("float32", "bfloat16") if DEVICE == "cuda" else ("float32",)
BACKENDS = tuple(b for b in emsa_bench.BACKEND_CHOICES
                 if b not in emsa_bench.EMULATORS + emsa_bench.ENGINES + (emsa_bench.FUSED_COMPILED,))
_SHAPES = {s.label: s for s in _cases.stage_shapes()}


def _synced(fn):
    if DEVICE != "cuda":
        return fn

    def run():  # the time of the work, not of its launch
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pass_", _cases.PASSES)
@pytest.mark.parametrize("op", _cases.OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_op(benchmark, backend, op, pass_, shape, dtype):
    reason = emsa_bench.skip_reason(backend, DEVICE, explicit=False)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    case = _cases.OpCase(op, pass_, _SHAPES[shape], BATCH, emsa_bench.DTYPES[dtype], DEVICE)
    try:
        runner = _cases.runner(case, backend)
        runner.fn()  # first call outside the timing: compilation, JIT, and the "cannot serve" check
    except rest_kernels.BackendUnavailableError as e:
        pytest.skip(str(e))
    benchmark.group = f"{op} {pass_} {shape} {dtype} B={BATCH} {DEVICE}"
    benchmark.extra_info.update(backend=backend, device=DEVICE, dtype=dtype, **case.dims())
    if runner.saved_bytes is not None:
        benchmark.extra_info["saved_bytes"] = runner.saved_bytes()
    benchmark(_synced(runner.fn))


# The models' CPU inference LayerNorm (rest/norms.py): a block's residual add and norm2, fused by
# the compiled kernel against the add and F.layer_norm it replaces, at rest_lite's stage-1 and stage-3
# token maps (batch 16).
@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("tokens, channels", [(3136, 64), (196, 256)], ids=["stage1", "stage3"])
@pytest.mark.parametrize("impl", ["kernel", "aten"])
def test_add_layer_norm(benchmark, impl, tokens, channels, dtype):
    from rest import norms
    reason = norms.kernel_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    dt = emsa_bench.DTYPES[dtype]
    x, r = (torch.randn(16, tokens, channels, dtype=dt) for _ in range(2))
    norm = torch.nn.LayerNorm(channels, eps=1e-6).to(dt).requires_grad_(False)
    if impl == "kernel":
        def fn():
            return norms.add_layer_norm(norm, x, r)
        assert norms.kernel_applies(norm, x, r)
    else:
        def fn():
            s = x + r
            return s, torch.nn.functional.layer_norm(s, (channels,), norm.weight, norm.bias, norm.eps)
    benchmark.group = f"add+layer_norm B=16 N={tokens} C={channels} {dtype} cpu"
    benchmark.extra_info.update(impl=impl, dtype=dtype, tokens=tokens, channels=channels)
    benchmark(fn)


# The models' float32 inference linear products at rest_base's batch-1 shapes (rows, in, out) and two of
# rest_lite's at batch 16: the cpu backend's packed_linear kernel (rest/dense.py PACKED_KERNEL_ON says
# where the models use it) against oneDNN's matmul on its once-reordered weight (the models' choice
# elsewhere) and F.linear (MKL's sgemm: nn.Linear).
@pytest.mark.parametrize("shape", [(3136, 96, 384), (784, 768, 192), (196, 384, 1536), (49, 3072, 768),
                                   (50176, 256, 64), (12544, 128, 512)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["kernel", "onednn", "aten"])
def test_linear_float32_inference(benchmark, impl, shape):
    from rest import dense
    rows, k, n = shape
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g) / k ** 0.5, torch.randn(n, generator=g)
    if impl == "kernel":
        reason = rest_kernels.available_backends()["cpu"]
        if reason is not None:
            pytest.skip(reason)
        panels = dense.pack_for_kernel(w)

        def fn():
            return dense.kernel_linear(x, panels, b, n)
    elif impl == "onednn":
        if dense.onednn_unavailable_reason() is not None:
            pytest.skip(dense.onednn_unavailable_reason())
        reordered = torch.ops.mkldnn._reorder_linear_weight(w)

        def fn():
            return dense.onednn_linear(x, reordered, b)
    else:
        def fn():
            return torch.nn.functional.linear(x, w, b)
    with torch.no_grad():
        torch.testing.assert_close(fn(), torch.nn.functional.linear(x.double(), w.double(), b.double()).float(),
                                   rtol=1e-4, atol=1e-4)
    benchmark.group = f"linear {rows}x{k}->{n} float32 cpu"
    benchmark.extra_info.update(impl=impl, rows=rows, in_features=k, out_features=n)
    benchmark(fn)


# The models' float32 inference depthwise convolution, EMSA's key/value reduction (kernel sr + 1, stride
# sr), at rest_lite's stage-1 and stage-3 shapes, batch 1 and 16, channels-last: the cpu backend's
# depthwise_conv2d kernel (rest/packed_conv.py says where the models use it) against oneDNN's
# convolution on a weight reordered once for the input's shape and F.conv2d.
@pytest.mark.parametrize("conv", [(1, 64, 56, 8), (1, 256, 14, 2), (16, 64, 56, 8), (16, 256, 14, 2)],
                         ids=lambda c: f"B{c[0]}-{c[1]}ch-{c[2]}px-sr{c[3]}")
@pytest.mark.parametrize("impl", ["kernel", "onednn", "aten"])
def test_depthwise_conv_float32_inference(benchmark, impl, conv):
    from rest import dense, packed_conv
    batch, channels, size, sr = conv
    k, pad = sr + 1, sr // 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(channels, 1, k, k, generator=g) / k, torch.randn(channels, generator=g)
    if impl == "kernel":
        reason = rest_kernels.available_backends()["cpu"]
        if reason is not None:
            pytest.skip(reason)
        taps = packed_conv.depthwise_taps(w)

        def fn():
            return torch.ops.rest_kernels_C.depthwise_conv2d(x, taps, b, [k, k], [sr, sr], [pad, pad])
    elif impl == "onednn":
        if dense.onednn_unavailable_reason() is not None:
            pytest.skip(dense.onednn_unavailable_reason())
        reordered = packed_conv._reorder(w, tuple(x.shape), (pad, pad), (sr, sr), (1, 1), channels)

        def fn():
            return torch.ops.mkldnn._convolution_pointwise(x, reordered, b, [pad] * 2, [sr] * 2, [1, 1], channels,
                                                           "none", [], "")
    else:
        def fn():
            return torch.nn.functional.conv2d(x, w, b, sr, pad, 1, channels)
    with torch.no_grad():
        want = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), sr, pad, 1, channels).float()
        torch.testing.assert_close(fn(), want, rtol=1e-4, atol=1e-4)
    benchmark.group = f"depthwise conv B={batch} {channels}ch {size}px sr {sr} float32 cpu"
    benchmark.extra_info.update(impl=impl, batch=batch, channels=channels, size=size, sr=sr)
    benchmark(fn)


# The bfloat16 attention forward of each cpu kernel build this CPU can run (avx512bf16: bfloat16
# products on VDPBF16PS; avx512 / avx2: float32 products on widened inputs), against eager PyTorch in
# bfloat16, at rest_lite's four stage shapes (batch 16, the model's strided q), without (stage 1) and
# with the head mix.
@pytest.mark.parametrize("stage", [(1, 3136, 49, 64), (2, 784, 49, 64), (4, 196, 49, 64), (8, 49, 49, 64)],
                         ids=["stage1", "stage2", "stage3", "stage4"])
@pytest.mark.parametrize("impl", ["reference", *(f"cpu-{isa}" for isa in _extension.runnable_cpu_builds())])
def test_emsa_bf16_forward_per_cpu_build(benchmark, impl, stage):
    h, N, M, d = stage
    g = torch.Generator().manual_seed(0)
    q = torch.randn(16, N, h, d, generator=g).to(torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(16, h, M, d, generator=g).to(torch.bfloat16) for _ in range(2))
    w = torch.randn(h, h, generator=g) if h > 1 else None
    backend = "reference" if impl == "reference" else "cpu"
    before = _extension.cpu_kernels_status()["selected"] if backend == "cpu" else None
    if backend == "cpu":
        _extension.select_cpu_kernels(impl[len("cpu-"):])

    def fn():
        with torch.no_grad():
            return rest_kernels.emsa_attention(q, k, v, w, backend=backend)
    try:
        fn()
        benchmark.group = f"emsa{'-mix' if w is not None else ''} fwd B=16 h={h} N={N} M={M} d={d} bfloat16 cpu"
        benchmark.extra_info.update(impl=impl, heads=h, tokens=N, keys=M, head_dim=d)
        benchmark(fn)
    finally:
        if before is not None:
            _extension.select_cpu_kernels(before)
