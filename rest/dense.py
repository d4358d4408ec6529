"""The model zoo's linear layers: nn.Linear whose CPU float32 (and bfloat16) products run on oneDNN.

Why: at 224 px the linear layers (q, kv, proj, the MLP) are about 60% of rest_base's CPU inference
time, and the matrix multiply PyTorch uses for them (MKL's sgemm) does not take an AVX-512 path on
every x86 CPU. Measured 2026-11-22 on a 2-core AMD EPYC with AVX-512 (Zen 4), 2 threads, float32:
MKL (torch.addmm) 100-180 GFLOP/s at ResT's shapes, oneDNN's matmul 300-410 GFLOP/s; the whole-model
effect on that machine and on an AVX2 one is in docs/benchmarks.md ("Whole models"). oneDNN also
applies the bias (and, when no gradient is needed, the MLP's GELU, except on CPUs where that post-op
measured slower: GELU_APART_ON) inside the matmul, which saves the bias broadcast copy and a pass over
the 4x-wide hidden activations. With
gradients, the backward's two products (dx, dweight) run on oneDNN too; under create_graph (double
backward) they are plain differentiable matmuls.

Which product a layer runs is its `linear_impl` option (the models and modules pass theirs down):
- "aten": always F.linear, i.e. exactly nn.Linear;
- "onednn": oneDNN for every call it can serve, F.linear for the others;
- "auto" (the default): as "onednn", except that the layer stays on F.linear when its rest_kernels
  backend (its `backend`, else the current default, see rest_kernels.use_backend) is "reference",
  so that the reference model stays the official eager math, the benchmarks' baseline, or when the
  environment variable REST_KERNELS_ONEDNN_LINEAR is "0" (the switch for comparisons; the explicit
  values ignore it).
oneDNN can serve a layer when (all must hold):
- its weight is a float32 CPU tensor (the layer's own device and dtype: the input must match them
  anyway), or a bfloat16 one where oneDNN has a bfloat16 path on this CPU
  (torch.ops.mkldnn._is_mkldnn_bf16_supported(): avx512_bf16 / AMX, or AVX-512 cores it emulates on),
  and CPU autocast is off (under autocast nn.Linear runs in the autocast dtype, on oneDNN
  already);
- no ONNX export is running: ONNX has no operator for oneDNN's matmul, so the file gets MatMul / Gemm
  (the same product up to rounding, as the rest_kernels ops get their reference math there);
- torch.compile / torch.export are not tracing the layer: inductor lowers oneDNN's linear only for
  weights that are graph constants (its "freezing" mode) and fails on a module's parameters, and it
  generates its own GEMMs (oneDNN ones with freezing) anyway; an exported program should carry the
  standard op. So a compiled or exported model has F.linear, the same product up to rounding;
- torch was built with oneDNN and its linear entry point answers a self-test (checked once; the
  reason it is unusable is logged once).
uses_onednn() is the one place where the choice is made. It reads the layer's configuration and the
process, never the input: torch.fx records one call of linear() (a leaf function), which makes the
same choice when the traced module runs, so an fx-traced model computes what the eager one does.

The results are the float32 products of a different GEMM: equal to nn.Linear's up to rounding
(tests/test_dense.py compares both with float64).

Why bfloat16 too: a model cast to bfloat16 for CPU inference (rest.optimize_for_inference(model,
dtype=torch.bfloat16)) otherwise runs nn.Linear's addmm, which first copies the broadcast bias into
the whole output and leaves the MLP's GELU as a separate pass over the 4x-wide hidden map; oneDNN
applies both inside its matmul (float32 accumulation, one rounding to bfloat16, as addmm). Measured
2026-12-05 on the 2-core AMD EPYC Zen 4 with avx512_bf16, 2 threads, rest_lite batch 16 at 224 px in
bfloat16: 267 ms per call with addmm, 249 ms with oneDNN (interleaved, median of 7).

Which float32 product runs for inference (no gradient, a prepacked weight: Linear.prepack, which
rest.optimize_for_inference calls) on CPUs where oneDNN's matmul is the slower one (PACKED_KERNEL_ON):
the cpu backend's own packed_linear kernel (csrc/cpu/packed_linear.cpp, its header has the per-shape
measurements) on the weight packed once into column panels, with the bias and the exact GELU applied
inside it. Same rule as oneDNN's path otherwise (uses_onednn decides whether the layer is on the
library's products at all); packed_kernel_unavailable_reason() says why it is not used elsewhere.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import rest_kernels

from . import _checks

logger = logging.getLogger("rest_kernels")

#: set to "0" to keep the linear layers whose linear_impl is "auto" on nn.Linear's own path
ENV_VAR = "REST_KERNELS_ONEDNN_LINEAR"

#: the values of the linear_impl option ("auto" is the default)
LINEAR_IMPLS = ("auto", "onednn", "aten")


def check_linear_impl(linear_impl) -> str:
    """linear_impl if it is one of LINEAR_IMPLS, else TypeError / ValueError naming the argument."""
    return _checks.choice("linear_impl", linear_impl, LINEAR_IMPLS)

_unavailable: list[str | None] = []  # [reason or None], computed once
_unavailable_bf16: list[str | None] = []  # the same for bfloat16 weights


# assume_constant_result: torch.compile takes the answer as a constant instead of tracing the self-test
@torch.compiler.assume_constant_result
def onednn_unavailable_reason() -> str | None:
    """None when oneDNN's fused linear can run in this process, else why not (computed once)."""
    if not _unavailable:
        _unavailable.append(_probe())
        if _unavailable[0] is not None:
            logger.info("rest: linear layers use nn.Linear's own CPU path: %s", _unavailable[0])
    return _unavailable[0]


