"""Pieces shared by the Triton kernels: dtype mapping, tile loads, the dot policy and the
logits of one (query block x key block) tile.

Every tile is 2-D, [rows, BD] of one head (a batched [heads, rows, d] dot only ever lowers to
mma.sync; a 2-D dot with 64 rows per warpgroup lowers to wgmma, HGMMA, on sm_90). The head dim is
padded to a power of two BD and masked. Every load and store is masked (the
interpreter does not bounds-check).
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


def split_count(programs: int, blocks: int, target: int, at_most: bool = False) -> tuple[int, int]:
    """(splits, blocks per split) when each of `programs` programs walks `blocks` blocks and the
    grid should hold `target` programs: the walk is split into ranges of whole blocks (at most one
    range per block, no empty range), as few as reach at least `target` programs, or with
    `at_most` as many as stay within it (a grid of one wave: a few programs more would start a
    second). No split when `programs` already reaches `target`. The split depends on the shapes
    only, never on the device, so a result is the same bits on every GPU."""
    if programs >= target:
        splits = 1
    elif at_most:
        splits = max(1, min(blocks, target // max(1, programs)))
    else:
        splits = max(1, min(blocks, -(-target // max(1, programs))))
    per_split = -(-blocks // splits) if blocks else 1
    return max(1, -(-blocks // per_split)), per_split


@triton.jit
def dot(a, b, DTYPE: tl.constexpr, DOT: tl.constexpr):
    """a @ b with fp32 accumulation under the dot policy above (a, b may be fp32 values)."""
    if DOT == 0:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DTYPE), b.to(DTYPE))


# ----------------------------------------------------------------------------- 2-D tiles of one head
@triton.jit
def trans2(x, DOT: tl.constexpr):
    """x^T of a 2-D tile. Under the interpreter the transposed numpy view is copied to C order (a
    flatten forces it): np.matmul falls back to a ~1000x slower loop on non-contiguous operands
    with an explicit dtype, which is how the interpreter calls it."""
    t = tl.trans(x)
    if DOT == 0:
        t = tl.reshape(tl.reshape(t, (t.shape[0] * t.shape[1],)), t.shape)
    return t


@triton.jit
def head_offset(b, h, sb, sh):
    """b * sb + h * sh in int64 (b, h: program ids or loop counters; any stride may be a 1-constexpr)."""
    return (tl.zeros((), tl.int64) + b) * sb + (tl.zeros((), tl.int64) + h) * sh


@triton.jit
def load_2d(ptr, sb, sh, sr, sd, b, h, r0, R, D, BR: tl.constexpr, BD: tl.constexpr):
    """[BR, BD] tile (rows r0..r0+BR) of head h of a (B, H, R, D) tensor, zero outside, in the
    tensor's own dtype (fp16 / bf16 tiles stay 16-bit: half the registers and shared memory)."""
    rr = r0 + tl.arange(0, BR)[:, None]
    dd = tl.arange(0, BD)[None, :]
    offs = head_offset(b, h, sb, sh) + rr.to(tl.int64) * sr + dd.to(tl.int64) * sd
    return tl.load(ptr + offs, mask=(rr < R) & (dd < D), other=0.0)


@triton.jit
def store_2d(ptr, val, sb, sh, sr, sd, b, h, r0, R, D, BR: tl.constexpr, BD: tl.constexpr):
    rr = r0 + tl.arange(0, BR)[:, None]
    dd = tl.arange(0, BD)[None, :]
    offs = head_offset(b, h, sb, sh) + rr.to(tl.int64) * sr + dd.to(tl.int64) * sd
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=(rr < R) & (dd < D))


@triton.jit
def load_row_stat(ptr, b, h, r0, H, R, BR: tl.constexpr, other):
    """[BR] of head h of a contiguous (B, H, R) statistic."""
    rr = r0 + tl.arange(0, BR)
    return tl.load(ptr + head_offset(b, h, H * R, R) + rr, mask=rr < R, other=other)


