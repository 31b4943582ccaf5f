"""The search network: mixed op, search cell, supernet (CIFAR and ImageNet stems), SPEC sections 1-4.

A mixed edge applies every candidate op to its input and sums the results. The supernet knows no
search method: a method (``msrdarts.methods``) adapts it by setting ``mixer``, a function of a cell
returning its (edges, ops) mixing weights (DARTS: softmax(alpha); MSR-DARTS with the authors'
``srsoftmax``: softmax(-stable rank)), and by adding its architecture parameters, which it names
in ``arch_parameter_names`` so they stay apart from the weights
(:meth:`SuperNet.arch_parameters`, :meth:`SuperNet.weight_parameters`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..config import check_network, check_ops, check_positive
from ..errors import ConfigError
from ..genotype import edge_index
from ..primitives import MSR_PRIMITIVES, can_fuse, fusable_ops, get_primitive
from .fused import FusedSuperNet, fused_conv_order
from .spectral_batch import SpectralBatch
from .ops import OpConv, Stem, cell_preprocess, get_op, record_input_sizes, reduction_layers
from .spectral import REFRESH_STEPS, REFRESH_TOL, apply_spectral_norm

#: mixer(net, cell) -> the (edges, ops) mixing weights of the cell, or None for plain sums.
Mixer = Callable[[nn.Module, nn.Module], "torch.Tensor | None"]
#: edge_mixer(net, cell) -> the (edges,) weights of the cell's edges in each node's sum, or None.
EdgeMixer = Callable[[nn.Module, nn.Module], "torch.Tensor | None"]
#: edge(C, stride, primitives) -> a mixed edge module (default :class:`MixedOp`).
EdgeFactory = Callable[[int, int, Sequence[str]], nn.Module]


class MixedOp(nn.Module):
    """All candidate ops of one edge, summed (optionally weighted)."""

    def __init__(self, C: int, stride: int, primitives: Sequence[str]):
        super().__init__()
        self.primitives = tuple(primitives)
        ops = []
        for name in primitives:
            op = get_op(name)(C, stride, False)
            if get_primitive(name).search_bn:  # DARTS: an affine-free BN after pooling during search
                op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
            ops.append(op)
        self.ops = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        if weights is None:
            return sum(op(x) for op in self.ops)
        return sum(w * op(x) for w, op in zip(weights, self.ops))


class SearchCell(nn.Module):
    """A cell of mixed edges: node j = sum over i < j of edge (i, j) applied to node i, each edge's
    output optionally scaled by an edge weight (PC-DARTS's edge normalisation)."""

    def __init__(self, steps: int, multiplier: int, C_pp: int, C_p: int, C: int, reduction: bool,
                 reduction_prev: bool, primitives: Sequence[str], edge: EdgeFactory = MixedOp,
                 edge_ops: Sequence[Sequence[str]] | None = None):
        super().__init__()
        self.reduction, self.steps, self.multiplier = reduction, steps, multiplier
        self.pre0, self.pre1 = cell_preprocess(C_pp, C_p, C, reduction_prev, affine=False)
        self.edges = nn.ModuleList(
            edge(C, 2 if reduction and src < 2 else 1, primitives if edge_ops is None else edge_ops[e])
            for e, (src, _) in enumerate(edge_index(steps)))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor | None = None,
                edge_weights: torch.Tensor | None = None) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        e = 0
        for _ in range(self.steps):
            outs = [self.edges[e + i](h, None if weights is None else weights[e + i]) for i, h in enumerate(states)]
            if edge_weights is not None:
                outs = [edge_weights[e + i] * o for i, o in enumerate(outs)]
            e += len(states)
            states.append(sum(outs))
        return torch.cat(states[-self.multiplier:], dim=1)


def check_edge_ops(edge_ops: Sequence[Sequence[Sequence[str]]], primitives: tuple[str, ...], steps: int) -> None:
    """Every edge's candidate ops: a non-empty subset of ``primitives`` in their order, for both types."""
    if len(edge_ops) != 2 or any(len(t) != len(edge_index(steps)) for t in edge_ops):
        raise ConfigError(f"edge_ops: need (normal, reduce), each with {len(edge_index(steps))} edges")
    for kind, table in zip(("normal", "reduce"), edge_ops):
        for e, ops in enumerate(table):
            if not ops or [p for p in primitives if p in ops] != list(ops):
                raise ConfigError(f"edge_ops: {kind} edge {e} has {list(ops)}; need a non-empty subset of "
                                  f"{', '.join(primitives)} in that order")