@torch.compiler.assume_constant_result
def onednn_bf16_unavailable_reason() -> str | None:
    """None when oneDNN's linear can also take bfloat16 weights in this process, else why not (once)."""
    if not _unavailable_bf16:
        _unavailable_bf16.append(onednn_unavailable_reason() or _probe_bf16())
        if _unavailable_bf16[0] is not None:
            logger.info("rest: bfloat16 linear layers use nn.Linear's own CPU path: %s", _unavailable_bf16[0])
    return _unavailable_bf16[0]


def _probe_bf16() -> str | None:
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN has no bfloat16 path on this CPU (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False)"
    try:
        x, w, b = (torch.randn(3, 5).bfloat16(), torch.randn(4, 5).bfloat16(), torch.randn(4).bfloat16())
        with torch.no_grad():
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")
        want = F.gelu(F.linear(x.double(), w.double(), b.double()))
    except Exception as e:  # noqa: BLE001
        return f"torch.ops.mkldnn._linear_pointwise failed its bfloat16 self-test ({type(e).__name__}: {e})"
    # float32 accumulation of exact bfloat16 inputs, one rounding: within a bfloat16 ulp (2^-8 relative)
    if got.dtype != torch.bfloat16 or not torch.allclose(got.double(), want, rtol=2 ** -7, atol=1e-2):
        return "torch.ops.mkldnn._linear_pointwise failed its bfloat16 self-test (wrong values)"
    return None


def _probe() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None:
        return "this torch build has no torch.ops.mkldnn._linear_pointwise"
    try:
        x, w, b = torch.randn(3, 5), torch.randn(4, 5), torch.randn(4)
        with torch.no_grad():
            got = op(x, w, b, "gelu", [], "none")
        want = F.gelu(F.linear(x.double(), w.double(), b.double()))
    except Exception as e:  # noqa: BLE001  (any failure of a private entry point means: do not use it)
        return f"torch.ops.mkldnn._linear_pointwise failed its self-test ({type(e).__name__}: {e})"
    if got.shape != want.shape or not torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5):
        return "torch.ops.mkldnn._linear_pointwise failed its self-test (wrong values)"
    return None


