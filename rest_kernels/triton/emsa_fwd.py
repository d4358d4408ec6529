"""EMSA forward in Triton: mixed-logit softmax attention with InstanceNorm, never forming N x M.

Design note
===========
Inputs q (B,h,N,d), k, v (B,h,M,d) with any strides; W (h,h) fp32 or None. Output (B,h,N,d) laid
out in memory as (B,N,h,d); statistics lse (B,h,N), with the mix rsq (B,h,N) and rstd (B,h), in
fp32 (contract of rest_kernels/backends/stats.py).

Grid and what a program holds
-----------------------------
With the head mix every output head g depends on the logits of every input head j, so a program
owns one block of BLOCK_N queries of one batch element and ALL h heads (HP = next_pow2(h) lanes,
masked): grid (cdiv(N, BLOCK_N), B, 1). It holds q [HP, BLOCK_N, BD] in registers, walks the keys
in blocks of BLOCK_M, loading k and v [HP, BLOCK_M, BD], and per key block forms the unmixed
logits L = q k^T scale (one batched tensor-core dot), the mix S[g] = sum_j W[g,j] L[j] (an HP x HP
contraction in registers) and the softmax pieces. Only [HP, BLOCK_N, BLOCK_M] exists at a time:
the N x M map never reaches global memory. Without the mix the heads are independent, a program
owns one head (HP = 1) and the grid is (cdiv(N, BLOCK_N), B, h). BD = next_pow2(d) >= 16, masked,
so d = 3, 5, 96 work; d <= 256, h <= 8 with the mix. On a GPU every call is first compiled for the
device's arch and its launches held against the arch's limits (shared memory per block, grid axes:
rest_kernels/triton/capability.py); what does not fit is refused with that reason, so "auto" falls
back.

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
once; it recomputes QK^T, which is cheap at ResT's sizes (below). We chose (b).

Bytes and FLOPs vs H100 (SXM: ~3.35 TB/s HBM, ~990 TFLOP/s dense bf16 tensor core, ~67 TFLOP/s
fp32 non-tensor), bf16 inputs, forward with the mix, per call:
  FLOPs ~ 2*(2 B h N M d) (QK^T twice) + 2 B h N M d (PV) + 2 B h^2 N M (mix, CUDA cores x2 passes)
  bytes ~ 2 |q| + 2 |k| + |v| + |out| (+ fp32 stats 12 B h N)
- stage 1 (B 64, N 3136, M 49, h 1, d 64; h = 1 has no mix in ResT: plain, one pass):
  bytes = 25.7 MB (q) + 25.7 MB (out) + 0.8 MB (k, v) + 0.8 MB lse ~ 53 MB -> 16 us at 3.35 TB/s;
  FLOPs = 4 B N M d = 2.5 GFLOP -> 2.5 us on tensor cores. Memory bound (intensity ~ 47 FLOP/B,
  ridge ~ 295 FLOP/B for bf16 tensor cores).
- stage 2 (B 64, N 784, M 49, h 2, d 64, mix): bytes ~ 2 x 12.8 (q) + 12.8 (out) + ~1 (k, v) +
  2.4 (stats) ~ 42 MB -> 12.5 us; FLOPs ~ 6 B h N M d = 1.9 GFLOP (tensor) + 0.04 GFLOP (mix,
  fp32 CUDA cores) -> ~2 us. Memory bound.
- detection (B 1, N 15200, M 950, h 2, d 64, mix): bytes ~ 2 x 3.9 (q) + 3.9 (out) + k, v re-read
  per query block (120 blocks of 128 x 0.24 MB ~ 29 MB, mostly L2 hits: 50 MB L2) -> ~12-40 MB;
  FLOPs ~ 6 B h N M d = 11 GFLOP (tensor: ~11 us) + exp of 2 passes x 29 M elements on SFUs and the
  mix 2 B h^2 N M x 2 = 0.23 GFLOP fp32 (~3.5 us). Roughly balanced; the exp/softmax work on CUDA
  cores (not the tensor cores) bounds it, as in flash-attention at small d.
fp32 inputs: the dots run "ieee" fp32 on CUDA cores (67 TFLOP/s): at ResT's small M still memory
bound at the stage shapes; compute bound at detection size (11 GFLOP -> ~170 us).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from ._common import (TORCH_TO_TL, dot, dot_mode, interpreting, load_heads, load_mix, load_rows,
                      load_tile, mixed_logits, pow2, store_rows, store_tile)


@triton.jit
def _stats_kernel(q_ptr, k_ptr, w_ptr, lse_ptr, rsq_ptr,
                  sqb, sqh, sqn, sqd, skb, skh, skm, skd,
                  H, N, M, D, scale,
                  HP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                  DTYPE: tl.constexpr, DOT: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    n0 = pid_n * BN
    q = load_tile(q_ptr, sqb, sqh, sqn, sqd, b, 0, n0, H, N, D, HP, BN, BD)
    w = load_mix(w_ptr, H, HP)
    m_i = tl.full((HP, BN), float("-inf"), tl.float32)
    l_i = tl.zeros((HP, BN), tl.float32)
    c_i = tl.zeros((HP, BN), tl.float32)  # sum (e - l/n)^2 over the keys seen, e = exp(S - m_i)
    cols = tl.arange(0, BM)[None, None, :]
    for m0 in range(0, M, BM):
        k = load_tile(k_ptr, skb, skh, skm, skd, b, 0, m0, H, M, D, HP, BM, BD)
        s, _ = mixed_logits(q, k, w, scale, True, DTYPE, DOT)
        valid = m0 + cols < M
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=2))  # finite: every key block holds a valid key
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, :, None])
        # Chan's pairwise update of a centred sum of squares: this block's own (centred at its
        # mean) plus the running one, both in the scale of the new max (c scales with alpha^2)
        n_a = m0 * 1.0
        n_b = tl.minimum((M - m0) * 1.0, BM * 1.0)
        l_b = tl.sum(p, axis=2)
        mean_b = l_b / n_b
        dev = tl.where(valid, p - mean_b[:, :, None], 0.0)
        l_a = l_i * alpha
        delta = mean_b - l_a / tl.maximum(n_a, 1.0)
        c_i = c_i * (alpha * alpha) + tl.sum(dev * dev, axis=2) + delta * delta * (n_a * n_b / (n_a + n_b))
        l_i = l_a + l_b
        m_i = m_new
    # log-mean-exp (rest_kernels/backends/stats.py): l / M near 1 for near-uniform rows, so its log
    # keeps full precision where a log-sum-exp would round at the size of log M
    store_rows(lse_ptr, m_i + tl.log(l_i / M), b, 0, n0, H, N, HP, BN)
    # sum_m (P - 1/M)^2 = sum_m (e - l/M)^2 / l^2 (rest_kernels/backends/stats.py)
    store_rows(rsq_ptr, c_i / (l_i * l_i), b, 0, n0, H, N, HP, BN)


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
                 HP: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
                 NORM: tl.constexpr, DTYPE: tl.constexpr, DOT: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    h0 = tl.program_id(2) * HP
    n0 = pid_n * BN
    q = load_tile(q_ptr, sqb, sqh, sqn, sqd, b, h0, n0, H, N, D, HP, BN, BD)
    acc = tl.zeros((HP, BN, BD), tl.float32)
    cols = tl.arange(0, BM)[None, None, :]
    inv_m = 1.0 / M
    if NORM:
        w = load_mix(w_ptr, H, HP)
        lse = load_rows(lse_ptr, b, h0, n0, H, N, HP, BN, 0.0)
        for m0 in range(0, M, BM):
            k = load_tile(k_ptr, skb, skh, skm, skd, b, h0, m0, H, M, D, HP, BM, BD)
            v = load_tile(v_ptr, svb, svh, svm, svd, b, h0, m0, H, M, D, HP, BM, BD)
            s, _ = mixed_logits(q, k, w, scale, True, DTYPE, DOT)
            # (P - 1/M) = (exp(S - lse) - 1) / M before the product with v: the mean is subtracted
            # exactly (exp(x) - 1 for small x is exact in fp32), with lse the row's log-mean-exp
            y = tl.where(m0 + cols < M, (tl.exp(s - lse[:, :, None]) - 1.0) * inv_m, 0.0)
            acc += dot(y, v, DTYPE, DOT)
        rstd = load_heads(rstd_ptr, b, h0, H, HP)
        acc = acc * rstd[:, None, None]
    else:
        m_i = tl.full((HP, BN), float("-inf"), tl.float32)
        l_i = tl.zeros((HP, BN), tl.float32)
        for m0 in range(0, M, BM):
            k = load_tile(k_ptr, skb, skh, skm, skd, b, h0, m0, H, M, D, HP, BM, BD)
            v = load_tile(v_ptr, svb, svh, svm, svd, b, h0, m0, H, M, D, HP, BM, BD)
            s, _ = mixed_logits(q, k, q, scale, False, DTYPE, DOT)
            s = tl.where(m0 + cols < M, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=2))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, :, None])
            l_i = l_i * alpha + tl.sum(p, axis=2)
            acc = acc * alpha[:, :, None] + dot(p, v, DTYPE, DOT)
            m_i = m_new
        acc = acc / l_i[:, :, None]
        store_rows(lse_ptr, m_i + tl.log(l_i / M), b, h0, n0, H, N, HP, BN)  # log-mean-exp
    store_tile(o_ptr, acc, sob, soh, son, sod, b, h0, n0, H, N, D, HP, BN, BD)


# GPU tiles (BLOCK_N, BLOCK_M) by (heads per program, 16-bit inputs?). Chosen from the shared
# memory that Triton 3.8 reports for sm_90 compiles of the three big kernels (attention, dkdv, dq;
# the layout conversions of the [HP, BN, BM] tiles and of the HP^2 mix dominate), kept under
# ~160 KiB of the 227 KiB an H100 block may use: e.g. bf16 HP 2, 64 x 64: 99 KiB; bf16 HP 4,
# 64 x 32: 134 KiB; fp32 HP 1, 64 x 64: 113 KiB. fp32 needs twice the bytes per staged operand.
_GPU_TILES = {
    (1, True): (64, 64), (2, True): (64, 64), (4, True): (64, 32), (8, True): (16, 32),
    (1, False): (64, 64), (2, False): (32, 32), (4, False): (16, 32), (8, False): (16, 16),
}


def block_sizes(hp: int, bd: int, m: int, low_precision: bool = True):
    """Fixed tiles (no autotune: it needs a driver, and the interpreter cannot time configs)."""
    if interpreting():  # numpy per op: big tiles, bounded so the HP^2 BN BM mix stays small
        bn = 64 if hp <= 4 else 32
        return bn, min(128 if hp <= 2 else 64, pow2(m, 16))
    bn, bm = _GPU_TILES[(hp, low_precision)]
    if bd > 64:  # head dims 65..256: the [HP, BLOCK, BD] operands grow with BD
        bn, bm = max(16, bn // (bd // 64)), max(16, bm // 2)
    return bn, min(bm, pow2(m, 16))


def launch_config(q, k, mix_weight):
    """Problem sizes and tile configuration shared by the forward and backward launches:
    (B, H, N, D, M, mix, HP, BD, BN, BM, DTYPE, DOT)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    mix = mix_weight is not None
    HP = pow2(H) if mix else 1
    BD = pow2(D, 16)
    BN, BM = block_sizes(HP, BD, M, q.dtype != torch.float32)
    DTYPE, DOT = TORCH_TO_TL[q.dtype], dot_mode(q.dtype)
    return B, H, N, D, M, mix, HP, BD, BN, BM, DTYPE, DOT


