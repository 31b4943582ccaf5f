"""Stable ranks of a supernet's ops (SPEC sections 3-4): the scores MSR-DARTS selects by.

Every candidate op of the MSR space ends in a C x C pointwise conv (its ``last_conv``); its
operator stable rank on an H x W input is H*W times the stable rank of the C x C matrix
(:func:`msrdarts.nn.spectrum.pointwise_stable_ranks`), computed from the raw weight (stable rank
is scale-free, so spectral normalisation does not change it).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..genotype import edge_index
from ..nn.ops import OpConv
from ..nn.supernet import raw_weight
from ..nn.spectrum import pointwise_stable_ranks
from ..primitives import convless


@torch.no_grad()
def stable_ranks(net: nn.Module, resolution_normalized: bool = False, authors_quirk: bool = False) -> torch.Tensor:
    """Stable rank of every op's last conv, shape (layers, edges, ops), float32.

    ``resolution_normalized`` divides by H*W (SPEC section 8); ``authors_quirk`` evaluates the
    stride-1 edges of reduction cells at the cell's input resolution (SPEC section 3). One
    batched computation per cell: all its last convs are C x C pointwise convs.
    """
    missing = convless(net.primitives)
    if missing:
        raise ConfigError(f"stable ranks need conv ops; {', '.join(missing)} have no conv "
                          f"(primitives {', '.join(net.primitives)})")
    rows = []
    for cell in net.cells:
        convs = [op.last_conv for edge in cell.edges for op in edge.ops]
        weights = torch.stack([raw_weight(c).flatten(1) for c in convs])       # (E*O, C, C)
        if any(c.kernel_size != (1, 1) for c in convs):
            raise ConfigError("stable-rank selection expects every op to end in a 1x1 conv")
        pixels = torch.tensor([float(c.input_hw[0] * c.input_hw[1]) for c in convs])
        if resolution_normalized:
            pixels = torch.ones_like(pixels)
        elif authors_quirk and cell.reduction:
            cell_hw = next(m for m in cell.edges[0].modules() if isinstance(m, OpConv)).input_hw
            stride1 = torch.tensor([src >= 2 for src, _ in edge_index(net.steps)]).repeat_interleave(
                len(net.primitives))
            pixels = torch.where(stride1, float(cell_hw[0] * cell_hw[1]), pixels)
        ranks = pointwise_stable_ranks(weights.float(), pixels.to(weights.device))
        rows.append(ranks.reshape(len(cell.edges), len(net.primitives)))
    return torch.stack(rows)


def cell_types(net: nn.Module) -> torch.Tensor:
    """Bool tensor (layers,): True where the cell is a reduction cell."""
    return torch.tensor([cell.reduction for cell in net.cells])


def stable_rank_table(net: nn.Module, resolution_normalized: bool = False, authors_quirk: bool = False
                      ) -> torch.Tensor:
    """Mean stable rank per cell type, shape (2, edges, ops): [normal, reduce] (SPEC section 4)."""
    ranks = stable_ranks(net, resolution_normalized, authors_quirk)
    is_red = cell_types(net).to(ranks.device)
    return torch.stack([ranks[~is_red].mean(0), ranks[is_red].mean(0)])