@triton.jit
def store_row_stat(ptr, val, b, h, r0, H, R, BR: tl.constexpr):
    rr = r0 + tl.arange(0, BR)
    tl.store(ptr + head_offset(b, h, H * R, R) + rr, val, mask=rr < R)


@triton.jit
def head_logits(q_ptr, k_ptr, w_ptr, sqb, sqh, sqn, sqd, skb, skh, skm, skd, q_g,
                b, g, n0, m0, H, N, M, D, scale,
                BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                MIX: tl.constexpr, DTYPE: tl.constexpr, DOT: tl.constexpr):
    """The [BN, BM] logits of output head g for query rows n0.. and key rows m0..:

        with the mix  S_g = sum_j W[g, j] scale q_j k_j^T     (the mix folded into the contraction:
                                                               one 2-D dot per input head j)
        without       S_g = scale q_g k_g^T                    (q_g: the program's query tile)

    Called with q and k swapped (and N, M, BN, BM with them) it gives S_g^T, summed in the same
    order (the mixed backward's dq kernel works on transposed tiles).

    Each product is a 2-D dot accumulated in fp32 and mixed in fp32 (the same arithmetic as the
    unfused reference: the logits are formed exactly, then mixed), so the mix costs h dots per
    output head instead of one batched contraction, and no tile of other heads has to be held."""
    if MIX:
        s = tl.zeros((BN, BM), tl.float32)
        for j in range(H):
            qj = load_2d(q_ptr, sqb, sqh, sqn, sqd, b, j, n0, N, D, BN, BD)
            kj = load_2d(k_ptr, skb, skh, skm, skd, b, j, m0, M, D, BM, BD)
            wgj = tl.load(w_ptr + (tl.zeros((), tl.int32) + g) * H + j) * scale
            s += wgj * dot(qj, trans2(kj, DOT), DTYPE, DOT)
    else:
        kg = load_2d(k_ptr, skb, skh, skm, skd, b, g, m0, M, D, BM, BD)
        s = dot(q_g, trans2(kg, DOT), DTYPE, DOT) * scale
    return s


@triton.jit
def group_logits(q_ptr, k_ptr, w_ptr, sqb, sqh, sqn, sqd, skb, skh, skm, skd,
                 b, g0, n0, m0, H, N, M, D, scale,
                 BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, G: tl.constexpr,
                 DTYPE: tl.constexpr, DOT: tl.constexpr):
    """The mixed [BN, BM] logits of G output heads g0 .. g0 + G - 1 at once, a tuple of G tiles:
    each input head's product L_j = q_j k_j^T is one 2-D dot, then added to every output head of
    the group as S_g += (W[g, j] scale) L_j. Per tile pair h dots for G output heads instead of
    head_logits' h dots per output head; each S_g is summed over j in the same order and with the
    same operations as head_logits, whatever G is (tests/test_triton_backend.py holds the forward
    to the same bits for G = 1, 2, 4). Output heads past H (G not dividing h) read row H - 1 of W;
    their tiles are computed and never stored."""
    s = ()
    for gl in tl.static_range(G):
        s = s + (tl.zeros((BN, BM), tl.float32),)
    for j in range(H):
        qj = load_2d(q_ptr, sqb, sqh, sqn, sqd, b, j, n0, N, D, BN, BD)
        kj = load_2d(k_ptr, skb, skh, skm, skd, b, j, m0, M, D, BM, BD)
        lj = dot(qj, trans2(kj, DOT), DTYPE, DOT)
        new = ()
        for gl in tl.static_range(G):
            g = tl.minimum(g0 + gl, H - 1)
            wgj = tl.load(w_ptr + (tl.zeros((), tl.int32) + g) * H + j) * scale
            new = new + (s[gl] + wgj * lj,)
        s = new
    return s
