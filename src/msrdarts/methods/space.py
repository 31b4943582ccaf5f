"""Search spaces by name, and uniform random genotypes from them (the random-search baseline).

A cell of ``steps`` intermediate nodes: node 2+i takes two *distinct* inputs among nodes 0..1+i
(an unordered pair, as DARTS derivation keeps the two strongest distinct edges), each through
one op of the space. ``none`` is never part of a genotype. Every architecture is equally likely:
the pair is drawn uniformly among the C(2+i, 2) pairs and each op uniformly, so a cell has
prod_i C(2+i, 2) * |ops|^2 equally likely outcomes (:func:`count_cells`), and a genotype
(normal, reduce) their square.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Callable, Sequence

import torch

from ..errors import ConfigError
from ..genotype import Genotype, pairs
from ..primitives import space_ops


def count_cells(num_ops: int, steps: int = 4) -> int:
    """How many distinct cells a space of ``num_ops`` ops has."""
    return math.prod(math.comb(2 + i, 2) * num_ops ** 2 for i in range(steps))


def sample_cell(ops: Sequence[str], generator: torch.Generator, steps: int = 4) -> list[tuple[str, int]]:
    """One cell, uniform over :func:`count_cells`; each node's pair is listed by input node."""
    cell = []
    for i in range(steps):
        choices = list(combinations(range(2 + i), 2))
        a, b = choices[int(torch.randint(len(choices), (), generator=generator))]
        for inp in (a, b):
            cell.append((ops[int(torch.randint(len(ops), (), generator=generator))], inp))
    return cell


def sample_genotype(ops: Sequence[str], generator: torch.Generator, steps: int = 4) -> Genotype:
    """A genotype with independent uniform normal and reduction cells, all nodes concatenated."""
    concat = tuple(range(2, 2 + steps))
    return Genotype(pairs(sample_cell(ops, generator, steps)), concat, pairs(sample_cell(ops, generator, steps)),
                    concat)


def sample_genotypes(space: str, n: int, seed: int, params_m: float | None = None, tolerance: float = 0.1,
                     count_params_m: Callable[[Genotype], float] | None = None, max_draws_per_sample: int = 500
                     ) -> list[tuple[Genotype, int]]:
    """``n`` genotypes of ``space`` drawn with ``seed``, each with the number of draws it took.

    With ``params_m``, draws outside ``params_m * (1 +- tolerance)`` million parameters (as
    ``count_params_m`` counts them) are rejected: uniform over the genotypes within the budget.
    """
    ops = space_ops(space)
    if n < 1:
        raise ConfigError(f"--n={n}: must be a positive integer")
    if params_m is not None:
        if params_m <= 0 or not 0 < tolerance < 1:
            raise ConfigError(f"--params-m={params_m} --tolerance={tolerance}: need params-m > 0 and 0 < tolerance < 1")
        if count_params_m is None:
            raise ValueError("a parameter budget needs count_params_m")
    g = torch.Generator().manual_seed(seed)
    out: list[tuple[Genotype, int]] = []
    seen: list[float] = []
    while len(out) < n:
        for draws in range(1, max_draws_per_sample + 1):
            geno = sample_genotype(ops, g)
            if params_m is None:
                break
            p = count_params_m(geno)
            seen.append(p)
            if abs(p - params_m) <= tolerance * params_m:
                break
        else:
            raise ConfigError(f"--params-m={params_m}: no genotype within {tolerance:.0%} in {max_draws_per_sample} "
                              f"draws; the drawn ones had {min(seen):.2f}M to {max(seen):.2f}M parameters "
                              f"(change --layers/--channels or --tolerance)")
        out.append((geno, draws))
    return out
