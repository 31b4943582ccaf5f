"""The fused supernet forward: the same function as the per-op reference, in far fewer kernels.

The reference :class:`msrdarts.nn.supernet.SearchCell` applies every (edge, op) separately: 14
edges x 4 ops x (ReLU, depthwise, pointwise, BN, twice for sep convs), each conv also running its
own spectral-norm computation. Here, per cell:

* **By source node.** All m edges leaving node i share its input h (B, C, H, W): one ReLU and
  one ``repeat`` to x (B, m*C, H, W), ordered (edge, channel). Then, per op kind (a sep or dil
  conv of given kernel and dilation), each block of ReLU - depthwise - pointwise - BN runs for
  all m edges at once:
  - the m depthwise convs are one depthwise conv over m*C channels, with weights (m*C, 1, k, k).
    On the CPU, maps of at most 64 pixels use the conv's dense operator instead (a batched
    matmul, see :class:`msrdarts.nn.kernels.DepthwiseRunner`);
  - the m pointwise convs are one batched matmul, (m, C, C) x (B, m, C, H*W), its output made
    contiguous (B, m*C, H, W): BN and convs on the matmul's (m, C, B, H*W) order are slow;
  - the m affine-free BNs are one ``batch_norm`` over the m*C channels, with the modules'
    running statistics gathered and written back.
  A sep conv runs its second block on the first block's output. The op outputs, viewed as
  (B, m, C, H', W'), are summed over the kinds (weighted by the srsoftmax mixing if set), and
  edge e's slice is added to its target node.
* **Batched spectral normalisation** (:class:`msrdarts.nn.spectral.SpectralBatch`): every
  normalised weight of the network comes from one call per step, grouped so that the weights one
  fused conv needs are a contiguous slice of its group (:func:`fused_conv_order` lists the convs
  in the order this forward consumes them).

The modules are the reference's: every conv keeps its spectral-norm parametrization (so
``conv.weight`` is its normalised weight, and checkpoints, stable ranks and derivation do not
depend on the implementation). The fused path only reads their parameters and buffers and
writes back exactly the state the reference forward would update (power-iteration vectors, BN
running statistics). tests/test_fused.py checks forward, gradients and state against the
reference in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from ..genotype import edge_index
from .kernels import CompiledTaps, DepthwiseRunner, _Geometry, is_channels_last
from .ops import DilConv, OpConv, SepConv
from .spectral_batch import SpectralBatch, _Slice


def _blocks(op: nn.Module) -> list[DilConv]:
    """The ReLU-depthwise-pointwise-BN blocks of an op, in order (1 for dil convs, 2 for sep convs)."""
    if isinstance(op, SepConv):
        return [op[0], op[1]]
    if isinstance(op, DilConv):
        return [op]
    raise TypeError(f"op {type(op).__name__} cannot be fused")


class _FusedBN:
    """The affine-free BNs of one fused stage as one ``batch_norm`` over concatenated channels."""

    def __init__(self, bns: list[nn.BatchNorm2d]):
        self.bns = bns

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bn0 = self.bns[0]
        means = torch.cat([b.running_mean for b in self.bns])
        variances = torch.cat([b.running_var for b in self.bns])
        if not bn0.training:
            return F.batch_norm(x, means, variances, None, None, False, 0.0, bn0.eps)
        torch._foreach_add_([b.num_batches_tracked for b in self.bns], 1)
        # as nn.BatchNorm2d: momentum None means a cumulative average over the batches seen
        factor = bn0.momentum if bn0.momentum is not None else 1.0 / float(bn0.num_batches_tracked)
        out = F.batch_norm(x, means, variances, None, None, True, factor, bn0.eps)
        with torch.no_grad():
            torch._foreach_copy_([b.running_mean for b in self.bns], list(means.chunk(len(self.bns))))
            torch._foreach_copy_([b.running_var for b in self.bns], list(variances.chunk(len(self.bns))))
        return out


@dataclass
class _Block:
    """One ReLU - depthwise - pointwise - BN block of one op kind, for the m edges of a source."""

    depthwise: _Slice
    geometry: _Geometry     # of the depthwise convs (one per op kind and level)
    pointwise: _Slice
    bn: _FusedBN
    runner: DepthwiseRunner

    def __call__(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """x: (B, m*C, H, W) ordered (edge, channel), already through the ReLU."""
        dw, pw = self.depthwise, self.pointwise
        y = self.runner(x, weights[dw.group][dw.start:dw.start + dw.count].flatten(0, 1), self.geometry)
        w = weights[pw.group][pw.start:pw.start + pw.count].flatten(2)            # (m, C_out, C_in)
        return self.bn(_pointwise(y, w))


def _pointwise(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """m 1x1 convs (w: (m, C_out, C_in)) on the m channel blocks of x (B, m*C_in, H, W), as one
    batched matmul (faster than a grouped conv on CPU); keeps channels_last inputs channels_last."""
    B, _, H, W = x.shape
    m, c_out, c_in = w.shape
    if not is_channels_last(x):
        y = torch.einsum("mdc,bmcl->bmdl", w, x.reshape(B, m, c_in, H * W))     # a (m, d, b, l)-ordered view
        return y.contiguous().view(B, m * c_out, H, W)   # BN, ReLU and convs are slow on that order
    xl = x.permute(0, 2, 3, 1).reshape(B, H * W, m, c_in)                        # a view for NHWC
    return torch.einsum("bpmc,mdc->bpmd", xl, w).reshape(B, H, W, m * c_out).permute(0, 3, 1, 2)


class _SourcePlan:
    """The fused computation of all edges leaving one node of one cell."""

    def __init__(self, edges: list[int], targets: list[int], ops: list[list[nn.Module]], batch: SpectralBatch,
                 runner: DepthwiseRunner):
        self.edges, self.targets, self.m = edges, targets, len(edges)
        self.kinds: list[list[_Block]] = []        # per op kind, its 1 (dil) or 2 (sep) blocks
        for p in range(len(ops[0])):
            per_edge = [_blocks(ops[e][p]) for e in range(self.m)]
            self.kinds.append([
                _Block(batch.slice_of([b[level][1] for b in per_edge]), _Geometry.of(per_edge[0][level][1]),
                       batch.slice_of([b[level][2] for b in per_edge]), _FusedBN([b[level][3] for b in per_edge]),
                       runner)
                for level in range(len(per_edge[0]))])

    def __call__(self, h: torch.Tensor, weights: list[torch.Tensor], mix: torch.Tensor | None) -> torch.Tensor:
        """(B, m, C, H', W'): the outputs of the m edges, ops summed (weighted by ``mix`` (m, P))."""
        B, C = h.shape[:2]
        m = self.m
        x = F.relu(h).repeat(1, m, 1, 1)                                            # (B, m*C, H, W)
        total = None
        for p, blocks in enumerate(self.kinds):
            y = blocks[0](x, weights)
            for block in blocks[1:]:
                y = block(F.relu(y), weights)
            y = y.view(B, m, C, *y.shape[-2:])
            if mix is not None:
                y = y * mix[:, p].view(1, m, 1, 1, 1).to(y.dtype)
            total = y if total is None else total + y
        return total


class FusedCell:
    """Plans the fused forward of one :class:`msrdarts.nn.supernet.SearchCell` (see the module docstring)."""

    def __init__(self, cell: nn.Module, batch: SpectralBatch, runner: DepthwiseRunner):
        self.cell = cell
        self.batch_norms = [m for m in cell.modules() if isinstance(m, _BatchNorm)]
        pairs = edge_index(cell.steps)
        n_ops = len(cell.edges[0].ops)
        self.sources: list[_SourcePlan | None] = []
        for i in range(cell.steps + 2):
            edges = [e for e, (src, _) in enumerate(pairs) if src == i]
            if not edges:
                self.sources.append(None)
                continue
            ops = [[cell.edges[e].ops[p] for p in range(n_ops)] for e in edges]
            self.sources.append(_SourcePlan(edges, [pairs[e][1] for e in edges], ops, batch, runner))

    @staticmethod
    def conv_order(cell: nn.Module) -> list[OpConv]:
        """The cell's op convs in the order the fused forward consumes them (see SpectralBatch):
        per source node, op kind and block, the depthwise convs of its m edges, then their pointwise convs."""
        pairs = edge_index(cell.steps)
        order: list[OpConv] = []
        for i in range(cell.steps + 2):
            edges = [e for e, (src, _) in enumerate(pairs) if src == i]
            if not edges:
                continue
            for p in range(len(cell.edges[0].ops)):
                per_edge = [_blocks(cell.edges[e].ops[p]) for e in edges]
                for level in range(len(per_edge[0])):
                    order += [b[level][1] for b in per_edge] + [b[level][2] for b in per_edge]
        return order

    def __call__(self, s0: torch.Tensor, s1: torch.Tensor, weights: list[torch.Tensor],
                 mix: torch.Tensor | None) -> torch.Tensor:
        cell = self.cell
        states = [cell.pre0(s0), cell.pre1(s1)]
        partial: list[torch.Tensor | None] = [None] * cell.steps
        for i, plan in enumerate(self.sources):
            if i >= 2:
                states.append(partial[i - 2])        # node i is complete once all sources < i are done
            if plan is None:
                continue
            out = plan(states[i], weights, None if mix is None else mix[plan.edges])
            for k, j in enumerate(plan.targets):
                partial[j - 2] = out[:, k] if partial[j - 2] is None else partial[j - 2] + out[:, k]
        return torch.cat(states[-cell.multiplier:], dim=1)


class FusedSuperNet:
    """The fused forward of a whole :class:`msrdarts.nn.supernet.SuperNet`.

    ``batch`` must list the op convs in :meth:`conv_order` (see :func:`fused_conv_order`).
    ``compile_kernels``: compile the large depthwise weight gradients (see
    :class:`msrdarts.nn.kernels.DepthwiseRunner`).
    """

    def __init__(self, net: nn.Module, batch: SpectralBatch, compile_kernels: bool = True,
                 checkpoint_cells: bool = False):
        self.batch = batch
        self.runner = DepthwiseRunner(batch.taps, CompiledTaps() if compile_kernels else None)
        self.cells = [FusedCell(cell, self.batch, self.runner) for cell in net.cells]
        self.checkpoint_cells = checkpoint_cells

    def __call__(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weights = self.batch.weights(net.training)   # normalised once per step, outside any checkpoint
        s0, s1 = net.stem(x)
        recompute = self.checkpoint_cells and net.training and torch.is_grad_enabled()
        for cell, fused in zip(net.cells, self.cells):
            mix = net.mixing_weights(cell)
            if recompute:
                out = checkpoint(_Recomputed(fused), s0, s1, mix, *weights, use_reentrant=False)
            else:
                out = fused(s0, s1, weights, mix)
            s0, s1 = s1, out
        return net.classifier(net.global_pooling(s1).flatten(1))


class _Recomputed:
    """One cell's fused forward under activation checkpointing (``--checkpoint-cells``): the
    backward keeps only the cell's inputs and runs the cell again to get its activations. The
    first call is the forward; the second, in the backward, leaves the BN statistics as the forward
    left them (a second update would count the batch twice). The spectral norms are computed
    before the cells, once per step, so both runs use the same normalised weights."""

    def __init__(self, fused: FusedCell):
        self.fused, self.calls = fused, 0

    def __call__(self, s0: torch.Tensor, s1: torch.Tensor, mix: torch.Tensor | None,
                 *weights: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            return self.fused(s0, s1, list(weights), mix)
        buffers = [b for m in self.fused.batch_norms for b in m.buffers()]   # (.to() replaces buffers: read now)
        kept = [b.clone() for b in buffers]
        try:
            return self.fused(s0, s1, list(weights), mix)
        finally:
            with torch.no_grad():
                for b, k in zip(buffers, kept):
                    b.copy_(k)


def fused_conv_order(net: nn.Module) -> list[OpConv]:
    """Every op conv of a supernet, in the order the fused forward consumes them."""
    return [conv for cell in net.cells for conv in FusedCell.conv_order(cell)]
