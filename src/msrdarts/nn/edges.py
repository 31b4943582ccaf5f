"""Mixed edges of other search methods (SPEC section 10): PC-DARTS's partial-channel edge (Xu et
al., ICLR 2020) and P-DARTS's edge with dropout on its skip connection (Chen et al., 2019).

Partial channels: on every edge only the first C/K channels of the input go through the candidate ops (built for
C/K channels); the other (K-1)C/K channels bypass them, max-pooled 2x2 on stride-2 edges. The two
parts are concatenated, [ops' output, bypass], and channel-shuffled with K groups, so that the
next edge sends a different slice of channels through its ops. A search method builds its
supernet with these edges through ``SuperNet(edge=partial_channel_edge(K))`` (P-DARTS:
``SuperNet(edge=SkipDropMixedOp)``); the supernet itself knows neither method.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .supernet import MixedOp


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's shuffle: channel g * (C/groups) + i moves to i * groups + g."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class PartialMixedOp(MixedOp):
    """A mixed edge whose ops see only the first ``C // k`` channels of their input.

    Args:
        C: channels of the edge's input and output.
        stride: 1, or 2 on the input edges of a reduction cell.
        primitives: the candidate ops (built for ``C // k`` channels).
        k: the channel proportion K (``C`` must be a multiple of it).
    """

    def __init__(self, C: int, stride: int, primitives: Sequence[str], k: int):
        if k < 1 or C % k or C // k < 2:
            raise ValueError(f"partial channels: {C} channels are not a multiple of K = {k} with at least 2 "
                             f"channels per part")
        super().__init__(C // k, stride, primitives)
        self.k, self.stride, self.part = k, stride, C // k

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        through, bypass = x[:, :self.part], x[:, self.part:]
        out = super().forward(through, weights)
        if self.k == 1:   # every channel goes through the ops: DARTS's edge
            return out
        if self.stride != 1:
            # ceil_mode: the same size as the stride-2 ops' output on odd inputs too (PC-DARTS's
            # own 2x2 pool drops the last row and column there, and the concat fails)
            bypass = F.max_pool2d(bypass, 2, 2, ceil_mode=True)
        return channel_shuffle(torch.cat([out, bypass], dim=1), self.k)


def partial_channel_edge(k: int) -> Callable[[int, int, Sequence[str]], nn.Module]:
    """The edge factory of a supernet with partial channels of proportion 1/k."""
    return functools.partial(PartialMixedOp, k=k)


class SkipDropMixedOp(MixedOp):
    """A mixed edge whose identity skip connection passes through dropout of rate ``p`` while
    training (P-DARTS's search regulariser, Chen et al., 2019; SPEC section 10): the skip op becomes
    ``Sequential(Identity, Dropout)``, as in P-DARTS's code. The method sets ``p`` before each
    epoch; stride-2 skips (factorised reductions) are left as they are, as in their code."""

    def __init__(self, C: int, stride: int, primitives: Sequence[str], p: float = 0.0):
        super().__init__(C, stride, primitives)
        self._p = p
        self.skip = next((i for i, (name, op) in enumerate(zip(primitives, self.ops))
                          if name == "skip_connect" and isinstance(op, nn.Identity)), None)
        if self.skip is not None:
            self.ops[self.skip] = nn.Sequential(self.ops[self.skip], nn.Dropout(p))

    @property
    def p(self) -> float:
        """The rate the method set (edges without an identity skip keep it and drop nothing)."""
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        self._p = value
        if self.skip is not None:
            self.ops[self.skip][1].p = value
