"""EMSA backward in Triton, by recomputation (see docs/emsa_math.md, "Backward").

Saved from the forward: q, k, v, W, out and the statistics of rest_kernels/backends/stats.py: lse
(B,h,N), with the mix rsq = sum_m (P - 1/M)^2 (B,h,N) and rstd (B,h). Nothing of size N x M.

Kernels (all deterministic: fixed loop orders, per-program partials, no atomics):
1. `_vbar_kernel` (mix only), grid (B, h): vbar = mean over keys of v, fp32.
2. `_row_terms_kernel`, grid (cdiv(N, 64), B, h): delta_i = dO_i . O_i per row. For fp16 / bf16
   with the mix, O is first recomputed in fp32 by the forward's `_attn_kernel` into a transient
   buffer: rstd (up to eps^-1/2) amplifies the rounding of the stored 16-bit O in the norm terms.
   A fixed-order rowsum gives c = mean(dY * Y) = sum_i delta_i / (N M) per (b, g).
3. `_dkdv_kernel`, grid (cdiv(M, BLOCK_M), B, head groups): a program owns a key block of all
   mixed heads, walks the query blocks and recomputes per tile S, P = exp(S - lse) / M (lse the
   row's log-mean-exp),
   Y = (P - 1/M) rstd and
       dP - D_i = rstd dO_i (v_m - vbar) - c rstd (Y_im - rstd rsq_i) - delta_i
   (the notes' dP = rstd (dO v^T - a - Y c) and D_i = delta_i + rstd dO_i.vbar - rstd a
   - c rstd^2 rsq_i with the a terms cancelled and v centred before the dot, so no
   difference of two large numbers is formed: it is exactly 0 when M = 1), dS = P (dP - D_i), the
   head-mix transpose dL_j = sum_g W[g, j] dS_g, and accumulates dv = Y^T dO, dk = dL^T q scale
   and a per-program partial dW[g, j] = sum dS_g L_j.
4. `_dq_kernel`, grid (cdiv(N, BLOCK_N), B, head groups): the same tile recomputation per query
   block over all key blocks, dq = dL k scale.
The dW partials (h, h, B * key blocks) are summed in a fixed order by the rowsum kernel.
Without the mix: plain attention backward (Y = P, dP = dO v^T, D_i = delta_i), one head per program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from ._common import (dot, trans, load_heads, load_mix, load_rows, load_tile,
                      mixed_logits, store_rows, store_tile)
from .emsa_fwd import _attn_kernel, block_sizes, launch_config, rowsum


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
def _centred_v(v_ptr, vbar_ptr, svb, svh, svm, svd, b, h0, m0, H, M, D,
               HP: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, NORM: tl.constexpr):
    """[HP, BM, BD] tile of v, minus vbar (fp32) with the norm; zero outside."""
    v = load_tile(v_ptr, svb, svh, svm, svd, b, h0, m0, H, M, D, HP, BM, BD)
    if NORM:
        hh = h0 + tl.arange(0, HP)[:, None, None]
        dd = tl.arange(0, BD)[None, None, :]
        vbar = tl.load(vbar_ptr + (b.to(tl.int64) * H + hh) * D + dd, mask=(hh < H) & (dd < D), other=0.0)
        rows = m0 + tl.arange(0, BM)[None, :, None]
        v = tl.where(rows < M, v - vbar, 0.0)
    return v


@triton.jit
def _ds_tile(q, k, vc, do, w, lse, delta, r, rstd, c, h0, n0, m0, H, N, M, scale,
             MIX: tl.constexpr, NORM: tl.constexpr, DTYPE: tl.constexpr, DOT: tl.constexpr,
             HP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    """Recompute one [HP, BN, BM] tile: returns dS, the weights of dv (Y or P) and the logits L."""
    s, logits = mixed_logits(q, k, w, scale, MIX, DTYPE, DOT)
    heads = h0 + tl.arange(0, HP)[:, None, None]
    rows = n0 + tl.arange(0, BN)[None, :, None]
    cols = m0 + tl.arange(0, BM)[None, None, :]
    valid = (heads < H) & (rows < N) & (cols < M)
    p = tl.where(valid, tl.exp(s - lse[:, :, None]) * (1.0 / M), 0.0)  # lse: the row's log-mean-exp
    if NORM:
        # dP = rstd (dO v^T - a - Y c) and D_i = sum_m P dP, which only needs row quantities:
        # D_i = delta_i + rstd e_i - rstd a - c rstd^2 rsq_i (sum_m P Y = rstd rsq_i, rsq centred).
        # In dP - D_i the terms a cancel
        # and dO v^T - e_i = dO (v - vbar)^T: v is centred before the dot (vc = v - vbar), so the
        # difference is never formed from two large terms (exactly zero when M = 1).
        inv_m = 1.0 / M
        rs = rstd[:, None]
        y = tl.where(valid, (p - inv_m) * rs[:, :, None], 0.0)  # (P - 1/M) rstd
        dpv = dot(do, trans(vc, DOT), DTYPE, DOT)
        dp_minus_d = (rs[:, :, None] * dpv - c[:, None, None] * rs[:, :, None] * (y - (rs * r)[:, :, None])
                      - delta[:, :, None])
        pw = y
    else:
        dpv = dot(do, trans(vc, DOT), DTYPE, DOT)  # dP = dO v^T
        dp_minus_d = dpv - delta[:, :, None]
        pw = p
    ds = p * dp_minus_d
    return ds, pw, logits


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, w_ptr, lse_ptr, delta_ptr, rsq_ptr, vbar_ptr,
                 rstd_ptr, c_ptr, dk_ptr, dv_ptr, dw_ptr,
                 sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sdb, sdh, sdn, sdd,
                 H, N, M, D, scale,
                 HP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                 MIX: tl.constexpr, NORM: tl.constexpr, DTYPE: tl.constexpr, DOT: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    h0 = tl.program_id(2) * HP
    m0 = pid_m * BM
    k = load_tile(k_ptr, skb, skh, skm, skd, b, h0, m0, H, M, D, HP, BM, BD)
    vc = _centred_v(v_ptr, vbar_ptr, svb, svh, svm, svd, b, h0, m0, H, M, D, HP, BM, BD, NORM)
    w = load_mix(w_ptr, H, HP)
    rstd = load_heads(rstd_ptr, b, h0, H, HP)
    c = load_heads(c_ptr, b, h0, H, HP)
    dk = tl.zeros((HP, BM, BD), tl.float32)
    dv = tl.zeros((HP, BM, BD), tl.float32)
    dw = tl.zeros((HP, HP), tl.float32)
    for n0 in range(0, N, BN):
        q = load_tile(q_ptr, sqb, sqh, sqn, sqd, b, h0, n0, H, N, D, HP, BN, BD)
        do = load_tile(do_ptr, sdb, sdh, sdn, sdd, b, h0, n0, H, N, D, HP, BN, BD)
        lse = load_rows(lse_ptr, b, h0, n0, H, N, HP, BN, 0.0)
        delta = load_rows(delta_ptr, b, h0, n0, H, N, HP, BN, 0.0)
        r = load_rows(rsq_ptr, b, h0, n0, H, N, HP, BN, 0.0)
        ds, pw, logits = _ds_tile(q, k, vc, do, w, lse, delta, r, rstd, c, h0, n0, m0, H, N, M,
                                  scale, MIX, NORM, DTYPE, DOT, HP, BN, BM)
        dv += dot(trans(pw, DOT), do, DTYPE, DOT)  # dv = Y^T dO (P^T dO without the norm)
        if MIX:
            dl = tl.sum(w[:, :, None, None] * ds[:, None, :, :], axis=0)  # dL_j = sum_g W[g,j] dS_g
            dw += tl.sum(tl.sum(ds[:, None, :, :] * logits[None, :, :, :], axis=3), axis=2)
        else:
            dl = ds
        dk += dot(trans(dl, DOT), q, DTYPE, DOT)
    store_tile(dk_ptr, dk * scale, H * M * D, M * D, D, 1, b, h0, m0, H, M, D, HP, BM, BD)
    store_tile(dv_ptr, dv, H * M * D, M * D, D, 1, b, h0, m0, H, M, D, HP, BM, BD)
    if MIX:
        g = tl.arange(0, HP)[:, None]
        j = tl.arange(0, HP)[None, :]
        part = b.to(tl.int64) * tl.num_programs(0) + pid_m
        tl.store(dw_ptr + (g * H + j) * (tl.num_programs(0) * tl.num_programs(1)) + part, dw,
                 mask=(g < H) & (j < H))


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, w_ptr, lse_ptr, delta_ptr, rsq_ptr, vbar_ptr,
               rstd_ptr, c_ptr, dq_ptr,
               sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sdb, sdh, sdn, sdd,
               H, N, M, D, scale,
               HP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
               MIX: tl.constexpr, NORM: tl.constexpr, DTYPE: tl.constexpr, DOT: tl.constexpr):
    n0 = tl.program_id(0) * BN
    b = tl.program_id(1)
    h0 = tl.program_id(2) * HP
    q = load_tile(q_ptr, sqb, sqh, sqn, sqd, b, h0, n0, H, N, D, HP, BN, BD)
    do = load_tile(do_ptr, sdb, sdh, sdn, sdd, b, h0, n0, H, N, D, HP, BN, BD)
    w = load_mix(w_ptr, H, HP)
    rstd = load_heads(rstd_ptr, b, h0, H, HP)
    c = load_heads(c_ptr, b, h0, H, HP)
    lse = load_rows(lse_ptr, b, h0, n0, H, N, HP, BN, 0.0)
    delta = load_rows(delta_ptr, b, h0, n0, H, N, HP, BN, 0.0)
    r = load_rows(rsq_ptr, b, h0, n0, H, N, HP, BN, 0.0)
    dq = tl.zeros((HP, BN, BD), tl.float32)
    for m0 in range(0, M, BM):
        k = load_tile(k_ptr, skb, skh, skm, skd, b, h0, m0, H, M, D, HP, BM, BD)
        vc = _centred_v(v_ptr, vbar_ptr, svb, svh, svm, svd, b, h0, m0, H, M, D, HP, BM, BD, NORM)
        ds, pw, logits = _ds_tile(q, k, vc, do, w, lse, delta, r, rstd, c, h0, n0, m0, H, N, M,
                                  scale, MIX, NORM, DTYPE, DOT, HP, BN, BM)
        if MIX:
            dl = tl.sum(w[:, :, None, None] * ds[:, None, :, :], axis=0)
        else:
            dl = ds
        dq += dot(dl, k, DTYPE, DOT)
    store_tile(dq_ptr, dq * scale, H * N * D, N * D, D, 1, b, h0, n0, H, N, D, HP, BN, BD)


def emsa_backward(dout, q, k, v, mix_weight, out, lse, rsq, rstd, scale, eps):
    B, H, N, D, M, mix, HP, BD, BN, BM, DTYPE, DOT = launch_config(q, k, mix_weight)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    lse, rsq, rstd = lse.contiguous(), rsq.contiguous(), rstd.contiguous()

    delta = torch.empty(B, H, N, **f32)
    if mix and q.dtype != torch.float32:
        # delta_i = dO_i . O_i enters dS through the InstanceNorm terms, where rstd (up to eps^-1/2)
        # amplifies the fp16 / bf16 rounding of the stored O: recompute O in fp32 instead (one
        # forward sweep, fp32 "ieee" PV dot, into a transient buffer that autograd never saves).
        out = torch.empty(B, N, H, D, **f32).transpose(1, 2)
        BN32, BM32 = block_sizes(HP, BD, M, False)  # fp32 operands: the fp32 tiles
        launch(_attn_kernel, (triton.cdiv(N, BN32), B, 1),
               q, k, v, mix_weight.contiguous(), out, lse, rstd, *q.stride(), *k.stride(), *v.stride(),
               *out.stride(), H, N, M, D, float(scale), HP=HP, BN=BN32, BM=BM32, BD=BD, NORM=True, DTYPE=tl.float32,
               DOT=0 if DOT == 0 else 1)
    BNR = 64
    launch(_row_terms_kernel, (triton.cdiv(N, BNR), B, H), out, dout, delta, *out.stride(), *dout.stride(),
           H, N, D, BN=BNR, BD=BD)
    if mix:
        vbar = torch.empty(B, H, D, **f32)
        launch(_vbar_kernel, (B, H), v, vbar, *v.stride(), H, M, D, BM=BM, BD=BD)
        c = rowsum(delta) / (N * M)  # mean(dY * Y) per (b, g), fixed-order sum
        w = mix_weight.contiguous()
    else:  # no norm: the kernels never read these; any buffer of >= B h N floats will do
        vbar = c = rsq = rstd = delta
        w = q

    dq = torch.empty(B, H, N, D, dtype=q.dtype, device=dev)
    dk = torch.empty(B, H, M, D, dtype=k.dtype, device=dev)
    dv = torch.empty(B, H, M, D, dtype=v.dtype, device=dev)
    grid_m, grid_n, grid_h = triton.cdiv(M, BM), triton.cdiv(N, BN), triton.cdiv(H, HP)
    dw_part = torch.empty(H, H, B * grid_m, **f32) if mix else delta
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    common = dict(HP=HP, BN=BN, BM=BM, BD=BD, MIX=mix, NORM=mix, DTYPE=DTYPE, DOT=DOT)
    stats = (lse, delta, rsq, vbar, rstd, c)
    launch(_dkdv_kernel, (grid_m, B, grid_h), q, k, v, dout, w, *stats, dk, dv, dw_part, *strides,
           H, N, M, D, float(scale), **common)
    launch(_dq_kernel, (grid_n, B, grid_h), q, k, v, dout, w, *stats, dq, *strides, H, N, M, D, float(scale), **common)
    dmix = rowsum(dw_part) if mix else None  # fixed-order sum of the per-program partials
    return dq, dk, dv, dmix
