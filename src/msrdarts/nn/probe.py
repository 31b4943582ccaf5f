"""The circular probe: where a depthwise conv's top singular vectors are likely to be (SPEC section 2).

With circular instead of zero padding a conv is diagonalised by the Fourier basis, so its top
singular vector is a plane wave at the peak of the kernel's spectrum (:func:`circular_top_vectors`,
:func:`circular_probe`). The zero-padded operator differs only at the border, so that wave, under a
sine window (:func:`depthwise_circular_probe`), holds much of the top of the real operator: the
spectral norms start their power iterations and their refreshes from it, and the first block
step of every training forward takes it as an extra vector
(:func:`with_probe`), so that a singular value training lifts from outside the tracked block is
seen at the next step. A heuristic for strided convs, whose spectrum folds; where two peaks are
nearly equal the per-conv and the batched paths may pick different ones.
"""

from __future__ import annotations

import math
import torch

from .block_power import normalize_groups
from .spectrum import kernel_spectrum


@torch.no_grad()
def circular_top_vectors(weight: torch.Tensor, input_hw: tuple[int, int], dilation: int, groups: int) -> torch.Tensor:
    """Per group, a top right singular vector of the conv with *circular* boundary, shape (1, C_in, H, W).

    It is Re(r exp(2 pi i f.x)) at the frequency f of the largest singular value of K^(f)
    (msrdarts.nn.spectrum), a real eigenvector of A^T A. The zero-padded operator differs only at the
    border, so this starts power iteration close to its answer.
    """
    H, W = input_hw
    spec = kernel_spectrum(weight, input_hw, dilation, groups).permute(2, 0, 1, 3, 4)  # (g, H, W, co/g, ci/g)
    if spec.shape[-1] == 1:  # depthwise: K^(f) is a column; its norm is the singular value, r = 1
        s = spec.abs().square().sum(-2).squeeze(-1)                            # (g, H, W)
        top = s.flatten(1).argmax(1)
        r = torch.ones(groups, 1, dtype=spec.dtype, device=spec.device)
    else:
        _, sv, vh = torch.linalg.svd(spec)
        top = sv[..., 0].flatten(1).argmax(1)                                 # (g,) flat frequency index
    f1, f2 = top // W, top % W
    if spec.shape[-1] != 1:
        r = vh[torch.arange(groups), f1, f2, 0]                                # (g, ci/g) complex
    ys = torch.arange(H, device=weight.device, dtype=r.real.dtype)
    xs = torch.arange(W, device=weight.device, dtype=r.real.dtype)
    phase = 2 * math.pi * (f1[:, None, None] * ys[None, :, None] / H + f2[:, None, None] * xs[None, None, :] / W)
    wave = torch.polar(torch.ones_like(phase), phase)                        # (g, H, W)
    u = (r[:, :, None, None] * wave[:, None]).real                           # (g, ci/g, H, W)
    return normalize_groups(u.reshape(1, -1, H, W).to(weight.dtype), groups, 1e-12)


@torch.no_grad()
def circular_probe(weight: torch.Tensor, input_hw: tuple[int, int], dilation: tuple[int, int], groups: int,
                   eps: float) -> torch.Tensor:
    """Where power iteration starts and what a refresh probes with, (1, C_in, H, W), unit per group:
    the circular top vectors (:func:`circular_top_vectors`) where the dilation is the same along
    both axes, else the uniform vector."""
    if dilation[0] == dilation[1]:
        return circular_top_vectors(weight, input_hw, dilation[0], groups)
    return normalize_groups(weight.new_ones(1, weight.shape[1] * groups, *input_hw), groups, eps)


