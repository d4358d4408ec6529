"""The `reference` backend: eager PyTorch with the official ResT math.

It is the fallback everywhere (any device, any floating dtype) and the oracle of the tests. The
public ops call `emsa_reference` / `pa_reference` directly when this backend is chosen, so autograd,
torch.compile, torch.export and ONNX export see ordinary PyTorch operations. The Backend methods
below additionally expose the kernel contract of base.py (statistics and explicit backward), so the
fused backends' statistics can be checked against the official math.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Backend
from .stats import stat_dtype, stats_from_logits


def mixed_logits(q, k, mix_weight=None, mix_bias=None, scale=1.0):
    """S = (q k^T) * scale, then the official 1x1 conv over heads when mix_weight is given."""
    attn = (q @ k.transpose(-2, -1)) * scale
    if mix_weight is not None:
        h = q.shape[1]
        weight = mix_weight.reshape(h, h, 1, 1).to(attn.dtype)
        bias = mix_bias.to(attn.dtype) if mix_bias is not None else None
        attn = F.conv2d(attn, weight, bias)
    return attn


def attention_map(q, k, mix_weight=None, mix_bias=None, scale=1.0, eps=1e-5):
    """The official N x M map: softmax, then InstanceNorm (no affine) when the head mix is on.

    float16 / bfloat16 inputs: logits, softmax and InstanceNorm are computed in float32 and the map is
    returned in the input dtype. With near-uniform attention the variance is of the order of eps and
    InstanceNorm divides by its root, so statistics kept in 16 bits would amplify rounding noise.
    The fused kernels likewise keep logits and every statistic in float32, and the low-precision tests
    (the flash-attention rule) compare them with this.
    """
    dtype = q.dtype
    low_precision = dtype in (torch.float16, torch.bfloat16)
    if low_precision:
        q, k = q.float(), k.float()
        mix_weight = mix_weight.float() if mix_weight is not None else None
        mix_bias = mix_bias.float() if mix_bias is not None else None
    attn = mixed_logits(q, k, mix_weight, mix_bias, scale).softmax(dim=-1)
    if mix_weight is not None:
        if attn.shape[-2] * attn.shape[-1] == 1:
            # one query and one key (a 1x1 map, e.g. stage 4 of a <= 32 px input): the normalised
            # entry is (x - mean(x)) * rstd = 0 with gradient 0, but F.instance_norm refuses maps
            # of one element; the same formula, written out
            attn = attn - attn.mean(dim=(-2, -1), keepdim=True)
        else:
            attn = F.instance_norm(attn, eps=eps)
    return attn.to(dtype)


def emsa_reference(q, k, v, mix_weight=None, mix_bias=None, scale=1.0, eps=1e-5):
    """Official EMSA core; returns (B,h,N,d) laid out in memory as (B,N,h,d) like every backend."""
    out = attention_map(q, k, mix_weight, mix_bias, scale, eps) @ v
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def emsa_export_form(q, k, v, mix_weight=None, mix_bias=None, scale=1.0, eps=1e-5):
    """emsa_reference's math in the form an ONNX export writes (torch.onnx.is_in_onnx_export()):
    equal in exact arithmetic, cheaper, and accurate in the engines' float32.

    The official graph normalises the softmax map P with InstanceNormalization, which ONNX Runtime
    and OpenVINO evaluate by recomputing the map's mean (exactly 1/M) in float32: an error d in it
    shifts every normalised entry by d * rstd (rstd up to eps^-1/2 ~ 316) and the product with v
    adds the shifts up over the keys. At near-uniform maps (the official init) that put rest_lite's
    logits 450x (ONNX Runtime) and 130x (OpenVINO) further from float64 than PyTorch's float32.
    Here, with the head mix, as in the statistics contract of stats.py (the exact mean, the
    centred sum of squares, one normalisation before the product with v):

        D = P - 1/M            (InstanceNorm's mean is exactly 1/M: every row of P sums to one)
        rstd = (sum_i sum_m D_im^2 / (N M) + eps)^-1/2      per (batch, head)
        out = rstd * (D v)     (the scalar rstd applied to the N x d product, not the N x M map)

    The softmax map is made once; the scale is folded into the h x h mix weight (or, without the
    mix, into q: N x d instead of N x M products) and the mix bias is dropped (a per-head constant
    added to every logit, which no softmax sees). rstd * (P v - 1 vbar^T), the same value, is
    about 3x less accurate in float32 at near-uniform maps (the product with v cancels), so D is
    multiplied instead. float16 / bfloat16 inputs: computed in float32, as attention_map does.
    """
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    if mix_weight is None:
        out = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    else:
        h = q.shape[1]
        weight = (mix_weight.reshape(h, h, 1, 1) * scale).to(q.dtype)
        p = F.conv2d(q @ k.transpose(-2, -1), weight).softmax(dim=-1)
        N, M = p.shape[-2], p.shape[-1]
        centred = p - 1.0 / M
        var = (centred * centred).sum(dim=(-2, -1), keepdim=True) / (N * M)
        out = (centred @ v) * torch.rsqrt(var + eps)
    return out.to(dtype).transpose(1, 2).contiguous().transpose(1, 2)


def pa_reference(x, weight, bias=None):
    """Official PA: x * sigmoid(depthwise 3x3 conv(x))."""
    return x * torch.sigmoid(F.conv2d(x, weight, bias, padding=1, groups=x.shape[1]))


class ReferenceBackend(Backend):
    name = "reference"

    def emsa_not_supported_reasons(self, q, k, v, mix_weight, needs_backward=False):
        return []  # the official math serves every validated input, on any device and dtype

    def pa_not_supported_reasons(self, x, weight, bias, needs_backward=False):
        return []

    def _emsa_forward(self, p):
        q, k, v, mix_weight, scale, eps = p.q, p.k, p.v, p.kernel_weight, p.scale, p.eps
        # logits in the statistics dtype, as attention_map computes them for 16-bit inputs
        sd = stat_dtype(q.dtype)
        logits = mixed_logits(q.to(sd), k.to(sd), mix_weight, None, scale)
        lse, rsq, rstd = stats_from_logits(logits, mix_weight is not None, eps)
        out = emsa_reference(q, k, v, mix_weight, None, scale, eps)
        return out, lse, rsq, rstd

    # Explicit chain rule over the materialised map (plain tensor ops: this works inside compiled
    # backwards and under opcheck's schema checks, where autograd.grad / torch.func do not).
    def _emsa_backward(self, p, dout, out, lse, rsq, rstd):
        q, k, v, mix_weight, scale, eps = p.q, p.k, p.v, p.kernel_weight, p.scale, p.eps
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
        logits = (q @ k.transpose(-2, -1)) * scale                       # L_j
        w = mix_weight.to(dtype) if mix_weight is not None else None
        s = torch.einsum("gj,bjnm->bgnm", w, logits) if w is not None else logits
        pm = torch.softmax(s, dim=-1)
        if w is not None:
            y = F.instance_norm(pm, eps=eps)                                # (P - 1/M) * rstd
            dy = dout @ v.transpose(-2, -1)
            dv = y.transpose(-2, -1) @ dout
            r = torch.rsqrt(pm.var(dim=(-2, -1), unbiased=False, keepdim=True) + eps)
            dp = r * (dy - dy.mean(dim=(-2, -1), keepdim=True) - y * (dy * y).mean(dim=(-2, -1), keepdim=True))
        else:
            dp = dout @ v.transpose(-2, -1)
            dv = pm.transpose(-2, -1) @ dout
        ds = pm * (dp - (pm * dp).sum(-1, keepdim=True))                    # softmax backward
        if w is not None:
            dl = torch.einsum("gj,bgnm->bjnm", w, ds)
            dmix = torch.einsum("bgnm,bjnm->gj", ds, logits).to(stat_dtype(q.dtype))
        else:
            dl, dmix = ds, None
        dq = (dl @ k) * scale
        dk = (dl.transpose(-2, -1) @ q) * scale
        return dq.to(out.dtype), dk.to(out.dtype), dv.to(out.dtype), dmix

    def _pa_forward(self, p):
        return pa_reference(p.x, p.weight, p.bias)

    def _pa_backward(self, p, dout):
        x, weight, bias = p.x, p.weight, p.bias
        C = x.shape[1]
        gate = torch.sigmoid(F.conv2d(x, weight, bias, padding=1, groups=C))
        dconv = dout * x * gate * (1 - gate)
        dx = dout * gate + torch.nn.grad.conv2d_input(x.shape, weight, dconv, padding=1, groups=C)
        dweight = torch.nn.grad.conv2d_weight(x, weight.shape, dconv, padding=1, groups=C)
        dbias = dconv.sum(dim=(0, 2, 3)) if bias is not None else None
        return dx, dweight, dbias
