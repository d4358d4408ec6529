"""EMSA forward in Triton: mixed-logit softmax attention with InstanceNorm, never forming N x M.

Design note
===========
Inputs q (B,h,N,d), k, v (B,h,M,d) with any strides; W (h,h) fp32 or None. Output (B,h,N,d) laid
out in memory as (B,N,h,d); statistics lse (B,h,N), with the mix rsq (B,h,N) and rstd (B,h), in
fp32 (contract of rest_kernels/backends/stats.py).

Grid and what a program holds
-----------------------------
One program per (query block of BN rows, batch element, OUTPUT head g): grid (cdiv(N, BN), B, h).
Every tile is 2-D. With the head mix the logits of head g are S_g = sum_j W[g,j] scale q_j k_j^T:
the program forms them as h 2-D dots, one per input head j, each accumulated in fp32 and mixed in
fp32 (rest_kernels/triton/_common.py:head_logits), so it never holds a tile of another output head.
Why: a 2-D dot with BN = 64 rows per warpgroup is what Triton lowers to wgmma (HGMMA) on sm_90
(a batched [heads, rows, d] dot only ever becomes mma.sync), and one [BN, BM] logit tile live per
program keeps the registers within the budget without spills at BN = BM = 64
(rest_kernels/triton/tiles.py). The price: the logits of h output heads cost h^2 dots per tile pair
instead of h dots plus an h x h contraction on the CUDA cores (h <= 8 in ResT; h = 1 has no mix).
Only [BN, BM] exists at a time: the N x M map never reaches global memory. BD = next_pow2(d) >= 16,
masked, so d = 3, 5, 96 work; d <= 256, h <= 8 with the mix. Tiles, warps and pipelining depth come
per arch from rest_kernels/triton/tiles.py. On a GPU every call is first compiled for the device's
arch and its launches held against the arch's limits (rest_kernels/triton/capability.py); what does
not fit is refused with that reason, so "auto" falls back.

Three kernels, all with fixed block order (deterministic, no atomics):
1. `_stats_kernel` (mix only): online softmax over the key blocks. Per row it keeps the running
   max m, l = sum e with e = exp(S - m), and c = sum (e - l/n)^2 over the n keys seen so far,
   merged block by block with Chan's pairwise update (each block centred at its own mean); when m
   grows by delta, l scales by exp(-delta) and c by exp(-2 delta). Stores lse = m + log(l / M) and
   rsq = c / l^2 = sum_m (P - 1/M)^2, the centred row sum (no cancellation for near-uniform rows).
2. `_rowsum_kernel`: per (b, g) the sum over rows of rsq, in a fixed order; the host turns the
   (B,h) sums into rstd = (sum/(N M) + eps)^-1/2 (B*h numbers).
3. `_attn_kernel`: with the mix, P = exp(S - lse) / M is final on every tile (lse is known), so the
   program accumulates Y v = sum_m (P - 1/M) v_m in fp32 (the 1/M is subtracted before the
   product, so no cancellation of two large terms, and no separate vbar) and writes
   out = rstd * (Y v) once, in the output dtype. Without the mix the same kernel runs classic online
   softmax (rescaled accumulator) and stores lse.

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

import torch
import triton
import triton.language as tl

from .launch import launch
from ._common import (TORCH_TO_TL, dot, dot_mode, head_logits, load_2d, load_row_stat, pow2,
                      store_2d, store_row_stat)
from .tiles import tiles_for


@triton.jit
def _stats_kernel(q_ptr, k_ptr, w_ptr, lse_ptr, rsq_ptr,
                  sqb, sqh, sqn, sqd, skb, skh, skm, skd,
                  H, N, M, D, scale,
                  BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                  DTYPE: tl.constexpr, DOT: tl.constexpr):
    n0 = tl.program_id(0) * BN
    b = tl.program_id(1)
    g = tl.program_id(2)
    m_i = tl.full((BN,), float("-inf"), tl.float32)
    l_i = tl.zeros((BN,), tl.float32)
    c_i = tl.zeros((BN,), tl.float32)  # sum (e - l/n)^2 over the keys seen, e = exp(S - m_i)
    cols = tl.arange(0, BM)[None, :]
    for m0 in range(0, M, BM):
        s = head_logits(q_ptr, k_ptr, w_ptr, sqb, sqh, sqn, sqd, skb, skh, skm, skd, q_ptr,
                        b, g, n0, m0, H, N, M, D, scale, BN, BM, BD, True, DTYPE, DOT)
        valid = m0 + cols < M
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every key block holds a valid key
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        # Chan's pairwise update of a centred sum of squares: this block's own (centred at its
        # mean) plus the running one, both in the scale of the new max (c scales with alpha^2)
        n_a = m0 * 1.0
        n_b = tl.minimum((M - m0) * 1.0, BM * 1.0)
        l_b = tl.sum(p, axis=1)
        mean_b = l_b / n_b
        dev = tl.where(valid, p - mean_b[:, None], 0.0)
        l_a = l_i * alpha
        delta = mean_b - l_a / tl.maximum(n_a, 1.0)
        c_i = c_i * (alpha * alpha) + tl.sum(dev * dev, axis=1) + delta * delta * (n_a * n_b / (n_a + n_b))
        l_i = l_a + l_b
        m_i = m_new
    # log-mean-exp (rest_kernels/backends/stats.py): l / M near 1 for near-uniform rows, so its log
    # keeps full precision where a log-sum-exp would round at the size of log M
    store_row_stat(lse_ptr, m_i + tl.log(l_i / M), b, g, n0, H, N, BN)
    # sum_m (P - 1/M)^2 = sum_m (e - l/M)^2 / l^2 (rest_kernels/backends/stats.py)
    store_row_stat(rsq_ptr, c_i / (l_i * l_i), b, g, n0, H, N, BN)


@triton.jit
def _rowsum_kernel(x_ptr, out_ptr, R, BR: tl.constexpr):
    """out[p] = sum_r x[p, r] for a contiguous (P, R) fp32 array: one program per row, fixed order."""
    p = tl.program_id(0)
    base = x_ptr + p.to(tl.int64) * R
    acc = tl.zeros((BR,), tl.float32)
    for r0 in range(0, R, BR):
        rr = r0 + tl.arange(0, BR)
        acc += tl.load(base + rr, mask=rr < R, other=0.0)
    tl.store(out_ptr + p, tl.sum(acc, axis=0))


def rowsum(x: torch.Tensor) -> torch.Tensor:
    """Deterministic sum over the last dim of a contiguous fp32 (..., R) tensor."""
    R = x.shape[-1]
    flat = x.reshape(-1, R)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=x.device)
    if flat.shape[0]:
        launch(_rowsum_kernel, (flat.shape[0],), flat, out, R, BR=min(1024, pow2(R, 16)))
    return out.reshape(x.shape[:-1])


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, w_ptr, o_ptr, lse_ptr, rstd_ptr,
                 sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sob, soh, son, sod,
                 H, N, M, D, scale,
                 BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                 NORM: tl.constexpr, DTYPE: tl.constexpr, DOT: tl.constexpr):
    n0 = tl.program_id(0) * BN
    b = tl.program_id(1)
    g = tl.program_id(2)
    acc = tl.zeros((BN, BD), tl.float32)
    cols = tl.arange(0, BM)[None, :]
    if NORM:
        inv_m = 1.0 / M
        lse = load_row_stat(lse_ptr, b, g, n0, H, N, BN, 0.0)
        for m0 in range(0, M, BM):
            s = head_logits(q_ptr, k_ptr, w_ptr, sqb, sqh, sqn, sqd, skb, skh, skm, skd, q_ptr,
                            b, g, n0, m0, H, N, M, D, scale, BN, BM, BD, True, DTYPE, DOT)
            v = load_2d(v_ptr, svb, svh, svm, svd, b, g, m0, M, D, BM, BD)
            # (P - 1/M) = (exp(S - lse) - 1) / M before the product with v: the mean is subtracted
            # exactly (exp(x) - 1 for small x is exact in fp32), with lse the row's log-mean-exp
            y = tl.where(m0 + cols < M, (tl.exp(s - lse[:, None]) - 1.0) * inv_m, 0.0)
            acc += dot(y, v, DTYPE, DOT)
        acc = acc * tl.load(rstd_ptr + (tl.zeros((), tl.int64) + b) * H + g)
    else:
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


def _config(q: torch.Tensor):
    """(BD, tiles, DTYPE, DOT) of the forward kernels for q's head dim and dtype on the target arch."""
    BD = pow2(q.shape[-1], 16)
    return BD, tiles_for("fwd", q.dtype != torch.float32, BD), TORCH_TO_TL[q.dtype], dot_mode(q.dtype)


