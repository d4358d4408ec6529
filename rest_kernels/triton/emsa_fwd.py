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
one pass (`_flash_range_kernel`: each range's statistics and unnormalised output together), merged
by `_flash_merge_kernel` in a fixed order (see "Why one pass where the key range is split" below).
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
With the key range split, two: `_flash_range_kernel` (1. and 3. in one pass over one range:
its (m, l, c) per row and its share sum_m e_m (v_m - vref) in fp32, e in the scale of the range's
own max) and `_flash_merge_kernel` (the ranges merged in order with the same update, then lse,
rsq, 2.'s rstd and out = rstd (P v - vbar)).

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

Why one pass where the key range is split
-----------------------------------------
At batch 1 and detection size (stages 3-4) the grid is small and each launch costs about as much
as the work (docs/performance_model.md: ~4 us a launch against 4-8 us of tensor-core work). Until
2026-12-07 the split forward was the two passes above over each range plus a merge of the
statistics and a sum of the output shares: four launches, with a merge of one program per (b, g).
A single pass has no lse when it meets a key, so it keeps flash-attention's unnormalised sum
rescaled by the running max and its merge subtracts vbar at the end: (a) above, for the calls
where launches, not bytes, set the time; the merge forms every statistic from the ranges'
partials, so there are two launches and the second one is spread over about a wave of programs.
What (a) costs in accuracy is kept to (b)'s: the tensor-core product takes the deviations of e
from their key block's mean, not e (the centred dev of Chan's update; the block's mean times the
sum of v is added in fp32), and v is shifted by vref, the mean of its first key block, so that
the fp32 difference P v - vbar is of two sums of the size of v's spread, not of its mean
(`_flash_range_kernel` has the argument; tests/test_triton_backend.py holds it to the unsplit
forward).

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
def _online_update(m, l, c, s, valid, n_a, n_b):
    """One key block's logits s [BN, BM] (valid: [1, BM], the keys inside M) folded into a row's
    running statistics over the n_a keys seen before: max m, l = sum e and c = sum (e - l/n)^2
    with e = exp(S - m). Chan's pairwise update of a centred sum of squares: the block's own
    (centred at its mean) plus the running one, both in the scale of the new max (c scales with
    alpha^2). Returns the new (m, l, c) and, for a caller that also sums e v, the factor alpha
    that brings the old sums to the new max, the block's mean of e and its centred e (dev)."""
    sg = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(sg, axis=1))  # finite: every key block holds a valid key
    alpha = tl.exp(m - m_new)
    p = tl.exp(sg - m_new[:, None])
    l_b = tl.sum(p, axis=1)
    mean_b = l_b / n_b
    dev = tl.where(valid, p - mean_b[:, None], 0.0)
    l_a = l * alpha
    delta = mean_b - l_a / tl.maximum(n_a, 1.0)
    c = c * (alpha * alpha) + tl.sum(dev * dev, axis=1) + delta * delta * (n_a * n_b / (n_a + n_b))
    return m_new, l_a + l_b, c, alpha, mean_b, dev


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
            m_g, l_g, c_g, _, _, _ = _online_update(m_i[gl], l_i[gl], c_i[gl], s[gl], valid, n_a, n_b)
            new_m = new_m + (m_g,)
            new_l = new_l + (l_g,)
            new_c = new_c + (c_g,)
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


