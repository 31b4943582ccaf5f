"""Spectral normalisation of convolutions as operators on their real input (SPEC section 2).

``W = C * W_orig / sigma(W_orig)`` where sigma is the largest singular value of the conv as a
linear map on its actual input shape (C_in, H, W), with its zero padding, stride, dilation and
groups: not the norm of the reshaped kernel matrix. sigma comes from power iteration with
``conv2d`` (A) and ``conv_transpose2d`` (A^T). The iteration vectors are buffers that persist
across steps (and in checkpoints), so one iteration per training forward tracks sigma closely;
a 1x1 conv without padding has the operator norm of its C_out x C_in matrix, so it iterates on
vectors of length C_in / C_out instead of whole feature maps.

The parametrization is registered with ``torch.nn.utils.parametrize``: ``conv.weight`` is the
normalised weight, ``conv.parametrizations.weight.original`` the trained one.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .ops import OpConv


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / x.norm().clamp_min(eps)


class ConvSpectralNorm(nn.Module):
    """Parametrization ``weight -> target * weight / sigma(weight)`` for one conv.

    Args:
        conv: the conv whose ``weight`` this will parametrize (its geometry is copied).
        input_hw: spatial size of the conv's input.
        n_power_iterations: iterations per training forward (the authors' code uses 5 from a
            random start; with persistent vectors 1 is enough to track sigma).
        init_iterations: iterations run once at construction to start from a converged state.
        target: the operator norm to normalise to (C in the paper, 1 by default).
    """

    def __init__(self, conv: nn.Conv2d, input_hw: tuple[int, int], n_power_iterations: int = 1,
                 init_iterations: int = 20, target: float = 1.0, eps: float = 1e-12):
        super().__init__()
        if n_power_iterations < 1:
            raise ValueError("n_power_iterations must be >= 1")
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups, self.kernel_size = conv.groups, conv.kernel_size
        self.n_power_iterations, self.target, self.eps = n_power_iterations, target, eps
        self.input_hw = tuple(input_hw)
        weight = conv.weight.detach()
        self.matrix = conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
        gen = torch.Generator(device="cpu").manual_seed(0)
        if self.matrix:
            u = torch.randn(conv.in_channels, generator=gen)
        else:
            u = torch.randn(1, conv.in_channels, *self.input_hw, generator=gen)
        u = _normalize(u.to(weight), eps)
        self.register_buffer("u", u)  # input-space vector (unit norm)
        self.register_buffer("v", _normalize(self._A(u, weight), eps))  # output-space vector
        self._power_iterate(weight, init_iterations)

    def _A(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.matrix:
            return w.flatten(1) @ x
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def _At(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.matrix:
            return w.flatten(1).t() @ y
        # conv_transpose2d is the adjoint of conv2d once output_padding restores the input size.
        out_pad = []
        for dim in range(2):
            full = (y.shape[2 + dim] - 1) * self.stride[dim] - 2 * self.padding[dim] \
                + self.dilation[dim] * (self.kernel_size[dim] - 1) + 1
            out_pad.append(self.input_hw[dim] - full)
        return F.conv_transpose2d(y, w, None, self.stride, self.padding, tuple(out_pad), self.groups,
                                  self.dilation)

    @torch.no_grad()
    def _power_iterate(self, weight: torch.Tensor, n: int) -> None:
        u, v = self.u, self.v
        for _ in range(n):
            v = _normalize(self._A(u, weight), self.eps)
            u = _normalize(self._At(v, weight), self.eps)
        # sigma = v^T A u = ||A^T v|| for this pair: a lower bound that converges to the top singular value.
        self.u.copy_(u)
        self.v.copy_(v)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """sigma = v^T A u for the current vectors; differentiable in ``weight``."""
        u, v = self.u.clone(), self.v.clone()  # clones: the buffers change in place next step
        return (v * self._A(u, weight)).sum()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._power_iterate(weight.detach(), self.n_power_iterations)
        return weight * (self.target / self.sigma(weight))


def apply_spectral_norm(model: nn.Module, n_power_iterations: int = 1, target: float = 1.0) -> int:
    """Spectrally normalise every :class:`OpConv` of ``model``; returns how many.

    Each conv must know its ``input_hw`` (see :func:`msrdarts.ops.record_input_sizes`).
    """
    count = 0
    for conv in model.modules():
        if isinstance(conv, OpConv) and not parametrize.is_parametrized(conv, "weight"):
            if conv.input_hw is None:
                raise RuntimeError("record_input_sizes() must run before apply_spectral_norm()")
            parametrize.register_parametrization(
                conv, "weight", ConvSpectralNorm(conv, conv.input_hw, n_power_iterations, target=target))
            count += 1
    return count

