"""Brute-force references for the conv-operator tests.

Everything here builds the dense matrix of a convolution by applying it to every unit impulse of
its input space, in float64. It deliberately shares no code with ``msrdarts``: the circular
operator is built from index-based circular padding plus ``F.conv2d`` (no FFT), the zero-padding
operator from ``F.conv2d`` with the conv's real geometry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def impulses(C: int, H: int, W: int) -> torch.Tensor:
    """All C*H*W unit impulses, shape (C*H*W, C, H, W), float64."""
    n = C * H * W
    return torch.eye(n, dtype=torch.float64).reshape(n, C, H, W)


def circular_pad(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Circular padding by index arithmetic; valid for any pad amount (wraps as often as needed)."""
    H, W = x.shape[-2:]
    rows = torch.arange(-ph, H + ph) % H
    cols = torch.arange(-pw, W + pw) % W
    return x[:, :, rows][:, :, :, cols]


def dense_circular(weight: torch.Tensor, H: int, W: int, dilation: int = 1, groups: int = 1) -> torch.Tensor:
    """Dense matrix (C_out*H*W, C_in*H*W) of the stride-1 circular-boundary conv on an H x W input."""
    w = weight.detach().to(torch.float64)
    c_out, c_in_g, kh, kw = w.shape
    c_in = c_in_g * groups
    x = impulses(c_in, H, W)
    xp = circular_pad(x, dilation * (kh // 2), dilation * (kw // 2))
    y = F.conv2d(xp, w, None, 1, 0, dilation, groups)
    assert y.shape[-2:] == (H, W), y.shape
    return y.reshape(x.shape[0], -1).t().contiguous()


def dense_conv(weight: torch.Tensor, input_hw, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """Dense matrix (out_numel, in_numel) of the zero-padding conv with its real geometry."""
    w = weight.detach().to(torch.float64)
    H, W = _pair(input_hw)
    c_in = w.shape[1] * groups
    x = impulses(c_in, H, W)
    y = F.conv2d(x, w, None, _pair(stride), _pair(padding), _pair(dilation), groups)
    return y.reshape(x.shape[0], -1).t().contiguous()


def dense_of(conv, input_hw=None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Dense zero-padding operator of an ``nn.Conv2d`` (its current ``weight`` unless given)."""
    hw = input_hw if input_hw is not None else conv.input_hw
    w = conv.weight if weight is None else weight
    return dense_conv(w, hw, conv.stride, conv.padding, conv.dilation, conv.groups)


def op_norm(A: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(A)[0])


def stable_rank_dense(A: torch.Tensor) -> float:
    s = torch.linalg.svdvals(A)
    return float(s.square().sum() / s[0].square())


def spectrum_formula(weight: torch.Tensor, H: int, W: int, dilation: int = 1) -> torch.Tensor:
    """K^(f) straight from the SPEC formula, shape (H, W, C_out, C_in/groups), complex128.

    K^(f) = sum_{p,q} K[:, :, p, q] exp(-2 pi i (d p f1 / H + d q f2 / W)).
    """
    w = weight.detach().to(torch.float64)
    kh, kw = w.shape[-2:]
    f1 = torch.arange(H, dtype=torch.float64)
    f2 = torch.arange(W, dtype=torch.float64)
    p = torch.arange(kh, dtype=torch.float64)
    q = torch.arange(kw, dtype=torch.float64)
    ph1 = torch.exp(-2j * torch.pi * dilation * f1[:, None] * p[None, :] / H)  # (H, kh)
    ph2 = torch.exp(-2j * torch.pi * dilation * f2[:, None] * q[None, :] / W)  # (W, kw)
    return torch.einsum("ap,bq,oipq->aboi", ph1, ph2, w.to(torch.complex128))
