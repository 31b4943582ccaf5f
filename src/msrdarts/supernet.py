"""The search network: mixed op, search cell, supernet (CIFAR and ImageNet stems), SPEC sections 1-4.

A mixed edge applies every candidate op to its input and sums the results: with ``mixing="sum"``
plainly (the paper: alpha fixed to 1); with ``mixing="srsoftmax"`` weighted by softmax(-R) over
the op stable ranks R of that edge in that cell (the authors' code), refreshed by
:meth:`SuperNet.refresh_mixing` at the start of every epoch. No architecture parameter is learned.

``mixing="alpha"`` is the DARTS baseline (msrdarts.darts): learned architecture parameters
``alphas`` (2, edges, ops), one table per cell type, mixing by softmax(alpha); they are kept apart
from the weights (:meth:`SuperNet.arch_parameters`, :meth:`SuperNet.weight_parameters`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .derive import derive_genotype, edge_index, num_edges
from .errors import ConfigError
from .fused import FUSABLE_OPS, FusedSuperNet, SpectralBatch, can_fuse, fused_conv_order
from .genotype import Genotype
from .ops import (MSR_PRIMITIVES, OpConv, Stem, cell_preprocess, get_op, record_input_sizes,
                  reduction_layers)
from .spectral import apply_spectral_norm
from .stable_rank import pointwise_stable_ranks

MIXING_MODES = ("sum", "srsoftmax", "alpha")
#: Supernet forward implementations: "fused" (see msrdarts.fused), "reference" (one module call
#: per op), "auto" (fused where the ops allow it).
IMPLS = ("auto", "fused", "reference")


class MixedOp(nn.Module):
    """All candidate ops of one edge, summed (optionally weighted)."""

    def __init__(self, C: int, stride: int, primitives: Sequence[str]):
        super().__init__()
        ops = []
        for name in primitives:
            op = get_op(name)(C, stride, False)
            if "pool" in name:  # DARTS: an affine-free BN after pooling during search
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if weights is None:
            return sum(op(x) for op in self.ops)
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class SearchCell(nn.Module):
    """A cell of mixed edges: node j = sum over i < j of edge (i, j) applied to node i."""

    def __init__(self, steps: int, multiplier: int, C_pp: int, C_p: int, C: int, reduction: bool,
                 reduction_prev: bool, primitives: Sequence[str]):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.pre0, self.pre1 = cell_preprocess(C_pp, C_p, C, reduction_prev, affine=False)
        self.edges = nn.ModuleList(
            MixedOp(C, 2 if reduction and src < 2 else 1, primitives) for src, _ in edge_index(steps))
        # srsoftmax mixing weights, one row per edge (unused, and all ones, with mixing="sum").
        self.register_buffer("mix", torch.ones(num_edges(steps), len(primitives)))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        e = 0
        for _ in range(self.steps):
            node = sum(self.edges[e + i](h, None if weights is None else weights[e + i]) for i, h in enumerate(states))
            e += len(states)
            states.append(node)
        return torch.cat(states[-self.multiplier:], dim=1)


def raw_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The trained weight of a conv, before any spectral normalisation (stable rank is scale-free)."""
    if parametrize.is_parametrized(conv, "weight"):
        return conv.parametrizations.weight.original
    return conv.weight