def on_reference_backend(backend: str | None) -> bool:
    """Whether a module pinned to `backend` (None: the current default) runs the `reference` backend,
    whose models "auto" keeps on the official eager math (nn.Linear here, NCHW maps in rest/layout.py)."""
    return (backend if backend is not None else rest_kernels.default_backend()) == "reference"


def _library_products_allowed(weight: torch.Tensor, linear_impl: str, backend: str | None) -> bool:
    """The half of the rule that the oneDNN path and the compiled packed_linear kernel share."""
    if linear_impl == "aten":
        return False
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False  # autocast casts F.linear's inputs; the library's ops are not on its lists
    if torch.onnx.is_in_onnx_export():
        return False  # no ONNX operator for them: the file gets the standard product
    if linear_impl == "auto":
        if os.environ.get(ENV_VAR, "1") == "0":
            return False
        if on_reference_backend(backend):
            return False
    return True


def compiled_kernel_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            linear_impl: str = "auto", backend: str | None = None) -> bool:
    """Whether torch.compile (not torch.export, whose programs carry the standard op) traces this call
    as the packed_linear kernel: a layer prepacked for it (Linear.prepack; float32), no gradient.

    Why: under torch.compile the oneDNN path is not taken (uses_onednn), and inductor's own choice
    for F.linear is oneDNN's matmul again (its freezing mode), the slower product where
    PACKED_KERNEL_ON holds. The traced graph packs the weight with pack_linear_weight, an op on a
    graph constant that inductor's freezing folds, so the panels are made once, at compile time."""
    if not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    packed = getattr(weight, PACKED_ATTR, None)
    if packed is None or not packed.for_kernel or weight.dtype != torch.float32 or x.dtype != torch.float32:
        return False
    return not _needs_grad(x, weight, bias) and _library_products_allowed(weight, linear_impl, backend)


def uses_onednn(weight: torch.Tensor, linear_impl: str = "auto", backend: str | None = None) -> bool:
    """Whether a linear layer with this weight, linear_impl and backend takes the oneDNN path (see the
    module docstring for the rule): the layer's configuration and the process decide, not the input."""
    if not _library_products_allowed(weight, linear_impl, backend):
        return False
    if torch.compiler.is_compiling():
        return False  # inductor cannot lower it on parameters (module docstring); tracers get F.linear
    if weight.dtype == torch.bfloat16:
        return onednn_bf16_unavailable_reason() is None
    return onednn_unavailable_reason() is None


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def _has_hooks(module: nn.Module) -> bool:
    # A fused fc1+GELU would skip hooks on either module; only fuse when there are none.
    return bool(module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


#: CPU capability levels (torch.backends.cpu.get_cpu_capability()) where oneDNN's matmul applies the
#: exact (erf) GELU post-op slower than the matmul alone plus ATen's vectorised GELU pass after it, so
#: the MLP's GELU runs as that separate pass (in place) there. Measured 2026-12-06 on a 2-core AMD
#: EPYC with AVX2 only (oneDNN's brg_matmul:avx2; the two GELUs gave the same bits there):
#: - rest_lite's fc1 alone, 1 thread, packed weights, medians of 40 (another job on the other core):
#:   (3136, 64 -> 256) 2.2-2.6 ms with the post-op against 2.0-2.1 apart, (49, 512 -> 2048) 2.1
#:   against 1.6-1.7; the post-op's cost hardly shrinks with the element count (about 0.5-0.9 ms
#:   from 0.8 M down to 0.1 M elements, where ATen's pass takes 1.0 down to 0.12 ms);
#: - the optimized rest_lite, 2 threads, both settings interleaved in one process (medians of 30 /
#:   8): batch 1 44.0 -> 41.2 ms, batch 16 533 -> 529 ms (within the noise).
#: On AVX-512, where the fused form was adopted (commit f98ce83), oneDNN keeps it; elsewhere too
#: (not measured).
GELU_APART_ON = frozenset({"AVX2"})


def onednn_gelu_epilogue() -> bool:
    """Whether onednn_linear(gelu=True) asks oneDNN for the GELU inside its matmul on this CPU."""
    return torch.backends.cpu.get_cpu_capability() not in GELU_APART_ON


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False):
    """x @ weight.T + bias (then the exact GELU) on oneDNN's matmul, the GELU inside it where
    onednn_gelu_epilogue() says so, else in place right after; callers check uses_onednn."""
    if gelu and onednn_gelu_epilogue():
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    y = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    # in place: no second hidden-size map (no gradient is recorded on this path, see linear())
    return torch.ops.aten.gelu_(y) if gelu else y


