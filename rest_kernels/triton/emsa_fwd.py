"""EMSA forward in Triton: mixed-logit softmax attention with InstanceNorm, never forming N x M.

Design note
===========
Inputs q (B,h,N,d), k, v (B,h,M,d) with any strides; W (h,h) fp32 or None. Output (B,h,N,d) laid
out in memory as (B,N,h,d); statistics lse (B,h,N), with the mix rsq (B,h,N) and rstd (B,h), in
fp32 (contract of rest_kernels/backends/stats.py).

Grid and what a program holds
-----------------------------
Without the mix: one program per (query block of BN rows, batch element, head): grid
(cdiv(N, BN), B, h), classic online softmax on 2-D tiles.
With the head mix the logits of output head g are S_g = sum_j W[g,j] scale q_j k_j^T. One program
per (query block, key range, batch element, group of G output heads): grid
(cdiv(N, BN) x SPLIT, B, cdiv(h, G)), SPLIT = 1 unless the key range is split (below). Per
key block it forms each input head's product L_j = q_j k_j^T once, as a 2-D dot accumulated in
fp32, and adds W[g,j] scale L_j into the G output heads' logit tiles it holds (a tuple of G
[BN, BM] fp32 tiles; rest_kernels/triton/_common.py:group_logits): h dots per tile pair serve G
output heads, plus G h fp32 FMAs per logit, where one head per program (G = 1) pays h dots per
output head (h^2 per tile pair). Each S_g is summed over j in the same order for every G
(tests/test_triton_backend.py holds the forward to the same bits for G = 1, 2, 4). Why 2-D: a 2-D
dot with BN = 64 rows per warpgroup is what Triton lowers to wgmma (HGMMA) on sm_90 (a batched
[heads, rows, d] dot only ever becomes mma.sync).
G comes from the tile table ("fwd_mix": the largest G whose tiles compile without spills, per arch,
precision, padded head dim and head count; rest_kernels/triton/tiles.py); for head dims outside the
table's (ResT's mixed stages use 64 and 96) the forward runs G = 1 on the "fwd" tiles.
Grouping divides the work but not a program's own time per key block: where query blocks x batch x
head groups leave less than a wave of programs (batch 1 at 800 x 1216, stages 3-4: 60 and 15 query
blocks), fp16 / bf16 calls split the key range over SPLIT programs per (query block, b, group),
each walking a range of whole key blocks (`forward_plan`; grid axis 0 = query blocks x SPLIT), in
the range kernels below. The statistics pass writes each range's (m, l, c), which
`_merge_stats_kernel` merges in a fixed order; the output pass writes each range's share of
rstd * sum_m (P - 1/M) v_m in fp32, which `_key_split_sum_kernel` adds in a fixed order, rounding
once. P is final on every tile (lse is known before the output pass), so the shares need no
rescaling: unlike flash-decoding's split, only a sum.
Only [BN, BM] tiles exist: the N x M map never reaches global memory. BD = next_pow2(d) >= 16,
masked, so d = 3, 5, 96 work; d <= 256, h <= 8 with the mix. On a GPU every call is first compiled
for the device's arch and its launches held against the arch's limits
(rest_kernels/triton/capability.py); what does not fit is refused with that reason, so "auto"
falls back.

Three kernels with the mix, all with fixed block order (deterministic, no atomics):
1. `_stats_kernel` (mix only): online softmax over the key blocks. Per row it keeps the running
   max m, l = sum e with e = exp(S - m), and c = sum (e - l/n)^2 over the n keys seen so far,
   merged block by block with Chan's pairwise update (each block centred at its own mean); when m
   grows by delta, l scales by exp(-delta) and c by exp(-2 delta). Stores lse = m + log(l / M)
   and rsq = c / l^2 = sum_m (P - 1/M)^2, the centred row sum (no cancellation for near-uniform
   rows).
2. `_rowsum_kernel`: per (b, g) the sum over rows of rsq, in a fixed order, and from it
   rstd = (sum/(N M) + eps)^-1/2 in the same program (B*h numbers).
3. `_attn_kernel`: with the mix, P = exp(S - lse) / M is final on every tile (lse is known), so the
   program accumulates Y v = sum_m (P - 1/M) v_m in fp32 (the 1/M is subtracted before the
   product, so no cancellation of two large terms, and no separate vbar) and writes
   out = rstd * (Y v) once, in the output dtype. Without the mix the same kernel runs classic
   online softmax (rescaled accumulator) and stores lse.
With the key range split, four: `_stats_range_kernel` (1. over one range, storing its (m, l, c)),
`_merge_stats_kernel` (the ranges merged in order with the same update, then lse, rsq and, as 2.,
rstd), `_attn_range_kernel` (3. over one range, its fp32 share) and `_key_split_sum_kernel`.

Why the normalisation is exact
------------------------------
InstanceNorm of the (b, g) map P (N x M): every row of a softmax sums to 1, so
mean = (1/(NM)) sum_i sum_m P_im = 1/M exactly, and var = (1/(NM)) sum_i rsq_i with
rsq_i = sum_m (P_im - 1/M)^2. So the norm is (P - 1/M) rstd, a per-(b, g) scale of P shifted by a
constant, and needs only the per-row rsq_i. The online merge is exact algebra, not an
approximation (same argument as for l).

Why a statistics pass instead of "one pass + one extra pass over out"
---------------------------------------------------------------------
rstd needs every row of the (b, g) map, so out cannot be final in one pass. Either (a) write
P v - vbar unnormalised and rescale it in place (reads + writes out again: 2 x |out| bytes and two
roundings in fp16/bf16), or (b) first run the cheap statistics pass (reads q and k: |q| + |k|
bytes, no v, no PV dot) and then write out once. |q| = |out|, so (b) moves fewer bytes and rounds
once; it recomputes QK^T, which is cheap at ResT's sizes. We chose (b).

What it costs on paper (bytes, FLOPs, per GPU) is bench/perf_model.py's job, which reads these
launches (docs/performance_model.md has the table).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .launch import launch
from ._common import (TORCH_TO_TL, dot, dot_mode, group_logits, head_logits, interpreting, load_2d,
                      load_row_stat, pow2, split_count, store_2d, store_row_stat)
from .tiles import Tiles, tiles_for


@triton.jit
def _stats_kernel(q_ptr, k_ptr, w_ptr, lse_ptr, rsq_ptr,
                  sqb, sqh, sqn, sqd, skb, skh, skm, skd,
                  H, N, M, D, scale,
                  BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, G: tl.constexpr,
                  DTYPE: tl.constexpr, DOT: tl.constexpr):
    n0 = tl.program_id(0) * BN
    b = tl.program_id(1)
    g0 = tl.program_id(2) * G  # output heads g0 .. g0 + G - 1
    m_i = ()
    l_i = ()
    c_i = ()  # per head: sum (e - l/n)^2 over the keys seen, e = exp(S - m_i)
    for gl in tl.static_range(G):
        m_i = m_i + (tl.full((BN,), float("-inf"), tl.float32),)
        l_i = l_i + (tl.zeros((BN,), tl.float32),)
        c_i = c_i + (tl.zeros((BN,), tl.float32),)
    cols = tl.arange(0, BM)[None, :]
    for m0 in range(0, M, BM):
        s = group_logits(q_ptr, k_ptr, w_ptr, sqb, sqh, sqn, sqd, skb, skh, skm, skd,
                         b, g0, n0, m0, H, N, M, D, scale, BN, BM, BD, G, DTYPE, DOT)
        valid = m0 + cols < M
        n_a = m0 * 1.0
        n_b = tl.minimum((M - m0) * 1.0, BM * 1.0)
        new_m = ()
        new_l = ()
        new_c = ()
        for gl in tl.static_range(G):
            sg = tl.where(valid, s[gl], float("-inf"))
            m_new = tl.maximum(m_i[gl], tl.max(sg, axis=1))  # finite: every key block holds a valid key
            alpha = tl.exp(m_i[gl] - m_new)
            p = tl.exp(sg - m_new[:, None])
            # Chan's pairwise update of a centred sum of squares: this block's own (centred at its
            # mean) plus the running one, both in the scale of the new max (c scales with alpha^2)
            l_b = tl.sum(p, axis=1)
            mean_b = l_b / n_b
            dev = tl.where(valid, p - mean_b[:, None], 0.0)
            l_a = l_i[gl] * alpha
            delta = mean_b - l_a / tl.maximum(n_a, 1.0)
            new_c = new_c + (c_i[gl] * (alpha * alpha) + tl.sum(dev * dev, axis=1)
                             + delta * delta * (n_a * n_b / (n_a + n_b)),)
            new_l = new_l + (l_a + l_b,)
            new_m = new_m + (m_new,)
        m_i = new_m
        l_i = new_l
        c_i = new_c
    for gl in tl.static_range(G):
        g = tl.minimum(g0 + gl, H - 1)
        r0 = tl.where(g0 + gl < H, n0, N)  # a padded head's rows start past N: nothing stored
        # log-mean-exp (rest_kernels/backends/stats.py): l / M near 1 for near-uniform rows, so its
        # log keeps full precision where a log-sum-exp would round at the size of log M
        store_row_stat(lse_ptr, m_i[gl] + tl.log(l_i[gl] / M), b, g, r0, H, N, BN)
        # sum_m (P - 1/M)^2 = sum_m (e - l/M)^2 / l^2 (rest_kernels/backends/stats.py)
        store_row_stat(rsq_ptr, c_i[gl] / (l_i[gl] * l_i[gl]), b, g, r0, H, N, BN)


# The key-range kernels (_stats_range_kernel, _attn_range_kernel) are the grouped forward's two
# passes over one range of key blocks. They are kept apart from _stats_kernel and _attn_kernel on
# purpose: with the range as runtime arguments in those kernels, ptxas allocated registers
# differently for calls that never split, and 10-16 of the tuned configurations spilled 4-32 B
# (sm_80-90, fp32 and 16-bit; 2026-12-06). Apart, the unsplit kernels compile exactly as measured in
# the resource budget, and the range kernels only at the shapes that split.
# SPLIT and blocks_per_split are runtime arguments (as in the backward's split): a constexpr split
# count would compile one kernel per count.
@triton.jit(do_not_specialize=["SPLIT", "blocks_per_split"])
def _stats_range_kernel(q_ptr, k_ptr, w_ptr, part_ptr,
                        sqb, sqh, sqn, sqd, skb, skh, skm, skd,
                        H, N, M, D, scale, blocks_per_split, SPLIT, sps, sstat,
                        BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, G: tl.constexpr,
                        DTYPE: tl.constexpr, DOT: tl.constexpr):
    """_stats_kernel over key blocks split * blocks_per_split ... of the grid's (query block, range)
    pid: stores the range's (m, l, c) per row into the (3, SPLIT, B, H, N) partials."""
    pid = tl.program_id(0)
    n0 = (pid // SPLIT) * BN
    split = pid % SPLIT
    m_lo = split * blocks_per_split * BM
    m_hi = m_lo + tl.minimum(M - m_lo, blocks_per_split * BM)
    b = tl.program_id(1)
    g0 = tl.program_id(2) * G  # output heads g0 .. g0 + G - 1
    m_i = ()
    l_i = ()
    c_i = ()  # per head: sum (e - l/n)^2 over the keys seen, e = exp(S - m_i)
    for gl in tl.static_range(G):
        m_i = m_i + (tl.full((BN,), float("-inf"), tl.float32),)
        l_i = l_i + (tl.zeros((BN,), tl.float32),)
        c_i = c_i + (tl.zeros((BN,), tl.float32),)
    cols = tl.arange(0, BM)[None, :]
    for m0 in range(m_lo, m_hi, BM):
        s = group_logits(q_ptr, k_ptr, w_ptr, sqb, sqh, sqn, sqd, skb, skh, skm, skd,
                         b, g0, n0, m0, H, N, M, D, scale, BN, BM, BD, G, DTYPE, DOT)
        valid = m0 + cols < M
        n_a = (m0 - m_lo) * 1.0  # keys of this range seen so far
        n_b = tl.minimum((M - m0) * 1.0, BM * 1.0)
        new_m = ()
        new_l = ()
        new_c = ()
        for gl in tl.static_range(G):  # the update of _stats_kernel
            sg = tl.where(valid, s[gl], float("-inf"))
            m_new = tl.maximum(m_i[gl], tl.max(sg, axis=1))
            alpha = tl.exp(m_i[gl] - m_new)
            p = tl.exp(sg - m_new[:, None])
            l_b = tl.sum(p, axis=1)
            mean_b = l_b / n_b
            dev = tl.where(valid, p - mean_b[:, None], 0.0)
            l_a = l_i[gl] * alpha
            delta = mean_b - l_a / tl.maximum(n_a, 1.0)
            new_c = new_c + (c_i[gl] * (alpha * alpha) + tl.sum(dev * dev, axis=1)
                             + delta * delta * (n_a * n_b / (n_a + n_b)),)
            new_l = new_l + (l_a + l_b,)
            new_m = new_m + (m_new,)
        m_i = new_m
        l_i = new_l
        c_i = new_c
    part = part_ptr + split.to(tl.int64) * sps
    for gl in tl.static_range(G):
        g = tl.minimum(g0 + gl, H - 1)
        r0 = tl.where(g0 + gl < H, n0, N)  # a padded head's rows start past N: nothing stored
        store_row_stat(part, m_i[gl], b, g, r0, H, N, BN)
        store_row_stat(part + sstat, l_i[gl], b, g, r0, H, N, BN)
        store_row_stat(part + 2 * sstat, c_i[gl], b, g, r0, H, N, BN)


@triton.jit(do_not_specialize=["SPLIT", "keys_per_split"])
def _merge_stats_kernel(part_ptr, lse_ptr, rsq_ptr, rstd_ptr, N, M, SPLIT, keys_per_split, sps, sstat,
                        count, eps, BR: tl.constexpr):
    """One program per (b, g), rows in blocks of BR: each row's (m, l, c) of the SPLIT key ranges
    merged in order s = 0, 1, ... (the update of _stats_kernel, range by range), then
        lse = m + log(l / M)    log-mean-exp (rest_kernels/backends/stats.py): l / M is near 1 for
                                near-uniform rows, so its log keeps full precision where a
                                log-sum-exp would round at the size of log M
        rsq = c / l^2           = sum_m (P - 1/M)^2, the centred row sum
    and over the rows, in a fixed order, rstd = (sum rsq / (N M) + eps)^-1/2, as _rowsum_kernel's
    RSTD epilogue forms it for the unsplit forward."""
    p = tl.program_id(0).to(tl.int64)  # = b * H + g: the (B, H, N) statistics are contiguous
    acc = tl.zeros((BR,), tl.float32)
    for r0 in range(0, N, BR):
        rr = r0 + tl.arange(0, BR)
        inside = rr < N
        m = tl.full((BR,), float("-inf"), tl.float32)
        l = tl.zeros((BR,), tl.float32)
        c = tl.zeros((BR,), tl.float32)
        n = 0.0
        src = part_ptr + p * N + rr
        for s in range(SPLIT):  # pointers step by sps: no split x size product in 32 bits
            m_s = tl.load(src, mask=inside, other=0.0)
            l_s = tl.load(src + sstat, mask=inside, other=1.0)
            c_s = tl.load(src + 2 * sstat, mask=inside, other=0.0)
            n_s = tl.minimum(M - s * keys_per_split, keys_per_split) * 1.0
            m_new = tl.maximum(m, m_s)  # m_s finite: every range holds a valid key
            alpha = tl.exp(m - m_new)
            beta = tl.exp(m_s - m_new)
            l_a = l * alpha
            l_b = l_s * beta
            delta = l_b / n_s - l_a / tl.maximum(n, 1.0)
            c = c * (alpha * alpha) + c_s * (beta * beta) + delta * delta * (n * n_s / (n + n_s))
            l = l_a + l_b
            m = m_new
            n += n_s
            src += sps
        rsq = c / (l * l)
        tl.store(lse_ptr + p * N + rr, m + tl.log(l / M), mask=inside)
        tl.store(rsq_ptr + p * N + rr, rsq, mask=inside)
        acc += tl.where(inside, rsq, 0.0)
    total = tl.sum(acc, axis=0)
    # correctly rounded sqrt and division: the same bits on every GPU
    tl.store(rstd_ptr + p, tl.math.div_rn(1.0, tl.sqrt_rn(total / count + eps)))


#: what _rowsum_kernel writes for each row's sum s (EPILOGUE): s itself; s / count (a mean); or
#: (s / count + eps)^-1/2 (InstanceNorm's rstd from the rows' centred sums of squares). The last two
#: are the forward's rstd and the backward's c = mean(dY * Y): done in the reduction's own program
#: they cost no launch of their own (three and one torch ops before: ~4 us each on a GPU).
SUM, MEAN, RSTD = 0, 1, 2


@triton.jit
def _rowsum_kernel(x_ptr, out_ptr, R, count, eps, BR: tl.constexpr, EPILOGUE: tl.constexpr):
    """out[p] = f(sum_r x[p, r]) for a contiguous (P, R) fp32 array: one program per row, fixed order."""
    p = tl.program_id(0)
    base = x_ptr + p.to(tl.int64) * R
    acc = tl.zeros((BR,), tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        acc += tl.load(base + rr, mask=rr < R, other=0.0)
    total = tl.sum(acc, axis=0)
    if EPILOGUE == 1:
        total = total / count
    elif EPILOGUE == 2:  # correctly rounded sqrt and division: the same bits on every GPU
        total = tl.math.div_rn(1.0, tl.sqrt_rn(total / count + eps))
    tl.store(out_ptr + p, total)


def rowsum(x: torch.Tensor, epilogue: int = SUM, count: int = 1, eps: float = 0.0) -> torch.Tensor:
    """Deterministic sum over the last dim of a contiguous fp32 (..., R) tensor, then the
    `epilogue` (SUM, MEAN: / count, RSTD: (/ count + eps)^-1/2)."""
    R = x.shape[-1]
    flat = x.reshape(-1, R)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=x.device)
    if flat.shape[0]:
        launch(_rowsum_kernel, (flat.shape[0],), flat, out, R, float(count), float(eps),
               BR=min(1024, pow2(R, 16)), EPILOGUE=epilogue)
    return out.reshape(x.shape[:-1])


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, w_ptr, o_ptr, lse_ptr, rstd_ptr,
                 sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sob, soh, son, sod,
                 H, N, M, D, scale,
                 BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, G: tl.constexpr,
                 NORM: tl.constexpr, DTYPE: tl.constexpr, DOT: tl.constexpr):
    n0 = tl.program_id(0) * BN
    b = tl.program_id(1)
    cols = tl.arange(0, BM)[None, :]
    if NORM:
        g0 = tl.program_id(2) * G  # output heads g0 .. g0 + G - 1
        inv_m = 1.0 / M
        acc = ()
        lse = ()
        for gl in tl.static_range(G):
            acc = acc + (tl.zeros((BN, BD), tl.float32),)
            lse = lse + (load_row_stat(lse_ptr, b, tl.minimum(g0 + gl, H - 1), n0, H, N, BN, 0.0),)
        for m0 in range(0, M, BM):
            s = group_logits(q_ptr, k_ptr, w_ptr, sqb, sqh, sqn, sqd, skb, skh, skm, skd,
                             b, g0, n0, m0, H, N, M, D, scale, BN, BM, BD, G, DTYPE, DOT)
            new = ()
            for gl in tl.static_range(G):
                v = load_2d(v_ptr, svb, svh, svm, svd, b, tl.minimum(g0 + gl, H - 1), m0, M, D, BM, BD)
                # (P - 1/M) = (exp(S - lse) - 1) / M before the product with v: the mean is
                # subtracted exactly (exp(x) - 1 for small x is exact in fp32), with lse the row's
                # log-mean-exp
                y = tl.where(m0 + cols < M, (tl.exp(s[gl] - lse[gl][:, None]) - 1.0) * inv_m, 0.0)
                new = new + (acc[gl] + dot(y, v, DTYPE, DOT),)
            acc = new
        for gl in tl.static_range(G):
            g = tl.minimum(g0 + gl, H - 1)
            rstd = tl.load(rstd_ptr + (tl.zeros((), tl.int64) + b) * H + g)
            store_2d(o_ptr, acc[gl] * rstd, sob, soh, son, sod, b, g, n0, N * (g0 + gl < H), D, BN, BD)
    else:
        g = tl.program_id(2)
        acc = tl.zeros((BN, BD), tl.float32)
        q = load_2d(q_ptr, sqb, sqh, sqn, sqd, b, g, n0, N, D, BN, BD)  # held: one head, no mix
        m_i = tl.full((BN,), float("-inf"), tl.float32)
        l_i = tl.zeros((BN,), tl.float32)
        for m0 in range(0, M, BM):
            s = head_logits(q_ptr, k_ptr, w_ptr, sqb, sqh, sqn, sqd, skb, skh, skm, skd, q,
                            b, g, n0, m0, H, N, M, D, scale, BN, BM, BD, False, DTYPE, DOT)
            v = load_2d(v_ptr, svb, svh, svm, svd, b, g, m0, M, D, BM, BD)
            s = tl.where(m0 + cols < M, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + dot(p, v, DTYPE, DOT)
            m_i = m_new
        acc = acc / l_i[:, None]
        store_row_stat(lse_ptr, m_i + tl.log(l_i / M), b, g, n0, H, N, BN)  # log-mean-exp
        store_2d(o_ptr, acc, sob, soh, son, sod, b, g, n0, N, D, BN, BD)


@triton.jit(do_not_specialize=["SPLIT", "blocks_per_split"])
def _attn_range_kernel(q_ptr, k_ptr, v_ptr, w_ptr, o_ptr, lse_ptr, rstd_ptr,
                       sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                       H, N, M, D, scale, blocks_per_split, SPLIT,
                       BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, G: tl.constexpr,
                       DTYPE: tl.constexpr, DOT: tl.constexpr):
    """_attn_kernel's mixed branch over one range of key blocks: the range's share of
    rstd * sum_m (P - 1/M) v_m into o, the (SPLIT, B, H, N, D) fp32 partials (contiguous), which
    _key_split_sum_kernel adds up. P is final on every tile (lse is known): the shares add without
    rescaling."""
    pid = tl.program_id(0)
    n0 = (pid // SPLIT) * BN
    split = pid % SPLIT
    m_lo = split * blocks_per_split * BM
    m_hi = m_lo + tl.minimum(M - m_lo, blocks_per_split * BM)
    b = tl.program_id(1)
    cols = tl.arange(0, BM)[None, :]
    o_ptr += split.to(tl.int64) * (tl.num_programs(1).to(tl.int64) * H * N * D)
    g0 = tl.program_id(2) * G  # output heads g0 .. g0 + G - 1
    inv_m = 1.0 / M
    acc = ()
    lse = ()
    for gl in tl.static_range(G):
        acc = acc + (tl.zeros((BN, BD), tl.float32),)
        lse = lse + (load_row_stat(lse_ptr, b, tl.minimum(g0 + gl, H - 1), n0, H, N, BN, 0.0),)
    for m0 in range(m_lo, m_hi, BM):
        s = group_logits(q_ptr, k_ptr, w_ptr, sqb, sqh, sqn, sqd, skb, skh, skm, skd,
                         b, g0, n0, m0, H, N, M, D, scale, BN, BM, BD, G, DTYPE, DOT)
        new = ()
        for gl in tl.static_range(G):
            v = load_2d(v_ptr, svb, svh, svm, svd, b, tl.minimum(g0 + gl, H - 1), m0, M, D, BM, BD)
            y = tl.where(m0 + cols < M, (tl.exp(s[gl] - lse[gl][:, None]) - 1.0) * inv_m, 0.0)  # P - 1/M
            new = new + (acc[gl] + dot(y, v, DTYPE, DOT),)
        acc = new
    for gl in tl.static_range(G):
        g = tl.minimum(g0 + gl, H - 1)
        rstd = tl.load(rstd_ptr + (tl.zeros((), tl.int64) + b) * H + g)
        store_2d(o_ptr, acc[gl] * rstd, H * N * D, N * D, D, 1, b, g, n0, N * (g0 + gl < H), D, BN, BD)


@triton.jit(do_not_specialize=["SPLIT"])
def _key_split_sum_kernel(part_ptr, o_ptr, sob, soh, son, sod, H, N, D, SPLIT, sps,
                          BR: tl.constexpr, BD: tl.constexpr):
    """o[b, g, rows] = sum_s part[s, b, g, rows] over the key ranges in order s = 0, 1, ..., rounded
    once into o (its own strides and dtype); part: (SPLIT, B, H, N, D) fp32, contiguous."""
    n0 = tl.program_id(0) * BR
    b = tl.program_id(1)
    g = tl.program_id(2)
    acc = tl.zeros((BR, BD), tl.float32)
    src = part_ptr
    for _ in range(SPLIT):  # pointers step by sps: no split x size product in 32 bits
        acc += load_2d(src, H * N * D, N * D, D, 1, b, g, n0, N, D, BR, BD)
        src += sps
    store_2d(o_ptr, acc, sob, soh, son, sod, b, g, n0, N, D, BR, BD)


def _config(q: torch.Tensor):
    """(BD, DTYPE, DOT) of the forward kernels for q's head dim and dtype."""
    return pow2(q.shape[-1], 16), TORCH_TO_TL[q.dtype], dot_mode(q.dtype)


#: programs the mixed forward aims at: about one wave of a 132-SM H100 (a property of the design,
#: not of the device, so every GPU runs the same kernels and gives the same bits)
FWD_TARGET_PROGRAMS = 128


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    """How a forward call is tiled: the tile row, G output heads per program (mixed forward), and
    the key range split over `splits` programs of `blocks_per_split` key blocks each (splits > 1:
    the range kernels)."""
    tiles: Tiles
    G: int
    splits: int = 1
    blocks_per_split: int = 0

    def grid(self, q: torch.Tensor) -> tuple[int, int, int]:
        B, H, N, _ = q.shape
        return triton.cdiv(N, self.tiles.BN) * self.splits, B, triton.cdiv(H, self.G)


def forward_plan(q: torch.Tensor, M: int, mix: bool) -> ForwardPlan:
    """The tiling of a forward call with M keys.

    With the mix: the "fwd_mix" row for (BD, padded heads), G = its output heads per program, where
    the table has one (ResT's mixed head dims 64 and 96) and the grid keeps at least
    FWD_TARGET_PROGRAMS programs. A group shares each input head's product q_j k_j^T among its G
    output heads (h dots per tile pair for G heads instead of h per head), but a program's own work
    per key block does not shrink with G. Where the grouped grid is smaller (batch 1 at 800 x 1216,
    stages 3-4: 60 and 15 query blocks), the key range is split over as many programs as keep the
    grid within FWD_TARGET_PROGRAMS (one wave: more would start a second for a few programs), each
    walking a range of whole key blocks, their partial statistics and P V sums merged in a fixed
    order (split_count; fp16 / bf16 only, below). Where that cannot reach half of
    FWD_TARGET_PROGRAMS either (few key blocks: tiny calls), the "fwd" row, G = 1, unsplit: the
    shortest programs. Only the table's G or 1: each row is compiled spill-free as it is (a smaller
    G on the same tiles spilled a few bytes in fp32 on sm_90). Without the mix: the "fwd" row, one
    head per program, never split (online softmax per row: many programs at ResT's one-head stage 1)."""
    B, H, N, _ = q.shape
    BD = pow2(q.shape[-1], 16)
    low = q.dtype != torch.float32
    if mix:
        t = tiles_for("fwd_mix", low, BD, hp=pow2(H))
        if t is not None:
            programs = triton.cdiv(N, t.BN) * B * triton.cdiv(H, t.G)
            if programs >= FWD_TARGET_PROGRAMS:
                return ForwardPlan(t, t.G)
            splits, per_split = split_count(programs, triton.cdiv(M, t.BM), FWD_TARGET_PROGRAMS, at_most=True)
            # the interpreter has no GPU to fill: the table's G, so that the tests run the grouped
            # path, split where the key blocks allow (in every dtype: the same kernels as 16-bit)
            if interpreting():
                return ForwardPlan(t, t.G, splits, per_split) if splits > 1 else ForwardPlan(t, t.G)
            # 16-bit only: the fp32 range kernels spilled on the tiles tuned for the unsplit ones
            # (sm_80 _attn_range_kernel BD 64 G 4: 56 B; sm_86 / 89 _stats_range_kernel BD 128
            # G 4: 8 B), and fp32 at these shapes is slower than eager anyway ("auto" sends it there)
            if low and splits > 1 and programs * splits >= FWD_TARGET_PROGRAMS // 2:
                return ForwardPlan(t, t.G, splits, per_split)
    return ForwardPlan(tiles_for("fwd", low, BD), 1)


def attention_output(q, k, v, mix_weight, lse, rstd, scale, out):
    """Run `_attn_kernel` into `out` (any (B,h,N,d) strides and float dtype: the backward asks for
    an fp32 copy of O). With the mix, lse and rstd are inputs; without it lse is written. A split
    key range (forward_plan) runs `_attn_range_kernel` into fp32 partials, which
    `_key_split_sum_kernel` adds into `out`."""
    B, H, N, D = q.shape
    M = k.shape[2]
    BD, DTYPE, DOT = _config(q)
    mix = mix_weight is not None
    plan = forward_plan(q, M, mix)
    t = plan.tiles
    w = mix_weight.contiguous() if mix else q  # unused pointer without the mix
    if plan.splits == 1:
        launch(_attn_kernel, plan.grid(q),
               q, k, v, w, out, lse, rstd, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
               H, N, M, D, float(scale), BN=t.BN, BM=t.BM, BD=BD, G=plan.G, NORM=mix, DTYPE=DTYPE, DOT=DOT,
               **t.launch_options())
        return
    part = torch.empty(plan.splits, B, H, N, D, dtype=torch.float32, device=q.device)
    launch(_attn_range_kernel, plan.grid(q), q, k, v, w, part, lse, rstd, *q.stride(), *k.stride(), *v.stride(),
           H, N, M, D, float(scale), blocks_per_split=plan.blocks_per_split, SPLIT=plan.splits,
           BN=t.BN, BM=t.BM, BD=BD, G=plan.G, DTYPE=DTYPE, DOT=DOT, **t.launch_options())
    BR = max(16, 2048 // BD)  # [BR, BD] fp32 tiles of 2048 elements: 16 registers a thread
    launch(_key_split_sum_kernel, (triton.cdiv(N, BR), B, H), part, out, *out.stride(), H, N, D,
           SPLIT=plan.splits, sps=B * H * N * D, BR=BR, BD=BD)


def emsa_forward(q, k, v, mix_weight, scale, eps):
    B, H, N, D = q.shape
    M = k.shape[2]
    dev = q.device
    out = torch.empty(B, N, H, D, dtype=q.dtype, device=dev).transpose(1, 2)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=dev)
    if mix_weight is None:  # no InstanceNorm: no rsq, no rstd (rest_kernels/backends/stats.py)
        rsq = torch.empty(0, dtype=torch.float32, device=dev)
        rstd = torch.empty(0, dtype=torch.float32, device=dev)
        attention_output(q, k, v, mix_weight, lse, rstd, scale, out)
        return out, lse, rsq, rstd
    BD, DTYPE, DOT = _config(q)
    plan = forward_plan(q, M, True)
    t = plan.tiles
    w = mix_weight.contiguous()
    rsq = torch.empty(B, H, N, dtype=torch.float32, device=dev)
    if plan.splits == 1:
        launch(_stats_kernel, plan.grid(q), q, k, w, lse, rsq, *q.stride(), *k.stride(), H, N, M, D, float(scale),
               BN=t.BN, BM=t.BM, BD=BD, G=plan.G, DTYPE=DTYPE, DOT=DOT, **t.launch_options())
        rstd = rowsum(rsq, RSTD, N * M, eps)  # (sum / (N M) + eps)^-1/2 per (b, g)
    else:
        rstd = torch.empty(B, H, dtype=torch.float32, device=dev)
        part = torch.empty(3, plan.splits, B, H, N, dtype=torch.float32, device=dev)  # (m, l, c) per range
        launch(_stats_range_kernel, plan.grid(q), q, k, w, part, *q.stride(), *k.stride(), H, N, M, D,
               float(scale), blocks_per_split=plan.blocks_per_split, SPLIT=plan.splits, sps=B * H * N,
               sstat=plan.splits * B * H * N, BN=t.BN, BM=t.BM, BD=BD, G=plan.G, DTYPE=DTYPE, DOT=DOT,
               **t.launch_options())
        # lse, rsq and rstd = (sum rsq / (N M) + eps)^-1/2 per (b, g), fixed order
        launch(_merge_stats_kernel, (B * H,), part, lse, rsq, rstd, N, M, SPLIT=plan.splits,
               keys_per_split=plan.blocks_per_split * t.BM, sps=B * H * N, sstat=plan.splits * B * H * N,
               count=float(N * M), eps=float(eps), BR=min(1024, pow2(N, 16)))
    attention_output(q, k, v, mix_weight, lse, rstd, scale, out)
    return out, lse, rsq, rstd