def attention_output(q, k, v, mix_weight, lse, rstd, scale, out):
    """Run `_attn_kernel` into `out` (any (B,h,N,d) strides and float dtype: the backward asks for
    an fp32 copy of O). With the mix, lse and rstd are inputs; without it lse is written."""
    B, H, N, D = q.shape
    M = k.shape[2]
    BD, t, DTYPE, DOT = _config(q)
    mix = mix_weight is not None
    w = mix_weight.contiguous() if mix else q  # unused pointer without the mix
    launch(_attn_kernel, (triton.cdiv(N, t.BN), B, H),
           q, k, v, w, out, lse, rstd, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
           H, N, M, D, float(scale), BN=t.BN, BM=t.BM, BD=BD, NORM=mix, DTYPE=DTYPE, DOT=DOT,
           **t.launch_options())


def emsa_forward(q, k, v, mix_weight, scale, eps):
    B, H, N, D = q.shape
    M = k.shape[2]
    dev = q.device
    out = torch.empty(B, N, H, D, dtype=q.dtype, device=dev).transpose(1, 2)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=dev)
    if mix_weight is not None:
        BD, t, DTYPE, DOT = _config(q)
        rsq = torch.empty(B, H, N, dtype=torch.float32, device=dev)
        launch(_stats_kernel, (triton.cdiv(N, t.BN), B, H), q, k, mix_weight.contiguous(), lse, rsq,
               *q.stride(), *k.stride(), H, N, M, D, float(scale),
               BN=t.BN, BM=t.BM, BD=BD, DTYPE=DTYPE, DOT=DOT, **t.launch_options())
        rstd = torch.rsqrt(rowsum(rsq) / (N * M) + eps)
    else:  # no InstanceNorm: no rsq, no rstd (rest_kernels/backends/stats.py)
        rsq = torch.empty(0, dtype=torch.float32, device=dev)
        rstd = torch.empty(0, dtype=torch.float32, device=dev)
    attention_output(q, k, v, mix_weight, lse, rstd, scale, out)
    return out, lse, rsq, rstd