#: CPU capability levels (torch.backends.cpu.get_cpu_capability()) where a prepacked float32 linear
#: layer runs the cpu backend's packed_linear kernel instead of oneDNN's matmul for inference. Measured
#: 2026-12-06 on a 2-core AMD EPYC with AVX2 only, 2 threads: per product (rest_base's shapes) the
#: kernel ran 9-28% faster than oneDNN's brg_matmul:avx2 with its weight reordered once when each call
#: starts on a quiet process (as a model's products do; level to 25% faster back to back), and within
#: 3% of ONNX Runtime's MLAS or faster (csrc/cpu/packed_linear.cpp has the table); rest_base batch 1
#: 99.0 -> 88.0 ms eager, 92.9 -> 87.6 compiled (docs/cpu_inference_profile.md). On AVX-512 oneDNN
#: stays: there the kernel is level with it, not faster. `python -m pytest bench/test_bench_ops.py -k
#: "linear_float32 and not aten"` (2 threads, back to back, medians, us, kernel / oneDNN, at (3136,
#: 96, 384), (784, 768, 192), (196, 384, 1536), (49, 3072, 768)): with one-panel tiles (6 of the 32
#: vector registers as accumulators, sized for AVX2's 16) 1088 / 713, 1119 / 711, 1126 / 710, 1190 /
#: 834 on a 2-core Intel Xeon (Emerald Rapids), 797 / 530, 758 / 531, 824 / 529, 821 / 539 on a 2-core
#: AMD EPYC (Zen 5, family 26), both 2026-12-07; with four-panel tiles (csrc/cpu/packed_linear.cpp
#: kTilePanels), same Zen 5 machine and day: 521 / 545, 547 / 517, 518 / 520, 534 / 560, and at two of
#: rest_lite's batch-16 products, (50176, 256, 64) and (12544, 128, 512), 5924 / 5083 and 4049 / 3765,
#: oneDNN 8-17% ahead. The compiled rest_lite and rest_base (224 px, 2 threads; an ad-hoc script, two
#: compiled copies of each model built with REST_KERNELS_PACKED_LINEAR at 0 and 1, calls interleaved,
#: medians, ms, oneDNN / kernel), two runs of 11 and 15 calls on that Zen 5: batch 1 17.7 / 16.1 and
#: 18.9 / 19.2 (rest_lite), 62.1 / 56.6 and 41.2 / 40.0 (rest_base); batch 16 177 / 182 and 194 / 201,
#: 489 / 501 and 470 / 483, each within its run's IQR (4-66 ms; the machine had other load): no gain
#: to switch for. The same rule gives
#: EMSA's depthwise reduction the cpu backend's depthwise_conv2d kernel (rest/packed_conv.py;
#: csrc/cpu/depthwise_conv.cpp has its AVX2 measurements). On the AVX-512 Xeon above (`-k
#: depthwise_conv_float32`, us, kernel against oneDNN): batch 1 12.6 / 37.3 (256 channels, 14 px, sr 2)
#: and 16.2 / 40.4 (64 channels, 56 px, sr 8), batch 16 115 / 103 and 261 / 293: about 0.25 ms of a
#: 26-30 ms rest_lite batch-1 call, not split into a rule of its own.
PACKED_KERNEL_ON = frozenset({"AVX2"})

