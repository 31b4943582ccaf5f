"""CPU fast path for training-mode batch norm on channels_last maps of few channels.

PyTorch's CPU batch norm in channels_last is slow where the evaluation network spends its BN
time: at 36 channels (not a multiple of 8) on 96 x 32 x 32 maps its forward + backward takes
2.2x the NCHW kernel's time (bench/batchnorm.py, BENCHMARKS.md). A channels_last tensor is an
(N*H*W, C) matrix in memory, so here the per-channel sums (of x, then of (x - mean)^2 forward;
of g and g * (x - mean) backward) are matrix-vector products with a vector of ones, and the
output and the input gradient are one elementwise pass each (``d * a + b`` with per-channel a, b,
d = x - mean). The statistics are two-pass (the input is centred before its squares are summed,
and the centred sum corrects the mean), so their float32 error does not grow with the mean
(tests/test_batchnorm.py: within 2e-5 of float64 for means up to 800x the spread).

:class:`BatchNorm2d` is ``nn.BatchNorm2d`` (same parameters, buffers and state dict) that takes
this path when its ``fast`` flag is set and :func:`use_fast_batch_norm` says it wins; the
evaluation network's fast build sets the flag. Statistics follow ``nn.BatchNorm2d``: the output
uses the biased batch variance, the running variance the unbiased one, and ``momentum=None`` is a
cumulative average. First derivatives only (the evaluation network needs no more).

This module imports no other module of the package.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode


def use_fast_batch_norm(x: torch.Tensor) -> bool:
    """Whether :func:`batch_norm_channels_last` beats PyTorch's own CPU batch norm for ``x``.

    Measured on a 2-core Intel Xeon with AVX-512 (bench/batchnorm.py, BENCHMARKS.md): PyTorch's
    channels_last kernel is slow (1.8-3.3x its NCHW kernel) at 20, 36 and 44 channels, and this
    path takes 0.46-0.67x its time there on maps of 8 x 8 and more; at 16, 32, 48, 72 and 144
    channels it is slower than PyTorch's kernel, and at 24 and 40 the two trade places from run
    to run.
    So: channels_last float CPU maps of fewer than 64 channels, a count that is not a multiple of
    8, and at least 64 pixels. Never under a dispatch mode (a FLOP or traffic counter counts
    PyTorch's op) or while torch.compile traces.
    """
    return (not torch.compiler.is_compiling() and x.dim() == 4 and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and x.shape[1] < 64 and x.shape[1] % 8 != 0
            and x.shape[2] * x.shape[3] >= 64
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            and _get_current_dispatch_mode() is None)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A channels_last (N, C, H, W) tensor as the (N*H*W, C) matrix it is in memory (a view)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _unrows(m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n, c, h, w = shape
    return m.view(n, h, w, c).permute(0, 3, 1, 2)


class _ChannelsLastBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float):
        rows = _rows(x)
        m = rows.shape[0]
        ones = rows.new_ones(m)
        mean = torch.mv(rows.t(), ones).div_(m)
        centred = rows - mean                   # kept for the backward (x itself is not)
        residual = torch.mv(centred.t(), ones).div_(m)   # the float32 sum's error: tiny against the spread
        mean += residual
        out = torch.empty_like(x, memory_format=torch.channels_last)   # not a view: ReLU(inplace) may follow
        out_rows = _rows(out)                 # first the squares (one large allocation fewer), then the output
        var = torch.mv(torch.mul(centred, centred, out=out_rows).t(), ones).div_(m).sub_(residual * residual)
        var.clamp_(min=0)                     # a constant channel: rounding may leave -0.0-ish
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        shift = -residual * scale if bias is None else bias - residual * scale
        torch.addcmul(shift, centred, scale, out=out_rows)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                running_var.mul_(1 - momentum).add_(var * (m / max(m - 1, 1)), alpha=momentum)
        ctx.save_for_backward(centred, residual, invstd, scale)
        ctx.has_weight, ctx.shape = weight is not None, x.shape
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        centred, residual, invstd, scale = ctx.saved_tensors     # x - mean = centred - residual
        g = _rows(grad_out.contiguous(memory_format=torch.channels_last))
        m = g.shape[0]
        ones = g.new_ones(m)
        sum_g = torch.mv(g.t(), ones)
        buffer = torch.empty_like(g)          # first g * centred, then the input gradient
        sum_gc = torch.mv(torch.mul(g, centred, out=buffer).t(), ones).sub_(residual * sum_g)   # sum of g * (x - mean)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # dx = scale * (g - sum_g / m - (x - mean) * invstd^2 * sum_gc / m) = g * A + centred * B + D
            b_coef = -scale * invstd * invstd * sum_gc / m
            d_coef = -scale * sum_g / m - residual * b_coef
            grad_x = _unrows(torch.addcmul(d_coef, centred, b_coef, out=buffer).addcmul_(g, scale), ctx.shape)
        if ctx.has_weight and ctx.needs_input_grad[1]:
            grad_w = sum_gc * invstd
        if ctx.needs_input_grad[2]:
            grad_b = sum_g
        return grad_x, grad_w, grad_b, None, None, None, None


def batch_norm_channels_last(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                             running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                             momentum: float, eps: float) -> torch.Tensor:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training=True, momentum, eps)``
    for a channels_last CPU ``x`` (the output is channels_last too)."""
    return _ChannelsLastBatchNorm.apply(x, weight, bias, running_mean, running_var, momentum, eps)


def update_factor(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The weight of a training batch in ``bn``'s running statistics, as ``nn.BatchNorm2d`` takes it
    once the batch is counted in ``num_batches_tracked``: ``momentum``, or 1 / batches seen where
    ``momentum`` is None (a cumulative average). Shared with the fused supernet's BNs."""
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with the channels_last fast path of :func:`batch_norm_channels_last`.

    The path runs in training mode when ``fast`` is set (the evaluation network's fast build sets
    it; off by default) and :func:`use_fast_batch_norm` holds; otherwise this is
    ``nn.BatchNorm2d``, whose state dict it shares.
    """

    fast: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.fast and self.training and use_fast_batch_norm(x)):
            return super().forward(x)
        factor = 0.0   # no running statistics: unused
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = update_factor(self)
        return batch_norm_channels_last(x, self.weight, self.bias, self.running_mean, self.running_var, factor,
                                        self.eps)
