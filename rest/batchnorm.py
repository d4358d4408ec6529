"""BatchNorm2d for the models' channels-last maps, with training statistics as accurate as NCHW's.

Why: on the CPU the ResT models run their maps channels-last (rest/layout.py), and PyTorch's
channels-last BatchNorm kernel loses accuracy in training mode. Measured 2026-12-04 (torch 2.14.1,
AMD EPYC with AVX-512, float32, a (16, 32, 112, 112) map of mean 3 and std 2, the size of ResT's stem):
the normalised output errs by 1e-5 (2 threads) and 2.6e-5 (1 thread) of its scale against float64,
against 8.8e-8 for the same call on an NCHW map. In a train step of rest_lite that error is large
enough to flip the sign of near-zero inputs of the stem's ReLUs, and every flipped element moves the
gradients of the stem and of the input by about 1e-3 relative (scripts/grad_error_table.py).

What this computes instead (train mode, or no running statistics, for a channels-last float32 or
float64 map on the CPU): the per-channel mean by PyTorch's sum (a cascade summation, a few ulps) and
the variance from the centred values (two passes, no E[x^2] - E[x]^2 cancellation); the backward
likewise from sums of dy and dy * xhat, then dx = w rstd (dy - mean(dy) - xhat mean(dy xhat)).
Everything else (NCHW maps, eval mode with running statistics, CUDA, autocast's 16-bit types) is
nn.BatchNorm2d's own path. Parameters, buffers, state_dict keys and running-statistics updates are
those of nn.BatchNorm2d (the running variance uses the unbiased batch variance, as PyTorch does).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """A channels-last (B, C, H, W) map as its (B*H*W, C) rows: a view, no copy."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B * H * W, C)


def _as_map(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B*H*W, C) rows back to a channels-last (B, C, H, W) map: a view."""
    B, C, H, W = like.shape
    return rows.view(B, H, W, C).permute(0, 3, 1, 2)


class _ChannelsLastBatchNorm(torch.autograd.Function):
    """Training-mode batch normalisation of a channels-last map; returns (y, mean, biased var)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        rows = _as_rows(x)
        n = rows.shape[0]
        mean = rows.sum(0) / n
        # The output is allocated as a map (a view returned from a Function could not be modified in
        # place by the ReLU that follows) and written through its rows.
        out = torch.empty_like(x, memory_format=torch.channels_last)
        y = _as_rows(out)
        torch.sub(rows, mean, out=y)  # centred values, then scaled in place
        var = y.square().sum(0) / n
        rstd = torch.rsqrt(var + eps)
        scale = rstd if weight is None else rstd * weight
        torch.addcmul(bias if bias is not None else torch.zeros_like(scale), y, scale, out=y)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, weight, mean, rstd = ctx.saved_tensors
        rows, g = _as_rows(x), _as_rows(dy)
        n = rows.shape[0]
        if torch.is_grad_enabled():
            # create_graph (double backward): the statistics again, as functions of x this time
            mean = rows.sum(0) / n
            rstd = torch.rsqrt((rows - mean).square().sum(0) / n + ctx.eps)
        xhat = (rows - mean) * rstd
        dbias = g.sum(0)
        dweight = (g * xhat).sum(0)
        dx = None
        if ctx.needs_input_grad[0]:
            scale = rstd if weight is None else rstd * weight
            # dx = scale * (g - mean(g) - xhat * mean(g * xhat))
            if torch.is_grad_enabled():  # create_graph: differentiable ops only (double backward)
                dx = _as_map((g - dbias / n - xhat * (dweight / n)) * scale, x)
            else:  # formed in the xhat buffer in two passes
                torch.addcmul(-dbias * scale / n, xhat, -dweight * scale / n, out=xhat)
                dx = _as_map(xhat.addcmul_(g, scale), x)
        return (dx, dweight if ctx.needs_input_grad[1] else None, dbias if ctx.needs_input_grad[2] else None,
                None)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics on channels-last CPU maps are computed
    accurately (see the module docstring); the same module in every other respect."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_norm_2d(x, self.weight, self.bias, self.running_mean, self.running_var,
                             self.num_batches_tracked, self.training, self.track_running_stats, self.momentum,
                             self.eps)


def _accurate_path_applies(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
            and x.numel() > x.shape[1]  # one value per channel: nn.BatchNorm2d's own error
            and x.is_contiguous(memory_format=torch.channels_last)
            and not x.is_contiguous() and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_scripting() and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export())


# A leaf function for torch.fx (torch.fx.wrap): the path depends on x's memory layout, which a
# symbolic trace cannot see; the trace records this call and the traced module chooses when it runs.
@torch.fx.wrap
def batch_norm_2d(x: torch.Tensor, weight, bias, running_mean, running_var, num_batches_tracked,
                  training: bool, track_running_stats: bool, momentum: float | None, eps: float) -> torch.Tensor:
    """BatchNorm2d's forward with nn.BatchNorm2d's rules: batch statistics in training (or without
    running statistics), else the running ones; in training with track_running_stats,
    num_batches_tracked += 1 and the running statistics move by `momentum` (None: a cumulative
    average). The accurate channels-last path where it applies (see the module docstring)."""
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-dimensional (B, C, H, W) map, got shape {tuple(x.shape)}")
    update = training and track_running_stats
    factor = 0.0 if momentum is None else momentum
    if update and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    batch_stats = training or (running_mean is None and running_var is None)
    if batch_stats and _accurate_path_applies(x):
        y, mean, var = _ChannelsLastBatchNorm.apply(x, weight, bias, eps)
        if update:
            _update_running_stats(running_mean, running_var, mean, var, factor, x.numel() // x.shape[1])
        return y
    # buffers go in only where they are read or updated (eval, or training that tracks them)
    keep = not training or track_running_stats
    return F.batch_norm(x, running_mean if keep else None, running_var if keep else None, weight, bias,
                        batch_stats, factor, eps)


@torch.no_grad()
def _update_running_stats(running_mean, running_var, mean: torch.Tensor, var: torch.Tensor, factor: float, n: int):
    """As nn.BatchNorm2d: an exponential average with weight `factor`, the unbiased batch variance
    in running_var."""
    if running_mean is not None:
        running_mean.lerp_(mean.to(running_mean.dtype), factor)
    if running_var is not None:
        unbiased = var * (n / (n - 1)) if n > 1 else var
        running_var.lerp_(unbiased.to(running_var.dtype), factor)