#: "0": prepack keeps oneDNN's copy everywhere; "1": the packed_linear (and depthwise_conv2d) kernel
#: wherever the cpu backend's kernels load, whatever PACKED_KERNEL_ON says (for comparisons and tests;
#: read at prepack time)
PACKED_KERNEL_ENV_VAR = "REST_KERNELS_PACKED_LINEAR"

_packed_kernel_unavailable: list[str | None] = []  # [reason or None], computed once


def packed_kernel_unavailable_reason() -> str | None:
    """None when prepack() gives a float32 layer the packed_linear kernel's panels (and
    PackedConv2d.from_conv a depthwise layer the depthwise_conv2d kernel's taps), else why they keep
    oneDNN's copy (the capability rule is computed once and logged once; the switch is read each time)."""
    switch = os.environ.get(PACKED_KERNEL_ENV_VAR, "")
    if switch == "0":
        return f"{PACKED_KERNEL_ENV_VAR}=0"
    if not _packed_kernel_unavailable:
        reason = rest_kernels.available_backends()["cpu"]
        if reason is not None:
            reason = f"the cpu backend's kernels do not load ({reason})"
        else:
            _register_packed_fakes()
        _packed_kernel_unavailable.append(reason)
        if reason is not None:
            logger.info("rest: prepacked linear layers keep oneDNN's copy: %s", reason)
    if _packed_kernel_unavailable[0] is not None or switch == "1":
        return _packed_kernel_unavailable[0]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in PACKED_KERNEL_ON:
        return f"oneDNN's matmul is used at CPU capability {capability} (PACKED_KERNEL_ON: {sorted(PACKED_KERNEL_ON)})"
    return None


