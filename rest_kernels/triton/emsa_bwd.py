"""EMSA backward in Triton, by recomputation (see docs/emsa_math.md, "Backward").

Saved from the forward: q, k, v, W, out and the statistics of rest_kernels/backends/stats.py: lse
(B,h,N), with the mix rsq = sum_m (P - 1/M)^2 (B,h,N) and rstd (B,h). Nothing of size N x M.
Every kernel is deterministic: fixed loop orders, per-program partials summed in a fixed order, no
atomics.

Without the head mix (ResT's one-head stage 1, ResTv2): plain attention backward on 2-D tiles of
one head (wgmma on sm_90, like the forward):
1. `_row_terms_kernel`: delta_i = dO_i . O_i.
2. `_dkdv_kernel`, grid (key blocks x SPLIT, B, h): a program holds its key block's k and v and
   walks 1/SPLIT of the query blocks, recomputing S = scale q k^T, P = exp(S - lse) / M,
   dP = dO v^T, dS = P (dP - delta), and accumulates dv = P^T dO, dk = scale dS^T q. SPLIT > 1 when
   the key blocks alone would give fewer than ~256 programs (detection-sized inputs at batch 1:
   15 key blocks): each split writes an fp32 partial, summed over the splits in a fixed order.
3. `_dq_kernel`, grid (query blocks, B, h): the same tile recomputation over all key blocks,
   dq = scale dS k.

With the head mix, also on 2-D tiles. dk_j and dq_j sum over every output head g
(dL_j = sum_g W[g, j] dS_g), so a program owns a block of every head's dk (or dq) and walks the
output heads g in turn, recomputing S_g as the forward does (one dot per input head j); its
accumulators are a tuple of one [BD, width] fp32 tile per input head j (transposed, so that BD is
the M side of the dots and the width can be as narrow as the registers need; JG heads per program,
the others on grid axis z, where HP tiles do not fit):
1. `_vbar_kernel`, grid (B, h, d / 16): vbar = mean over keys of v, fp32, a strip of 16 columns
   per program.
2. `_row_terms_kernel`: delta_i = dO_i . O_i. For fp16 / bf16, O is first recomputed into a
   transient fp32 buffer by the forward's `_attn_kernel` (16-bit operands, fp32 accumulation):
   rstd (up to eps^-1/2) amplifies the rounding of the stored 16-bit O in the norm terms. Where
   the forward plan splits the key range, `_attn_range_kernel`'s fp32 partials are summed and
   dotted with dO by `_key_split_row_terms_kernel` instead (no O buffer, no row-terms launch). A
   fixed-order rowsum gives c = mean(dY * Y) = sum_i delta_i / (N M) per (b, g).
3. `_dkdv_mixed_kernel`, grid (key blocks x SPLIT, B, head groups): per output head g and query
   block, S_g, P = exp(S - lse) / M (lse the row's log-mean-exp), Y = (P - 1/M) rstd and
       dP - D_i = rstd dO_i (v_m - vbar) - c rstd (Y_im - rstd rsq_i) - delta_i
   (the notes' dP = rstd (dO v^T - a - Y c) and D_i = delta_i + rstd dO_i.vbar - rstd a
   - c rstd^2 rsq_i with the a terms cancelled and v centred before the dot, so no
   difference of two large numbers is formed: it is exactly 0 when M = 1), dS = P (dP - D_i);
   accumulates dv_g^T = dO_g^T Y_g, dk_j^T += W[g, j] q_j^T dS_g for the group's heads j, and
   dW[g, j] = scale sum (q_j^T dS_g) . k_j^T (= sum dS_g . L_j with L_j = scale q_j k_j^T).
4. `_dq_mixed_kernel`, grid (query blocks, B, head groups), on transposed tiles [BM, BN]: per key
   block, every output head g's S_g^T and dS_g^T, added into dL_j^T = sum_g W[g, j] dS_g^T for the
   group's input heads j (fp32 tiles, CUDA cores); then one product dq_j^T += k_j^T dL_j^T per input
   head (dq_j = scale dL_j k_j).
The dk / dv split partials are summed over the splits by `_split_sum_kernel`, the dW partials
(h, h, programs) by the rowsum kernel, both in a fixed order. The price of 2-D tiles: S_g costs h
dots per output head (h^2 per tile pair instead of h dots and an h x h contraction on the CUDA
cores), once per head group, and so do the dk products (a key-block program walks the output
heads outermost, one dv accumulator at a time, so dk_j takes one product per g; dq sums over g
first); the performance model (bench/perf_model.py) counts it. The forward's
output-head groups (one product q_j k_j^T for G heads) were tried here too and do not fit: with the
G heads' centred v tiles, dv accumulators and logit tiles beside the JG dk accumulators, G = 2
spilled at every 16-bit dk / dv tile of sm_80 / 86 / 90 and fit the dq kernel only on sm_86
(scripts/tune_triton_tiles.py, 2026-12-06).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from ._common import (TORCH_TO_TL, dot, dot_mode, head_logits, load_2d, load_row_stat, pow2, split_count,
                      store_2d, store_row_stat, trans2)
from .emsa_fwd import MEAN, attention_output, forward_plan, output_row_terms, rowsum
from .tiles import tiles_for

#: columns of v per _vbar_kernel program: 16 are 32 B of a 16-bit row (one DRAM sector) and 64 B of
#: an fp32 one, so the strips cost no wasted sectors, and a head of d = 64 / 96 gives 4 / 6 programs
VBAR_COLUMNS = 16


@triton.jit
def _vbar_kernel(v_ptr, vbar_ptr, svb, svh, svm, svd, H, M, D, BM: tl.constexpr, BD: tl.constexpr):
    """vbar = mean over the keys of v, fp32, for BD of head g's columns (program_id(2)): a column
    strip per program, so that a call at batch 1 still has B h ceil(d / BD) programs (one per
    (b, g) left 8 programs for a detection-sized stage 4 on a GPU of 132 SMs)."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    d0 = tl.program_id(2) * BD
    rows = tl.arange(0, BM)[:, None]
    dd = d0 + tl.arange(0, BD)
    cols = dd[None, :]
    base = v_ptr + (tl.zeros((), tl.int64) + b) * svb + (tl.zeros((), tl.int64) + g) * svh
    acc = tl.zeros((BD,), tl.float32)
    for m0 in range(0, M, BM):
        rr = m0 + rows
        tile = tl.load(base + rr.to(tl.int64) * svm + cols.to(tl.int64) * svd, mask=(rr < M) & (cols < D),
                       other=0.0)
        acc += tl.sum(tile.to(tl.float32), axis=0)
    tl.store(vbar_ptr + (b.to(tl.int64) * H + g) * D + dd, acc / M, mask=dd < D)


