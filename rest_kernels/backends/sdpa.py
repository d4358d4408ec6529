"""The `sdpa` backend: plain softmax attention through torch.nn.functional.scaled_dot_product_attention.

What plain softmax attention would otherwise use, on any device and dtype PyTorch's SDPA takes (its
own flash / memory-efficient / math kernels, chosen by PyTorch). It serves emsa_attention calls
without the head mix (mix_weight None: every attention of ResTv2 and ResT v1's one-head stage 1)
and nothing else: the head mix with InstanceNorm is no scaled-dot-product attention, and PA is no
attention at all; both are refused with that reason.

The public op calls `sdpa_attention` directly when this backend is chosen (rest_kernels/ops.py),
as it does the reference: autograd differentiates PyTorch's SDPA (whose CPU flash kernel, like the
fused kernels, has no double backward), torch.compile and torch.export see aten's SDPA node, ONNX export the official math (the registry
pins the reference while exporting). "auto" takes it where a fused backend's measured rules say
SDPA is faster (rest_kernels/backends/preference.py), and for plain calls no fused backend serves.

The Backend methods below also implement the kernel contract of base.py, so that the custom ops
(torch.ops.rest_kernels.emsa_fwd / emsa_bwd with backend "sdpa") and their opchecks work like
every backend's: the output comes from SDPA; the statistics (lse, which SDPA does not return) and
the explicit backward are the reference's, which form the N x M logits. That path is for the custom
ops' contract and the tests, not for speed: the public op never takes it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend
from .reference import ReferenceBackend, mixed_logits
from .stats import stat_dtype, stats_from_logits


def sdpa_attention(q, k, v, scale: float):
    """softmax(q k^T * scale) @ v by PyTorch's SDPA, laid out (B,N,h,d) in memory like every backend's
    output (a no-op where SDPA already returns that layout)."""
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


class SdpaBackend(ReferenceBackend):
    name = "sdpa"
    #: "auto" reaches it through the measured rules and the fallback, not through AUTO_ORDER
    auto_device_type = None
    device_type = ""  # any: PyTorch's SDPA runs wherever torch does
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    serves_mix = False
    serves_pa = False

    def unavailable_reason(self):
        if not hasattr(F, "scaled_dot_product_attention"):  # pragma: no cover  (torch < 2.0)
            return "this torch has no torch.nn.functional.scaled_dot_product_attention"
        return None

    # the declarations decide (base.Backend), not the reference's "serves everything"
    emsa_not_supported_reasons = Backend.emsa_not_supported_reasons
    pa_not_supported_reasons = Backend.pa_not_supported_reasons

    def _emsa_forward(self, p):
        # the statistics from the logits, in the statistics dtype (see the module docstring)
        sd = stat_dtype(p.q.dtype)
        lse, rsq, rstd = stats_from_logits(mixed_logits(p.q.to(sd), p.k.to(sd), None, None, p.scale), False, p.eps)
        return sdpa_attention(p.q, p.k, p.v, p.scale), lse, rsq, rstd
