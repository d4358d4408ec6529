"""What a backend is: capability checks that return reasons, and the four kernels.

A backend implements the forward and backward of both ops; the autograd wiring, fake tensors and
validation live once in rest_kernels/ops.py. Contract of the kernels (shared by every fused
backend so their statistics are interchangeable and testable against each other):

emsa_forward(q, k, v, mix_weight, scale, eps) -> (out, lse, rsq, rstd)
    q (B,h,N,d), k and v (B,h,M,d), any strides, one floating dtype; mix_weight (h,h) float32
    contiguous (float64 when q is float64), or None for plain softmax attention.
    out  (B,h,N,d) in q's dtype, memory laid out as (B,N,h,d) (`out.transpose(1, 2)` contiguous).
    lse  (B,h,N) float32: log(sum_m exp(S_im)) of the mixed, scaled logits S (natural log).
    rsq  (B,h,N) float32: sum_m P_im^2, P = softmax(S)   (zeros when mix_weight is None).
    rstd (B,h)   float32: (var + eps)^-1/2, var = mean(rsq)/M - 1/M^2  (zeros when None).
emsa_backward(dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale, eps) -> (dq, dk, dv, dmix)
    dq, dk, dv in the dtype of q (any layout); dmix (h,h) in mix_weight's dtype (float32, float64
    for float64 q), or None when mix_weight is None.
pa_forward(x, weight, bias) -> out          x (B,C,H,W); weight (C,1,3,3); bias (C,) or None
pa_backward(dout, x, weight, bias) -> (dx, dweight, dbias)   dbias None when bias is None
"""
from __future__ import annotations

import torch


class Backend:
    name: str = ""
    #: eligible for "auto" selection, and on which device type
    auto_device_type: str | None = None
    #: dtypes the fused kernels accept
    dtypes: tuple[torch.dtype, ...] = ()
    #: device type of the tensors it serves ("cpu" or "cuda")
    device_type: str = ""

    def unavailable_reason(self) -> str | None:
        """None when the backend can run in this process, else why not (cached by callers)."""
        return None

    def _common_reason(self, tensors, what: str) -> str | None:
        t = tensors[0]
        if t.device.type != self.device_type:
            return f"{self.name} serves {self.device_type} tensors, got {what} on {t.device}"
        if t.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"{self.name} supports dtypes {names}, got {str(t.dtype).replace('torch.', '')}"
        return None

    def emsa_unsupported_reason(self, q, k, v, mix_weight, needs_backward: bool = False) -> str | None:
        """None when these (already validated) inputs can be served, else why not. With
        needs_backward the backward of the call must be servable too (a backend that can run the
        forward of a training call but not its backward must refuse it before the forward runs)."""
        return self._common_reason((q, k, v), "q")

    def pa_unsupported_reason(self, x, weight, bias, needs_backward: bool = False) -> str | None:
        return self._common_reason((x, weight), "x")

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