def emsa_forward(q, k, v, mix_weight, scale, eps):
    B, H, N, D, M, mix, HP, BD, BN, BM, DTYPE, DOT = launch_config(q, k, mix_weight)
    dev = q.device
    out = torch.empty(B, N, H, D, dtype=q.dtype, device=dev).transpose(1, 2)
    lse = torch.empty(B, H, N, dtype=torch.float32, device=dev)
    grid_n = triton.cdiv(N, BN)
    strides = (*q.stride(), *k.stride())
    if mix:
        w = mix_weight.contiguous()
        rsq = torch.empty(B, H, N, dtype=torch.float32, device=dev)
        launch(_stats_kernel, (grid_n, B, 1), q, k, w, lse, rsq, *strides, H, N, M, D, float(scale),
               HP=HP, BN=BN, BM=BM, BD=BD, DTYPE=DTYPE, DOT=DOT)
        rstd = torch.rsqrt(rowsum(rsq) / (N * M) + eps)
    else:  # no InstanceNorm: no rsq, no rstd (rest_kernels/backends/stats.py)
        w = q  # unused pointer
        rsq = torch.empty(0, dtype=torch.float32, device=dev)
        rstd = torch.empty(0, dtype=torch.float32, device=dev)
    launch(_attn_kernel, (grid_n, B, triton.cdiv(H, HP)),
           q, k, v, w, out, lse, rstd, *strides, *v.stride(), *out.stride(), H, N, M, D, float(scale),
           HP=HP, BN=BN, BM=BM, BD=BD, NORM=mix, DTYPE=DTYPE, DOT=DOT)
    return out, lse, rsq, rstd