class SuperNet(nn.Module):
    """The MSR-DARTS supernet.

    Args:
        num_classes: classifier outputs.
        layers: number of cells L (>= 3); reduction cells sit at floor(L/3) and floor(2L/3).
        channels: C, the channels of each node in the first cells (doubled at every reduction).
        input_size: input image side (the spatial size every conv sees is recorded from it).
        stem: ``"cifar"`` or ``"imagenet"`` (see :class:`msrdarts.ops.Stem`).
        primitives: candidate ops of every edge.
        mixing: ``"sum"`` (paper) or ``"srsoftmax"`` (authors' code).
        spectral_norm: spectrally normalise every conv inside every op to operator norm 1.
        sn_iterations: power iterations per training forward of each normalised conv.
        impl: ``"fused"``, ``"reference"`` or ``"auto"`` (fused if every op is a sep/dil conv); both
            compute the same function with the same modules and state.
        compile_kernels: let the fused path compile its large depthwise weight gradients on the
            CPU (:class:`msrdarts.ops.CompiledTaps`; seconds per kernel geometry, once).
    """

    def __init__(self, num_classes: int, layers: int, channels: int, input_size: int, stem: str = "cifar",
                 primitives: Sequence[str] = MSR_PRIMITIVES, mixing: str = "sum", in_channels: int = 3,
                 steps: int = 4, multiplier: int = 4, stem_multiplier: int = 3, spectral_norm: bool = True,
                 sn_iterations: int = 1, impl: str = "auto", compile_kernels: bool = True):
        super().__init__()
        _check_positive(num_classes=num_classes, channels=channels, input_size=input_size, in_channels=in_channels,
                        steps=steps, sn_iterations=sn_iterations)
        if layers < 3:
            raise ConfigError(f"layers={layers}: need at least 3 cells so there are normal and reduction cells")
        if channels < 2:
            raise ConfigError(f"channels={channels}: need at least 2 (FactorizedReduce splits channels in two)")
        if mixing not in MIXING_MODES:
            raise ConfigError(f"unknown mixing {mixing!r}; allowed: {', '.join(MIXING_MODES)}")
        if not primitives or len(set(primitives)) != len(primitives):
            raise ConfigError(f"primitives must be a non-empty list of distinct ops, got {list(primitives)}")
        if not 1 <= multiplier <= steps:
            raise ConfigError(f"multiplier={multiplier} must be in 1..steps={steps}")
        if impl not in IMPLS:
            raise ConfigError(f"impl={impl!r}: unknown; allowed: {', '.join(IMPLS)}")
        if impl == "fused" and not can_fuse(primitives):
            raise ConfigError(f"impl='fused' supports the ops {', '.join(FUSABLE_OPS)}; got {', '.join(primitives)} "
                              f"(use impl='reference')")
        self.impl = impl if impl != "auto" else ("fused" if can_fuse(primitives) else "reference")
        self.primitives = tuple(primitives)
        self.mixing, self.steps, self.multiplier, self.layers = mixing, steps, multiplier, layers
        self.stem = Stem(stem, in_channels, channels, stem_multiplier)
        C_pp, C_p = self.stem.out_channels
        reduction_prev, C_curr = self.stem.reduction_prev, channels
        cells = []
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            if reduction:
                C_curr *= 2
            cells.append(SearchCell(steps, multiplier, C_pp, C_p, C_curr, reduction, reduction_prev, self.primitives))
            reduction_prev = reduction
            C_pp, C_p = C_p, multiplier * C_curr
        self.cells = nn.ModuleList(cells)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)
        self._fused: FusedSuperNet | None = None   # the reference forward records the conv input sizes
        # DARTS: alphas drawn as 1e-3 * N(0, 1), after the weights (a "sum" network draws the same weights).
        self.alphas = nn.Parameter(1e-3 * torch.randn(2, num_edges(steps), len(self.primitives))) \
            if mixing == "alpha" else None
        record_input_sizes(self, torch.zeros(1, in_channels, input_size, input_size))
        # The op convs grouped by geometry for batched spectral norms, in the fused forward's order.
        fusable = can_fuse(self.primitives)
        batch = SpectralBatch(fused_conv_order(self) if fusable else
                              [m for m in self.modules() if isinstance(m, OpConv)])
        if spectral_norm:
            apply_spectral_norm(self, sn_iterations, converge=False)
            batch.converge()
        if mixing == "srsoftmax":
            self.refresh_mixing()
        self._spectral = batch    # for batched refreshes; references this network's own modules
        batch.link()
        self._fused = None
        if self.impl == "fused":   # the plan holds references to this network's own modules, no state
            self._fused = FusedSuperNet(self, batch, compile_kernels)

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.double()`` and the like replace the power-iteration buffers: link the new
        ones into one tensor per bundle again (see :meth:`SpectralBatch.link`)."""
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_spectral", None) is not None:
            self._spectral.link()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            return self._fused(self, x)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The readable definition: every edge a :class:`MixedOp`, every op and conv on its own."""
        s0, s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, self.mixing_weights(cell))
        return self.classifier(self.global_pooling(s1).flatten(1))

    def mixing_weights(self, cell: nn.Module) -> torch.Tensor | None:
        """The (edges, ops) weights of ``cell``'s mixed edges; None for a plain sum."""
        if self.mixing == "srsoftmax":
            return cell.mix
        if self.mixing == "alpha":
            return torch.softmax(self.alphas[int(cell.reduction)], dim=-1)
        return None

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters (DARTS alphas); empty for MSR-DARTS."""
        return [self.alphas] if self.alphas is not None else []

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the architecture's: what the weight optimiser trains."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def alpha_table(self) -> torch.Tensor:
        """softmax(alpha) per cell type, shape (2, edges, ops): [normal, reduce]."""
        return torch.softmax(self.alphas.detach().float(), dim=-1)

    def alpha_genotype(self) -> Genotype:
        """DARTS derivation: per edge the strongest op but ``none`` by softmax(alpha), per node the 2
        strongest edges (the shared routine, with costs -softmax(alpha))."""
        table = self.alpha_table().cpu()
        return derive_genotype(-table[0], -table[1], self.primitives, self.steps, self.multiplier, exclude=("none",))

    def cell_types(self) -> torch.Tensor:
        """Bool tensor (layers,): True where the cell is a reduction cell."""
        return torch.tensor([cell.reduction for cell in self.cells])

    @torch.no_grad()
    def stable_ranks(self, resolution_normalized: bool = False, authors_quirk: bool = False) -> torch.Tensor:
        """Stable rank of every op's last conv, shape (layers, edges, ops), float32.

        ``resolution_normalized`` divides by H*W (SPEC section 8); ``authors_quirk`` evaluates
        the stride-1 edges of reduction cells at the cell's input resolution (SPEC section 3).
        One batched computation per cell: all its last convs are C x C pointwise convs.
        """
        rows = []
        for cell in self.cells:
            convs = []
            for edge in cell.edges:
                for op in edge.ops:
                    if not hasattr(op, "last_conv"):
                        raise ConfigError(f"op {type(op).__name__} has no conv: stable ranks need conv ops only "
                                          f"(primitives {', '.join(self.primitives)})")
                    convs.append(op.last_conv)
            weights = torch.stack([raw_weight(c).flatten(1) for c in convs])       # (E*O, C, C)
            if any(c.kernel_size != (1, 1) for c in convs):
                raise ConfigError("stable-rank selection expects every op to end in a 1x1 conv")
            pixels = torch.tensor([float(c.input_hw[0] * c.input_hw[1]) for c in convs])
            if resolution_normalized:
                pixels = torch.ones_like(pixels)
            elif authors_quirk and cell.reduction:
                cell_hw = next(m for m in cell.edges[0].modules() if isinstance(m, OpConv)).input_hw
                stride1 = torch.tensor([src >= 2 for src, _ in edge_index(self.steps)]).repeat_interleave(
                    len(self.primitives))
                pixels = torch.where(stride1, float(cell_hw[0] * cell_hw[1]), pixels)
            ranks = pointwise_stable_ranks(weights.float(), pixels.to(weights.device))
            rows.append(ranks.reshape(len(cell.edges), len(self.primitives)))
        return torch.stack(rows)

    def stable_rank_table(self, resolution_normalized: bool = False, authors_quirk: bool = False) -> torch.Tensor:
        """Mean stable rank per cell type, shape (2, edges, ops): [normal, reduce] (SPEC section 4)."""
        ranks = self.stable_ranks(resolution_normalized, authors_quirk)
        is_red = self.cell_types().to(ranks.device)
        return torch.stack([ranks[~is_red].mean(0), ranks[is_red].mean(0)])

    def genotype(self, resolution_normalized: bool = False, authors_quirk: bool = False,
                 table: torch.Tensor | None = None) -> Genotype:
        """The architecture read off the weights: per edge argmin Rbar, per node the 2 lowest."""
        if table is None:
            table = self.stable_rank_table(resolution_normalized, authors_quirk)
        return derive_genotype(table[0], table[1], self.primitives, self.steps, self.multiplier)

    def refresh_spectral_norms(self, iterations: int = 3) -> None:
        """:meth:`msrdarts.spectral.ConvSpectralNorm.refresh` for every normalised conv, the 1x1
        convs batched per shape (the search loop calls it every ``sn_refresh_every`` steps)."""
        self._spectral.refresh(iterations)

    @torch.no_grad()
    def refresh_mixing(self, resolution_normalized: bool = False, authors_quirk: bool = False) -> None:
        """srsoftmax: set every cell's edge weights to softmax(-R) of that cell's op stable ranks."""
        ranks = self.stable_ranks(resolution_normalized, authors_quirk)
        for cell, r in zip(self.cells, ranks):
            cell.mix.copy_(torch.softmax(-r.double(), dim=-1).to(cell.mix))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r}: must be a positive integer")
