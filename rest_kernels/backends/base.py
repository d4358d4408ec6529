"""What a backend is: capability checks that return reasons, and the four kernels.

A backend implements the forward and backward of both ops on validated problems
(rest_kernels/_validation.py); the autograd wiring and fake tensors live once in
rest_kernels/ops.py, empty problems and result layouts once here. Contract of the four public calls
(shared by every backend so their statistics are interchangeable and testable against each other):

emsa_forward(q, k, v, mix_weight, scale, eps) -> (out, lse, rsq, rstd)
    q (B,h,N,d), k and v (B,h,M,d), any strides, one floating dtype; mix_weight (h,h) contiguous in
    the statistics dtype (float32, float64 when q is float64), or None for plain softmax attention.
    out  (B,h,N,d) in q's dtype, memory laid out as (B,N,h,d) (`out.transpose(1, 2)` contiguous).
    lse, rsq, rstd: the statistics of rest_kernels/backends/stats.py (rsq and rstd empty without the mix).
emsa_backward(dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale, eps) -> (dq, dk, dv, dmix)
    dq, dk, dv in the dtype of q (any layout); dmix (h,h) in mix_weight's dtype, or None when
    mix_weight is None.
pa_forward(x, weight, bias) -> out          x (B,C,H,W); weight (C,1,3,3); bias (C,) or None
pa_backward(dout, x, weight, bias) -> (dx, dweight, dbias)   dbias None when bias is None
"""
from __future__ import annotations

import torch

from .._validation import check_emsa_backward_args, check_pa_backward_args, emsa_problem, pa_problem
from .preference import ReferenceFaster, emsa_key, pa_key, route_preference
from .stats import empty_stats, stat_dtype


