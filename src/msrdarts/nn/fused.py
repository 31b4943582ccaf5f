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
  - the m pointwise convs are one broadcast matmul, (m, C, C) x (B, m, C, H*W), whose output is
    NCHW (B, m*C, H, W) as it comes (maps of 64 pixels and up; on smaller ones an einsum batched
    over m, its (m, C, B, H*W)-ordered output copied to NCHW: BN and convs on that order are slow);
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
from .batchnorm import update_factor
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
        self.eps = bns[0].eps

    @property
    def training(self) -> bool:
        return self.bns[0].training

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The running means and variances, concatenated, and this batch's update factor (for a
        training batch, whose count it adds); :meth:`write_back` stores what the BN made of them."""
        means = torch.cat([b.running_mean for b in self.bns])
        variances = torch.cat([b.running_var for b in self.bns])
        if not self.training:
            return means, variances, 0.0
        torch._foreach_add_([b.num_batches_tracked for b in self.bns], 1)
        return means, variances, update_factor(self.bns[0])

    @torch.no_grad()
    def write_back(self, means: torch.Tensor, variances: torch.Tensor) -> None:
        torch._foreach_copy_([b.running_mean for b in self.bns], list(means.chunk(len(self.bns))))
        torch._foreach_copy_([b.running_var for b in self.bns], list(variances.chunk(len(self.bns))))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        means, variances, factor = self.statistics()
        out = F.batch_norm(x, means, variances, None, None, self.training, factor, self.eps)
        if self.training:
            self.write_back(means, variances)
        return out


@dataclass
class _Block:
    """One ReLU - depthwise - pointwise - BN block of one op kind, for the m edges of a source."""

    depthwise: _Slice
    geometry: _Geometry     # of the depthwise convs (one per op kind and level)
    pointwise: _Slice
    bn: _FusedBN
    runner: DepthwiseRunner
    recompute: bool         # training with gradients: a _LeanBlock

    def __call__(self, x: torch.Tensor, weights: list[torch.Tensor], copies: int,
                 shared: "_SharedSpread | None" = None) -> torch.Tensor:
        """The block on ``_spread(x, copies)`` (B, m*C, H, W), ordered (edge, channel): ``x`` is the
        source node (``copies`` = m) or the previous block's output (1). ``shared``: that input,
        computed once for the source's op kinds."""
        dw, pw = self.depthwise, self.pointwise
        w_dw = weights[dw.group][dw.start:dw.start + dw.count].flatten(0, 1)
        w_pw = weights[pw.group][pw.start:pw.start + pw.count].flatten(2)          # (m, C_out, C_in)
        if self.recompute and self.bn.training and torch.is_grad_enabled():
            means, variances, factor = self.bn.statistics()
            y = _LeanBlock.apply(x, w_dw, w_pw, means, variances, (copies, shared, self.runner, self.geometry,
                                                                   factor, self.bn.eps))
            self.bn.write_back(means, variances)
            return y
        y = self.runner(_spread(x, copies) if shared is None else shared.value, w_dw, self.geometry)
        return self.bn(_pointwise(y, w_pw))