# The key-range kernels (_flash_range_kernel, _attn_range_kernel) walk one range of key blocks.
# They are kept apart from _stats_kernel and _attn_kernel on purpose: with the range as runtime
# arguments in those kernels, ptxas allocated registers differently for calls that never split, and
# 10-16 of the tuned configurations spilled 4-32 B (sm_80-90, fp32 and 16-bit; 2026-12-06). Apart,
# the unsplit kernels compile exactly as measured in the resource budget, and the range kernels
# only at the shapes that split.
# SPLIT and blocks_per_split are runtime arguments (as in the backward's split): a constexpr split
# count would compile one kernel per count.
@triton.jit(do_not_specialize=["SPLIT", "blocks_per_split"])
def _flash_range_kernel(q_ptr, k_ptr, v_ptr, w_ptr, po_ptr, ps_ptr, pv_ptr,
                        sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd,
                        H, N, M, D, scale, blocks_per_split, SPLIT, sps, sstat,
                        BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, G: tl.constexpr,
                        DTYPE: tl.constexpr, DOT: tl.constexpr):
    """One pass over the key blocks split * blocks_per_split ... of the grid's (query block, range)
    pid, for G output heads: the range's online statistics (m, l, c) per row, as _stats_kernel's,
    into ps (3, SPLIT, B, H, N), and in the same pass its unnormalised output
    sum_m e_m (v_m - vref), e = exp(S - m), into po (SPLIT, B, H, N, D) fp32, and (query block 0
    only) sum_m (v_m - vref) into pv (SPLIT, B, H, D): _flash_merge_kernel makes out from them.

    Why e (v - vref) is summed as dev . v + mean_b vsum_b: with e_m = mean_b + dev_m over a key
    block (mean_b its mean, the centred dev of Chan's update below, whose sum over the block is 0),
    sum_m e_m (v_m - vref) = dev . v + mean_b sum_m (v_m - vref). Only dev is rounded to 16 bits
    for the tensor-core product: like the unsplit forward's P - 1/M, a deviation, so the rounding is
    relative to the small part of a near-uniform row (e rounded whole, as flash-attention's P, would
    put a 16-bit error of the order of P itself into P v - vbar, which rstd then amplifies up to
    eps^-1/2 = 316 fold). vref (the mean of v over key block 0, the same bits in every program of a
    (b, g)) keeps the fp32 sums of v near the size of v's spread, not of its mean: out is formed as
    rstd (P v - vbar), a difference of two sums of v.
    Emulated on the CPU (torch: the product's operands rounded to 16 bits, fp32 sums; 256 rows, M
    = 950, d = 64, 64-key blocks; error of rstd sum_m (P - 1/M) v_m relative to its largest
    float64 value), near-uniform rows (logits x 0.02, rstd 316), v of mean 0 / 3: bf16 (P - 1/M)
    rounded (the unsplit forward) 1.6e-3 / 4.6e-3, e rounded 5.8e-2 / 1.5e-1, dev rounded (here)
    1.4e-3 / 4.9e-3; fp16 8.5e-4 / 2.2e-3, 7.6e-3 / 1.7e-2, 2.2e-4 / 6.1e-4. With sharper rows
    (logits x 3, rstd 79) all three are within 2x of each other."""
    pid = tl.program_id(0)
    qblock = pid // SPLIT
    n0 = qblock * BN
    split = pid % SPLIT
    m_lo = split * blocks_per_split * BM
    m_hi = m_lo + tl.minimum(M - m_lo, blocks_per_split * BM)
    b = tl.program_id(1)
    g0 = tl.program_id(2) * G  # output heads g0 .. g0 + G - 1
    keys = tl.arange(0, BM)
    m_i = ()
    l_i = ()
    c_i = ()  # per head: sum (e - l/n)^2 over the keys seen, e = exp(S - m_i)
    acc = ()  # per head: sum e (v - vref) over the keys seen, [BN, BD] fp32
    vs = ()   # per head: sum (v - vref) over the keys seen, [BD] fp32
    vref = ()
    for gl in tl.static_range(G):
        v0 = load_2d(v_ptr, svb, svh, svm, svd, b, tl.minimum(g0 + gl, H - 1), 0, M, D, BM, BD)
        vref = vref + (tl.sum(v0.to(tl.float32), axis=0) / tl.minimum(M, BM),)
        m_i = m_i + (tl.full((BN,), float("-inf"), tl.float32),)
        l_i = l_i + (tl.zeros((BN,), tl.float32),)
        c_i = c_i + (tl.zeros((BN,), tl.float32),)
        acc = acc + (tl.zeros((BN, BD), tl.float32),)
        vs = vs + (tl.zeros((BD,), tl.float32),)
    for m0 in range(m_lo, m_hi, BM):
        s = group_logits(q_ptr, k_ptr, w_ptr, sqb, sqh, sqn, sqd, skb, skh, skm, skd,
                         b, g0, n0, m0, H, N, M, D, scale, BN, BM, BD, G, DTYPE, DOT)
        valid = m0 + keys < M
        n_a = (m0 - m_lo) * 1.0  # keys of this range seen so far
        n_b = tl.minimum((M - m0) * 1.0, BM * 1.0)
        new_m = ()
        new_l = ()
        new_c = ()
        new_acc = ()
        new_vs = ()
        for gl in tl.static_range(G):  # the update of _stats_kernel
            m_g, l_g, c_g, alpha, mean_b, dev = _online_update(m_i[gl], l_i[gl], c_i[gl], s[gl],
                                                               valid[None, :], n_a, n_b)
            new_m = new_m + (m_g,)
            new_l = new_l + (l_g,)
            new_c = new_c + (c_g,)
            v = load_2d(v_ptr, svb, svh, svm, svd, b, tl.minimum(g0 + gl, H - 1), m0, M, D, BM, BD)
            vsum_b = tl.sum(tl.where(valid[:, None], v.to(tl.float32) - vref[gl][None, :], 0.0), axis=0)
            # "x + dot" last: the JIT accumulates the product into x's registers (a separate
            # [BN, BD] product tile spilled on sm_90)
            rescaled = acc[gl] * alpha[:, None] + mean_b[:, None] * vsum_b[None, :]
            new_acc = new_acc + (rescaled + dot(dev, v, DTYPE, DOT),)
            new_vs = new_vs + (vs[gl] + vsum_b,)
        m_i = new_m
        l_i = new_l
        c_i = new_c
        acc = new_acc
        vs = new_vs
    part = ps_ptr + split.to(tl.int64) * sps
    po_ptr += split.to(tl.int64) * (tl.num_programs(1).to(tl.int64) * H * N * D)
    dd = tl.arange(0, BD)
    for gl in tl.static_range(G):
        g = tl.minimum(g0 + gl, H - 1)
        r0 = tl.where(g0 + gl < H, n0, N)  # a padded head's rows start past N: nothing stored
        store_row_stat(part, m_i[gl], b, g, r0, H, N, BN)
        store_row_stat(part + sstat, l_i[gl], b, g, r0, H, N, BN)
        store_row_stat(part + 2 * sstat, c_i[gl], b, g, r0, H, N, BN)
        store_2d(po_ptr, acc[gl], H * N * D, N * D, D, 1, b, g, n0, N * (g0 + gl < H), D, BN, BD)
        vdst = pv_ptr + ((split.to(tl.int64) * tl.num_programs(1) + b) * H + g) * D + dd
        tl.store(vdst, vs[gl], mask=(dd < D) & (qblock == 0) & (g0 + gl < H))