def pa_layout(x: torch.Tensor) -> torch.memory_format:
    """Memory format of PA's results (out, dx): channels-last when x is, as for PyTorch's own conv2d
    and pointwise ops, so a channels-last model stays channels-last through the gate (the cpu backend
    computes such inputs in place, see csrc/cpu/pa_cpu_nhwc.cpp; other backends' results are laid out
    afterwards). A tensor contiguous both ways (C == 1 or H = W = 1) counts as NCHW."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class Backend:
    """A backend declares what it serves as data (the class attributes below); every refusal reason
    is derived from those declarations by `emsa_not_supported_reasons` / `pa_not_supported_reasons`,
    which return all reasons, not the first. A backend with limits that are not declarative (the
    Triton kernels' GPU resources, known only once compiled for the device) adds them in
    `_emsa_extra_reasons` / `_pa_extra_reasons`."""
    name: str = ""
    #: eligible for "auto" selection, and on which device type
    auto_device_type: str | None = None
    #: dtypes the fused kernels accept
    dtypes: tuple[torch.dtype, ...] = ()
    #: device type of the tensors it serves ("cpu" or "cuda"; "" for any device)
    device_type: str = ""
    #: serves EMSA with the head mix (mix_weight given); without it: plain softmax attention only
    serves_mix: bool = True
    #: serves pa_gate
    serves_pa: bool = True
    #: largest head dim d the EMSA kernels take (None: any)
    max_head_dim: int | None = None
    #: largest number of heads whose mix the EMSA kernels fuse (None: any)
    max_mix_heads: int | None = None
    #: largest head dim d with the head mix (None: max_head_dim)
    max_mix_head_dim: int | None = None
    #: largest batch x heads of one EMSA call (None: any)
    max_batch_heads: int | None = None
    #: where "auto" prefers the reference or sdpa to this backend (measured; backends/preference.py)
    reference_rules: tuple[ReferenceFaster, ...] = ()
    #: its forward kernels are ops of the compiled extension (torch.ops.rest_kernels_C, with fakes
    #: registered by rest_kernels._extension) that an inference graph may call directly instead of
    #: through the custom op (rest_kernels.direct_kernels_in_traces)
    graph_ops: bool = False

    def unavailable_reason(self) -> str | None:
        """None when the backend can run in this process, else why not (cached by callers)."""
        return None

    def _common_reasons(self, t, what: str) -> list[str]:
        reasons = []
        if self.device_type and t.device.type != self.device_type:
            reasons.append(f"{self.name} serves {self.device_type} tensors, got {what} on {t.device}")
        if t.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"{self.name} supports dtypes {names}, got {str(t.dtype).replace('torch.', '')}")
        return reasons

    def emsa_not_supported_reasons(self, q, k, v, mix_weight, needs_backward: bool = False) -> list[str]:
        """Every reason why these (already validated) inputs cannot be served; empty when they can.
        With needs_backward the backward of the call must be servable too (a backend that can run
        the forward of a training call but not its backward must refuse it before the forward)."""
        reasons = self._common_reasons(q, "q")
        if mix_weight is not None and not self.serves_mix:
            reasons.append(f"{self.name} serves plain softmax attention only (mix_weight None), not the head mix "
                           "with InstanceNorm")
        B, h, _, d = q.shape
        if self.max_head_dim is not None and d > self.max_head_dim:
            reasons.append(f"{self.name} supports head dims up to {self.max_head_dim}, got {d}")
        if self.max_mix_heads is not None and mix_weight is not None and h > self.max_mix_heads:
            reasons.append(f"{self.name} fuses the head mix for up to {self.max_mix_heads} heads, got {h}")
        if (self.max_mix_head_dim is not None and mix_weight is not None and d > self.max_mix_head_dim
                and not (self.max_head_dim is not None and d > self.max_head_dim)):
            reasons.append(f"{self.name} fuses the head mix for head dims up to {self.max_mix_head_dim}, got {d}")
        if self.max_batch_heads is not None and B * h > self.max_batch_heads:
            reasons.append(f"{self.name} supports batch x heads up to {self.max_batch_heads} (the CUDA grid's "
                           f"y dimension), got {B} x {h}; split the batch")
        if not reasons:  # the extra checks may compile: only for inputs the declarations accept
            reasons += self._emsa_extra_reasons(q, k, v, mix_weight, needs_backward)
        return reasons

    def pa_not_supported_reasons(self, x, weight, bias, needs_backward: bool = False) -> list[str]:
        if not self.serves_pa:
            return [f"{self.name} serves attention only, not pa_gate"]
        reasons = self._common_reasons(x, "x")
        if not reasons:
            reasons += self._pa_extra_reasons(x, weight, bias, needs_backward)
        return reasons

    def _emsa_extra_reasons(self, q, k, v, mix_weight, needs_backward) -> list[str]:
        return []

    def _pa_extra_reasons(self, x, weight, bias, needs_backward) -> list[str]:
        return []

    def emsa_route_preference(self, q, k, mix_weight, needs_backward: bool = False):
        """(the backend name auto takes instead of this one for this call, "reference" or "sdpa", or None;
        why, or None when no rule covers it)."""
        return route_preference(self.reference_rules, emsa_key(q, k, mix_weight), needs_backward, q)

    def pa_route_preference(self, x, needs_backward: bool = False):
        return route_preference(self.reference_rules, pa_key(x), needs_backward, x)

    def emsa_unsupported_reason(self, q, k, v, mix_weight, needs_backward: bool = False) -> str | None:
        """All of emsa_not_supported_reasons as one message, or None."""
        return "; ".join(self.emsa_not_supported_reasons(q, k, v, mix_weight, needs_backward)) or None

    def pa_unsupported_reason(self, x, weight, bias, needs_backward: bool = False) -> str | None:
        return "; ".join(self.pa_not_supported_reasons(x, weight, bias, needs_backward)) or None

    # ----------------------------------------------------------------- the four calls
    # Public, with the arguments of the custom ops: each validates its call once (or takes the
    # problem the layer above validated, rest_kernels/_validation.py), answers empty problems with
    # the one definition of backends/stats.py, runs the backend's kernel and normalises the layout
    # of the results. Backends implement the underscored methods, on validated, non-empty problems.
    def emsa_forward(self, q, k, v, mix_weight, scale, eps):
        """(out, lse, rsq, rstd): out (B,h,N,d) laid out as (B,N,h,d), the statistics contiguous."""
        return self.run_emsa_forward(emsa_problem(q, k, v, mix_weight, None, scale, eps))

    def emsa_backward(self, dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale, eps):
        """(dq, dk, dv, dmix): dmix (h,h) in the statistics dtype, empty (0,) float32 without the mix."""
        p = emsa_problem(q, k, v, mix_weight, None, scale, eps)
        check_emsa_backward_args(dout, q, out, lse, rsq, rstd, p.mix)
        return self.run_emsa_backward(p, dout, out, lse, rsq, rstd)

    def pa_forward(self, x, weight, bias):
        """x * sigmoid(depthwise 3x3 conv(x)), in x's memory format."""
        return self.run_pa_forward(pa_problem(x, weight, bias))

    def pa_backward(self, dout, x, weight, bias):
        """(dx, dweight, dbias): dx in x's memory format, dbias empty (0,) without a bias."""
        p = pa_problem(x, weight, bias)
        check_pa_backward_args(dout, x)
        return self.run_pa_backward(p, dout)

    def run_emsa_forward(self, p):
        q = p.q
        if p.empty:  # no kernel launch (zero-sized grids, zero-sized buffers)
            B, h, N, d = q.shape
            return (q.new_empty(B, N, h, d).transpose(1, 2),) + empty_stats(q, p.mix, p.eps)
        out, lse, rsq, rstd = self._emsa_forward(p)
        if not out.transpose(1, 2).is_contiguous():  # the promised (B, N, h, d) memory layout
            out = out.transpose(1, 2).contiguous().transpose(1, 2)
        return out, lse.contiguous(), rsq.contiguous(), rstd.contiguous()

    def run_emsa_backward(self, p, dout, out, lse, rsq, rstd):
        q, k, v = p.q, p.k, p.v
        if p.empty:  # no query or no head dim: every gradient is an empty or exactly zero sum
            dmix = (torch.zeros(p.mix_weight.shape, dtype=stat_dtype(q.dtype), device=q.device) if p.mix
                    else q.new_empty(0, dtype=torch.float32))
            return (*(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)), dmix)
        # the kernels index the (small) statistics as dense arrays
        dq, dk, dv, dmix = self._emsa_backward(p, dout, out, lse.contiguous(), rsq.contiguous(), rstd.contiguous())
        if dmix is None:
            dmix = q.new_empty(0, dtype=torch.float32)
        return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmix.contiguous()

    def run_pa_forward(self, p):
        if p.empty:
            return p.x.new_empty(p.x.shape)
        return self._pa_forward(p).contiguous(memory_format=pa_layout(p.x))

    def run_pa_backward(self, p, dout):
        x, weight, bias = p.x, p.weight, p.bias
        if p.empty:  # no pixel: the gradients of weight and bias are empty sums
            return (torch.zeros(x.shape, dtype=x.dtype, device=x.device), torch.zeros_like(weight),
                    torch.zeros_like(bias) if bias is not None else x.new_empty(0))
        dx, dw, db = self._pa_backward(p, dout)
        if db is None:
            db = x.new_empty(0)
        return dx.contiguous(memory_format=pa_layout(x)), dw.contiguous(), db.contiguous()

    def _emsa_forward(self, p):
        """(out, lse, rsq, rstd) of a validated, non-empty problem; the mix weight is p.kernel_weight."""
        raise NotImplementedError

    def _emsa_backward(self, p, dout, out, lse, rsq, rstd):
        """(dq, dk, dv, dmix or None)."""
        raise NotImplementedError

    def _pa_forward(self, p):
        raise NotImplementedError

    def _pa_backward(self, p, dout):
        """(dx, dweight, dbias or None)."""
        raise NotImplementedError

    def __repr__(self):
        return f"<rest_kernels backend {self.name!r}>"
