"""MSR-DARTS (SPEC sections 2-4): no architecture parameters; the architecture is read off the
trained weights by minimum stable rank.

Every edge sums its ops (``mixing="sum"``, the paper) or weights them by softmax(-R) over the
op stable ranks R of that edge in that cell (``mixing="srsoftmax"``, the authors' code),
refreshed at the start of every epoch. After each epoch: per edge the op whose last conv has
the lowest stable rank (averaged over the cells of a type), per node the 2 lowest edges.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..genotype import CellGenotypes, Genotype
from ..primitives import convless
from .base import Derivation, Method, register_method
from .derive import derive_cells, derive_genotype
from .stable_rank import cell_types, stable_rank_table, stable_ranks


@register_method
class MSR(Method):
    name = "msr"
    defaults = {"spectral_norm": True}
    owns = ("mixing", "select", "authors_reduce_resolution", "rank_per_pixel")
    score_key = "stable_rank"
    lower_wins = True

    @classmethod
    def validate(cls, cfg: Any) -> None:
        missing = convless(cfg.ops)
        if missing:
            where = f"--space={cfg.space}" if cfg.space else "--primitives"
            raise ConfigError(f"{where}: MSR-DARTS ranks ops by the stable rank of their last conv; "
                              f"{', '.join(missing)} have none (allowed: sep_conv_*, dil_conv_*; --space msr)")

    def adapt(self, net: nn.Module) -> None:
        if self.cfg.mixing == "srsoftmax":
            use_srsoftmax(net)

    def new_epoch(self, epoch: int, fresh: bool) -> None:
        # a resumed epoch keeps the mixing weights it started with (they are in the checkpoint)
        if fresh and self.cfg.mixing == "srsoftmax":
            # the authors' raw ranks (per-pixel ranks would soften the softmax)
            refresh_mixing(self.net, authors_quirk=self.cfg.authors_reduce_resolution)

    def setup(self, net: nn.Module, weight_optimizer: torch.optim.Optimizer, ctx: Any) -> None:
        self.net = net

    def derive(self, net: nn.Module) -> Derivation:
        """Mean and per-cell genotypes from the stable ranks at this epoch."""
        ranks = stable_ranks(net, resolution_normalized=self.cfg.rank_per_pixel,
                             authors_quirk=self.cfg.authors_reduce_resolution)
        is_red = cell_types(net).to(ranks.device)
        table = torch.stack([ranks[~is_red].mean(0), ranks[is_red].mean(0)]).cpu()
        ranks = ranks.cpu()
        genotype, cells = select_by_rank(table, ranks, is_red.tolist(), net.primitives, self.cfg.select,
                                         net.steps, net.multiplier)
        # the authors' ablation, read off the same weights (their search wrote it beside the min files)
        top, top_cells = select_by_rank(table, ranks, is_red.tolist(), net.primitives, "max", net.steps,
                                        net.multiplier)
        return Derivation(table, genotype, ranks, cells, {"max": top, "cells-max": top_cells})


def select_by_rank(table: torch.Tensor, ranks: torch.Tensor, reduction: list[bool], primitives: Sequence[str],
                   select: str = "min", steps: int = 4, multiplier: int = 4) -> tuple[Genotype, CellGenotypes]:
    """MSR-DARTS's choice (SPEC sections 4, 4a): from the per-type mean table (2, edges, ops) the
    genotype, and from every cell's own table (layers, edges, ops) one genotype per cell.
    ``select="min"``: the op and edges of lowest stable rank (the method); ``"max"``: of highest
    (the authors' ablation). The shared routine minimises costs, so max passes -R."""
    sign = 1.0 if select == "min" else -1.0
    genotype = derive_genotype(sign * table[0], sign * table[1], primitives, steps, multiplier)
    return genotype, derive_cells(sign * ranks, reduction, primitives, steps, multiplier)


def use_srsoftmax(net: nn.Module) -> nn.Module:
    """Weight every edge's ops by softmax(-R) of their stable ranks in that cell (the authors' code):
    a ``mix`` buffer (edges, ops) per cell, set now and by :func:`refresh_mixing`."""
    for cell in net.cells:
        cell.register_buffer("mix", torch.ones(len(cell.edges), len(net.primitives),
                                               device=net.classifier.weight.device))
    net.mixer = cell_mix
    refresh_mixing(net)
    return net


def cell_mix(net: nn.Module, cell: nn.Module) -> torch.Tensor:
    """srsoftmax mixing: the weights stored in the cell (refreshed by :func:`refresh_mixing`)."""
    return cell.mix


@torch.no_grad()
def refresh_mixing(net: nn.Module, resolution_normalized: bool = False, authors_quirk: bool = False) -> None:
    """srsoftmax: set every cell's edge weights to softmax(-R) of that cell's op stable ranks."""
    ranks = stable_ranks(net, resolution_normalized, authors_quirk)
    for cell, r in zip(net.cells, ranks):
        cell.mix.copy_(torch.softmax(-r.double(), dim=-1).to(cell.mix))


def msr_genotype(net: nn.Module, resolution_normalized: bool = False, authors_quirk: bool = False) -> Genotype:
    """The architecture read off a supernet's weights: per edge argmin Rbar, per node the 2 lowest."""
    table = stable_rank_table(net, resolution_normalized, authors_quirk)
    return derive_genotype(table[0], table[1], net.primitives, net.steps, net.multiplier)