@triton.jit
def _row_terms_kernel(o_ptr, do_ptr, delta_ptr, sob, soh, son, sod, sdb, sdh, sdn, sdd, H, N, D,
                      BN: tl.constexpr, BD: tl.constexpr):
    n0 = tl.program_id(0) * BN
    b = tl.program_id(1)
    g = tl.program_id(2)
    o = load_2d(o_ptr, sob, soh, son, sod, b, g, n0, N, D, BN, BD).to(tl.float32)
    do = load_2d(do_ptr, sdb, sdh, sdn, sdd, b, g, n0, N, D, BN, BD).to(tl.float32)
    store_row_stat(delta_ptr, tl.sum(do * o, axis=1), b, g, n0, H, N, BN)


@triton.jit
def _centred_v(v_ptr, vbar_ptr, svb, svh, svm, svd, b, g, m0, H, M, D,
               BM: tl.constexpr, BD: tl.constexpr):
    """[BM, BD] tile of v_g - vbar_g (fp32); zero outside."""
    v = load_2d(v_ptr, svb, svh, svm, svd, b, g, m0, M, D, BM, BD).to(tl.float32)
    dd = tl.arange(0, BD)
    vbar = tl.load(vbar_ptr + ((tl.zeros((), tl.int64) + b) * H + g) * D + dd, mask=dd < D, other=0.0)
    rows = m0 + tl.arange(0, BM)[:, None]
    return tl.where(rows < M, v - vbar[None, :], 0.0)


@triton.jit
def _mixed_ds(s, vc_dot, lse, delta, r, rstd, c, inv_m, valid):
    """dS and Y of one logit tile of output head g, in either orientation ([rows, cols] with the row
    statistics broadcast by the caller). s: the mixed logits S_g; vc_dot: dO (v - vbar)^T.

    dP = rstd (dO v^T - a - Y c) and D_i = sum_m P dP, which only needs row quantities:
    D_i = delta_i + rstd e_i - rstd a - c rstd^2 rsq_i (sum_m P Y = rstd rsq_i, rsq centred). In
    dP - D_i the terms a cancel and dO v^T - e_i = dO (v - vbar)^T: v is centred before the dot, so
    the difference is never formed from two large terms (exactly zero when M = 1)."""
    p = tl.where(valid, tl.exp(s - lse) * inv_m, 0.0)  # lse: the row's log-mean-exp
    y = tl.where(valid, (p - inv_m) * rstd, 0.0)       # (P - 1/M) rstd
    dp_minus_d = rstd * vc_dot - c * rstd * (y - rstd * r) - delta
    return p * dp_minus_d, y


# SPLIT and blocks_per_split are runtime arguments, never specialised: as constexprs (or as the
# JIT's specialisations of 1 and of multiples of 16) every split count compiled its own kernel, with
# its own register allocation, and some of those spilled where the tuned tiles did not.
@triton.jit(do_not_specialize=["SPLIT", "blocks_per_split"])
def _dkdv_mixed_kernel(q_ptr, k_ptr, v_ptr, do_ptr, w_ptr, lse_ptr, delta_ptr, rsq_ptr, vbar_ptr,
                       rstd_ptr, c_ptr, dk_ptr, dv_ptr, dw_ptr,
                       sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sdb, sdh, sdn, sdd,
                       sps, spb, sph, spm,
                       H, N, M, D, scale, blocks_per_split, SPLIT,
                       HP: tl.constexpr, JG: tl.constexpr, BN: tl.constexpr,
                       BM: tl.constexpr, BD: tl.constexpr, DTYPE: tl.constexpr, DOT: tl.constexpr):
    """One key block (of 1/SPLIT of the query blocks) of one batch element, every head: for each
    output head g in turn, walk the query blocks, recompute S_g (one 2-D dot per input head),
    dS_g, Y_g, and accumulate dv_g^T = dO_g^T Y_g and, for every input head j,
    dk_j^T += W[g, j] q_j^T dS_g (HP accumulators [BD, BM], a tuple: dk_j sums over g, so the
    program owns every head's dk of its key block) and dW[g, j] = scale sum (q_j^T dS_g) . k_j^T.
    Transposed accumulators put BD (64, 128) on the M side of the dots: wgmma on sm_90 even with
    the narrow key blocks the HP accumulators need. Where HP accumulators do not fit the registers
    the input heads j are split into groups of JG over grid axis z (each group recomputes S_g; the
    first also accumulates dv)."""
    pid = tl.program_id(0)
    m0 = (pid // SPLIT) * BM
    split = pid % SPLIT
    b = tl.program_id(1)
    j0 = tl.program_id(2) * JG
    first = (j0 == 0).to(tl.int32)
    n_lo = split * blocks_per_split * BN
    n_hi = tl.minimum(N, n_lo + blocks_per_split * BN)
    inv_m = 1.0 / M
    rows_n = tl.arange(0, BN)[:, None]
    cols = m0 + tl.arange(0, BM)[None, :]
    heads = tl.arange(0, HP)
    dk = ()
    for jl in tl.static_range(JG):
        dk = dk + (tl.zeros((BD, BM), tl.float32),)
    dw = tl.zeros((HP, HP), tl.float32)  # [g, j]
    base = split.to(tl.int64) * sps  # (SPLIT, B, H, M, D) partials, or the gradients when SPLIT = 1
    for g in range(H):
        vc = _centred_v(v_ptr, vbar_ptr, svb, svh, svm, svd, b, g, m0, H, M, D, BM, BD)
        rstd = tl.load(rstd_ptr + (tl.zeros((), tl.int64) + b) * H + g)
        c = tl.load(c_ptr + (tl.zeros((), tl.int64) + b) * H + g)
        dv = tl.zeros((BD, BM), tl.float32)
        dw_g = tl.zeros((HP,), tl.float32)
        for n0 in range(n_lo, n_hi, BN):
            s = head_logits(q_ptr, k_ptr, w_ptr, sqb, sqh, sqn, sqd, skb, skh, skm, skd, q_ptr,
                            b, g, n0, m0, H, N, M, D, scale, BN, BM, BD, True, DTYPE, DOT)
            do = load_2d(do_ptr, sdb, sdh, sdn, sdd, b, g, n0, N, D, BN, BD)
            lse = load_row_stat(lse_ptr, b, g, n0, H, N, BN, 0.0)
            delta = load_row_stat(delta_ptr, b, g, n0, H, N, BN, 0.0)
            r = load_row_stat(rsq_ptr, b, g, n0, H, N, BN, 0.0)
            valid = (n0 + rows_n < N) & (cols < M)
            ds, y = _mixed_ds(s, dot(do, trans2(vc, DOT), DTYPE, DOT), lse[:, None], delta[:, None],
                              r[:, None], rstd, c, inv_m, valid)
            dv += dot(trans2(do, DOT), y, DTYPE, DOT)
            new = ()
            for jl in tl.static_range(JG):
                j = j0 + jl
                jj = tl.minimum(j, H - 1)  # padded heads (HP > H) read head H - 1, weighted 0
                on = (j < H).to(tl.float32)
                qj = load_2d(q_ptr, sqb, sqh, sqn, sqd, b, jj, n0, N, D, BN, BD)
                t = dot(trans2(qj, DOT), ds, DTYPE, DOT)  # q_j^T dS_g, [BD, BM]
                kj = load_2d(k_ptr, skb, skh, skm, skd, b, jj, m0, M, D, BM, BD).to(tl.float32)
                dw_g += tl.where(heads == j, tl.sum(t * trans2(kj, DOT)) * on, 0.0)
                new = new + (dk[jl] + (tl.load(w_ptr + g * H + jj) * on) * t,)
            dk = new
        store_2d(dv_ptr + base, trans2(dv, DOT), spb, sph, spm, 1, b, g, m0, M * first, D, BM, BD)
        dw = tl.where(heads[:, None] == g, dw_g[None, :] * scale, dw)
    for jl in tl.static_range(JG):
        j = j0 + jl
        store_2d(dk_ptr + base, trans2(dk[jl], DOT) * scale, spb, sph, spm, 1, b, tl.minimum(j, H - 1), m0,
                 M * (j < H), D, BM, BD)
    gg = heads[:, None]
    jj2 = heads[None, :]
    part = b.to(tl.int64) * tl.num_programs(0) + pid
    tl.store(dw_ptr + (gg * H + jj2) * (tl.num_programs(0) * tl.num_programs(1)) + part, dw,
             mask=(gg < H) & (jj2 < H) & (jj2 >= j0) & (jj2 < j0 + JG))


@triton.jit
def _dq_mixed_kernel(q_ptr, k_ptr, v_ptr, do_ptr, w_ptr, lse_ptr, delta_ptr, rsq_ptr, vbar_ptr,
                     rstd_ptr, c_ptr, dq_ptr,
                     sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sdb, sdh, sdn, sdd,
                     H, N, M, D, scale,
                     JG: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                     DTYPE: tl.constexpr, DOT: tl.constexpr):
    """One query block of one batch element, every head (input heads in groups of JG over grid axis
    z, as in _dkdv_mixed_kernel), in the transposed orientation (tiles [BM, BN]: the key side
    BM = 64 is the M side of the logit dots, so the query block BN can be as narrow as the JG
    accumulators dq_j^T [BD, BN] need).

    dq_j = scale sum_g W[g, j] dS_g k_j = scale dL_j k_j with dL_j = sum_g W[g, j] dS_g (the
    gradient of the unmixed logits L_j = q_j k_j^T): per key block, each output head g's S_g^T and
    dS_g^T are recomputed and added into the JG tiles dL_j^T [BM, BN] (fp32, on the CUDA cores),
    then one product dq_j^T += k_j^T dL_j^T per input head. Summing over g before the product,
    instead of one product k_j^T dS_g^T per output head as well, takes h - 1 of every h of those
    products away (h + 1 + JG / h products per output head and key block instead of h + 1 + JG).
    With 16-bit operands dL_j^T is rounded once, where each dS_g^T was rounded before: the rounded
    sum is within |sum| 2^-9 (bf16), the sum of rounded terms within sum |terms| 2^-9."""
    n0 = tl.program_id(0) * BN
    b = tl.program_id(1)
    j0 = tl.program_id(2) * JG
    inv_m = 1.0 / M
    rows_m = tl.arange(0, BM)[:, None]
    cols = n0 + tl.arange(0, BN)[None, :]
    dq = ()
    for jl in tl.static_range(JG):
        dq = dq + (tl.zeros((BD, BN), tl.float32),)
    for m0 in range(0, M, BM):
        valid = (m0 + rows_m < M) & (cols < N)
        dl = ()
        for jl in tl.static_range(JG):
            dl = dl + (tl.zeros((BM, BN), tl.float32),)
        for g in range(H):
            do = load_2d(do_ptr, sdb, sdh, sdn, sdd, b, g, n0, N, D, BN, BD)
            lse = load_row_stat(lse_ptr, b, g, n0, H, N, BN, 0.0)
            delta = load_row_stat(delta_ptr, b, g, n0, H, N, BN, 0.0)
            r = load_row_stat(rsq_ptr, b, g, n0, H, N, BN, 0.0)
            rstd = tl.load(rstd_ptr + (tl.zeros((), tl.int64) + b) * H + g)
            c = tl.load(c_ptr + (tl.zeros((), tl.int64) + b) * H + g)
            st = head_logits(k_ptr, q_ptr, w_ptr, skb, skh, skm, skd, sqb, sqh, sqn, sqd, k_ptr,
                             b, g, m0, n0, H, M, N, D, scale, BM, BN, BD, True, DTYPE, DOT)
            vc = _centred_v(v_ptr, vbar_ptr, svb, svh, svm, svd, b, g, m0, H, M, D, BM, BD)
            dst, _ = _mixed_ds(st, dot(vc, trans2(do, DOT), DTYPE, DOT), lse[None, :], delta[None, :],
                               r[None, :], rstd, c, inv_m, valid)
            new = ()
            for jl in tl.static_range(JG):
                j = j0 + jl
                on = (j < H).to(tl.float32)  # padded heads (HP > H) read row H - 1 of W, weighted 0
                new = new + (dl[jl] + (tl.load(w_ptr + g * H + tl.minimum(j, H - 1)) * on) * dst,)
            dl = new
        new = ()
        for jl in tl.static_range(JG):
            kj = load_2d(k_ptr, skb, skh, skm, skd, b, tl.minimum(j0 + jl, H - 1), m0, M, D, BM, BD)
            new = new + (dq[jl] + dot(trans2(kj, DOT), dl[jl], DTYPE, DOT),)  # k_j^T dL_j^T, [BD, BN]
        dq = new
    for jl in tl.static_range(JG):
        j = j0 + jl
        store_2d(dq_ptr, trans2(dq[jl], DOT) * scale, H * N * D, N * D, D, 1, b, tl.minimum(j, H - 1), n0,
                 N * (j < H), D, BN, BD)


# ----------------------------------------------------------------------------- without the mix: 2-D
@triton.jit
def _plain_ds(q, k, v, do, lse, delta, n0, m0, N, M, scale,
              BN: tl.constexpr, BM: tl.constexpr, DTYPE: tl.constexpr, DOT: tl.constexpr):
    """One [BN, BM] tile of plain attention: (P, dS) with P = exp(scale q k^T - lse) / M, dS = P (dO v^T - delta)."""
    rows = n0 + tl.arange(0, BN)[:, None]
    cols = m0 + tl.arange(0, BM)[None, :]
    s = dot(q, trans2(k, DOT), DTYPE, DOT) * scale
    p = tl.where((rows < N) & (cols < M), tl.exp(s - lse[:, None]) * (1.0 / M), 0.0)  # lse: log-mean-exp
    dp = dot(do, trans2(v, DOT), DTYPE, DOT)
    return p, p * (dp - delta[:, None])


@triton.jit(do_not_specialize=["SPLIT", "blocks_per_split"])
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                 sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sdb, sdh, sdn, sdd,
                 sps, spb, sph, spm,
                 H, N, M, D, scale, blocks_per_split, SPLIT,
                 BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                 DTYPE: tl.constexpr, DOT: tl.constexpr):
    pid = tl.program_id(0)
    m0 = (pid // SPLIT) * BM
    split = pid % SPLIT
    b = tl.program_id(1)
    g = tl.program_id(2)
    k = load_2d(k_ptr, skb, skh, skm, skd, b, g, m0, M, D, BM, BD)
    v = load_2d(v_ptr, svb, svh, svm, svd, b, g, m0, M, D, BM, BD)
    dk = tl.zeros((BM, BD), tl.float32)
    dv = tl.zeros((BM, BD), tl.float32)
    n_lo = split * blocks_per_split * BN
    n_hi = tl.minimum(N, n_lo + blocks_per_split * BN)
    for n0 in range(n_lo, n_hi, BN):
        q = load_2d(q_ptr, sqb, sqh, sqn, sqd, b, g, n0, N, D, BN, BD)
        do = load_2d(do_ptr, sdb, sdh, sdn, sdd, b, g, n0, N, D, BN, BD)
        lse = load_row_stat(lse_ptr, b, g, n0, H, N, BN, 0.0)
        delta = load_row_stat(delta_ptr, b, g, n0, H, N, BN, 0.0)
        p, ds = _plain_ds(q, k, v, do, lse, delta, n0, m0, N, M, scale, BN, BM, DTYPE, DOT)
        dv += dot(trans2(p, DOT), do, DTYPE, DOT)
        dk += dot(trans2(ds, DOT), q, DTYPE, DOT)
    # (SPLIT, B, H, M, D) partials, or the gradients themselves when SPLIT = 1 (sps unused)
    base = split.to(tl.int64) * sps
    store_2d(dk_ptr + base, dk * scale, spb, sph, spm, 1, b, g, m0, M, D, BM, BD)
    store_2d(dv_ptr + base, dv, spb, sph, spm, 1, b, g, m0, M, D, BM, BD)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
               sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sdb, sdh, sdn, sdd,
               H, N, M, D, scale,
               BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
               DTYPE: tl.constexpr, DOT: tl.constexpr):
    n0 = tl.program_id(0) * BN
    b = tl.program_id(1)
    g = tl.program_id(2)
    q = load_2d(q_ptr, sqb, sqh, sqn, sqd, b, g, n0, N, D, BN, BD)
    do = load_2d(do_ptr, sdb, sdh, sdn, sdd, b, g, n0, N, D, BN, BD)
    lse = load_row_stat(lse_ptr, b, g, n0, H, N, BN, 0.0)
    delta = load_row_stat(delta_ptr, b, g, n0, H, N, BN, 0.0)
    dq = tl.zeros((BN, BD), tl.float32)
    for m0 in range(0, M, BM):
        k = load_2d(k_ptr, skb, skh, skm, skd, b, g, m0, M, D, BM, BD)
        v = load_2d(v_ptr, svb, svh, svm, svd, b, g, m0, M, D, BM, BD)
        _, ds = _plain_ds(q, k, v, do, lse, delta, n0, m0, N, M, scale, BN, BM, DTYPE, DOT)
        dq += dot(ds, k, DTYPE, DOT)
    store_2d(dq_ptr, dq * scale, H * N * D, N * D, D, 1, b, g, n0, N, D, BN, BD)