def _register_packed_fakes() -> None:
    """The ops' shape functions, so that torch.library.opcheck and FakeTensor can reason about them
    (the linear ones here, the convolutions' in rest/packed_conv.py)."""
    # the panel width is the kernels' (csrc/cpu/kernels.h kPackedLinearPanel): asked of them once
    panel = torch.ops.rest_kernels_C.pack_linear_weight(torch.zeros(1, 1)).shape[-1]
    from .packed_conv import register_kernel_fakes  # here, not at import: packed_conv imports this module
    register_kernel_fakes()

    @torch.library.register_fake("rest_kernels_C::pack_linear_weight")
    def _fake_pack(weight):
        return weight.new_empty(((weight.shape[0] + panel - 1) // panel, weight.shape[1], panel))

    @torch.library.register_fake("rest_kernels_C::packed_linear")
    def _fake_linear(x, packed_weight, bias, out_features, gelu):
        return x.new_empty((*x.shape[:-1], out_features))


def kernel_pack(pack):
    """Marks `pack` (a PackedWeight pack function) as making the cpu backend kernels' own copy of a
    weight (PackedWeight.for_kernel), not oneDNN's: the layer then calls the kernel on it."""
    pack.packs_for_kernel = True
    return pack


@kernel_pack
def pack_for_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The packed_linear kernel's panels of a (out, in) float32 weight (a PackedWeight pack function)."""
    return torch.ops.rest_kernels_C.pack_linear_weight(weight)


def kernel_linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                  gelu: bool = False) -> torch.Tensor:
    """x @ weight.T + bias (then the exact GELU, inside the kernel) on the weight's panels."""
    return torch.ops.rest_kernels_C.packed_linear(x, panels, bias, out_features, gelu)


def _onednn_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a @ b_t.T on oneDNN (b_t may be any strided view; oneDNN reorders it)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")


class _TrainableOneDnnLinear(torch.autograd.Function):
    """The oneDNN linear with gradients. Saves what F.linear saves (x and the weight). Backward: the
    two products on oneDNN; under create_graph (double backward) plain differentiable matmuls."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g2 = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        differentiable = torch.is_grad_enabled()  # create_graph: the products must be traced
        dx = dw = db = None
        if need_x:
            dx = (g2 @ weight if differentiable else _onednn_mm(g2, weight.t())).reshape(x.shape)
        if need_w:
            dw = g2.t() @ x2 if differentiable else _onednn_mm(g2.t(), x2.t())
        if need_b and ctx.has_bias:
            db = g2.sum(0)
        return dx, dw, db


#: the attribute of a weight Parameter that holds its PackedWeight (Linear.prepack)
PACKED_ATTR = "_rest_onednn_packed"


class PackedWeight:
    """oneDNN's own (blocked) copy of a linear layer's weight, for inference without gradients.

    Why: given a plain (out, in) weight, oneDNN reorders it into its blocked layout on every call;
    with the reordered copy kept (torch.ops.mkldnn._reorder_linear_weight, what inductor's freezing
    mode does) the matmul starts at once. Measured 2026-12-05 on the 2-core AMD EPYC Zen 4, 2 threads,
    float32, median of 50: (rows, in, out) = (49, 768, 3072) 1388 -> 1065 us, (3136, 96, 384) 1310 ->
    1053 us, (196, 384, 1536) 1067 -> 1035 us; the same products bit for bit.
    rest.optimize_for_inference gives each linear layer's weight one (Linear.prepack). The copy follows
    the weight: it is rebuilt on first use after the weight changes (another tensor, or an in-place
    update: its version counter), holding the weight it was made from so that its memory cannot be
    reused by another tensor meanwhile; deepcopy and pickling give an empty one (rebuilt on first use):
    oneDNN's opaque tensors have no storage to copy."""

    def __init__(self, pack=None):
        # pack: weight -> oneDNN's copy (a picklable callable; default: the linear layers' reorder;
        # rest/packed_conv.py gives the convolutions')
        self._pack = pack
        self._for_kernel = getattr(pack, "packs_for_kernel", False)  # kernel_pack's mark, read once
        self._source = None  # the weight the copy was made from (a detached alias: same version counter)
        self._version = None
        self._packed = None

    @property
    def for_kernel(self) -> bool:
        """Whether the copy is for one of the cpu backend's kernels (packed_linear's panels, or the
        depthwise convolution's taps: rest/packed_conv.py), else oneDNN's blocked weight."""
        return self._for_kernel

    @property
    def pack(self):
        """The pack function (weight, *hint) -> copy: what a compiled graph traces instead of get()."""
        return self._pack

    def get(self, weight: torch.Tensor, *hint) -> torch.Tensor:
        """The copy for `weight` (made now if it has none or the weight changed). hint: what else the
        pack function is given and the copy depends on (a convolution's input shape: oneDNN's best
        blocked layout depends on it, and a copy made for another shape is reordered on every call)."""
        source = self._source
        if (source is None or source.data_ptr() != weight.data_ptr() or source.dtype != weight.dtype
                or source.shape != weight.shape or self._version != (weight._version, hint)):
            with torch.no_grad():
                w = weight.detach()
                self._packed = torch.ops.mkldnn._reorder_linear_weight(w) if self._pack is None else self._pack(w, *hint)
            self._source, self._version = weight.detach(), (weight._version, hint)
        return self._packed

    def __deepcopy__(self, memo):
        return PackedWeight(self._pack)

    def __getstate__(self):
        return {"pack": self._pack}

    def __setstate__(self, state):
        self.__init__(state.get("pack"))


@torch.fx.wrap
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, linear_impl: str = "auto",
           backend: str | None = None, gelu: bool = False) -> torch.Tensor:
    """x @ weight.T + bias, then the exact GELU when `gelu`, by the product uses_onednn() picks for
    these options: oneDNN (the GELU inside its matmul when no gradient is needed, with the weight's
    PackedWeight when it has one), else F.linear.

    A leaf function for torch.fx (torch.fx.wrap): a symbolic trace records this call instead of the
    branches below, so the traced module makes the same choice, on the real tensors, as eager."""
    if compiled_kernel_applies(x, weight, bias, linear_impl, backend):
        return kernel_linear(x, pack_for_kernel(weight), bias, weight.shape[0], gelu=gelu)
    if uses_onednn(weight, linear_impl, backend):
        if _needs_grad(x, weight, bias):
            y = _TrainableOneDnnLinear.apply(x, weight, bias)
        else:
            packed = getattr(weight, PACKED_ATTR, None)
            if packed is not None and packed.for_kernel:
                if weight.dtype == torch.float32:
                    return kernel_linear(x, packed.get(weight), bias, weight.shape[0], gelu=gelu)
                packed = None  # the panels are float32: a weight cast in place runs oneDNN on itself
            return onednn_linear(x, weight if packed is None else packed.get(weight), bias, gelu=gelu)
    else:
        y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


