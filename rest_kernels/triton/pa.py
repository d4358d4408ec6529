"""PA in Triton: out = x * sigmoid(depthwise3x3(x) + bias), forward and backward, one pass each.

Grid (B * channel blocks, tiles of BH x BW pixels): a program owns one tile of BC channels of one
image. B * channel blocks goes on grid axis x (up to 2^31 - 1 blocks), the tiles of one plane on axis y
(up to 65,535: planes of up to ~67 M pixels; beyond, the capability check refuses the call) (BC = 1 on a GPU unless the planes are small). The 3x3 taps are
nine masked shifted loads of x (zero padding comes from the mask; neighbours come from L1/L2).

Backward, with s = sigmoid(z), z = conv(x) + bias and dz = dout * x * s (1 - s):
  dx(p) = dout(p) s(p) + sum_t w_t dz(p - off_t)     (the transposed depthwise conv)
  dw_t  = sum_p dz(p) x(p + off_t),   dbias = sum_p dz(p).
dz is needed on the tile plus a one-pixel halo; it is recomputed there (each shifted dz needs its
own 3x3 window of x) rather than written to memory, so the backward reads x and dout and writes dx
only. dweight and dbias are per-program partials (C, 10, programs) summed in a fixed order.
Cost: 9 x 9 tap FMAs per pixel in the backward, in exchange for no dz round trip through memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from ._common import interpreting
from .emsa_fwd import rowsum


@triton.jit
def _preact(base, w_ptr, cc, mc, bias, yy, xx, sc, sh, sw, H, W):
    """z = bias + sum_t w_t x(y + dy - 1, x + dx - 1) at the [BC, BH, BW] positions (cc, yy, xx)."""
    z = bias + tl.zeros(yy.shape, tl.float32) + tl.zeros(xx.shape, tl.float32)
    for t in tl.range(9):
        y = yy + (t // 3 - 1)
        x = xx + (t % 3 - 1)
        m = mc & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        wt = tl.load(w_ptr + cc * 9 + t, mask=mc, other=0.0).to(tl.float32)
        offs = cc.to(tl.int64) * sc + y.to(tl.int64) * sh + x.to(tl.int64) * sw
        z += wt * tl.load(base + offs, mask=m, other=0.0).to(tl.float32)
    return z


@triton.jit
def _tile_coords(C, n_tw, n_cb, BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Program (spatial tile, b * channel block) -> b, channels [BC,1,1], rows [1,BH,1], cols [1,1,BW]."""
    bcb = tl.program_id(0)
    t = tl.program_id(1)
    b = bcb // n_cb
    cc = (bcb % n_cb) * BC + tl.arange(0, BC)[:, None, None]
    yy = (t // n_tw) * BH + tl.arange(0, BH)[None, :, None]
    xx = (t % n_tw) * BW + tl.arange(0, BW)[None, None, :]
    return b, cc, cc < C, yy, xx


@triton.jit
def _pa_fwd_kernel(x_ptr, w_ptr, b_ptr, o_ptr, sb, sc, sh, sw, C, H, W, n_tw, n_cb,
                   HAS_BIAS: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    b, cc, mc, yy, xx = _tile_coords(C, n_tw, n_cb, BC, BH, BW)
    base = x_ptr + b.to(tl.int64) * sb
    bias = tl.zeros((BC, 1, 1), tl.float32)
    if HAS_BIAS:
        bias += tl.load(b_ptr + cc, mask=mc, other=0.0).to(tl.float32)
    z = _preact(base, w_ptr, cc, mc, bias, yy, xx, sc, sh, sw, H, W)
    inside = mc & (yy < H) & (xx < W)
    offs = cc.to(tl.int64) * sc + yy.to(tl.int64) * sh + xx.to(tl.int64) * sw
    x = tl.load(base + offs, mask=inside, other=0.0).to(tl.float32)
    out = x * tl.sigmoid(z)
    o_offs = ((b.to(tl.int64) * C + cc) * H + yy) * W + xx
    tl.store(o_ptr + o_offs, out.to(o_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _pa_bwd_kernel(x_ptr, w_ptr, b_ptr, do_ptr, dx_ptr, part_ptr,
                   sb, sc, sh, sw, db_, dc_, dh_, dw_, C, H, W, n_tw, n_cb,
                   HAS_BIAS: tl.constexpr, BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    b, cc, mc, yy, xx = _tile_coords(C, n_tw, n_cb, BC, BH, BW)
    base = x_ptr + b.to(tl.int64) * sb
    dbase = do_ptr + b.to(tl.int64) * db_
    bias = tl.zeros((BC, 1, 1), tl.float32)
    if HAS_BIAS:
        bias += tl.load(b_ptr + cc, mask=mc, other=0.0).to(tl.float32)
    dx = tl.zeros((BC, BH, BW), tl.float32)
    # partial sums of (dweight taps 0..8, dbias) of this program: part[c, k, b * tiles + tile]
    n_part = tl.num_programs(1) * (tl.num_programs(0) // n_cb)
    c1 = (tl.program_id(0) % n_cb) * BC + tl.arange(0, BC)
    inside = mc & (yy < H) & (xx < W)
    part = part_ptr + c1.to(tl.int64) * 10 * n_part + b * tl.num_programs(1) + tl.program_id(1)
    mc1 = c1 < C
    dz0 = tl.zeros((BC, BH, BW), tl.float32)  # dz on the tile itself (tap 4), for dweight / dbias
    for t in tl.range(9):
        # dz at q = p - off_t (the tile shifted against the tap), zero outside the image
        qy = yy - (t // 3 - 1)
        qx = xx - (t % 3 - 1)
        mq = mc & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
        s = tl.sigmoid(_preact(base, w_ptr, cc, mc, bias, qy, qx, sc, sh, sw, H, W))
        xq = tl.load(base + cc.to(tl.int64) * sc + qy.to(tl.int64) * sh + qx.to(tl.int64) * sw,
                     mask=mq, other=0.0).to(tl.float32)
        gq = tl.load(dbase + cc.to(tl.int64) * dc_ + qy.to(tl.int64) * dh_ + qx.to(tl.int64) * dw_,
                     mask=mq, other=0.0).to(tl.float32)
        dz = gq * xq * s * (1.0 - s)
        dx += tl.load(w_ptr + cc * 9 + t, mask=mc, other=0.0).to(tl.float32) * dz
        if t == 4:  # the unshifted tap
            dx += gq * s
            dz0 = dz
    tl.store(part + 9 * n_part, tl.sum(tl.sum(dz0, axis=2), axis=1), mask=mc1)
    for u in tl.range(9):
        y = yy + (u // 3 - 1)
        x = xx + (u % 3 - 1)
        m = mc & (y >= 0) & (y < H) & (x >= 0) & (x < W)
        xs = tl.load(base + cc.to(tl.int64) * sc + y.to(tl.int64) * sh + x.to(tl.int64) * sw,
                     mask=m, other=0.0).to(tl.float32)
        tl.store(part + u * n_part, tl.sum(tl.sum(dz0 * xs, axis=2), axis=1), mask=mc1)
    dx_offs = ((b.to(tl.int64) * C + cc) * H + yy) * W + xx
    tl.store(dx_ptr + dx_offs, dx.to(dx_ptr.dtype.element_ty), mask=inside)


def _tiles(C, H, W):
    """(BC, BH, BW) and the tile counts. GPU: ~1024 elements per program (registers of the 9 x 9
    recompute), one channel unless the planes are small. The interpreter pays per program, so
    there a program takes up to 16K elements (whole planes, several channels)."""
    budget = 16384 if interpreting() else 1024
    BW = min(64, triton.next_power_of_2(W))
    BH = min(max(1, budget // BW), triton.next_power_of_2(H), 64)
    BC = min(max(1, budget // (BH * BW)), triton.next_power_of_2(C))
    return BC, BH, BW, triton.cdiv(C, BC), triton.cdiv(H, BH), triton.cdiv(W, BW)


def _bwd_warps(BW: int) -> int:
    """Warps of the backward: 8 (4 elements of the 1024-element tile per thread) keeps the 9 x 9
    recompute spill-free, except on 8-wide tiles (planes of 7 x 7, 16 channels a program), where
    ptxas spilled 16 B at 8 warps on sm_90 (fp16) and none at 4 (ahead-of-time compile, Triton 3.8)."""
    return 4 if BW <= 8 else 8


def _flat_params(weight, bias, C):
    """weight as a contiguous (C, 9) array and bias contiguous: the kernels index both as dense
    arrays (w_ptr + c * 9 + t, b_ptr + c), so a strided view (e.g. bias[::2]) must be copied."""
    return weight.reshape(C, 9).contiguous(), (bias.contiguous() if bias is not None else None)


def pa_forward(x, weight, bias):
    B, C, H, W = x.shape
    BC, BH, BW, n_cb, n_th, n_tw = _tiles(C, H, W)
    out = torch.empty(B, C, H, W, dtype=x.dtype, device=x.device)
    w, bias = _flat_params(weight, bias, C)
    launch(_pa_fwd_kernel, (B * n_cb, n_th * n_tw), x, w, bias if bias is not None else w, out, *x.stride(), C, H, W,
           n_tw, n_cb, HAS_BIAS=bias is not None, BC=BC, BH=BH, BW=BW)
    return out


def pa_backward(dout, x, weight, bias):
    B, C, H, W = x.shape
    BC, BH, BW, n_cb, n_th, n_tw = _tiles(C, H, W)
    dx = torch.empty(B, C, H, W, dtype=x.dtype, device=x.device)
    w, bias = _flat_params(weight, bias, C)
    part = torch.empty(C, 10, B * n_th * n_tw, dtype=torch.float32, device=x.device)
    launch(_pa_bwd_kernel, (B * n_cb, n_th * n_tw), x, w, bias if bias is not None else w, dout, dx, part,
           *x.stride(), *dout.stride(), C, H, W, n_tw, n_cb,
           HAS_BIAS=bias is not None, BC=BC, BH=BH, BW=BW, num_warps=_bwd_warps(BW))
    sums = rowsum(part)  # (C, 10), fixed order over the programs
    dweight = sums[:, :9].reshape(C, 1, 3, 3).to(weight.dtype)
    dbias = sums[:, 9].to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias
