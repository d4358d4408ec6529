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

With the head mix: 3-D tiles [HP, rows, BD] of all heads per program (the dk / dv / dq
accumulators of every head of a block live together; their 3-D dots lower to mma.sync):
1. `_vbar_kernel`, grid (B, h): vbar = mean over keys of v, fp32.
2. `_row_terms_kernel`: delta_i = dO_i . O_i. For fp16 / bf16, O is first recomputed into a
   transient fp32 buffer by the forward's 2-D `_attn_kernel` (16-bit operands, fp32 accumulation):
   rstd (up to eps^-1/2) amplifies the rounding of the stored 16-bit O in the norm terms. A
   fixed-order rowsum gives c = mean(dY * Y) = sum_i delta_i / (N M) per (b, g).
3. `_dkdv_mixed_kernel`, grid (cdiv(M, BLOCK_M), B, 1): a program owns a key block of all mixed
   heads, walks the query blocks and recomputes per tile S, P = exp(S - lse) / M (lse the row's
   log-mean-exp), Y = (P - 1/M) rstd and
       dP - D_i = rstd dO_i (v_m - vbar) - c rstd (Y_im - rstd rsq_i) - delta_i
   (the notes' dP = rstd (dO v^T - a - Y c) and D_i = delta_i + rstd dO_i.vbar - rstd a
   - c rstd^2 rsq_i with the a terms cancelled and v centred before the dot, so no
   difference of two large numbers is formed: it is exactly 0 when M = 1), dS = P (dP - D_i), the
   head-mix transpose dL_j = sum_g W[g, j] dS_g, and accumulates dv = Y^T dO, dk = dL^T q scale
   and a per-program partial dW[g, j] = sum dS_g L_j.
4. `_dq_mixed_kernel`, grid (cdiv(N, BLOCK_N), B, 1): the same tile recomputation per query
   block over all key blocks, dq = dL k scale.
The dW partials (h, h, B * key blocks) are summed in a fixed order by the rowsum kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from ._common import (TORCH_TO_TL, dot, dot_mode, interpreting, load_2d, load_heads, load_mix,
                      load_row_stat, load_rows, load_tile, mixed_logits, pow2, store_2d, store_rows,
                      store_tile, trans, trans2)
from .emsa_fwd import attention_output, rowsum
from .tiles import tiles_for


@triton.jit
def _vbar_kernel(v_ptr, vbar_ptr, svb, svh, svm, svd, H, M, D, BM: tl.constexpr, BD: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    acc = tl.zeros((1, BD), tl.float32)
    for m0 in range(0, M, BM):
        acc += tl.sum(load_tile(v_ptr, svb, svh, svm, svd, b, g, m0, H, M, D, 1, BM, BD), axis=1)
    dd = tl.arange(0, BD)[None, :]
    tl.store(vbar_ptr + (b.to(tl.int64) * H + g) * D + dd, acc / M, mask=dd < D)


@triton.jit
def _row_terms_kernel(o_ptr, do_ptr, delta_ptr, sob, soh, son, sod, sdb, sdh, sdn, sdd, H, N, D,
                      BN: tl.constexpr, BD: tl.constexpr):
    n0 = tl.program_id(0) * BN
    b = tl.program_id(1)
    g = tl.program_id(2)
    o = load_tile(o_ptr, sob, soh, son, sod, b, g, n0, H, N, D, 1, BN, BD)
    do = load_tile(do_ptr, sdb, sdh, sdn, sdd, b, g, n0, H, N, D, 1, BN, BD)
    store_rows(delta_ptr, tl.sum(do * o, axis=2), b, g, n0, H, N, 1, BN)


@triton.jit
def _centred_v(v_ptr, vbar_ptr, svb, svh, svm, svd, b, m0, H, M, D,
               HP: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """[HP, BM, BD] tile of v - vbar (fp32); zero outside."""
    v = load_tile(v_ptr, svb, svh, svm, svd, b, 0, m0, H, M, D, HP, BM, BD)
    hh = tl.arange(0, HP)[:, None, None]
    dd = tl.arange(0, BD)[None, None, :]
    vbar = tl.load(vbar_ptr + (b.to(tl.int64) * H + hh) * D + dd, mask=(hh < H) & (dd < D), other=0.0)
    rows = m0 + tl.arange(0, BM)[None, :, None]
    return tl.where(rows < M, v - vbar, 0.0)


@triton.jit
def _ds_tile(q, k, vc, do, w, lse, delta, r, rstd, c, n0, m0, H, N, M, scale,
             DTYPE: tl.constexpr, DOT: tl.constexpr,
             HP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    """Recompute one [HP, BN, BM] tile: returns dS, Y (the weights of dv) and the logits L."""
    s, logits = mixed_logits(q, k, w, scale, True, DTYPE, DOT)
    heads = tl.arange(0, HP)[:, None, None]
    rows = n0 + tl.arange(0, BN)[None, :, None]
    cols = m0 + tl.arange(0, BM)[None, None, :]
    valid = (heads < H) & (rows < N) & (cols < M)
    p = tl.where(valid, tl.exp(s - lse[:, :, None]) * (1.0 / M), 0.0)  # lse: the row's log-mean-exp
    # dP = rstd (dO v^T - a - Y c) and D_i = sum_m P dP, which only needs row quantities:
    # D_i = delta_i + rstd e_i - rstd a - c rstd^2 rsq_i (sum_m P Y = rstd rsq_i, rsq centred).
    # In dP - D_i the terms a cancel and dO v^T - e_i = dO (v - vbar)^T: v is centred before the
    # dot (vc = v - vbar), so the difference is never formed from two large terms (exactly zero
    # when M = 1).
    inv_m = 1.0 / M
    rs = rstd[:, None]
    y = tl.where(valid, (p - inv_m) * rs[:, :, None], 0.0)  # (P - 1/M) rstd
    dpv = dot(do, trans(vc, DOT), DTYPE, DOT)
    dp_minus_d = (rs[:, :, None] * dpv - c[:, None, None] * rs[:, :, None] * (y - (rs * r)[:, :, None])
                  - delta[:, :, None])
    return p * dp_minus_d, y, logits


@triton.jit
def _dkdv_mixed_kernel(q_ptr, k_ptr, v_ptr, do_ptr, w_ptr, lse_ptr, delta_ptr, rsq_ptr, vbar_ptr,
                       rstd_ptr, c_ptr, dk_ptr, dv_ptr, dw_ptr,
                       sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sdb, sdh, sdn, sdd,
                       H, N, M, D, scale,
                       HP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                       DTYPE: tl.constexpr, DOT: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    m0 = pid_m * BM
    k = load_tile(k_ptr, skb, skh, skm, skd, b, 0, m0, H, M, D, HP, BM, BD)
    vc = _centred_v(v_ptr, vbar_ptr, svb, svh, svm, svd, b, m0, H, M, D, HP, BM, BD)
    w = load_mix(w_ptr, H, HP)
    rstd = load_heads(rstd_ptr, b, 0, H, HP)
    c = load_heads(c_ptr, b, 0, H, HP)
    dk = tl.zeros((HP, BM, BD), tl.float32)
    dv = tl.zeros((HP, BM, BD), tl.float32)
    dw = tl.zeros((HP, HP), tl.float32)
    for n0 in range(0, N, BN):
        q = load_tile(q_ptr, sqb, sqh, sqn, sqd, b, 0, n0, H, N, D, HP, BN, BD)
        do = load_tile(do_ptr, sdb, sdh, sdn, sdd, b, 0, n0, H, N, D, HP, BN, BD)
        lse = load_rows(lse_ptr, b, 0, n0, H, N, HP, BN, 0.0)
        delta = load_rows(delta_ptr, b, 0, n0, H, N, HP, BN, 0.0)
        r = load_rows(rsq_ptr, b, 0, n0, H, N, HP, BN, 0.0)
        ds, y, logits = _ds_tile(q, k, vc, do, w, lse, delta, r, rstd, c, n0, m0, H, N, M,
                                 scale, DTYPE, DOT, HP, BN, BM)
        dv += dot(trans(y, DOT), do, DTYPE, DOT)  # dv = Y^T dO
        dl = tl.sum(w[:, :, None, None] * ds[:, None, :, :], axis=0)  # dL_j = sum_g W[g,j] dS_g
        dw += tl.sum(tl.sum(ds[:, None, :, :] * logits[None, :, :, :], axis=3), axis=2)
        dk += dot(trans(dl, DOT), q, DTYPE, DOT)
    store_tile(dk_ptr, dk * scale, H * M * D, M * D, D, 1, b, 0, m0, H, M, D, HP, BM, BD)
    store_tile(dv_ptr, dv, H * M * D, M * D, D, 1, b, 0, m0, H, M, D, HP, BM, BD)
    g = tl.arange(0, HP)[:, None]
    j = tl.arange(0, HP)[None, :]
    part = b.to(tl.int64) * tl.num_programs(0) + pid_m
    tl.store(dw_ptr + (g * H + j) * (tl.num_programs(0) * tl.num_programs(1)) + part, dw,
             mask=(g < H) & (j < H))


@triton.jit
def _dq_mixed_kernel(q_ptr, k_ptr, v_ptr, do_ptr, w_ptr, lse_ptr, delta_ptr, rsq_ptr, vbar_ptr,
                     rstd_ptr, c_ptr, dq_ptr,
                     sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sdb, sdh, sdn, sdd,
                     H, N, M, D, scale,
                     HP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                     DTYPE: tl.constexpr, DOT: tl.constexpr):
    n0 = tl.program_id(0) * BN
    b = tl.program_id(1)
    q = load_tile(q_ptr, sqb, sqh, sqn, sqd, b, 0, n0, H, N, D, HP, BN, BD)
    do = load_tile(do_ptr, sdb, sdh, sdn, sdd, b, 0, n0, H, N, D, HP, BN, BD)
    w = load_mix(w_ptr, H, HP)
    rstd = load_heads(rstd_ptr, b, 0, H, HP)
    c = load_heads(c_ptr, b, 0, H, HP)
    lse = load_rows(lse_ptr, b, 0, n0, H, N, HP, BN, 0.0)
    delta = load_rows(delta_ptr, b, 0, n0, H, N, HP, BN, 0.0)
    r = load_rows(rsq_ptr, b, 0, n0, H, N, HP, BN, 0.0)
    dq = tl.zeros((HP, BN, BD), tl.float32)
    for m0 in range(0, M, BM):
        k = load_tile(k_ptr, skb, skh, skm, skd, b, 0, m0, H, M, D, HP, BM, BD)
        vc = _centred_v(v_ptr, vbar_ptr, svb, svh, svm, svd, b, m0, H, M, D, HP, BM, BD)
        ds, _, _ = _ds_tile(q, k, vc, do, w, lse, delta, r, rstd, c, n0, m0, H, N, M,
                            scale, DTYPE, DOT, HP, BN, BM)
        dl = tl.sum(w[:, :, None, None] * ds[:, None, :, :], axis=0)  # dL_j = sum_g W[g,j] dS_g
        dq += dot(dl, k, DTYPE, DOT)
    store_tile(dq_ptr, dq * scale, H * N * D, N * D, D, 1, b, 0, n0, H, N, D, HP, BN, BD)


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


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                 sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sdb, sdh, sdn, sdd,
                 sps, spb, sph, spm,
                 H, N, M, D, scale, blocks_per_split,
                 SPLIT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
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


def dkdv_split(key_programs: int, query_blocks: int) -> int:
    """How many query-block ranges each key block's work is split over."""
    if key_programs >= MIN_DKDV_PROGRAMS:
        return 1
    return max(1, min(query_blocks, -(-MIN_DKDV_PROGRAMS // max(1, key_programs))))


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
    grid_m, n_blocks = triton.cdiv(M, t.BM), triton.cdiv(N, t.BN)
    split = dkdv_split(grid_m * B * H, n_blocks)
    per_split = triton.cdiv(n_blocks, split)
    split = triton.cdiv(n_blocks, per_split)  # no empty split
    if split == 1:
        dk = torch.empty(B, H, M, D, dtype=k.dtype, device=dev)
        dv = torch.empty(B, H, M, D, dtype=v.dtype, device=dev)
        pk, pv = dk, dv
    else:
        pk = torch.empty(split, B, H, M, D, dtype=torch.float32, device=dev)
        pv = torch.empty(split, B, H, M, D, dtype=torch.float32, device=dev)
    launch(_dkdv_kernel, (grid_m * split, B, H), q, k, v, dout, lse, delta, pk, pv, *strides,
           B * H * M * D, H * M * D, M * D, D, H, N, M, D, float(scale), per_split,
           SPLIT=split, BN=t.BN, BM=t.BM, BD=BD, DTYPE=DTYPE, DOT=DOT, **t.launch_options())
    if split > 1:  # fixed-order sum over the splits (torch's reduction is deterministic)
        dk, dv = pk.sum(0).to(k.dtype), pv.sum(0).to(v.dtype)

    t = tiles_for("dq", low, BD)
    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=dev)
    launch(_dq_kernel, (triton.cdiv(N, t.BN), B, H), q, k, v, dout, lse, delta, dq, *strides,
           H, N, M, D, float(scale), BN=t.BN, BM=t.BM, BD=BD, DTYPE=DTYPE, DOT=DOT, **t.launch_options())
    return dq, dk, dv, None


# ----------------------------------------------------------------------------- with the mix: 3-D
# Tiles (BLOCK_N, BLOCK_M) of the mixed backward by (heads per program, 16-bit inputs?), kept under
# the shared memory of an H100 block for head dims <= 64 (rest_kernels/triton/capability.py refuses
# what does not fit the device; the budget table lists every number).
_MIXED_TILES = {
    (2, True): (64, 64), (4, True): (64, 32), (8, True): (16, 32),
    (2, False): (32, 32), (4, False): (16, 32), (8, False): (16, 16),
}


def mixed_block_sizes(hp: int, bd: int, m: int, low_precision: bool):
    """(BLOCK_N, BLOCK_M) of the mixed backward (fixed: autotune needs a driver)."""
    if interpreting():  # numpy per op: big tiles, bounded so the HP^2 BN BM mix stays small
        bn = 64 if hp <= 4 else 32
        return bn, min(128 if hp <= 2 else 64, pow2(m, 16))
    bn, bm = _MIXED_TILES[(hp, low_precision)]
    if bd > 64:  # head dims 65..256: the [HP, BLOCK, BD] operands grow with BD
        bn, bm = max(16, bn // (bd // 64)), max(16, bm // 2)
    return bn, min(bm, pow2(m, 16))


def _mixed_backward(dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale):
    B, H, N, D = q.shape
    M = k.shape[2]
    dev = q.device
    HP, BD = pow2(H), pow2(D, 16)
    BN, BM = mixed_block_sizes(HP, BD, M, q.dtype != torch.float32)
    DTYPE, DOT = TORCH_TO_TL[q.dtype], dot_mode(q.dtype)
    f32 = dict(dtype=torch.float32, device=dev)
    rsq, rstd = rsq.contiguous(), rstd.contiguous()
    w = mix_weight.contiguous()

    delta = torch.empty(B, H, N, **f32)
    if q.dtype != torch.float32:
        # delta_i = dO_i . O_i enters dS through the InstanceNorm terms, where rstd (up to eps^-1/2)
        # amplifies the fp16 / bf16 rounding of the stored O: recompute O into an fp32 buffer that
        # autograd never saves (the forward's kernel: 16-bit operands, fp32 accumulation).
        out = torch.empty(B, N, H, D, **f32).transpose(1, 2)
        attention_output(q, k, v, w, lse, rstd, scale, out)
    _row_terms(out, dout, delta, BD)
    vbar = torch.empty(B, H, D, **f32)
    launch(_vbar_kernel, (B, H), v, vbar, *v.stride(), H, M, D, BM=BM, BD=BD)
    c = rowsum(delta) / (N * M)  # mean(dY * Y) per (b, g), fixed-order sum

    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=dev)
    dk = torch.empty(B, H, M, D, dtype=k.dtype, device=dev)
    dv = torch.empty(B, H, M, D, dtype=v.dtype, device=dev)
    grid_m, grid_n = triton.cdiv(M, BM), triton.cdiv(N, BN)
    dw_part = torch.empty(H, H, B * grid_m, **f32)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    common = dict(HP=HP, BN=BN, BM=BM, BD=BD, DTYPE=DTYPE, DOT=DOT)
    stats = (lse, delta, rsq, vbar, rstd, c)
    launch(_dkdv_mixed_kernel, (grid_m, B, 1), q, k, v, dout, w, *stats, dk, dv, dw_part, *strides,
           H, N, M, D, float(scale), **common)
    launch(_dq_mixed_kernel, (grid_n, B, 1), q, k, v, dout, w, *stats, dq, *strides, H, N, M, D,
           float(scale), **common)
    return dq, dk, dv, rowsum(dw_part)  # fixed-order sum of the per-program dW partials


def emsa_backward(dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale, eps):
    lse = lse.contiguous()
    if mix_weight is None:
        return _plain_backward(dout, q, k, v, out, lse, scale)
    return _mixed_backward(dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale)
