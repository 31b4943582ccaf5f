"""Singular values and stable rank of a convolution viewed as a linear operator (SPEC section 3).

With circular boundary a stride-1 conv on an H x W input is block-circulant: its singular values
are the union over the H*W frequencies f of the singular values of the C_out x C_in matrices
K^(f) = sum_{p,q} K[:, :, p, q] exp(-2 pi i (d p f1 / H + d q f2 / W)) (block-diagonal when the
conv is grouped). One ``torch.fft.fft2`` gives every K^(f); one batched ``svdvals`` gives all
singular values. Computation is in float32 at least (float64 stays float64).
"""

from __future__ import annotations

import torch


def _as_float(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach()
    return w if w.dtype == torch.float64 else w.float()


def _check(weight: torch.Tensor, input_size: tuple[int, int], dilation: int, groups: int) -> tuple[int, int]:
    if weight.dim() != 4:
        raise ValueError(f"conv weight must be 4-D (C_out, C_in/groups, k, k), got shape {tuple(weight.shape)}")
    if weight.shape[0] % groups:
        raise ValueError(f"C_out={weight.shape[0]} is not divisible by groups={groups}")
    H, W = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if H < 1 or W < 1 or dilation < 1:
        raise ValueError(f"input_size {input_size} and dilation {dilation} must be positive")
    return H, W


def kernel_spectrum(weight: torch.Tensor, input_size: tuple[int, int] | int, dilation: int = 1,
                    groups: int = 1) -> torch.Tensor:
    """All K^(f) as a complex tensor of shape (H, W, groups, C_out/groups, C_in/groups)."""
    H, W = _check(weight, input_size, dilation, groups)
    w = _as_float(weight)
    c_out, c_in_g, kh, kw = w.shape
    # Scatter the (dilated) taps onto an H x W grid; taps that wrap onto the same pixel add up,
    # exactly as they do in a circular convolution. A shift of the whole kernel only changes
    # each K^(f) by a unit phase, so the tap origin does not matter for singular values.
    rows = (dilation * torch.arange(kh, device=w.device)) % H
    cols = (dilation * torch.arange(kw, device=w.device)) % W
    grid = w.new_zeros(H, W, c_out, c_in_g)
    grid.index_put_((rows[:, None], cols[None, :]), w.permute(2, 3, 0, 1), accumulate=True)
    spec = torch.fft.fft2(grid, dim=(0, 1))  # (H, W, C_out, C_in/g), complex
    return spec.reshape(H, W, groups, c_out // groups, c_in_g)


def conv_singular_values(weight: torch.Tensor, input_size: tuple[int, int] | int, dilation: int = 1,
                         groups: int = 1) -> torch.Tensor:
    """Every singular value of the stride-1 conv operator on an H x W input, largest first.

    There are H * W * min(C_out, C_in) of them (groups * min(C_out, C_in) / groups per frequency).
    """
    spec = kernel_spectrum(weight, input_size, dilation, groups)
    return torch.linalg.svdvals(spec).flatten().sort(descending=True).values


def conv_stable_rank(weight: torch.Tensor, input_size: tuple[int, int] | int, dilation: int = 1,
                     groups: int = 1) -> float:
    """||A||_F^2 / ||A||_2^2 of the conv operator A on an H x W input (circular boundary)."""
    s = conv_singular_values(weight, input_size, dilation, groups)
    return float((s.square().sum() / s[0].square()).item())


def pointwise_stable_ranks(weights: torch.Tensor, pixels: torch.Tensor | float) -> torch.Tensor:
    """Stable ranks of many 1x1 convs at once.

    ``weights`` has shape (N, C_out, C_in) or (N, C_out, C_in, 1, 1); ``pixels`` (scalar or (N,))
    is H*W of each conv's input. A 1x1 conv has K^(f) = K at every frequency, so its operator
    stable rank is H*W times the stable rank of the matrix K. One batched svdvals call.
    """
    if weights.dim() not in (3, 5) or (weights.dim() == 5 and weights.shape[-2:] != (1, 1)):
        raise ValueError(f"expected (N, C_out, C_in[, 1, 1]) weights, got {tuple(weights.shape)}")
    w = _as_float(weights).flatten(2)
    top = torch.linalg.matrix_norm(w, ord=2)
    fro = torch.linalg.matrix_norm(w, ord="fro")
    return (fro / top).square() * torch.as_tensor(pixels, dtype=w.dtype, device=w.device)