@triton.jit
def _merge_range(m, l, c, n, m_s, l_s, c_s, n_s):
    """A row's statistics (m, l, c) over n keys merged with one key range's (m_s, l_s, c_s) over n_s
    keys: the update of _stats_kernel, range by range. Also returns the factors alpha, beta that
    bring each side's sums to the new max."""
    m_new = tl.maximum(m, m_s)  # m_s finite: every range holds a valid key
    alpha = tl.exp(m - m_new)
    beta = tl.exp(m_s - m_new)
    l_a = l * alpha
    l_b = l_s * beta
    delta = l_b / n_s - l_a / tl.maximum(n, 1.0)
    c = c * (alpha * alpha) + c_s * (beta * beta) + delta * delta * (n * n_s / (n + n_s))
    return m_new, l_a + l_b, c, alpha, beta


@triton.jit(do_not_specialize=["SPLIT", "keys_per_split", "rows"])
def _flash_merge_kernel(ps_ptr, po_ptr, pv_ptr, o_ptr, lse_ptr, rsq_ptr, rstd_ptr,
                        sob, soh, son, sod, H, N, M, D, SPLIT, keys_per_split, sps, sstat, spv, rows,
                        count, eps, BRS: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """out, lse, rsq of rows program_id(0) * rows ... (+ rows) of (b, g), and rstd of (b, g), from
    _flash_range_kernel's partials, every sum over the key ranges in order s = 0, 1, ...:
        lse = m + log(l / M)    log-mean-exp (rest_kernels/backends/stats.py): l / M is near 1 for
                                near-uniform rows, so its log keeps full precision where a
                                log-sum-exp would round at the size of log M
        rsq = c / l^2           = sum_m (P - 1/M)^2, the centred row sum
        rstd = (sum rsq / (N M) + eps)^-1/2, over every row of (b, g) in a fixed order: each
                                program forms it from all rows' partials (the same bits in every
                                program; ~12 B per row and range, read again from L2: cheaper than
                                a launch of its own)
        out = rstd (P v - vbar) = rstd (sum_s e_s (v - vref) / l - sum_s (v - vref) / M).
    Strides of one key range: sps in each of ps's three statistics (sstat apart), sps D in po, spv
    in pv."""
    b = tl.program_id(1)
    g = tl.program_id(2)
    p = (tl.zeros((), tl.int64) + b) * H + g  # the (B, H, N) statistics are contiguous
    acc = tl.zeros((BRS,), tl.float32)
    for r0 in range(0, N, BRS):
        rr = r0 + tl.arange(0, BRS)
        inside = rr < N
        m = tl.full((BRS,), float("-inf"), tl.float32)
        l = tl.zeros((BRS,), tl.float32)
        c = tl.zeros((BRS,), tl.float32)
        n = 0.0
        src = ps_ptr + p * N + rr
        for s in range(SPLIT):  # pointers step by sps: no split x size product in 32 bits
            n_s = tl.minimum(M - s * keys_per_split, keys_per_split) * 1.0
            m, l, c, alpha, beta = _merge_range(m, l, c, n, tl.load(src, mask=inside, other=0.0),
                                                tl.load(src + sstat, mask=inside, other=1.0),
                                                tl.load(src + 2 * sstat, mask=inside, other=0.0), n_s)
            n += n_s
            src += sps
        acc += tl.where(inside, c / (l * l), 0.0)
    # correctly rounded sqrt and division: the same bits on every GPU
    rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.sum(acc, axis=0) / count + eps))
    if tl.program_id(0) == 0:
        tl.store(rstd_ptr + p, rstd)
    dd = tl.arange(0, BD)
    vbar = tl.zeros((BD,), tl.float32)  # mean of v - vref over the keys
    src_v = pv_ptr + p * D + dd
    for s in range(SPLIT):
        vbar += tl.load(src_v, mask=dd < D, other=0.0)
        src_v += spv
    vbar = vbar / M
    r_lo = tl.program_id(0) * rows
    for r0 in range(r_lo, tl.minimum(r_lo + rows, N), BR):
        rr = r0 + tl.arange(0, BR)
        inside = rr < N
        m = tl.full((BR,), float("-inf"), tl.float32)
        l = tl.zeros((BR,), tl.float32)
        c = tl.zeros((BR,), tl.float32)
        o = tl.zeros((BR, BD), tl.float32)
        n = 0.0
        src = ps_ptr + p * N + rr
        src_o = po_ptr
        for s in range(SPLIT):
            n_s = tl.minimum(M - s * keys_per_split, keys_per_split) * 1.0
            m, l, c, alpha, beta = _merge_range(m, l, c, n, tl.load(src, mask=inside, other=0.0),
                                                tl.load(src + sstat, mask=inside, other=1.0),
                                                tl.load(src + 2 * sstat, mask=inside, other=0.0), n_s)
            o = o * alpha[:, None] + load_2d(src_o, H * N * D, N * D, D, 1, b, g, r0, N, D, BR, BD) * beta[:, None]
            n += n_s
            src += sps
            src_o += sps * D
        tl.store(lse_ptr + p * N + rr, m + tl.log(l / M), mask=inside)
        tl.store(rsq_ptr + p * N + rr, c / (l * l), mask=inside)
        store_2d(o_ptr, (o / l[:, None] - vbar[None, :]) * rstd, sob, soh, son, sod, b, g, r0, N, D, BR, BD)


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
    _key_split_row_terms_kernel adds up. P is final on every tile (lse is known): the shares add
    without rescaling."""
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
def _key_split_row_terms_kernel(part_ptr, do_ptr, delta_ptr, sdb, sdh, sdn, sdd, H, N, D, SPLIT, sps,
                                BR: tl.constexpr, BD: tl.constexpr):
    """delta[b, g, rows] = dO . O per row, O = sum_s part[s, b, g, rows] over the key ranges in
    order s = 0, 1, ... in fp32 (part: (SPLIT, B, H, N, D) fp32, contiguous): the backward's row
    terms with O never stored (a launch and an fp32 O buffer fewer than summing O, then the row
    terms)."""
    n0 = tl.program_id(0) * BR
    b = tl.program_id(1)
    g = tl.program_id(2)
    o = tl.zeros((BR, BD), tl.float32)
    src = part_ptr
    for _ in range(SPLIT):  # pointers step by sps: no split x size product in 32 bits
        o += load_2d(src, H * N * D, N * D, D, 1, b, g, n0, N, D, BR, BD)
        src += sps
    do = load_2d(do_ptr, sdb, sdh, sdn, sdd, b, g, n0, N, D, BR, BD).to(tl.float32)
    store_row_stat(delta_ptr, tl.sum(do * o, axis=1), b, g, n0, H, N, BR)


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
    the range kernels; one_pass: the one-pass range kernel, also with one range)."""
    tiles: Tiles
    G: int
    splits: int = 1
    blocks_per_split: int = 0
    one_pass: bool = False  # _flash_range_kernel + _flash_merge_kernel (the forward's own split call)

    def grid(self, q: torch.Tensor) -> tuple[int, int, int]:
        B, H, N, _ = q.shape
        return triton.cdiv(N, self.tiles.BN) * self.splits, B, triton.cdiv(H, self.G)