#: programs the key blocks of the plain backward should give at least (about two waves of a
#: 132-SM H100); below it the query blocks are split (a property of the design, not of the device,
#: so that the result is the same bits on every GPU)
MIN_DKDV_PROGRAMS = 256


def _split_outputs(k, v, key_programs: int, query_blocks: int):
    """(SPLIT, query blocks per split, dk target, dv target) of a dk / dv launch: the gradients
    themselves when SPLIT = 1, else (SPLIT, B, H, M, D) fp32 partials (_sum_splits)."""
    split, per_split = split_count(key_programs, query_blocks, MIN_DKDV_PROGRAMS)
    if split == 1:
        return 1, per_split, torch.empty(k.shape, dtype=k.dtype, device=k.device), \
            torch.empty(v.shape, dtype=v.dtype, device=v.device)
    f32 = dict(dtype=torch.float32, device=k.device)
    return split, per_split, torch.empty(split, *k.shape, **f32), torch.empty(split, *v.shape, **f32)


@triton.jit(do_not_specialize=["SPLIT"])
def _split_sum_kernel(pk_ptr, pv_ptr, dk_ptr, dv_ptr, SPLIT, E, BE: tl.constexpr):
    """dk[e] = sum_s pk[s, e] and dv[e] = sum_s pv[s, e] over the splits in order s = 0, 1, ...
    (E elements each, contiguous), rounded once to the gradients' dtype: both sums in one launch
    (four torch ops before: a sum and a cast each)."""
    e = tl.program_id(0).to(tl.int64) * BE + tl.arange(0, BE)
    inside = e < E
    ak = tl.zeros((BE,), tl.float32)
    av = tl.zeros((BE,), tl.float32)
    pk = pk_ptr + e
    pv = pv_ptr + e
    for _ in range(SPLIT):  # pointers step by E: no split x E product in 32 bits
        ak += tl.load(pk, mask=inside, other=0.0)
        av += tl.load(pv, mask=inside, other=0.0)
        pk += E
        pv += E
    tl.store(dk_ptr + e, ak.to(dk_ptr.dtype.element_ty), mask=inside)
    tl.store(dv_ptr + e, av.to(dv_ptr.dtype.element_ty), mask=inside)