class _LeanBlock(torch.autograd.Function):
    """A training block (ReLU, spread over the m edges for the first block of an op; depthwise;
    pointwise; BN without affine) that keeps two activations for the backward, its input before the
    ReLU and its output, where autograd keeps four of m*C channels (the spread ReLU output, the
    depthwise output, the pointwise output, the BN input).

    * The BN's input gradient comes from its output y and 1/std (y is x_hat for an affine-free BN):
      ``native_batch_norm_backward`` with y as the input, mean 0, inverse std 1 and 1/std as the
      scale is ``(dy - mean(dy) - y mean(dy y)) / std``, one kernel.
    * The pointwise gradients are two matmuls with the depthwise output, which the backward
      computes again from the input (ReLU, repeat and one depthwise conv, the block's cheapest
      part); the input and depthwise gradients are autograd's through that recomputation.

    A first block's input is the source node (C channels, not the m*C of its spread ReLU), a
    second block's is the first block's output, which that block keeps anyway: per source node, a
    sep conv keeps 2 activations of m*C channels and a dil conv 1, where autograd kept 5 and 2 plus
    the shared spread input (BENCHMARKS.md, search-step peak memory). Under autocast the backward
    runs under the forward's autocast state. First derivatives only (the fused path's users need
    no more).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w_dw: torch.Tensor, w_pw: torch.Tensor, means: torch.Tensor,
                variances: torch.Tensor, how: tuple) -> torch.Tensor:
        copies, shared, runner, geometry, factor, eps = how
        d = runner(_spread(x, copies) if shared is None else shared.value, w_dw, geometry)
        c = _pointwise(d, w_pw)
        del d
        y, _, invstd = torch.native_batch_norm(c, None, None, means, variances, True, factor, eps)
        ctx.save_for_backward(x, w_dw, w_pw, y, invstd)
        ctx.how = how
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, w_dw, w_pw, y, invstd = ctx.saved_tensors
        copies, shared, runner, geometry, _, eps = ctx.how
        dc = torch.ops.aten.native_batch_norm_backward(
            dy, y, invstd, None, None, torch.zeros_like(invstd), torch.ones_like(invstd), True, eps,
            [True, False, False])[0]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype, enabled=enabled):
            xs = shared.get(x) if shared is not None else F.relu(x.detach()).requires_grad_(ctx.needs_input_grad[0])
            wd = w_dw.detach().requires_grad_(ctx.needs_input_grad[1])
            d = runner(xs, wd, geometry)
        dd, dw_pw = _pointwise_backward(d.detach(), w_pw, dc)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        wrt = [xs] * need_x + [wd] * need_w
        grads = list(torch.autograd.grad(d, wrt, dd)) if wrt else []
        dx = grads.pop(0) if need_x else None
        if dx is not None:      # through the spread: the sum over its copies, where the ReLU passed
            if copies > 1:
                dx = dx.reshape(x.shape[0], copies, *x.shape[1:]).sum(1)
            dx = torch.ops.aten.threshold_backward(dx.to(x.dtype), x, 0)
        dw_dw = grads.pop(0) if need_w else None
        return dx, dw_dw, dw_pw if ctx.needs_input_grad[2] else None, None, None, None


class _SharedSpread:
    """The spread input of a source's first blocks, computed once for all its op kinds: in the
    forward (:meth:`release` drops it after the last kind) and, for :class:`_LeanBlock`, once
    again in the backward (as a leaf; each block maps its gradient back to the source node)."""

    def __init__(self, h: torch.Tensor, copies: int, users: int):
        self.copies, self.users = copies, users
        self.value: torch.Tensor | None = _spread(h, copies)

    def release(self) -> None:
        self.value = None

    def get(self, h: torch.Tensor) -> torch.Tensor:
        """In the backward: the spread of the source node ``h``, dropped once its last user has it."""
        if self.value is None:
            self.value = _spread(h.detach(), self.copies).requires_grad_()
        value = self.value
        self.users -= 1
        if self.users == 0:
            self.value = None
        return value


_MATMUL_MIN_PIXELS = 64   # NCHW pointwise convs on maps this large and up: broadcast matmuls (see _pointwise)


def _spread(x: torch.Tensor, copies: int) -> torch.Tensor:
    """A block's input: ReLU(x), repeated ``copies`` times along the channels (the m edges of a source)."""
    x = F.relu(x)
    return x.repeat(1, copies, 1, 1) if copies > 1 else x