def forward_plan(q: torch.Tensor, M: int, mix: bool, one_pass: bool = False) -> ForwardPlan:
    """The tiling of a forward call with M keys.

    With the mix: the "fwd_mix" row for (BD, padded heads), G = its output heads per program, where
    the table has one (ResT's mixed head dims 64 and 96) and the grid keeps at least
    FWD_TARGET_PROGRAMS programs. A group shares each input head's product q_j k_j^T among its G
    output heads (h dots per tile pair for G heads instead of h per head), but a program's own work
    per key block does not shrink with G. Where the grouped grid is smaller (batch 1 at 800 x 1216,
    stages 3-4: 60 and 15 query blocks), the key range is split over as many programs as keep the
    grid within FWD_TARGET_PROGRAMS (one wave: more would start a second for a few programs), each
    walking a range of whole key blocks, their partials merged in a fixed order (split_count;
    fp16 / bf16 only, below). `one_pass`: the forward's own call, whose split runs
    _flash_range_kernel on the "fwd_split" row (that kernel holds more per head than the two-pass
    kernels: its own G); otherwise (the backward's rebuild of O, lse and rstd known) the split runs
    _attn_range_kernel on the "fwd_mix" row. Where a split cannot reach half of
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
            ts = tiles_for("fwd_split", low, BD, hp=pow2(H)) if one_pass else t
            if ts is not None:
                programs = triton.cdiv(N, ts.BN) * B * triton.cdiv(H, ts.G)
                splits, per_split = split_count(programs, triton.cdiv(M, ts.BM), FWD_TARGET_PROGRAMS, at_most=True)
                # the interpreter has no GPU to fill: the table's G, so that the tests run the
                # grouped path, split where the key blocks allow (in every dtype: the same kernels
                # as 16-bit), else unsplit
                if interpreting():
                    return ForwardPlan(ts, ts.G, splits, per_split, one_pass) if splits > 1 else ForwardPlan(t, t.G)
                # 16-bit only: the fp32 range kernels spilled on the tiles tuned for the unsplit
                # ones (sm_80 _attn_range_kernel BD 64 G 4: 56 B; sm_86 / 89 the two-pass statistics
                # kernel BD 128 G 4: 8 B), and fp32 at these shapes is slower than eager anyway
                # ("auto" sends it there). The one-pass kernel also where its own G fills the grid
                # unsplit (ResT's stage 3 at 800 x 1216: two launches instead of three or four).
                if low and (splits > 1 or one_pass) and programs * splits >= FWD_TARGET_PROGRAMS // 2:
                    return ForwardPlan(ts, ts.G, splits, per_split, one_pass)
    return ForwardPlan(tiles_for("fwd", low, BD), 1)


def attention_output(q, k, v, mix_weight, lse, rstd, scale, out, plan: ForwardPlan):
    """Run `_attn_kernel` on an unsplit plan into `out` (any (B,h,N,d) strides and float dtype: the
    backward asks for an fp32 copy of O). With the mix, lse and rstd are inputs; without it lse is
    written. The plan is the caller's: the forward's own (its two-pass branch runs unsplit plans
    only) or the backward's rebuild of O where forward_plan does not split it (a split rebuild goes
    straight into the row terms, output_row_terms). Recomputing a plan here could differ from the
    caller's: forward_plan(one_pass=True) may fall back to the unsplit "fwd" row where the "fwd_mix"
    row of forward_plan(one_pass=False) splits (sm_86 bf16, d = 96, h = 3, N = 71, M = 484)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    BD, DTYPE, DOT = _config(q)
    mix = mix_weight is not None
    assert plan.splits == 1 and not plan.one_pass, f"attention_output runs unsplit plans only, not {plan}"
    t = plan.tiles
    w = mix_weight.contiguous() if mix else q  # unused pointer without the mix
    launch(_attn_kernel, plan.grid(q),
           q, k, v, w, out, lse, rstd, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
           H, N, M, D, float(scale), BN=t.BN, BM=t.BM, BD=BD, G=plan.G, NORM=mix, DTYPE=DTYPE, DOT=DOT,
           **t.launch_options())


