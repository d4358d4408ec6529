"""Pieces shared by the Triton kernels: dtype mapping, block sizes, tile loads, the dot policy and
the recomputation of one (query block x key block) tile of mixed logits for every head.

Tiles are 3-D, [HP, rows, BD]: HP heads handled by one program (all heads when the head mix
couples them, one head otherwise), a block of rows, the head dim padded to a power of two BD and
masked. Every load and store is masked (the interpreter does not bounds-check).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Dot policy (constexpr DOT): why three modes.
#  DOT_INTERP: the interpreter computes bf16 dots wrongly and rounds fp32 -> bf16 by truncation,
#              so operands are widened to fp32 and the product is exact ("ieee").
#  DOT_IEEE:   fp32 inputs on a GPU: tl.dot would use TF32 (10-bit mantissa) by default, which
#              misses the 1e-4 relative tolerance the float32 contract promises; "ieee" keeps fp32.
#  DOT_LOWP:   fp16 / bf16 inputs on a GPU: operands in the input dtype, fp32 accumulation, on
#              tensor cores, as flash-attention does (P and dS are rounded to the input dtype).
DOT_INTERP = tl.constexpr(0)
DOT_IEEE = tl.constexpr(1)
DOT_LOWP = tl.constexpr(2)



TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_mode(dtype: torch.dtype) -> int:
    if interpreting():
        return 0
    return 1 if dtype == torch.float32 else 2


def pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def strides4(t: torch.Tensor):
    return tuple(t.stride())


@triton.jit
def dot(a, b, DTYPE: tl.constexpr, DOT: tl.constexpr):
    """a @ b with fp32 accumulation under the dot policy above (a, b may be fp32 values)."""
    if DOT == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DTYPE), b.to(DTYPE))


@triton.jit
def trans(x, DOT: tl.constexpr):
    """Swap the last two axes of a 3-D tile. Under the interpreter the permuted numpy view is copied
    to C order (a flatten forces it): np.matmul falls back to a ~1000x slower loop on
    non-contiguous operands with an explicit dtype, which is how the interpreter calls it."""
    t = tl.permute(x, (0, 2, 1))
    if DOT == 0:
        t = tl.reshape(tl.reshape(t, (t.shape[0] * t.shape[1] * t.shape[2],)), t.shape)
    return t


@triton.jit
def load_tile(ptr, sb, sh, sr, sd, b, h0, r0, H, R, D,
              HP: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """[HP, BR, BD] tile of a (B, H, R, D) tensor with any strides, zero outside; as fp32."""
    hh = h0 + tl.arange(0, HP)[:, None, None]
    rr = r0 + tl.arange(0, BR)[None, :, None]
    dd = tl.arange(0, BD)[None, None, :]
    mask = (hh < H) & (rr < R) & (dd < D)
    offs = b.to(tl.int64) * sb + hh.to(tl.int64) * sh + rr.to(tl.int64) * sr + dd.to(tl.int64) * sd
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_tile(ptr, val, sb, sh, sr, sd, b, h0, r0, H, R, D,
               HP: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    hh = h0 + tl.arange(0, HP)[:, None, None]
    rr = r0 + tl.arange(0, BR)[None, :, None]
    dd = tl.arange(0, BD)[None, None, :]
    mask = (hh < H) & (rr < R) & (dd < D)
    offs = b.to(tl.int64) * sb + hh.to(tl.int64) * sh + rr.to(tl.int64) * sr + dd.to(tl.int64) * sd
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_rows(ptr, b, h0, r0, H, R, HP: tl.constexpr, BR: tl.constexpr, other):
    """[HP, BR] of a contiguous (B, H, R) fp32 statistic."""
    hh = h0 + tl.arange(0, HP)[:, None]
    rr = r0 + tl.arange(0, BR)[None, :]
    mask = (hh < H) & (rr < R)
    offs = (b.to(tl.int64) * H + hh) * R + rr
    return tl.load(ptr + offs, mask=mask, other=other)


@triton.jit
def store_rows(ptr, val, b, h0, r0, H, R, HP: tl.constexpr, BR: tl.constexpr):
    hh = h0 + tl.arange(0, HP)[:, None]
    rr = r0 + tl.arange(0, BR)[None, :]
    mask = (hh < H) & (rr < R)
    offs = (b.to(tl.int64) * H + hh) * R + rr
    tl.store(ptr + offs, val, mask=mask)


@triton.jit
def load_heads(ptr, b, h0, H, HP: tl.constexpr):
    """[HP] of a contiguous (B, H) fp32 statistic."""
    hh = h0 + tl.arange(0, HP)
    return tl.load(ptr + b.to(tl.int64) * H + hh, mask=hh < H, other=0.0)


@triton.jit
def load_mix(w_ptr, H, HP: tl.constexpr):
    """The (H, H) fp32 head-mix weight as [HP, HP] (g, j), zero outside."""
    g = tl.arange(0, HP)[:, None]
    j = tl.arange(0, HP)[None, :]
    return tl.load(w_ptr + g * H + j, mask=(g < H) & (j < H), other=0.0)


@triton.jit
def mixed_logits(q, k, w, scale, MIX: tl.constexpr, DTYPE: tl.constexpr, DOT: tl.constexpr):
    """S[g] = sum_j w[g, j] (q_j k_j^T) scale for the tile: q [HP,BN,BD], k [HP,BM,BD] -> [HP,BN,BM].

    Also returns the unmixed logits L (needed by the backward for d(mix_weight))."""
    logits = dot(q, trans(k, DOT), DTYPE, DOT) * scale
    if MIX:
        s = tl.sum(w[:, :, None, None] * logits[None, :, :, :], axis=1)
    else:
        s = logits
    return s, logits
