"""What a backend is: capability checks that return reasons, and the four kernels.

A backend implements the forward and backward of both ops; the autograd wiring, fake tensors and
validation live once in rest_kernels/ops.py. Contract of the kernels (shared by every fused
backend so their statistics are interchangeable and testable against each other):

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
    #: device type of the tensors it serves ("cpu" or "cuda")
    device_type: str = ""
    #: largest head dim d the EMSA kernels take (None: any)
    max_head_dim: int | None = None
    #: largest number of heads whose mix the EMSA kernels fuse (None: any)
    max_mix_heads: int | None = None
    #: largest batch x heads of one EMSA call (None: any)
    max_batch_heads: int | None = None

    def unavailable_reason(self) -> str | None:
        """None when the backend can run in this process, else why not (cached by callers)."""
        return None

    def _common_reasons(self, t, what: str) -> list[str]:
        reasons = []
        if t.device.type != self.device_type:
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
        B, h, _, d = q.shape
        if self.max_head_dim is not None and d > self.max_head_dim:
            reasons.append(f"{self.name} supports head dims up to {self.max_head_dim}, got {d}")
        if self.max_mix_heads is not None and mix_weight is not None and h > self.max_mix_heads:
            reasons.append(f"{self.name} fuses the head mix for up to {self.max_mix_heads} heads, got {h}")
        if self.max_batch_heads is not None and B * h > self.max_batch_heads:
            reasons.append(f"{self.name} supports batch x heads up to {self.max_batch_heads} (the CUDA grid's "
                           f"y dimension), got {B} x {h}; split the batch")
        if not reasons:  # the extra checks may compile: only for inputs the declarations accept
            reasons += self._emsa_extra_reasons(q, k, v, mix_weight, needs_backward)
        return reasons

    def pa_not_supported_reasons(self, x, weight, bias, needs_backward: bool = False) -> list[str]:
        reasons = self._common_reasons(x, "x")
        if not reasons:
            reasons += self._pa_extra_reasons(x, weight, bias, needs_backward)
        return reasons

    def _emsa_extra_reasons(self, q, k, v, mix_weight, needs_backward) -> list[str]:
        return []

    def _pa_extra_reasons(self, x, weight, bias, needs_backward) -> list[str]:
        return []

    def emsa_unsupported_reason(self, q, k, v, mix_weight, needs_backward: bool = False) -> str | None:
        """All of emsa_not_supported_reasons as one message, or None."""
        return "; ".join(self.emsa_not_supported_reasons(q, k, v, mix_weight, needs_backward)) or None

    def pa_unsupported_reason(self, x, weight, bias, needs_backward: bool = False) -> str | None:
        return "; ".join(self.pa_not_supported_reasons(x, weight, bias, needs_backward)) or None

    def emsa_forward(self, q, k, v, mix_weight, scale, eps):
        raise NotImplementedError

    def emsa_backward(self, dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale, eps):
        raise NotImplementedError

    def pa_forward(self, x, weight, bias):
        raise NotImplementedError

    def pa_backward(self, dout, x, weight, bias):
        raise NotImplementedError

    def __repr__(self):
        return f"<rest_kernels backend {self.name!r}>"