def output_row_terms(q, k, v, mix_weight, lse, rstd, scale, dout, delta, plan: ForwardPlan):
    """delta = dO . O per row (B, h, N), with the mixed forward's O rebuilt in fp32 from q, k, v and
    its statistics on a split plan (forward_plan(q, M, True)): `_attn_range_kernel`'s fp32 partials,
    then `_key_split_row_terms_kernel` sums them and dots them with dO (O never stored)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    assert plan.splits > 1 and not plan.one_pass, f"output_row_terms runs split plans only, not {plan}"
    BD, DTYPE, DOT = _config(q)
    t = plan.tiles
    part = torch.empty(plan.splits, B, H, N, D, dtype=torch.float32, device=q.device)
    launch(_attn_range_kernel, plan.grid(q), q, k, v, mix_weight.contiguous(), part, lse, rstd,
           *q.stride(), *k.stride(), *v.stride(), H, N, M, D, float(scale),
           blocks_per_split=plan.blocks_per_split, SPLIT=plan.splits,
           BN=t.BN, BM=t.BM, BD=BD, G=plan.G, DTYPE=DTYPE, DOT=DOT, **t.launch_options())
    BR = max(16, 2048 // BD)  # [BR, BD] fp32 tiles of 2048 elements: 16 registers a thread
    launch(_key_split_row_terms_kernel, (triton.cdiv(N, BR), B, H), part, dout, delta, *dout.stride(),
           H, N, D, SPLIT=plan.splits, sps=B * H * N * D, BR=BR, BD=BD)


def emsa_forward(q, k, v, mix_weight, scale, eps):
    B, H, N, D = q.shape
    M = k.shape[2]
    dev = q.device
    out = torch.empty(B, N, H, D, dtype=q.dtype, device=dev).transpose(1, 2)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=dev)
    if mix_weight is None:  # no InstanceNorm: no rsq, no rstd (rest_kernels/backends/stats.py)
        rsq = torch.empty(0, dtype=torch.float32, device=dev)
        rstd = torch.empty(0, dtype=torch.float32, device=dev)
        attention_output(q, k, v, mix_weight, lse, rstd, scale, out, forward_plan(q, M, False))
        return out, lse, rsq, rstd
    BD, DTYPE, DOT = _config(q)
    plan = forward_plan(q, M, True, one_pass=True)
    t = plan.tiles
    w = mix_weight.contiguous()
    rsq = torch.empty(B, H, N, dtype=torch.float32, device=dev)
    if not plan.one_pass:
        launch(_stats_kernel, plan.grid(q), q, k, w, lse, rsq, *q.stride(), *k.stride(), H, N, M, D, float(scale),
               BN=t.BN, BM=t.BM, BD=BD, G=plan.G, DTYPE=DTYPE, DOT=DOT, **t.launch_options())
        rstd = rowsum(rsq, RSTD, N * M, eps)  # (sum / (N M) + eps)^-1/2 per (b, g)
        attention_output(q, k, v, mix_weight, lse, rstd, scale, out, plan)  # the statistics' own plan
        return out, lse, rsq, rstd
    # one pass over each key range (statistics and unnormalised output together), then one merge
    # that forms every statistic and the output: two launches (three unsplit, four split before)
    S = plan.splits
    rstd = torch.empty(B, H, dtype=torch.float32, device=dev)
    part_s = torch.empty(3, S, B, H, N, dtype=torch.float32, device=dev)  # (m, l, c) per range
    part_o = torch.empty(S, B, H, N, D, dtype=torch.float32, device=dev)
    part_v = torch.empty(S, B, H, D, dtype=torch.float32, device=dev)
    launch(_flash_range_kernel, plan.grid(q), q, k, v, w, part_o, part_s, part_v,
           *q.stride(), *k.stride(), *v.stride(), H, N, M, D, float(scale),
           blocks_per_split=plan.blocks_per_split, SPLIT=S, sps=B * H * N, sstat=S * B * H * N,
           BN=t.BN, BM=t.BM, BD=BD, G=plan.G, DTYPE=DTYPE, DOT=DOT, **t.launch_options())
    BR = max(16, 2048 // BD)  # [BR, BD] fp32 tiles of 2048 elements: 16 registers a thread
    blocks = triton.cdiv(N, BR)
    rows = BR * triton.cdiv(blocks * B * H, FWD_TARGET_PROGRAMS)  # about a wave of merge programs
    launch(_flash_merge_kernel, (triton.cdiv(N, rows), B, H), part_s, part_o, part_v, out, lse, rsq, rstd,
           *out.stride(), H, N, M, D, SPLIT=S, keys_per_split=plan.blocks_per_split * t.BM, sps=B * H * N,
           sstat=S * B * H * N, spv=B * H * D, rows=rows, count=float(N * M), eps=float(eps),
           BRS=min(1024, pow2(N, 16)), BR=BR, BD=BD)
    return out, lse, rsq, rstd