def raw_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The trained weight of a conv, before any spectral normalisation (stable rank is scale-free)."""
    if parametrize.is_parametrized(conv, "weight"):
        return conv.parametrizations.weight.original
    return conv.weight


class SuperNet(nn.Module):
    """The MSR-DARTS / DARTS search network.

    Args:
        num_classes: classifier outputs.
        layers: number of cells L (>= 3); reduction cells sit at floor(L/3) and floor(2L/3).
        channels: C, the channels of each node in the first cells (doubled at every reduction).
        input_size: input image side (the spatial size every conv sees is recorded from it).
        stem: ``"cifar"`` or ``"imagenet"`` (see :class:`msrdarts.nn.ops.Stem`).
        primitives: candidate ops of every edge.
        spectral_norm: spectrally normalise every conv inside every op to operator norm 1.
        sn_iterations: power iterations per training forward of each normalised conv.
        impl: ``"fused"``, ``"reference"`` or ``"auto"`` (fused if every op is a sep/dil conv); both
            compute the same function with the same modules and state.
        compile_kernels: let the fused path compile its large depthwise weight gradients on the
            CPU (:class:`msrdarts.nn.kernels.CompiledTaps`; seconds per kernel geometry, once).
        edge: the factory of the mixed edges, ``edge(C, stride, primitives)`` (a method's own edge,
            e.g. PC-DARTS's :class:`msrdarts.nn.edges.PartialMixedOp`; only the default
            :class:`MixedOp` has a fused forward).
        edge_ops: the candidate ops of every edge, ``(normal, reduce)``, each one tuple of op
            names per edge (P-DARTS's edges after op dropping: each a subset of ``primitives``, in
            their order); None: every edge has all of ``primitives``.
        checkpoint_cells: keep only each cell's inputs for the backward and run the cell again
            there (activation checkpointing; fused forward only): less memory, more compute.
        recompute_depthwise: keep only each ReLU-depthwise-pointwise-BN block's input and output
            for the backward and compute its depthwise conv again there (fused forward only): under
            half the activations of the plain fused step, for about 1.2x its time (BENCHMARKS.md).

    Every edge sums its ops, and every node its edges, until a search method sets :attr:`mixer`
    (op weights per edge) or :attr:`edge_mixer` (a weight per edge).
    """

    def __init__(self, num_classes: int, layers: int, channels: int, input_size: int, stem: str = "cifar",
                 primitives: Sequence[str] = MSR_PRIMITIVES, in_channels: int = 3,
                 steps: int = 4, multiplier: int = 4, stem_multiplier: int = 3, spectral_norm: bool = True,
                 sn_iterations: int = 1, impl: str = "auto", compile_kernels: bool = True,
                 edge: EdgeFactory = MixedOp, edge_ops: Sequence[Sequence[Sequence[str]]] | None = None,
                 checkpoint_cells: bool = False, recompute_depthwise: bool = False):
        super().__init__()
        check_positive(num_classes=num_classes, input_size=input_size, in_channels=in_channels, steps=steps,
                       sn_iterations=sn_iterations)
        check_network(layers, channels)
        check_ops(tuple(primitives), impl)
        if not 1 <= multiplier <= steps:
            raise ConfigError(f"multiplier={multiplier} must be in 1..steps={steps}")
        if edge_ops is not None:
            check_edge_ops(edge_ops, tuple(primitives), steps)
        fusable = can_fuse(primitives) and edge is MixedOp and edge_ops is None
        if impl == "fused" and not fusable:
            raise ConfigError("--impl=fused: this search method's mixed edges have no fused forward; "
                              "use --impl reference (or auto)")
        self.impl = impl if impl != "auto" else ("fused" if fusable else "reference")
        for flag, on in (("--checkpoint-cells", checkpoint_cells), ("--recompute-depthwise", recompute_depthwise)):
            if on and self.impl != "fused":
                raise ConfigError(f"{flag}: needs the fused supernet forward (the ops {', '.join(fusable_ops())}, "
                                  "mixed edges of MSR-DARTS or DARTS, --impl fused or auto)")
        self.primitives = tuple(primitives)
        self.steps, self.multiplier, self.layers = steps, multiplier, layers
        self.stem = Stem(stem, in_channels, channels, stem_multiplier)
        C_pp, C_p = self.stem.out_channels
        reduction_prev, C_curr = self.stem.reduction_prev, channels
        cells = []
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            if reduction:
                C_curr *= 2
            cells.append(SearchCell(steps, multiplier, C_pp, C_p, C_curr, reduction, reduction_prev, self.primitives,
                                    edge, None if edge_ops is None else edge_ops[int(reduction)]))
            reduction_prev = reduction
            C_pp, C_p = C_p, multiplier * C_curr
        self.cells = nn.ModuleList(cells)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)
        #: The mixing weights of a cell's edges, set by a search method (None: plain sums).
        self.mixer: Mixer | None = None
        #: The weights of a cell's edges in each node's sum, set by a search method (None: plain sums).
        self.edge_mixer: EdgeMixer | None = None
        #: Names of the architecture parameters a search method added (DARTS: ("alphas",)).
        self.arch_parameter_names: tuple[str, ...] = ()
        self._fused: FusedSuperNet | None = None   # the reference forward records the conv input sizes
        record_input_sizes(self, torch.zeros(1, in_channels, input_size, input_size))
        # The op convs grouped by geometry for batched spectral norms, in the fused forward's order.
        batch = SpectralBatch(fused_conv_order(self) if fusable else
                              [m for m in self.modules() if isinstance(m, OpConv)])
        if spectral_norm:
            apply_spectral_norm(self, sn_iterations, converge=False)
            batch.converge()
        self._spectral = batch    # for batched refreshes; references this network's own modules
        batch.link()
        if self.impl == "fused":   # the plan holds references to this network's own modules, no state
            self._fused = FusedSuperNet(self, batch, compile_kernels, checkpoint_cells, recompute_depthwise)

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.double()`` and the like replace the power-iteration buffers: link the new
        ones into one tensor per bundle again (see :meth:`SpectralBatch.link`), and convert the
        drift reference alike."""
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_spectral", None) is not None:
            self._spectral.link()
            self._spectral.apply_to_drift_reference(fn)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            if self.edge_mixer is not None:
                raise ConfigError("edge weights (edge_mixer) need the reference forward: build the supernet with "
                                  "impl='reference'")
            return self._fused(self, x)
        return self.forward_reference(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The readable definition: every edge a :class:`MixedOp`, every op and conv on its own."""
        s0, s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, self.mixing_weights(cell), self.edge_weights(cell))
        return self.classifier(self.global_pooling(s1).flatten(1))

    def mixing_weights(self, cell: nn.Module) -> torch.Tensor | None:
        """The (edges, ops) weights of ``cell``'s mixed edges; None for a plain sum."""
        return None if self.mixer is None else self.mixer(self, cell)

    def edge_weights(self, cell: nn.Module) -> torch.Tensor | None:
        """The (edges,) weights of ``cell``'s edges in each node's sum; None for a plain sum."""
        return None if self.edge_mixer is None else self.edge_mixer(self, cell)

    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture parameters a search method added (DARTS alphas); empty for MSR-DARTS."""
        return [getattr(self, n) for n in self.arch_parameter_names]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the architecture's: what the weight optimiser trains."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    @property
    def recompute_depthwise(self) -> bool:
        """Whether training steps recompute the depthwise convs in the backward (see ``__init__``)."""
        return self._fused is not None and self._fused.recompute_depthwise

    def set_recompute_depthwise(self, on: bool) -> None:
        """Turn ``recompute_depthwise`` on or off after building (the same function and gradients
        either way; ``--recompute-depthwise auto`` decides once it knows the batch and the device)."""
        if on and self._fused is None:
            raise ConfigError(f"--recompute-depthwise: needs the fused supernet forward (the ops "
                              f"{', '.join(fusable_ops())}, mixed edges of MSR-DARTS or DARTS, --impl fused or auto)")
        if self._fused is not None:
            self._fused.set_recompute_depthwise(on)

    def refresh_spectral_norms(self, iterations: int = REFRESH_STEPS, tol: float = REFRESH_TOL,
                               depthwise: bool = True, bundles: Sequence[int] | None = None) -> None:
        """:meth:`msrdarts.nn.spectral.ConvSpectralNorm.refresh` for every normalised conv, batched
        (:meth:`msrdarts.nn.spectral_batch.SpectralBatch.refresh`); with ``depthwise=False`` the 1x1
        convs only. The search loop refreshes the 1x1 convs every ``sn_refresh_every`` steps and
        all when :meth:`spectral_drift` exceeds ``sn_refresh_drift`` (and every
        ``sn_refresh_depthwise_every`` steps); ``bundles`` (as :meth:`spectral_drifted` returns
        them) refreshes those bundles of convs only."""
        self._spectral.refresh(iterations, tol, depthwise, bundles)

    def spectral_drifted(self, threshold: float) -> list[int]:
        """The bundles of normalised convs (of one map size and stride, batched together) some of whose
        weights moved by more than ``threshold`` (relative) since the bundle's last refresh
        (:meth:`msrdarts.nn.spectral_batch.SpectralBatch.drifted`): the search's drift trigger
        refreshes those."""
        return self._spectral.drifted(threshold)

    def spectral_bundle_names(self) -> list[str]:
        """A name per bundle of normalised convs, in :meth:`spectral_drifted`'s numbering ("1x1",
        "8x8/1", ...): what the search's history counts refreshes under."""
        return self._spectral.bundle_names()

    def spectral_drift(self) -> float:
        """How far the normalised convs' weights moved since the last refresh (relative, worst conv:
        :meth:`msrdarts.nn.spectral_batch.SpectralBatch.drift`); the search loop refreshes early when
        it exceeds ``sn_refresh_drift``."""
        return self._spectral.drift()

    def drift_reference(self) -> dict[str, torch.Tensor]:
        """The weights :meth:`spectral_drift` compares against, for a checkpoint."""
        return self._spectral.drift_reference()

    def load_drift_reference(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`drift_reference` returned (a checkpoint's), on this network's
        device and dtype; ValueError where it does not fit this network."""
        self._spectral.load_drift_reference(state)
