"""The evaluation network: a derived (or published) genotype trained from scratch (SPEC sections 1, 5-7).

One network class for CIFAR and ImageNet (the stem is chosen by ``stem``), one auxiliary head
parameterised by its input size, drop path as a method. No spectral normalisation here: the
authors' evaluation network has none (SPEC section 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EVAL_IMPLS, check_choice, check_network, check_positive
from ..errors import ConfigError
from ..genotype import CellGenotypes, Genotype, Pairs
from .batchnorm import BatchNorm2d
from .kernels import channels_cat
from .ops import (FactorizedReduce, OpConv, SepConv, Stem, begins_with_relu, cell_preprocess, drop_path, drop_path_mask,
                  get_op, list_ops, reduction_layers)


class EvalCell(nn.Module):
    """A discrete cell: node j = op_a(x_a) + op_b(x_b) for the two (op, input) pairs of node j."""

    def __init__(self, pairs: Pairs, concat: tuple[int, ...], C_pp: int, C_p: int, C: int, reduction: bool,
                 reduction_prev: bool, fast: bool = True):
        super().__init__()
        self.reduction = reduction
        self.fast = fast
        self.pre0, self.pre1 = cell_preprocess(C_pp, C_p, C, reduction_prev, affine=True)
        self.concat = tuple(concat)
        self.inputs = tuple(i for _, i in pairs)
        self.ops = nn.ModuleList(get_op(name)(C, 2 if reduction and i < 2 else 1, True) for name, i in pairs)
        self.steps = len(pairs) // 2

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float = 0.0,
                activated: bool = False) -> torch.Tensor:
        """``activated``: s0 and s1 have been through ReLU already (the preprocessors' first step)."""
        if activated:
            states = [self.pre0.reduce(s0), self.pre1.reduce(s1)]
        else:
            states = [self.pre0(s0), self.pre1(s1)]
        relu_of: dict[int, torch.Tensor] = {}   # fast: ReLU(state i), once for all the ops that begin with it
        for j in range(self.steps):
            if self.fast:
                states.append(self._node(j, states, relu_of, drop_prob))
                continue
            a, b = (self._edge(k, states, drop_prob) for k in (2 * j, 2 * j + 1))
            states.append(a + b)
        out = [states[i] for i in self.concat]   # (channels_cat: see Network)
        return channels_cat(out) if self.fast else torch.cat(out, dim=1)

    def _node(self, j: int, states: list[torch.Tensor], relu_of: dict[int, torch.Tensor],
              drop_prob: float) -> torch.Tensor:
        """Node j as :meth:`_edge` twice and a sum, faster: the ops that begin with a ReLU of a
        state share one (``relu_of``: state index -> its ReLU, filled as needed), and the
        drop-path products are folded into the sum (``a * ma + b * mb`` as one ``addcmul`` after
        one product: a pass over the map fewer). The masks are drawn in the same order, so the
        random stream is the same."""
        k = 2 * j
        a, b = (self._run_op(i, states, relu_of) for i in (k, k + 1))
        ma, mb = (drop_path_mask(h, drop_prob, self.training) if self._droppable(i) else None
                  for i, h in ((k, a), (k + 1, b)))
        if ma is None and mb is None:
            return a + b
        if mb is None:
            a, ma, b, mb = b, mb, a, ma
        return torch.addcmul(a if ma is None else a * ma, b, mb)

    def _run_op(self, k: int, states: list[torch.Tensor], relu_of: dict[int, torch.Tensor]) -> torch.Tensor:
        op, i = self.ops[k], self.inputs[k]
        if not begins_with_relu(op):
            return op(states[i])
        if i not in relu_of:
            relu_of[i] = F.relu(states[i])
        return op.reduce(relu_of[i])

    def _droppable(self, k: int) -> bool:
        return not isinstance(self.ops[k], nn.Identity)   # DARTS: identity edges are never dropped

    def _edge(self, k: int, states: list[torch.Tensor], drop_prob: float) -> torch.Tensor:
        h = self.ops[k](states[self.inputs[k]])
        return drop_path(h, drop_prob, self.training) if self._droppable(k) else h


class AuxiliaryHead(nn.Module):
    """The DARTS auxiliary classifier on an ``input_size`` x ``input_size`` feature map.

    It pools to 2 x 2 (CIFAR's 8 x 8 map: average pool 5 / stride 3; ImageNet's 7 x 7: pool 5 /
    stride 2, both as in DARTS; other sizes: adaptive), then conv1x1 -> 128, conv2x2 -> 768
    (1 x 1), linear.
    """

    def __init__(self, C: int, num_classes: int, input_size: int):
        super().__init__()
        if input_size in (7, 8):
            pool = nn.AvgPool2d(5, stride=3 if input_size == 8 else 2, padding=0, count_include_pad=False)
        else:
            pool = nn.AdaptiveAvgPool2d(2)
        self.features = nn.Sequential(
            nn.ReLU(inplace=False), pool,
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class Network(nn.Module):
    """Stem, ``layers`` cells of ``genotype`` (reductions at L/3 and 2L/3), global pool, linear.

    ``genotype`` is a :class:`Genotype` (every normal cell alike, every reduction cell alike) or a
    :class:`CellGenotypes` (cell k built from entry k; ``layers`` must equal its length and its
    reduce entries must sit at the network's reduction depths).

    ``forward`` returns (logits, auxiliary logits or None); the auxiliary head sits after the
    second reduction cell and runs only in training mode.

    ``impl``: ``"reference"`` is DARTS's network in plain PyTorch ops; ``"fast"`` (or ``"auto"``)
    computes the same function faster on the CPU, where it is meant to run in channels_last
    (:class:`msrdarts.device.Accel` sets that): gradients keep the channels_last format through
    each cell's concatenation (:func:`msrdarts.nn.kernels.channels_cat`), the ReLU that the two
    cells reading a state both begin with runs once, so does the ReLU that the ops of a cell reading
    one state begin with, each node's drop-path products fold into its sum, the inner ReLU of each
    separable conv works in place, the depthwise convs of NCHW inputs use the fast backward
    of :func:`msrdarts.nn.kernels.depthwise_conv2d` where it wins, and the cells' batch norms take
    :mod:`msrdarts.nn.batchnorm`'s channels_last path where PyTorch's kernel is slow (the cells'
    BNs of 36 channels). Same parameters and state dict either way.
    """

    def __init__(self, genotype: Genotype | CellGenotypes, num_classes: int, layers: int, channels: int, stem: str = "cifar",
                 in_channels: int = 3, input_size: int = 32, auxiliary: bool = False, stem_multiplier: int = 3,
                 impl: str = "auto"):
        super().__init__()
        check_choice("impl", impl, EVAL_IMPLS)
        self.impl = "fast" if impl == "auto" else impl
        fast = self.impl == "fast"
        genotype.validate(list_ops())
        check_network(layers, channels)
        check_positive(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
        cells_of = cell_specs(genotype, layers)
        self.stem = Stem(stem, in_channels, channels, stem_multiplier)
        C_pp, C_p = self.stem.out_channels
        reduction_prev, C_curr = self.stem.reduction_prev, channels
        size = input_size if stem == "cifar" else -(-input_size // 8)
        cells, self.aux_index, aux_channels, aux_size = [], None, 0, 0
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            if reduction:
                C_curr *= 2
                size = -(-size // 2)
            cell = EvalCell(*cells_of[i], C_pp, C_p, C_curr, reduction, reduction_prev, fast)
            cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, len(cell.concat) * C_curr
            if i == 2 * layers // 3:
                self.aux_index, aux_channels, aux_size = i, C_p, size
        self.cells = nn.ModuleList(cells)
        self.auxiliary_head = AuxiliaryHead(aux_channels, num_classes, aux_size) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)
        self.drop_prob = 0.0
        for m in self.modules():
            if isinstance(m, (OpConv, FactorizedReduce, BatchNorm2d)):
                m.fast = fast
            elif isinstance(m, SepConv) and fast:
                m[1][0].inplace = True   # the inner ReLU: its input (a BN's output) has no other reader

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        s0, s1 = self.stem(x)
        if self.impl == "fast":   # every state feeds two cells, which both begin with its ReLU: run it once
            r1 = F.relu(s1)
            r0 = r1 if s0 is s1 else F.relu(s0)
        aux = None
        for i, cell in enumerate(self.cells):
            if self.impl == "fast":
                s0, s1 = s1, cell(r0, r1, self.drop_prob, activated=True)
                if i + 1 < len(self.cells):
                    r0, r1 = r1, F.relu(s1)
            else:
                s0, s1 = s1, cell(s0, s1, self.drop_prob)
            if i == self.aux_index and self.auxiliary_head is not None and self.training:
                aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), aux

    def set_drop_path(self, prob: float) -> None:
        """Drop-path probability for the next forwards (DARTS ramps it linearly over training)."""
        self.drop_prob = float(prob)



def cell_specs(genotype: Genotype | CellGenotypes, layers: int) -> list[tuple[Pairs, tuple[int, ...]]]:
    """(pairs, concat) of each of the ``layers`` cells; a per-cell genotype must fit the network."""
    reductions = reduction_layers(layers)
    if isinstance(genotype, Genotype):
        return [(genotype.reduce, genotype.reduce_concat) if i in reductions else (genotype.normal, genotype.normal_concat)
                for i in range(layers)]
    if genotype.layers != layers:
        raise ConfigError(f"--layers={layers}: the per-cell genotype has {genotype.layers} cells; the network "
                          f"needs one cell per entry (leave --layers out to take it from the genotype)")
    for k, cell in enumerate(genotype.cells):
        wanted = "reduce" if k in reductions else "normal"
        if cell.type != wanted:
            raise ConfigError(f"per-cell genotype: cell {k} is {cell.type!r} but a network of {layers} cells has a "
                              f"{'reduction' if wanted == 'reduce' else 'normal'} cell there (reduction cells at "
                              f"{' and '.join(map(str, reductions))})")
    return [(c.pairs, c.concat) for c in genotype.cells]
