"""The statistics the EMSA forward saves for its backward: one contract for every backend.

Per batch b, output head g and query row i, with S the mixed, scaled logits and P = softmax(S):

    lse  (B,h,N)  log (sum_m exp(S_im) / M)                P_im = exp(S_im - lse_i) / M
    rsq  (B,h,N)  sum_m (P_im - 1/M)^2                     the row's centred sum of squares
    rstd (B,h)    (sum_i rsq_i / (N M) + eps)^-1/2         InstanceNorm's 1/std of the (b, g) map

rsq and rstd exist only with the head mix (InstanceNorm); without it they are empty, shape (0,).
lse is the row's log-MEAN-exp (the log-sum-exp minus log M). With the mix every backend forms
P - 1/M = (exp(S - lse) - 1) / M: for near-uniform rows S - lse is small and exp of it minus 1 is
exact in floating point, while a stored log-sum-exp (about log M) would carry a rounding of an ulp of
log M into every P of the row, which InstanceNorm then amplifies by rstd (up to eps^-1/2). Measured
with tests/test_stats_contract.py's near-uniform case before this choice: 4.7x PyTorch's own float32
error on the output of the tiled backends.

Every backward reads exactly these: lse to rebuild P tile by tile, rstd for the normalised map
Y = (P - 1/M) rstd, and (cuda, triton) rsq for the row term sum_m P_im Y_im = rstd rsq_i of D_i.
(The name rsq, "row sum of squares", is kept from the op schemas; it is the centred sum.)

Why centred and not sum P^2. Each row of P sums to one, so InstanceNorm's mean is exactly 1/M and its
biased variance is sum_i rsq_i / (N M). For near-uniform attention rsq_i is many orders below 1/M;
sum_m P^2 = rsq_i + 1/M in float32 keeps only rsq_i's leading digits (or none), and rstd (up to
eps^-1/2 ~ 316) amplifies what is lost. So every backend accumulates the centred terms: full rows
(cpu, reference) sum (P - 1/M)^2 directly; the tiled online forwards (cuda, triton) merge each key
tile's centred sum of squares with the running one (Chan, Golub & LeVeque's pairwise update, the
running values rescaled with the running max), which equals sum_m (e_m - l/M)^2 for e = exp(S - max),
l = sum e, and rsq = that / l^2.

One normalisation: every forward forms Y = (P - 1/M) rstd from the final P (lse known) and only then
multiplies by v; no backend subtracts a mean of v after the product.

dtype: float32, float64 for float64 inputs (a float32 lse would cap a float64 backward near 1e-7).
"""
from __future__ import annotations

import math

import torch


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the statistics (and of the mix weight the kernels read, and of dmix) for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stat_shapes(B: int, h: int, N: int, mix: bool) -> tuple[tuple, tuple, tuple]:
    """Shapes of (lse, rsq, rstd)."""
    return (B, h, N), ((B, h, N) if mix else (0,)), ((B, h) if mix else (0,))


def empty_stats(q: torch.Tensor, mix: bool, eps: float):
    """(lse, rsq, rstd) of a call with nothing to compute (B, h, N or d is 0), defined once for every
    backend. With d = 0 every logit is 0: uniform attention, exactly lse = 0 (the log-mean-exp of
    zeros), rsq = 0, var = 0. csrc/op_checks.h gives the compiled ops' raw calls the same answer."""
    B, h, N, _ = q.shape
    lse_shape, rc_shape, rstd_shape = stat_shapes(B, h, N, mix)
    opts = dict(dtype=stat_dtype(q.dtype), device=q.device)
    lse = torch.zeros(lse_shape, **opts)
    rstd = eps ** -0.5 if eps > 0 else math.inf
    return lse, torch.zeros(rc_shape, **opts), torch.full(rstd_shape, rstd, **opts)


def stats_from_logits(s: torch.Tensor, mix: bool, eps: float):
    """The contract computed from materialised mixed logits s (B,h,N,M), in the statistics dtype:
    the definition the fused backends are tested against."""
    s = s.to(stat_dtype(s.dtype))
    B, h, N, M = s.shape
    lse = torch.logsumexp(s, dim=-1) - math.log(M)
    if not mix:
        return lse, s.new_empty(0), s.new_empty(0)
    rsq = ((torch.softmax(s, dim=-1) - 1.0 / M) ** 2).sum(-1)
    return lse, rsq, rstd_from_rsq(rsq, M, eps)


def rstd_from_rsq(rsq: torch.Tensor, M: int, eps: float) -> torch.Tensor:
    """rstd (B,h) from the centred row sums rsq (B,h,N), summed in float64."""
    N = rsq.shape[-1]
    var = rsq.double().sum(-1) / (N * M)
    return torch.rsqrt(var + eps).to(rsq.dtype)
