"""One-time transformations of a model for inference that need no rebuild of the kernels.

optimize_for_inference folds each BatchNorm into the convolution before it (the stem's conv1/norm1
and conv2/norm2, each patch embedding's conv/norm; ResTv2's stem proj.0/proj.1 and proj.3/proj.4): in eval mode BatchNorm is the affine map
y = (x - running_mean) * weight / sqrt(running_var + eps) + bias per channel, so the convolution's
weight can be scaled by the first factor and its bias shifted, and the separate pass over the map
goes away (torch.nn.utils.fusion.fuse_conv_bn_eval does the arithmetic, in the weights' dtype).
The result is for inference only: it has no BatchNorm left to train. Its linear layers keep a packed
copy of their weight for calls without gradients (rest/dense.py, Linear.prepack, PackedWeight):
oneDNN's blocked copy (oneDNN otherwise reorders the weight on every call), or, for float32 layers on
CPUs where the cpu backend's own product is the faster one (rest/dense.py PACKED_KERNEL_ON: AVX2), the
panels of its packed_linear kernel; the copy follows the weight if it changes. So do its
convolutions (rest/packed_conv.py, PackedConv2d): the stem's and patch embeddings' keep oneDNN's
copy, and on those CPUs EMSA's depthwise key/value reduction `sr` runs the cpu backend's own
depthwise kernel on its taps.

compile_for_inference is optimize_for_inference followed by torch.compile with inductor's freezing,
for deployment where the time between the ops matters (batch 1); its docstring says when and why.

dtype=torch.bfloat16 then casts the folded model (folded in its own precision first, so the folded
weights are rounded once). Why a bfloat16 model rather than torch.autocast for CPU inference: under
autocast every linear layer casts its float32 weight to bfloat16 on every call, and its output back
where the next op wants float32; a model that is bfloat16 itself does that once. The fused kernels,
LayerNorm and softmax statistics still compute in float32 inside (rounded once per op), and the model
takes its images in bfloat16 (x.to(torch.bfloat16)). Measured 2026-12-05 (2-core AMD EPYC Zen 4 with
avx512_bf16, 2 threads, rest_lite batch 16, 224 px, interleaved, median of 7): float32 318 ms,
autocast 204 ms, this bfloat16 model 190 ms; logits within 2.3e-2 of float32's (autocast's 2.1e-2).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from rest_kernels import direct_kernels_in_traces

from .checkpoint import unwrap_model
from .dense import Linear
from .packed_conv import PackedConv2d, depthwise_kernel_takes
from .layers import BasicStem, PatchEmbed
from .layers_v2 import ConvStem
from .modules import _ReducedAttention

__all__ = ["optimize_for_inference", "compile_for_inference", "CompiledInference"]

# (convolution, BatchNorm after it) pairs of the layers that have them, as dotted submodule names
_FOLDS = {BasicStem: (("conv1", "norm1"), ("conv2", "norm2")), PatchEmbed: (("conv", "norm"),),
          ConvStem: (("proj.0", "proj.1"), ("proj.3", "proj.4"))}  # ResTv2's stem: an nn.Sequential


def _set_submodule(root: nn.Module, name: str, value: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, value)


#: the dtypes optimize_for_inference casts to (None: the model's own)
INFERENCE_DTYPES = (None, torch.float32, torch.bfloat16)


def optimize_for_inference(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `model` in eval mode with every BatchNorm folded into the convolution before it, cast
    to `dtype` (None: left as it is; torch.float32 or torch.bfloat16: the module docstring says why).

    Same outputs as model.eval() up to rounding (the folded weights are rounded once in their
    dtype); the argument is left as it is. The copy's state_dict has no BatchNorm entries and its
    folded convolutions gain biases, so it is not a checkpoint of the original architecture."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"dtype must be one of None, torch.float32, torch.bfloat16, got {dtype!r}")
    model = copy.deepcopy(unwrap_model(model)).eval()
    for module in model.modules():
        for kind, pairs in _FOLDS.items():
            if not isinstance(module, kind):
                continue
            for conv_name, norm_name in pairs:
                norm = module.get_submodule(norm_name)
                if isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                    _set_submodule(module, conv_name, fuse_conv_bn_eval(module.get_submodule(conv_name), norm))
                    _set_submodule(module, norm_name, nn.Identity())
    model = model if dtype is None else model.to(dtype)
    # kept copies of the weights for inference, decided for their final dtype: the convolutions'
    # (rest/packed_conv.py: the stems' and patch embeddings', EMSA's depthwise reduction) and the
    # linear layers' (rest/dense.py, Linear.prepack)
    for module in list(model.modules()):
        if isinstance(module, tuple(_FOLDS)):
            for name, conv in list(module.named_modules()):
                if name and isinstance(conv, nn.Conv2d) and conv.groups == 1:
                    _set_submodule(module, name, PackedConv2d.from_conv(conv))
        elif (isinstance(module, _ReducedAttention) and type(getattr(module, "sr", None)) is nn.Conv2d
              and depthwise_kernel_takes(module.sr)):
            module.sr = PackedConv2d.from_conv(module.sr)  # elsewhere nn.Conv2d: oneDNN's copy not measured
        elif isinstance(module, Linear):
            module.prepack()
    return model


def compile_for_inference(model: nn.Module, dtype: torch.dtype | None = None, *,
                          dynamic: bool | None = None) -> "CompiledInference":
    """optimize_for_inference(model, dtype), compiled with torch.compile for calls without gradients
    (with inductor's `freezing` on: the weights become constants, oneDNN's blocked copies made once at
    compile time, and the elementwise work between the ops fused; and its `cpp_wrapper`: the graph's
    calls made from C++). The attention and PA stay the compiled kernels of rest_kernels, called by
    the graph as the extension's ops (rest_kernels.direct_kernels_in_traces: no Python between
    them), and so do the linear layers prepacked for the packed_linear kernel (their panels made
    once, by freezing's constant folding: rest/dense.py compiled_kernel_applies); the rest is
    inductor's code.

    Why, and when: at batch 1 a large part of the eager model's time is Python and dispatch between
    the ops (bfloat16 rest_lite at 32 px, with almost nothing to compute, still took 7.8 ms a call,
    against 19 ms at 224 px), which a compiled graph does not have. Measured side by side in the
    README's deployment table. The first call compiles (15-60 s on a 2-core CPU); a call with another
    size may compile again.

    dynamic: torch.compile's. None (default) picks by the model's dtype, from measurements on the
    AMD EPYC (Zen 4, 2 threads, 224 px, medians of 15, 2026-12-06):
    - float32: True (sizes symbolic from the first call). With a fixed size inductor packs float32
      linear weights for MKL, slower on these CPUs than oneDNN, which it uses for symbolic sizes:
      rest_lite batch 16 340 ms fixed against 293 dynamic, batch 1 26.9 against 23.7.
    - bfloat16: None, torch's automatic dynamic: the first size is compiled as it is, so that the
      convolutions' weights are packed once for it (with symbolic sizes oneDNN reorders them on every
      call), and a second size compiles once more with symbolic sizes: rest_base batch 1 44.5 ms
      against 46.2, rest_lite batch 16 179 against 185.

    Returns a CompiledInference: call it like the model (images in `dtype` where given); it never
    records gradients. Bad arguments: as optimize_for_inference."""
    optimized = optimize_for_inference(model, dtype)
    if dynamic is None:
        dynamic = True if _floating_dtype(optimized) == torch.float32 else None
    return CompiledInference(optimized, dynamic=dynamic)


def _floating_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


#: inductor settings of every compiled call: `freezing` (the weights become constants, oneDNN's
#: blocked copies made once) and `cpp_wrapper` (the graph's calls made from generated C++ instead of
#: generated Python: measured, bfloat16 rest_lite batch 1 at 32 px, with almost nothing to compute,
#: 6.46 -> 5.78 ms a call; rest_base batch 1 at 224 px 44.5 -> 40.8 with the guard skip below).
_INDUCTOR_SETTINGS = {"freezing": True, "cpp_wrapper": True}

#: calls whose signature was compiled before skip Dynamo's guards; at most this many signatures are
#: remembered (a caller feeding ever new sizes gets the guarded call after that, as torch.compile does)
_MAX_KNOWN_CALLS = 64


def _call_signature(x) -> tuple | None:
    """What decides which compiled graph serves a call, and whether it is valid, on the input's side:
    its type, dtype, device, sizes and strides, and the thread's modes Dynamo guards on beside the
    process-wide ones that torch's GlobalStateGuard checks (grad mode is always off here; inference
    mode, autocast, active torch function / dispatch modes). None: a call to run with every guard
    (not a plain tensor, or a mode is active)."""
    if type(x) is not torch.Tensor or torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        return None
    device_type = x.device.type
    autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)) \
        if device_type in ("cpu", "cuda") else None
    return (x.dtype, x.device, tuple(x.shape), x.stride(), x.storage_offset(), x.requires_grad, x.is_inference(),
            torch.is_inference_mode_enabled(), autocast, torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled())


class CompiledInference(nn.Module):
    """An optimize_for_inference model and its torch.compile (freezing, C++ wrapper) for calls without
    gradients.

    forward(x) runs the compiled model under torch.no_grad(), rest_kernels.direct_kernels_in_traces()
    and inductor's `freezing` and `cpp_wrapper` settings: inductor freezes the weights only for calls
    that record no gradients, and Dynamo reads `freezing` itself while it traces (to treat the parameters as constants), so the
    settings are switched on around every call, which may trace, not passed as torch.compile options
    (which inductor alone sees: measured, bfloat16 rest_lite batch 1 took 18.3 ms that way against
    15.5 with the setting on while tracing).

    The compiled model is a snapshot: the weights are read at the first compilation, and changing
    them or anything else of the model afterwards (the `model` attribute is the uncompiled model) has
    no effect on the compiled calls. Hence a call whose input signature (_call_signature: dtype,
    device, sizes, strides, the thread's modes) has run before, in the same global state (torch's
    GlobalStateGuard: thread count, grad and autocast modes, default dtype, math modes), skips
    Dynamo's guard evaluation (torch.compiler.set_stance(skip_guard_eval_unsafe=True), which then
    checks only what tells its compiled graphs apart): the guards would check the model's attributes, which the
    snapshot ignores anyway, and the input, which the signature has checked. Measured: 0.5-0.7 ms a
    call at batch 1 (rest_lite 32 px 6.46 -> 5.79 ms). A new signature runs with every guard and may
    compile. Decisions of the Python code (the rest_kernels backend, environment switches) are those
    in force when a call compiles, as with any torch.compile. Not for concurrent calls from several
    threads (the stance and the inductor settings are process-wide while a call runs)."""

    def __init__(self, model: nn.Module, dynamic: bool | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.eval()
        # not a submodule: its parameters are the model's, and state_dict lists them once
        self.__dict__["compiled"] = torch.compile(self.model, dynamic=dynamic)
        self.__dict__["dynamic"] = dynamic  # torch.compile's argument, as given
        # the signatures (_call_signature) run so far -> the global state they ran in
        self.__dict__["known_calls"] = {}

    def train(self, mode: bool = True) -> "CompiledInference":
        if mode:  # the model has no BatchNorm left (optimize_for_inference) and its weights are frozen
            raise RuntimeError("CompiledInference is for inference only: train() is not available "
                               "(compile the original model for training instead)")
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config as inductor_config  # imported here: 1 s, not at `import rest`
        with torch.no_grad(), inductor_config.patch(_INDUCTOR_SETTINGS), direct_kernels_in_traces():
            signature = _call_signature(x)
            # the global state (thread count, grad and autocast modes, default dtype, math modes...) as
            # Dynamo's own global-state guard sees it: a call from a thread with another thread count
            # compiles its own graph (inductor's C++ kernels are made for a thread count)
            state = self.known_calls.get(signature) if signature is not None else None
            if state is not None and state.check():
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self.compiled(x)
            out = self.compiled(x)
            if signature is not None and (signature in self.known_calls or len(self.known_calls) < _MAX_KNOWN_CALLS):
                self.known_calls[signature] = torch._C._dynamo.guards.GlobalStateGuard()
            return out
