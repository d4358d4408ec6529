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
        batch_stats = self.training or not self.track_running_stats
        if not (batch_stats and self._accurate_path_applies(x)):
            return super().forward(x)
        self._check_input_dim(x)
        y, mean, var = _ChannelsLastBatchNorm.apply(x, self.weight, self.bias, self.eps)
        if self.training and self.track_running_stats:
            self._update_running_stats(mean, var, x.numel() // x.shape[1])
        return y

    @staticmethod
    def _accurate_path_applies(x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
                and x.numel() > x.shape[1]  # one value per channel: nn.BatchNorm2d's own error
                and x.is_contiguous(memory_format=torch.channels_last)
                and not x.is_contiguous() and not torch.is_autocast_enabled("cpu")
                and not torch.jit.is_scripting() and not torch.jit.is_tracing()
                and not torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export())

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: int):
        """As nn.BatchNorm2d: num_batches_tracked += 1, then an exponential (momentum) or cumulative
        (momentum None) average, with the unbiased variance in running_var."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        if self.running_mean is not None:
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        if self.running_var is not None:
            unbiased = var * (n / (n - 1)) if n > 1 else var
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