def _sum_splits(pk, pv, k, v):
    """dk, dv from _split_outputs' targets: partials summed over the splits in a fixed order
    (_split_sum_kernel), or the gradients as they are."""
    if pk.dim() == k.dim():
        return pk, pv
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    E, BE = dk.numel(), 1024
    launch(_split_sum_kernel, (triton.cdiv(E, BE),), pk, pv, dk, dv, pk.shape[0], E, BE=BE)
    return dk, dv


def _row_terms(out, dout, delta, BD):
    B, H, N, D = out.shape
    BNR = 64
    launch(_row_terms_kernel, (triton.cdiv(N, BNR), B, H), out, dout, delta, *out.stride(), *dout.stride(),
           H, N, D, BN=BNR, BD=BD)


def _plain_backward(dout, q, k, v, out, lse, scale):
    B, H, N, D = q.shape
    M = k.shape[2]
    dev = q.device
    BD = pow2(D, 16)
    DTYPE, DOT = TORCH_TO_TL[q.dtype], dot_mode(q.dtype)
    low = q.dtype != torch.float32
    delta = torch.empty(B, H, N, dtype=torch.float32, device=dev)
    _row_terms(out, dout, delta, BD)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())

    t = tiles_for("dkdv", low, BD)
    grid_m = triton.cdiv(M, t.BM)
    split, per_split, pk, pv = _split_outputs(k, v, grid_m * B * H, triton.cdiv(N, t.BN))
    launch(_dkdv_kernel, (grid_m * split, B, H), q, k, v, dout, lse, delta, pk, pv, *strides,
           B * H * M * D, H * M * D, M * D, D, H, N, M, D, float(scale), per_split,
           SPLIT=split, BN=t.BN, BM=t.BM, BD=BD, DTYPE=DTYPE, DOT=DOT, **t.launch_options())
    dk, dv = _sum_splits(pk, pv, k, v)

    t = tiles_for("dq", low, BD)
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=dev)
    launch(_dq_kernel, (triton.cdiv(N, t.BN), B, H), q, k, v, dout, lse, delta, dq, *strides,
           H, N, M, D, float(scale), BN=t.BN, BM=t.BM, BD=BD, DTYPE=DTYPE, DOT=DOT, **t.launch_options())
    return dq, dk, dv, None


