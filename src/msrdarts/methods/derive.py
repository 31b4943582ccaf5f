"""The one routine that turns per-edge, per-op scores into a Genotype (SPEC section 4).

Scores are *costs*: lower is better. MSR-DARTS passes the mean stable rank Rbar(e, o); DARTS
passes -softmax(alpha) with excluded ops (``none``) set to +inf. For every edge the op is the
argmin of its costs and the edge's cost is that minimum (strength S'(e) = -min); every
intermediate node keeps its ``keep`` cheapest incoming edges. Ties go to the lower op index and
then to the lower source node. Pairs of one node are listed cheapest first (the DARTS order).

Edges are numbered as in the cell: node j (2..steps+1) receives edges from nodes 0..j-1, node
after node, so node j's edges start at index sum_{i<j}(i) - 1 = (j-2)(j+1)/2.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..genotype import Cell, CellGenotypes, Genotype, num_edges, pairs


def derive_cell(costs: torch.Tensor, primitives: Sequence[str], steps: int = 4, keep: int = 2,
                exclude: Sequence[str] = ()) -> list[tuple[str, int]]:
    """(op, input) pairs of one cell from costs of shape (num_edges(steps), len(primitives))."""
    costs = torch.as_tensor(costs).detach().to("cpu", torch.float64)
    E, O = num_edges(steps), len(primitives)
    if costs.shape != (E, O):
        raise ValueError(f"costs must have shape ({E}, {O}) for {steps} steps and {O} ops, got {tuple(costs.shape)}")
    if exclude:
        mask = torch.tensor([p in exclude for p in primitives])
        costs = costs.masked_fill(mask, float("inf"))
    if torch.isnan(costs).any():
        raise ValueError("costs contain NaN")
    best = costs.min(dim=1).values                                           # (E,)
    op_ids = torch.arange(O).expand(E, O)
    best_op = torch.where(costs == best[:, None], op_ids, O).min(dim=1).values  # first minimum
    # Pad the edges of each node into a (steps, steps + 1) table, +inf where a node has fewer.
    width = steps + 1
    table = torch.full((steps, width), float("inf"), dtype=costs.dtype)
    src = torch.cat([torch.arange(2 + i) for i in range(steps)])
    node = torch.cat([torch.full((2 + i,), i) for i in range(steps)])
    table[node, src] = best
    order = torch.sort(table, dim=1, stable=True).indices[:, :keep]          # cheapest, then lower src
    first_edge = torch.tensor([num_edges(i) for i in range(steps)])
    if not torch.isfinite(table.gather(1, order)).all():
        raise ValueError("a node has fewer finite-cost incoming edges than it must keep")
    chosen_ops = best_op[first_edge[:, None] + order]
    return [(primitives[int(o)], int(s)) for o_row, s_row in zip(chosen_ops, order) for o, s in zip(o_row, s_row)]


def derive_genotype(normal_costs: torch.Tensor, reduce_costs: torch.Tensor, primitives: Sequence[str],
                    steps: int = 4, multiplier: int = 4, exclude: Sequence[str] = ()) -> Genotype:
    """A Genotype from the cost tables of the normal and the reduction cell type."""
    concat = tuple(range(2 + steps - multiplier, steps + 2))
    return Genotype(
        normal=pairs(derive_cell(normal_costs, primitives, steps, exclude=exclude)),
        normal_concat=concat,
        reduce=pairs(derive_cell(reduce_costs, primitives, steps, exclude=exclude)),
        reduce_concat=concat,
    )


def derive_cells(costs: torch.Tensor, reduction: Sequence[bool], primitives: Sequence[str], steps: int = 4,
                 multiplier: int = 4, exclude: Sequence[str] = ()) -> CellGenotypes:
    """One genotype per cell (SPEC section 4a) from each cell's own costs, shape (layers, edges, ops),
    with the same rule and tie breaks as :func:`derive_cell`; ``reduction[k]`` tags cell k."""
    concat = tuple(range(2 + steps - multiplier, steps + 2))
    if len(costs) != len(reduction):
        raise ValueError(f"{len(costs)} cost tables for {len(reduction)} cells")
    return CellGenotypes(tuple(
        Cell("reduce" if red else "normal", pairs(derive_cell(c, primitives, steps, exclude=exclude)), concat)
        for c, red in zip(costs, reduction)))