class Linear(nn.Linear):
    """nn.Linear (same parameters, state_dict keys, init and results up to rounding) whose CPU float32
    and bfloat16 products run on oneDNN. linear_impl: "auto" (default), "onednn" or "aten" (see the module
    docstring); `backend` pins the rest_kernels backend that "auto" looks at."""

    def __init__(self, in_features, out_features, bias=True, backend=None, device=None, dtype=None, *,
                 linear_impl="auto"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.backend = rest_kernels.check_backend_name(backend) if backend is not None else None
        self.linear_impl = check_linear_impl(linear_impl)

    def extra_repr(self):
        return super().extra_repr() + (f", linear_impl={self.linear_impl!r}" if self.linear_impl != "auto" else "")

    def prepack(self) -> bool:
        """Keep a packed copy of the weight for calls without gradients: the packed_linear kernel's
        panels for a float32 weight where packed_kernel_unavailable_reason() is None, else oneDNN's
        blocked copy (PackedWeight; for inference: rest.optimize_for_inference does it). Returns
        whether the layer takes the library's products (uses_onednn) now (its copy is made on the
        first such call). The copy hangs on the weight Parameter itself, so torch.fx traces (which
        pass the Parameter) use it too; a deep copy of the layer packs its own weight; a weight
        replaced by another Parameter (`layer.weight = ...`) has none until prepack() is called again."""
        kernel = self.weight.dtype == torch.float32 and packed_kernel_unavailable_reason() is None
        setattr(self.weight, PACKED_ATTR, PackedWeight(pack_for_kernel if kernel else None))
        self._prepacked = True  # a module attribute, so that a deep copy packs its own weight (__setstate__)
        return uses_onednn(self.weight, self.linear_impl, self.backend)

    def __setstate__(self, state):
        # copy.deepcopy (and unpickling) end here with the module's new Parameters; deepcopy's
        # Parameters lose their Python attributes (torch.nn.Parameter.__deepcopy__ copies the data
        # only), so a prepacked layer gives its copy's weight a packed copy of its own again.
        super().__setstate__(state)
        if self.__dict__.get("_prepacked") and getattr(self.weight, PACKED_ATTR, None) is None:
            self.prepack()

    @property
    def packed(self) -> PackedWeight | None:
        """The weight's PackedWeight (prepack), or None."""
        return getattr(self.weight, PACKED_ATTR, None)

    def forward(self, x):
        return linear(x, self.weight, self.bias, self.linear_impl, self.backend)


def linear_gelu(fc: nn.Linear, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(fc(x)), with the exact (erf) GELU applied inside the product (oneDNN's matmul, where
    onednn_gelu_epilogue() allows, or the packed_linear kernel) where fc takes the library's products
    without gradients and neither module has hooks that fusing would skip."""
    if (isinstance(fc, Linear) and type(act) is nn.GELU and act.approximate == "none"
            and not _has_hooks(fc) and not _has_hooks(act)):
        return linear(x, fc.weight, fc.bias, fc.linear_impl, fc.backend, gelu=True)
    return act(fc(x))