def _pointwise(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """m 1x1 convs (w: (m, C_out, C_in)) on the m channel blocks of x (B, m*C_in, H, W), as one
    batched matmul (faster than a grouped conv on CPU); keeps channels_last inputs channels_last.
    In NCHW, on maps of at least 64 pixels, it is a broadcast matmul, (m, C_out, C_in) x
    (B, m, C_in, H*W), whose output is already NCHW, with its own backward (:class:`_Pointwise`):
    an einsum batched over m gives the (m, C_out, B, H*W) order, and its copy back cost more than
    the products (bench/results/pointwise.txt). On smaller maps the B*m products of a few columns
    each are slower than the copy (the quick preset's 4x4 and 2x2 cells), so the einsum stays."""
    B, _, H, W = x.shape
    m, c_out, c_in = w.shape
    if not is_channels_last(x):
        if H * W >= _MATMUL_MIN_PIXELS:
            return _Pointwise.apply(x, w)
        y = torch.einsum("mdc,bmcl->bmdl", w, x.reshape(B, m, c_in, H * W))     # a (m, d, b, l)-ordered view
        return y.contiguous().view(B, m * c_out, H, W)   # BN, ReLU and convs are slow on that order
    xl = x.permute(0, 2, 3, 1).reshape(B, H * W, m, c_in)                        # a view for NHWC
    return torch.einsum("bpmc,mdc->bpmd", xl, w).reshape(B, H, W, m * c_out).permute(0, 3, 1, 2)


class _Pointwise(torch.autograd.Function):
    """:func:`_pointwise` in NCHW, keeping x and w for the backward (:func:`_pointwise_backward`).
    Autograd through the broadcast matmul would keep w expanded over the batch, (B, m, C_out, C_in)
    per block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        m, c_out, c_in = w.shape
        ctx.save_for_backward(x, w)
        return torch.matmul(w, x.reshape(B, m, c_in, H * W)).view(B, m * c_out, H, W)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):   # differentiable ops: DARTS's exact hypergradient differentiates it again
        x, w = ctx.saved_tensors
        dx, dw = _pointwise_backward(x, w, dy)
        return dx.to(x.dtype), dw


def _pointwise_backward(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`_pointwise` (x, w) -> y with respect to x and w, given dy (in dy's
    dtype for x, and w's for w, as autograd through an autocast matmul gives them)."""
    B, _, H, W = x.shape
    m, c_out, c_in = w.shape
    wt = w.to(dy.dtype)
    if not is_channels_last(x) and H * W >= _MATMUL_MIN_PIXELS:   # broadcast matmuls, as the forward
        dy4, x4 = dy.reshape(B, m, c_out, H * W), x.reshape(B, m, c_in, H * W).to(dy.dtype)
        dx = torch.matmul(wt.mT, dy4).view(B, m * c_in, H, W)
        return dx, torch.matmul(dy4, x4.mT).sum(0).to(w.dtype)
    if not is_channels_last(x):   # small maps: one copy of dy and x each to the (m, channel, B*H*W) order
        dyp = dy.reshape(B, m, c_out, H * W).permute(1, 2, 0, 3).reshape(m, c_out, B * H * W)
        xp = x.reshape(B, m, c_in, H * W).permute(1, 2, 0, 3).reshape(m, c_in, B * H * W).to(dy.dtype)
        dx = torch.bmm(wt.mT, dyp).view(m, c_in, B, H * W).permute(2, 0, 1, 3).reshape(B, m * c_in, H, W)
        return dx, torch.bmm(dyp, xp.mT).to(w.dtype)
    xl = x.permute(0, 2, 3, 1).reshape(B, H * W, m, c_in).to(dy.dtype)
    dyl = dy.permute(0, 2, 3, 1).reshape(B, H * W, m, c_out)
    dx = torch.einsum("bpmd,mdc->bpmc", dyl, wt).reshape(B, H, W, m * c_in).permute(0, 3, 1, 2)
    return dx, torch.einsum("bpmd,bpmc->mdc", dyl, xl).to(w.dtype)


class _SourcePlan:
    """The fused computation of all edges leaving one node of one cell."""

    def __init__(self, edges: list[int], targets: list[int], ops: list[list[nn.Module]], batch: SpectralBatch,
                 runner: DepthwiseRunner, recompute: bool):
        self.edges, self.targets, self.m = edges, targets, len(edges)
        self.recompute = recompute
        self.kinds: list[list[_Block]] = []        # per op kind, its 1 (dil) or 2 (sep) blocks
        for p in range(len(ops[0])):
            per_edge = [_blocks(ops[e][p]) for e in range(self.m)]
            self.kinds.append([
                _Block(batch.slice_of([b[level][1] for b in per_edge]), _Geometry.of(per_edge[0][level][1]),
                       batch.slice_of([b[level][2] for b in per_edge]), _FusedBN([b[level][3] for b in per_edge]),
                       runner, recompute)
                for level in range(len(per_edge[0]))])

    def __call__(self, h: torch.Tensor, weights: list[torch.Tensor], mix: torch.Tensor | None) -> torch.Tensor:
        """(B, m, C, H', W'): the outputs of the m edges, ops summed (weighted by ``mix`` (m, P))."""
        B, C = h.shape[:2]
        m = self.m
        lean = self.recompute and torch.is_grad_enabled() and self.kinds[0][0].bn.training   # _LeanBlocks keep h
        shared = _SharedSpread(h.detach() if lean else h, m, len(self.kinds))      # (B, m*C, H, W)
        total = None
        for p, blocks in enumerate(self.kinds):
            y = blocks[0](h, weights, m, shared)
            for block in blocks[1:]:
                y = block(y, weights, 1)
            y = y.view(B, m, C, *y.shape[-2:])
            if mix is not None:
                y = y * mix[:, p].view(1, m, 1, 1, 1).to(y.dtype)
            total = y if total is None else total + y
        shared.release()
        return total


class FusedCell:
    """Plans the fused forward of one :class:`msrdarts.nn.supernet.SearchCell` (see the module docstring)."""

    def __init__(self, cell: nn.Module, batch: SpectralBatch, runner: DepthwiseRunner, recompute: bool = False):
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
            self.sources.append(_SourcePlan(edges, [pairs[e][1] for e in edges], ops, batch, runner, recompute))

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
                 checkpoint_cells: bool = False, recompute_depthwise: bool = False):
        self.batch = batch
        self.runner = DepthwiseRunner(batch.taps, CompiledTaps() if compile_kernels else None)
        self.cells = [FusedCell(cell, self.batch, self.runner, recompute_depthwise) for cell in net.cells]
        self.checkpoint_cells = checkpoint_cells
        self.recompute_depthwise = recompute_depthwise

    def set_recompute_depthwise(self, on: bool) -> None:
        """Switch every block between :class:`_LeanBlock` (``on``) and autograd's plain graph: the
        same function and gradients, so a run may choose after building (``--recompute-depthwise auto``)."""
        self.recompute_depthwise = on
        for fused in self.cells:
            for plan in fused.sources:
                if plan is not None:
                    plan.recompute = on
                    for blocks in plan.kinds:
                        for block in blocks:
                            block.recompute = on

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