def circular_probe_tables(kernel_size: tuple[int, int], dilation: tuple[int, int], input_hw: tuple[int, int],
                          dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For :func:`depthwise_circular_probe`: the real and imaginary parts' DFT of each kernel tap
    on the H x W torus, (k*k, 2F) for the F = H * (W // 2 + 1) frequencies of a real signal, and
    the cosine wave of each frequency under a sine window, unit (F, H*W)."""
    (H, W), (kh, kw) = input_hw, kernel_size
    fy = torch.arange(H, dtype=torch.float64)[:, None].expand(H, W // 2 + 1).reshape(-1)
    fx = torch.arange(W // 2 + 1, dtype=torch.float64)[None, :].expand(H, W // 2 + 1).reshape(-1)
    ty = (dilation[0] * torch.arange(kh, dtype=torch.float64))[:, None].expand(kh, kw).reshape(-1)
    tx = (dilation[1] * torch.arange(kw, dtype=torch.float64))[None, :].expand(kh, kw).reshape(-1)
    phase = 2 * math.pi * (ty[:, None] * fy[None] / H + tx[:, None] * fx[None] / W)     # (k*k, F)
    dft = torch.cat([torch.cos(phase), torch.sin(phase)], 1)
    ys, xs = torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64)
    waves = torch.cos(2 * math.pi * (fy[:, None, None] * ys[:, None] / H + fx[:, None, None] * xs[None, :] / W))
    # under a sine window that vanishes past the border: the zero-padded operator's top singular
    # vectors taper there, so the windowed wave is the closer start
    window = torch.sin(math.pi * (ys + 1) / (H + 1))[:, None] * torch.sin(math.pi * (xs + 1) / (W + 1))[None, :]
    waves = (waves * window).flatten(1)
    waves = waves / waves.norm(dim=1, keepdim=True)
    return dft.to(dtype=dtype, device=device), waves.to(dtype=dtype, device=device)


@torch.no_grad()
def depthwise_circular_probe(weight: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per channel of the depthwise conv ``weight`` (C, 1, k, k), the unit cosine wave (C, H*W) at
    the frequency where its circular-boundary spectrum peaks, under a sine window (a vector of the
    circular operator's top singular subspace, :func:`circular_top_vectors` without its complex
    phase, tapered as the zero-padded operator's top vectors are), in two small matrix products
    and a lookup, with ``tables`` from :func:`circular_probe_tables`. What the block power steps
    take as an extra vector (:func:`with_probe`). For a
    strided conv it is a heuristic (its circular operator's top vector mixes aliased frequencies);
    the argmax can pick another of two near-equal peaks where rounding differs (fused against
    reference path, or TF32 on a GPU), which changes the start, not the result's bound."""
    dft, waves = tables
    spec = weight.flatten(1) @ dft                                                  # (C, 2F): re, im
    re, im = spec.chunk(2, 1)
    return waves.index_select(0, (re.square() + im.square()).argmax(1))


def with_probe(basis: torch.Tensor, weight: torch.Tensor, geometry: tuple, tables: dict) -> torch.Tensor:
    """The block's basis (groups, b-1, n) and, as an extra b-th row, the depthwise conv ``weight``'s
    :func:`depthwise_circular_probe` (``geometry``: kernel size, dilation and input map; ``tables``
    caches :func:`circular_probe_tables` per geometry, dtype and device): the one place both the
    per-conv and the batched block steps build it. The block step on the b + 1 vectors keeps the
    top b Ritz directions (``rows`` of :func:`msrdarts.nn.block_power.block_coefficients`): the
    probe adds a direction without displacing a tracked one, so a singular value rising from
    below the tracked ones stays in the block while it overtakes, and where the probe holds some
    of a top singular vector outside the block, the step's top Ritz vector takes it in, however
    small its share against the probe's weight on lower singular vectors. (When the probe took the
    block's last slot instead, it needed power steps of its own to keep such a share; as an extra
    vector it does not: ``bench/sn_accuracy.py`` measured the same accuracy without them.)"""
    key = (*geometry, weight.dtype, weight.device)
    if key not in tables:
        tables[key] = circular_probe_tables(*key)
    probe = depthwise_circular_probe(weight, tables[key]).view(basis.shape[0], 1, -1)
    return torch.cat([basis, probe.to(basis.dtype)], 1)