# ----------------------------------------------------------------------------- with the mix
def _mixed_backward(dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale):
    B, H, N, D = q.shape
    M = k.shape[2]
    dev = q.device
    HP, BD = pow2(H), pow2(D, 16)
    low = q.dtype != torch.float32
    DTYPE, DOT = TORCH_TO_TL[q.dtype], dot_mode(q.dtype)
    f32 = dict(dtype=torch.float32, device=dev)
    rsq, rstd = rsq.contiguous(), rstd.contiguous()
    w = mix_weight.contiguous()

    delta = torch.empty(B, H, N, **f32)
    # delta_i = dO_i . O_i enters dS through the InstanceNorm terms, where rstd (up to eps^-1/2)
    # amplifies the fp16 / bf16 rounding of the stored O: for those dtypes O is recomputed in fp32
    # (the forward's kernels: 16-bit operands, fp32 accumulation), straight into the row terms
    # where the key range is split, else into an fp32 buffer that autograd never saves.
    rebuild = forward_plan(q, M, True) if low else None  # lse and rstd known: no one-pass kernels
    if rebuild is not None and rebuild.splits > 1:
        output_row_terms(q, k, v, w, lse, rstd, scale, dout, delta, rebuild)
    else:
        if rebuild is not None:
            out = torch.empty(B, N, H, D, **f32).transpose(1, 2)
            attention_output(q, k, v, w, lse, rstd, scale, out, rebuild)
        _row_terms(out, dout, delta, BD)
    vbar = torch.empty(B, H, D, **f32)
    # strips of VBAR_COLUMNS columns ([128, 16] tiles: 16 registers per thread at 4 warps)
    bdv = min(BD, VBAR_COLUMNS)
    launch(_vbar_kernel, (B, H, triton.cdiv(D, bdv)), v, vbar, *v.stride(), H, M, D, BM=2048 // bdv, BD=bdv)
    c = rowsum(delta, MEAN, N * M)  # mean(dY * Y) per (b, g), fixed-order sum
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    stats = (lse, delta, rsq, vbar, rstd, c)

    t = tiles_for("dkdv_mix", low, BD, hp=HP)
    grid_m = triton.cdiv(M, t.BM)
    split, per_split, pk, pv = _split_outputs(k, v, grid_m * B * (HP // t.JG), triton.cdiv(N, t.BN))
    dw_part = torch.empty(H, H, B * grid_m * split, **f32)
    launch(_dkdv_mixed_kernel, (grid_m * split, B, HP // t.JG), q, k, v, dout, w, *stats, pk, pv, dw_part,
           *strides, B * H * M * D, H * M * D, M * D, D, H, N, M, D, float(scale), per_split,
           SPLIT=split, HP=HP, JG=t.JG, BN=t.BN, BM=t.BM, BD=BD, DTYPE=DTYPE, DOT=DOT, **t.launch_options())
    dk, dv = _sum_splits(pk, pv, k, v)

    t = tiles_for("dq_mix", low, BD, hp=HP)
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=dev)
    launch(_dq_mixed_kernel, (triton.cdiv(N, t.BN), B, HP // t.JG), q, k, v, dout, w, *stats, dq, *strides,
           H, N, M, D, float(scale), JG=t.JG, BN=t.BN, BM=t.BM, BD=BD, DTYPE=DTYPE, DOT=DOT,
           **t.launch_options())
    return dq, dk, dv, rowsum(dw_part)  # fixed-order sum of the per-program dW partials


def emsa_backward(dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale, eps):
    lse = lse.contiguous()
    if mix_weight is None:
        return _plain_backward(dout, q, k, v, out, lse, scale)
    return _mixed_backward(dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale)
