"""What eager PyTorch and torch.compile do for a piece of PyTorch code, for the performance model
(bench/perf_model.py): the aten ops it dispatches, recorded on meta tensors, and their costs.

The code runs for real on meta tensors under a TorchDispatchMode, so the op list is exactly what
PyTorch dispatches (the matmul decomposition with its contiguous copies, the fp32 casts of the
reference, autograd's backward ops), with nothing computed.

Eager: every op that is not a view or an allocation is one kernel reading each input and writing
each output once (bytes of the distinct elements of each view); native_batch_norm and its
backward (InstanceNorm) are two kernels that read their inputs twice (statistics, then the
elementwise pass), as CUDA's batch_norm_stats / batch_norm_elemt do; convolution_backward is one
kernel per gradient it computes.

torch.compile (assumed, not traced through Inductor):
  1. matmul-class ops (mm, bmm, addmm, baddbmm, convolution and convolution_backward) stay
     separate library kernels (Inductor calls cuBLAS / cuDNN for them by default; no max-autotune
     templates, no epilogue fusion): their inputs and outputs, the N x M logits included, are
     materialised in HBM;
  2. every other op fuses with its neighbours into one kernel per run between two matmul-class
     ops, except that a reduction over more than PERSISTENT_REDUCTION elements per output (the
     InstanceNorm statistics over N x M) ends its kernel: the following elementwise pass is a new
     kernel that reads the input again (Inductor keeps only reductions of up to ~1024 elements
     "persistent", fused with their consumers);
  3. a fused kernel reads each tensor it uses that was produced elsewhere once, and writes each
     tensor it produces that another kernel uses (or that nobody reads: an output) once;
  4. no recomputation between forward and backward (AOTAutograd's min-cut partitioner may
     recompute cheap ops instead of saving them: not modelled), no CUDA graphs (default mode).
Fusing by program order can merge independent elementwise chains (horizontal fusion), which
Inductor does not always do: this errs towards fewer launches for torch.compile.

FLOPs: matmuls 2 m n k (bf16 / fp16 on tensor cores; fp32 on CUDA cores, PyTorch's default
torch.backends.cuda.matmul.allow_tf32 = False); convolutions 2 x output x (C_in / groups) x k^2
(TF32 tensor cores for fp32, cuDNN's default torch.backends.cudnn.allow_tf32 = True; a depthwise
convolution runs on CUDA cores); elementwise ops a few FLOPs per element (OP_FLOPS), exp and
sigmoid on the SFU.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .perf_model import Kernel

PERSISTENT_REDUCTION = 1024

#: ops that launch nothing: allocations and views that the schema does not mark as views
FREE = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "detach", "alias",
        "_unsafe_view", "_reshape_alias", "lift_fresh", "lift_fresh_copy", "view", "t", "expand",
        "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "is_same_size", "_to_copy_noop"}
MATMUL = {"mm", "bmm", "addmm", "baddbmm", "convolution", "convolution_backward"}
COPIES = {"_to_copy", "clone", "copy_", "copy"}
FILLS = {"zeros", "zero_", "fill_", "ones", "full", "new_zeros", "new_ones", "new_full", "zeros_like",
         "ones_like", "full_like", "scalar_tensor", "fill"}
#: (fp32 FLOPs, SFU ops) per output element of elementwise / row ops; anything else: (1, 0)
OP_FLOPS = {"_softmax": (4, 1), "_log_softmax": (4, 2), "_softmax_backward_data": (3, 0),
            "sigmoid": (2, 2), "sigmoid_backward": (3, 0), "exp": (1, 1), "rsqrt": (0, 1),
            "sqrt": (0, 1), "log": (0, 1), "tanh": (1, 2), "div": (1, 1), "reciprocal": (0, 1)}
REDUCTIONS = {"sum", "mean", "amax", "amin", "var", "var_mean", "std", "logsumexp", "prod", "max", "min"}


@dataclasses.dataclass
class AtenOp:
    name: str                     # overload packet name, e.g. "bmm"
    func: object
    args: tuple
    kwargs: dict
    out: object


class OpLog(TorchDispatchMode):
    """Append every aten op that launches something to `sink` (a list shared with other recorders,
    e.g. rest_kernels.triton.launch.recording, so that the two interleave in program order)."""

    def __init__(self, sink: list):
        super().__init__()
        self.sink = sink

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if not (func.is_view or name in FREE):
            self.sink.append(AtenOp(name, func, args, kwargs, out))
        return out


# ----------------------------------------------------------------------------- tensors
def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of a view (a broadcast dimension, stride 0, counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _sid(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _dot_unit(dtype: torch.dtype, conv: bool) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "tc16"
    return "tf32" if conv else "fp32"


# ----------------------------------------------------------------------------- phases
@dataclasses.dataclass
class Phase:
    """One pass of one op: what it reads and writes, and its FLOPs. An eager op is one or more
    phases, each one kernel."""
    name: str
    reads: list
    writes: list
    dot_flops: float = 0.0
    dot_unit: str = "fp32"
    fp32: float = 0.0
    sfu: float = 0.0
    matmul: bool = False
    ends_fusion: bool = False     # a large reduction: torch.compile's kernel ends here


def _numel(t) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 0


def phases(op: AtenOp) -> list[Phase]:
    name, args, out = op.name, op.args, op.out
    ins, outs = _tensors((args, op.kwargs)), _tensors(out)
    if name in ("bmm", "mm", "addmm", "baddbmm"):
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
        k = a.shape[-1]
        return [Phase(name, ins, outs, 2.0 * outs[0].numel() * k, _dot_unit(a.dtype, False),
                      fp32=outs[0].numel() if name in ("addmm", "baddbmm") else 0.0, matmul=True)]
    if name == "convolution":
        x, w = args[0], args[1]
        flops = 2.0 * outs[0].numel() * w.shape[1] * math.prod(w.shape[2:])
        depthwise = args[8] > 1 and w.shape[1] == 1
        unit = "fp32" if depthwise else _dot_unit(x.dtype, True)
        return [Phase(name, ins, outs, flops, unit, fp32=outs[0].numel() if args[2] is not None else 0.0,
                      matmul=True)]
    if name == "convolution_backward":
        gout, x, w, mask = args[0], args[1], args[2], args[10]
        flops = 2.0 * gout.numel() * w.shape[1] * math.prod(w.shape[2:])
        unit = "fp32" if (args[9] > 1 and w.shape[1] == 1) else _dot_unit(x.dtype, True)
        grads = list(out)
        res = []
        if mask[0]:
            res.append(Phase(name + ".input", [gout, w], [grads[0]], flops, unit, matmul=True))
        if mask[1]:
            res.append(Phase(name + ".weight", [gout, x], [grads[1]], flops, unit, matmul=True))
        if mask[2]:
            res.append(Phase(name + ".bias", [gout], [grads[2]], fp32=gout.numel(), matmul=True))
        return res
    if name == "native_batch_norm":
        x = args[0]
        stats = [t for t in outs[1:] if t.numel()]
        return [Phase(name + ".stats", [x], stats, fp32=3.0 * x.numel(), ends_fusion=_large(x, stats)),
                Phase(name + ".elemt", [x] + stats, [outs[0]], fp32=2.0 * x.numel())]
    if name == "native_batch_norm_backward":
        gout, x = args[0], args[1]
        small = [t for t in ins[2:] if isinstance(t, torch.Tensor)]
        return [Phase(name + ".reduce", [gout, x] + small, [], fp32=4.0 * x.numel(), ends_fusion=True),
                Phase(name + ".elemt", [gout, x] + small, outs[:1], fp32=4.0 * x.numel())]
    mutated = op.func._schema.is_mutable
    if mutated:  # in-place: writes its first argument; reads it too unless it only overwrites it
        reads = ins[1:] if name in COPIES | FILLS else ins
        writes = ins[:1]
    else:
        reads, writes = ins, outs
    if name in COPIES or name in FILLS:
        return [Phase(name, [] if name in FILLS else reads, writes)]
    n_out = sum(t.numel() for t in writes)
    if name in REDUCTIONS:
        n_in = sum(t.numel() for t in reads)
        return [Phase(name, reads, writes, fp32=float(n_in), ends_fusion=_large(reads[0], writes))]
    f, s = OP_FLOPS.get(name, (1, 0))
    return [Phase(name, reads, writes, fp32=float(f * n_out), sfu=float(s * n_out))]


def _large(x: torch.Tensor, outs: list) -> bool:
    n_out = max(1, max((t.numel() for t in outs), default=1))
    return x.numel() // n_out > PERSISTENT_REDUCTION


def _phase_kernel(p: Phase) -> Kernel:
    return Kernel("aten." + p.name, float(sum(tensor_bytes(t) for t in p.reads + p.writes)),
                  p.dot_flops, p.dot_unit, p.fp32, p.sfu)


# ----------------------------------------------------------------------------- eager and compile
def eager_kernels(ops: list[AtenOp]) -> list[Kernel]:
    """One kernel per phase of every op (see the module docstring)."""
    return [_phase_kernel(p) for op in ops for p in phases(op)]


def compiled_kernels(ops: list[AtenOp]) -> list[Kernel]:
    """The fused kernels torch.compile is assumed to make of the same ops (module docstring)."""
    groups, current = [], []
    for op in ops:
        for p in phases(op):
            if p.matmul:
                if current:
                    groups.append(current)
                groups.append([p])
                current = []
            else:
                current.append(p)
                if p.ends_fusion:
                    groups.append(current)
                    current = []
    if current:
        groups.append(current)
    readers: dict[int, set] = {}
    for gi, group in enumerate(groups):
        for p in group:
            for t in p.reads:
                readers.setdefault(_sid(t), set()).add(gi)
    kernels = []
    for gi, group in enumerate(groups):
        written: dict[int, int] = {}
        read: dict[int, int] = {}
        for p in group:
            for t in p.reads:
                sid = _sid(t)
                if sid not in written:  # produced elsewhere (an input or another kernel): read once
                    read[sid] = max(read.get(sid, 0), tensor_bytes(t))
            for t in p.writes:
                written[_sid(t)] = max(written.get(_sid(t), 0), tensor_bytes(t))
        stored = sum(b for sid, b in written.items() if readers.get(sid, set()) - {gi} or sid not in readers)
        if group[0].matmul:
            name = "extern " + group[0].name
        else:
            name = "fused " + "+".join(dict.fromkeys(p.name for p in group))
        kernels.append(Kernel(name, float(sum(read.values()) + stored),
                              sum(p.dot_flops for p in group), group[0].dot_unit,
                              sum(p.fp32 for p in group), sum(p.sfu for p in group)))
    return kernels


# ----------------------------------------------------------------------------- the reference
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def reference_ops(shape, dtype: str, backward: bool) -> list[AtenOp]:
    """The aten ops of eager PyTorch running the reference (rest_kernels/backends/reference.py) on
    one call with the model's layouts (as bench/_cases.py builds them): the forward, then with
    backward=True autograd's backward for every input (torch.autograd.grad: no accumulation
    into .grad, so no layout copies of AccumulateGrad)."""
    from rest_kernels.backends.reference import emsa_reference, pa_reference
    from rest_kernels.triton.resources import shape_tensors
    dt = DTYPES[dtype]
    tensors = list(shape_tensors(shape, dt))
    if shape.op == "emsa":
        q, k, v, w = tensors
        b = torch.empty(shape.heads, device="meta") if w is not None else None  # the 1x1 conv's bias
        w = w.reshape(shape.heads, shape.heads, 1, 1) if w is not None else None
        args = [q, k, v, w, b]
    else:
        args = tensors
    if backward:
        args = [t.detach().requires_grad_(True) if t is not None else None for t in args]
    ops: list = []
    with torch.set_grad_enabled(backward), OpLog(ops):
        if shape.op == "emsa":
            out = emsa_reference(*args, scale=shape.d ** -0.5, eps=1e-5)
            dout = torch.empty(out.transpose(1, 2).shape, dtype=dt, device="meta").transpose(1, 2)
        else:
            out = pa_reference(*args)
            dout = torch.empty(out.shape, dtype=dt, device="meta")
        if backward:
            torch.autograd.grad(out, [t for t in args if t is not None], dout)
    return ops
