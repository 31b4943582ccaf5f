"""PC-DARTS (Xu et al., ICLR 2020), ``msrdarts search --method pc-darts``: DARTS with partial
channel connections and edge normalisation (SPEC section 10).

* **Partial channels.** Every edge is a :class:`msrdarts.nn.edges.PartialMixedOp`: its ops see
  1/K of the input channels (``--partial-channels K``), the rest bypass them, then a channel
  shuffle. The supernet is built with that edge; its forward is the reference one.
* **Edge normalisation.** Parameters ``betas`` (2, edges), one per edge and cell type, drawn as
  1e-3 * N(0, 1) like the alphas; node j sums its incoming edges weighted by softmax over those
  edges' betas. They are architecture parameters: the same Adam steps as the alphas train them.
* **Derivation.** The strength of op o on edge (i, j) is softmax(beta)_{i->j} x softmax(alpha)_o;
  per edge the strongest op but ``none``, per node the 2 edges whose strongest such op is
  strongest (the shared routine on the product table, as PC-DARTS's ``genotype()``).
* **Warm-up.** No architecture steps in the first ``--arch-start`` epochs (15 on CIFAR-10).

What stays DARTS's (:mod:`msrdarts.methods.darts`): the Architect (first order by default, as
PC-DARTS's code; ``--order 2`` unrolls), its Adam settings, the search-valid batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..genotype import num_edges
from ..nn.edges import partial_channel_edge
from .base import Derivation, register_method
from .darts import DARTS, add_alphas, alpha_table
from .derive import derive_genotype


@register_method
class PCDARTS(DARTS):
    name = "pc-darts"
    defaults = {"spectral_norm": False}
    owns = DARTS.owns + ("partial_channels",)
    #: softmax(beta) x softmax(alpha) per (edge, op): what derivation ranks.
    score_key = "strength"
    lower_wins = False

    @classmethod
    def validate(cls, cfg: Any) -> None:
        super().validate(cfg)
        if cfg.channels % cfg.partial_channels or cfg.channels // cfg.partial_channels < 2:
            raise ConfigError(f"--partial-channels={cfg.partial_channels}: must divide --channels={cfg.channels} "
                              f"into parts of at least 2 channels (each edge sends channels/K of its input through "
                              f"its ops)")
        if cfg.impl == "fused":
            raise ConfigError("--method pc-darts: partial-channel edges have no fused forward; use --impl reference "
                              "or auto")

    @classmethod
    def supernet_options(cls, cfg: Any) -> dict[str, Any]:
        return {"edge": partial_channel_edge(cfg.partial_channels)}

    def adapt(self, net: nn.Module) -> None:
        add_betas(add_alphas(net))
        for p in net.arch_parameters():   # trained by the Architect's own steps only
            p.requires_grad_(False)

    def derive(self, net: nn.Module) -> Derivation:
        table = strength_table(net).cpu()
        betas = beta_table(net).cpu()
        return Derivation(table, derive_genotype(-table[0], -table[1], net.primitives, net.steps, net.multiplier,
                                                 exclude=("none",)),
                          extra={"beta": {"normal": betas[0].tolist(), "reduce": betas[1].tolist()}})


def add_betas(net: nn.Module) -> nn.Module:
    """Give a supernet (with alphas) PC-DARTS's edge parameters ``betas`` (2, edges), drawn as
    1e-3 * N(0, 1), and edge normalisation: softmax over each node's incoming edges."""
    net.register_parameter("betas", nn.Parameter(
        1e-3 * torch.randn(2, num_edges(net.steps), device=net.alphas.device)))
    net.arch_parameter_names = (*net.arch_parameter_names, "betas")
    net.edge_mixer = softmax_beta
    return net


def node_softmax(betas: torch.Tensor, steps: int) -> torch.Tensor:
    """softmax of ``betas`` (..., edges) over each node's incoming edges (node j: 2 + j of them)."""
    parts, start = [], 0
    for j in range(steps):
        parts.append(torch.softmax(betas[..., start:start + 2 + j], dim=-1))
        start += 2 + j
    return torch.cat(parts, dim=-1)


def softmax_beta(net: nn.Module, cell: nn.Module) -> torch.Tensor:
    """PC-DARTS's edge weights of the cell's type, (edges,)."""
    return node_softmax(net.betas[int(cell.reduction)], net.steps)


def beta_table(net: nn.Module) -> torch.Tensor:
    """The normalised edge weights per cell type, shape (2, edges): [normal, reduce]."""
    return node_softmax(net.betas.detach().float(), net.steps)


def strength_table(net: nn.Module) -> torch.Tensor:
    """softmax(beta) x softmax(alpha) per cell type, edge and op, shape (2, edges, ops)."""
    return alpha_table(net) * beta_table(net)[..., None]
