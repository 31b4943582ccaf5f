"""The fused supernet forward: the same function as the per-op reference, in far fewer kernels.

The reference :class:`msrdarts.supernet.SearchCell` applies every (edge, op) separately: 14 edges
x 4 ops x (ReLU, depthwise, pointwise, BN, twice for sep convs), each conv also running its own
spectral-norm computation. Here, per cell:

* **By source node.** All m edges leaving node i share its input h (B, C, H, W): one ReLU and
  one ``repeat`` to x (B, m*C, H, W), ordered (edge, channel). Then, per op kind (a sep or dil
  conv of given kernel and dilation), each block of ReLU - depthwise - pointwise - BN runs for
  all m edges at once:
  - the m depthwise convs are one depthwise conv over m*C channels, with weights (m*C, 1, k, k).
    On the CPU, maps of at most 64 pixels use the conv's dense operator instead (a batched
    matmul, see :class:`DepthwiseRunner`);
  - the m pointwise convs are one batched matmul, (m, C, C) x (B, m, C, H*W);
  - the m affine-free BNs are one ``batch_norm`` over the m*C channels, with the modules'
    running statistics gathered and written back.
  A sep conv runs its second block on the first block's output. The op outputs, viewed as
  (B, m, C, H', W'), are summed over the kinds (weighted by the srsoftmax mixing if set), and
  edge e's slice is added to its target node.
* **Batched spectral normalisation** (:class:`SpectralBatch`). All normalised convs of the
  network with the same shape form one group, and each group advances the persistent
  power-iteration vectors of all its convs at once, gathered from and written back to the
  convs' own buffers:
  - pointwise C x C matrices (N of them): batched matrix-vector products, (N, C, C) x (N, C);
  - depthwise kernels with the same (C, k, dilation, stride, input size): on maps of at most 16
    pixels (``SpectralBatch.DENSE_MAX_PIXELS``), batched products with each channel's dense
    (H*W, H'*W') operator (:class:`DenseTaps`); on larger maps a single grouped conv and
    transposed conv over the N*C channels.
  Groups are ordered so that the weights one fused conv needs are a contiguous slice: no
  gather per use.

The modules are the reference's: every conv keeps its spectral-norm parametrization (so
``conv.weight`` is its normalised weight, and checkpoints, stable ranks and derivation do not
depend on the implementation). The fused path only reads their parameters and buffers and
writes back exactly the state the reference forward would update (power-iteration vectors, BN
running statistics). tests/test_fused.py checks forward, gradients and state against the
reference in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .derive import edge_index
from .ops import CompiledTaps, DilConv, OpConv, SepConv, depthwise_conv2d, use_fast_depthwise
from .spectral import ConvSpectralNorm, _normalize, matrix_power_iteration, matrix_top_vectors

#: Ops the fused path understands: a sequence of ReLU - depthwise - pointwise - BN blocks.
FUSABLE_OPS = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


def can_fuse(primitives: Sequence[str]) -> bool:
    return all(p in FUSABLE_OPS for p in primitives)


def _blocks(op: nn.Module) -> list[DilConv]:
    """The ReLU-depthwise-pointwise-BN blocks of an op, in order (1 for dil convs, 2 for sep convs)."""
    if isinstance(op, SepConv):
        return [op[0], op[1]]
    if isinstance(op, DilConv):
        return [op]
    raise TypeError(f"op {type(op).__name__} cannot be fused")


def _sn(conv: OpConv) -> ConvSpectralNorm | None:
    if parametrize.is_parametrized(conv, "weight"):
        return next(p for p in conv.parametrizations.weight if isinstance(p, ConvSpectralNorm))
    return None


class DenseTaps:
    """The 0/1 tap tensors of depthwise conv geometries, cached per geometry, map size, dtype and device.

    ``T[t, i, l] = 1`` where output pixel l reads input pixel i through kernel tap t, so channel
    c's dense operator (as a right factor: y_c = x_c M_c) is ``M_c = sum_t w[c, t] T[t]``, of
    shape (H*W, H'*W'). Worth it for maps of at most :attr:`MAX_PIXELS` pixels.
    """

    MAX_PIXELS = 64

    def __init__(self):
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, kernel_size: tuple, stride: tuple, padding: tuple, dilation: tuple, hw: tuple,
                 dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        H, W = hw
        key = (kernel_size, stride, padding, dilation, H, W, dtype, device)
        if key not in self._cache:
            eye = torch.eye(H * W, dtype=dtype, device=device).view(H * W, 1, H, W)
            cols = F.unfold(eye, kernel_size, dilation, padding, stride)               # (HW, k*k, L)
            self._cache[key] = cols.permute(1, 0, 2).contiguous()                       # (k*k, HW, L)
        return self._cache[key]


def _raw_slot(conv: OpConv) -> tuple[dict, str]:
    """Where the conv's trained weight lives: (a module's ``_parameters``, key)."""
    if parametrize.is_parametrized(conv, "weight"):
        return conv.parametrizations.weight._parameters, "original"
    return conv._parameters, "weight"


@dataclass
class _Slice:
    group: int      # index into SpectralBatch.groups
    start: int      # first conv of the slice within the group
    count: int


class SpectralBatch:
    """Normalised weights of many convs, computed group by group (see the module docstring).

    ``convs`` must be listed in the order their weights are consumed; :meth:`slice_of` maps a run
    of consecutive convs of one group to its position.
    """

    #: Depthwise power iteration uses dense per-channel operators on maps up to this size. On 8x8
    #: maps the dense operators (64 x 64, 9 or 25 nonzeros per column) cost more than the convs.
    DENSE_MAX_PIXELS = 16

    def __init__(self, convs: Sequence[OpConv]):
        self.taps = DenseTaps()
        self.groups: list[list[OpConv]] = []
        self._sn_cache: list[list[ConvSpectralNorm | None]] | None = None
        self._raw_cache: list[list[tuple[dict, str]]] | None = None
        self._vector_cache: dict[int, list[dict]] = {}
        keys: dict[tuple, int] = {}
        self.where: dict[int, tuple[int, int]] = {}
        for conv in convs:
            sn = _sn(conv)
            key = (tuple(conv.weight.shape) if sn is None else None, conv.in_channels, conv.out_channels,
                   conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.input_hw,
                   None if sn is None else (sn.matrix, sn.n_power_iterations))
            if key not in keys:
                keys[key] = len(self.groups)
                self.groups.append([])
            g = keys[key]
            self.where[id(conv)] = (g, len(self.groups[g]))
            self.groups[g].append(conv)

    def slice_of(self, convs: Sequence[OpConv]) -> _Slice:
        g, start = self.where[id(convs[0])]
        for k, c in enumerate(convs):
            if self.where[id(c)] != (g, start + k):
                raise ValueError("convs of one fused op must be consecutive in one group")
        return _Slice(g, start, len(convs))

    def _norms(self) -> list[list[ConvSpectralNorm | None]]:
        """Each group's spectral-norm modules, looked up once (after the parametrizations exist),
        so that a training step does not walk every conv's parametrization list."""
        if self._sn_cache is None:
            self._sn_cache = [[_sn(c) for c in convs] for convs in self.groups]
        return self._sn_cache

    def _raws(self, g: int) -> list[torch.Tensor]:
        """Group g's trained weights, read straight from the modules' parameter dicts (looked up
        once): walking every conv's parametrization costs microseconds per conv, every step.
        Reading the dicts each time still sees what ``torch.func.functional_call`` substitutes."""
        if self._raw_cache is None:
            self._raw_cache = [[_raw_slot(c) for c in convs] for convs in self.groups]
        return [params[name] for params, name in self._raw_cache[g]]

    def _vectors(self, g: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Group g's power-iteration buffers (u's and v's), read from the modules' buffer dicts
        (looked up once), so that buffers replaced by ``.to()`` or substituted by
        ``functional_call`` are the ones used."""
        if g not in self._vector_cache:
            self._vector_cache[g] = [sn._buffers for sn in self._norms()[g]]
        slots = self._vector_cache[g]
        return [b["u"] for b in slots], [b["v"] for b in slots]

    def weights(self, training: bool) -> list[torch.Tensor]:
        """Per group, the stacked normalised weights (N, C_out, C_in/groups, k, k).

        In training mode the groups first advance their power iterations (and store the vectors
        back in each conv's buffers), as each conv's parametrization would.
        """
        return [self._group_weights(g, training) for g in range(len(self.groups))]

    def _group_weights(self, g: int, training: bool) -> torch.Tensor:
        w = torch.stack(self._raws(g))                                            # (N, Co, Ci/g, k, k)
        sns = self._norms()[g]
        if sns[0] is None:
            return w
        device_type = w.device.type
        with torch.autocast(device_type, enabled=False):                          # norms always in fp32+
            w = w if w.dtype in (torch.float32, torch.float64) else w.float()
            iterations = sns[0].n_power_iterations if training else 0
            sigma = self._power_sigma(sns, w, iterations, self._vectors(g)).view(-1, 1, 1, 1, 1)
            target = sns[0].target
            if all(sn.target == target for sn in sns):
                return w * (target / sigma)
            return w * (w.new_tensor([sn.target for sn in sns]).view(-1, 1, 1, 1, 1) / sigma)

    @torch.no_grad()
    def converge(self, tol: float = 1e-7, max_iterations: int = 500) -> None:
        """Converge every group's vectors, as each ConvSpectralNorm would alone at construction,
        one batched computation per group: the exact top singular vectors of the 1x1 convs;
        power iteration for the others until each sigma changes by at most ``tol`` (relative)
        over 10 iterations."""
        for g, sns in enumerate(self._norms()):
            if sns[0] is None:
                continue
            if sns[0].matrix:
                self._exact_matrix_vectors(g)
                continue
            w = torch.stack(self._raws(g))
            active = list(range(len(sns)))              # convs still converging
            last = self._power_sigma(sns, w, 0, self._vectors(g))
            for _ in range(0, max_iterations, 10):
                now = self._power_sigma([sns[i] for i in active], w[active], 10, _buffers([sns[i] for i in active]))
                moving = ((now - last).abs() > tol * now).tolist()
                active, last = [i for i, m in zip(active, moving) if m], now[torch.tensor(moving, dtype=torch.bool)]
                if not active:
                    break

    @torch.no_grad()
    def refresh(self, iterations: int = 3) -> None:
        """:meth:`ConvSpectralNorm.refresh` for every conv: the 1x1 convs' vectors become exact
        in one batched ``eigh`` per group; the other convs run their own refresh."""
        for g, sns in enumerate(self._norms()):
            if sns[0] is None:
                continue
            if sns[0].matrix:
                self._exact_matrix_vectors(g)
            else:
                for w, sn in zip(self._raws(g), sns):
                    sn.refresh(w.detach(), iterations)

    def _exact_matrix_vectors(self, g: int) -> None:
        """Set group g's 1x1 convs' vectors to their exact top singular vectors (one batched eigh)."""
        w = torch.stack(self._raws(g)).detach()
        self._store(self._vectors(g), *matrix_top_vectors(w.flatten(2), self._norms()[g][0].eps))

    @staticmethod
    def _store(vectors: tuple[list[torch.Tensor], list[torch.Tensor]], u: torch.Tensor, v: torch.Tensor) -> None:
        """Write the rows of u (N, ...) and v (N, ...) back into the N convs' buffers (one shape)."""
        us, vs = vectors
        torch._foreach_copy_(us, list(u.view(len(us), *us[0].shape).unbind(0)))
        torch._foreach_copy_(vs, list(v.view(len(vs), *vs[0].shape).unbind(0)))

    def _power_sigma(self, sns: list[ConvSpectralNorm], w: torch.Tensor, iterations: int,
                     vectors: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        """sigma (N,) of N convs of one geometry, v^T A u, after ``iterations`` batched power
        iterations; ``vectors`` are the convs' (u, v) buffers, read and stored back."""
        sn = sns[0]
        if sn.matrix:
            return self._matrix_sigma(sn, w, iterations, vectors)
        if sn.depthwise and sn.input_hw[0] * sn.input_hw[1] <= self.DENSE_MAX_PIXELS:
            return self._dense_sigma(sn, w, iterations, vectors)
        return self._conv_sigma(sn, w, iterations, vectors)

    def _matrix_sigma(self, sn: ConvSpectralNorm, w: torch.Tensor, iterations: int,
                      vectors: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        m = w.flatten(2)                                                            # (N, Co, Ci)
        u, v = torch.stack(vectors[0]), torch.stack(vectors[1])                     # (N, Ci), (N, Co)
        if iterations:
            u, v = matrix_power_iteration(m.detach(), u, iterations, sn.eps)
            self._store(vectors, u, v)
        return (m * (v[:, :, None] * u[:, None, :])).sum((1, 2))                    # v^T W u

    def _dense_sigma(self, sn: ConvSpectralNorm, w: torch.Tensor, iterations: int,
                     vectors: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        """Depthwise convs on small maps: per channel c, A_c = M_c^T with M_c (HW, L) its dense
        operator (see DenseTaps), so A u = u M and A^T v = M v, batched over the N*C channels."""
        n = w.shape[0]
        T = self.taps(sn.kernel_size, sn.stride, sn.padding, sn.dilation, sn.input_hw, w.dtype, w.device)
        kk, hw, L = T.shape
        channels = w.shape[0] * w.shape[1]
        taps = T.view(kk, hw * L)
        u = torch.cat(vectors[0], dim=1).view(channels, hw)
        v = torch.cat(vectors[1], dim=1).view(channels, L)
        with torch.no_grad():
            if iterations:
                M = (w.detach().reshape(channels, kk) @ taps).view(channels, hw, L)
                for _ in range(iterations):
                    v = F.normalize(torch.bmm(u.unsqueeze(1), M).squeeze(1), dim=1, eps=sn.eps)
                    u = F.normalize(torch.bmm(M, v.unsqueeze(2)).squeeze(2), dim=1, eps=sn.eps)
                self._store(vectors, u.view(n, -1), v.view(n, -1))
            # G[c, t] = sum_{i,l} u[c, i] T[t, i, l] v[c, l] = d(v^T A u)/dw[c, t]
            G = ((u.unsqueeze(2) * v.unsqueeze(1)).view(channels, hw * L) @ taps.mT).view_as(w)
        return (w * G).reshape(n, sn.groups, -1).sum(-1).amax(1)                     # max over channels

    def _conv_sigma(self, sn: ConvSpectralNorm, w: torch.Tensor, iterations: int,
                    vectors: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        """Other convs: their union is one grouped conv with N times the groups."""
        n = w.shape[0]
        groups = sn.groups * n
        wd = w.detach().flatten(0, 1)                                               # (N*Co, Ci/g, k, k)
        u = torch.cat(vectors[0], dim=1)                                            # (1, N*Ci, H, W)
        v = torch.cat(vectors[1], dim=1)
        if iterations:
            with torch.no_grad():
                for _ in range(iterations):
                    v = _normalize(F.conv2d(u, wd, None, sn.stride, sn.padding, sn.dilation, groups), groups, sn.eps)
                    u = _normalize(_adjoint(sn, v, wd, groups), groups, sn.eps)
                torch._foreach_copy_(vectors[0], list(u.chunk(n, dim=1)))
                torch._foreach_copy_(vectors[1], list(v.chunk(n, dim=1)))
        with torch.no_grad():                       # G = d(v^T A u)/dW, one unfold + one bmm
            c_out, c_in_g, kh, kw = w.shape[1:]
            patches = F.unfold(u, (kh, kw), sn.dilation, sn.padding, sn.stride)      # (1, N*Ci*k*k, L)
            patches = patches.view(groups, c_in_g * kh * kw, -1)
            vv = v.reshape(groups, c_out // sn.groups, -1)
            G = torch.bmm(vv, patches.transpose(1, 2)).view_as(w)
        return (w * G).reshape(n, sn.groups, -1).sum(-1).amax(1)                     # max over groups


def _buffers(sns: list[ConvSpectralNorm]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [s.u for s in sns], [s.v for s in sns]


def _adjoint(sn: ConvSpectralNorm, y: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    """conv_transpose2d restoring the conv's input size (the adjoint of the grouped conv)."""
    out_pad = []
    for dim in range(2):
        full = (y.shape[2 + dim] - 1) * sn.stride[dim] - 2 * sn.padding[dim] \
            + sn.dilation[dim] * (sn.kernel_size[dim] - 1) + 1
        out_pad.append(sn.input_hw[dim] - full)
    return F.conv_transpose2d(y, w, None, sn.stride, sn.padding, tuple(out_pad), groups, sn.dilation)


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
    conv: OpConv            # a representative depthwise conv (geometry)
    pointwise: _Slice
    bn: _FusedBN
    runner: "DepthwiseRunner"

    def __call__(self, x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        """x: (B, m*C, H, W) ordered (edge, channel), already through the ReLU."""
        dw, pw = self.depthwise, self.pointwise
        y = self.runner(x, weights[dw.group][dw.start:dw.start + dw.count].flatten(0, 1), self.conv)
        w = weights[pw.group][pw.start:pw.start + pw.count].flatten(2)            # (m, C_out, C_in)
        return self.bn(_pointwise(y, w))


def _pointwise(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """m 1x1 convs (w: (m, C_out, C_in)) on the m channel blocks of x (B, m*C_in, H, W), as one
    batched matmul (faster than a grouped conv on CPU); keeps channels_last inputs channels_last."""
    B, _, H, W = x.shape
    m, c_out, c_in = w.shape
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.matmul(w, x.reshape(B, m, c_in, H * W)).view(B, m * c_out, H, W)
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
                _Block(batch.slice_of([b[level][1] for b in per_edge]), per_edge[0][level][1],
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


class _Geometry(NamedTuple):
    """A depthwise conv's kernel_size, stride, padding and dilation (each an (h, w) pair)."""

    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple

    @classmethod
    def of(cls, conv: OpConv) -> "_Geometry":
        return cls(tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))

    def out_size(self, hw: Sequence[int]) -> tuple[int, int]:
        k, s, p, d = self
        return tuple((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2))

    def subsampled(self, hw: Sequence[int]) -> "_Geometry | None":
        """The same conv on the input subsampled by its stride, where one exists.

        A conv with stride s whose dilation d and padding p are multiples of s reads only the
        input pixels at multiples of s: it is the stride-1 conv with dilation d/s and padding
        p/s of ``x[..., ::s, ::s]`` (same output). For the dilated ops of a reduction cell
        (s = d = 2) that is a dense 3x3 or 5x5 conv on a quarter of the input, several times
        cheaper than the strided dilated conv.
        """
        k, s, p, d = self
        if s == (1, 1) or any(d[i] % s[i] or p[i] % s[i] for i in range(2)):
            return None
        sub = _Geometry(k, (1, 1), (p[0] // s[0], p[1] // s[1]), (d[0] // s[0], d[1] // s[1]))
        small = tuple(-(-hw[i] // s[i]) for i in range(2))
        return sub if sub.out_size(small) == self.out_size(hw) else None


class DepthwiseRunner:
    """Runs the fused depthwise convs, each in the fastest of three ways for its geometry (CPU).

    * maps of at most 64 pixels: as a matmul with the conv's dense operator. Channel c's
      (H*W, H'*W') matrix is sum_t w[c, t] * T[t], with T the 0/1 tap tensor of the geometry,
      cached here. PyTorch's depthwise kernels cost about a millisecond per call at these sizes
      whatever the work; the matmuls cost a tenth of that (bench/depthwise.py).
    * larger stride-1 maps: :func:`msrdarts.ops.depthwise_conv2d` where it is faster, with its
      weight gradient compiled (``compiled``, a :class:`msrdarts.ops.CompiledTaps`) for large calls;
    * otherwise ``F.conv2d``. On other devices always ``F.conv2d``.

    Before choosing, a strided conv that only reads pixels at multiples of its stride runs on
    the subsampled input instead (see :meth:`_Geometry.subsampled`).
    """

    def __init__(self, taps: DenseTaps | None = None, compiled: CompiledTaps | None = None):
        self.taps = taps if taps is not None else DenseTaps()
        self.compiled = compiled

    def __call__(self, x: torch.Tensor, w: torch.Tensor, conv: OpConv) -> torch.Tensor:
        geo = _Geometry.of(conv)
        sub = geo.subsampled(x.shape[-2:])
        if sub is not None:
            x, geo = x[:, :, ::geo.stride[0], ::geo.stride[1]], sub
        k, s, p, d = geo
        H, W = x.shape[-2:]
        if x.device.type == "cpu" and H * W <= DenseTaps.MAX_PIXELS and not (
                H * W == DenseTaps.MAX_PIXELS and k == (3, 3) and d == (1, 1) and s == (1, 1)):
            return self._dense(x, w, geo)
        if use_fast_depthwise(x, k, s, d):
            return depthwise_conv2d(x, w, p, d, s, self.compiled)
        return F.conv2d(x, w, None, s, p, d, x.shape[1])

    def _dense(self, x: torch.Tensor, w: torch.Tensor, geo: _Geometry) -> torch.Tensor:
        B, C, H, W = x.shape
        T = self.taps(*geo, (H, W), x.dtype, x.device)
        kk, _, L = T.shape
        M = torch.matmul(w.reshape(C, kk), T.view(kk, -1)).view(C, H * W, L)             # (C, HW, L)
        y = torch.einsum("bci,cil->bcl", x.reshape(B, C, H * W), M)                    # per channel: X_c M_c
        return y.view(B, C, *geo.out_size((H, W)))


class FusedCell:
    """Plans the fused forward of one :class:`msrdarts.supernet.SearchCell` (see the module docstring)."""

    def __init__(self, cell: nn.Module, batch: SpectralBatch, runner: DepthwiseRunner):
        self.cell = cell
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
    """The fused forward of a whole :class:`msrdarts.supernet.SuperNet`.

    ``batch`` must list the op convs in :meth:`conv_order` (see :func:`fused_conv_order`).
    ``compile_kernels``: compile the large depthwise weight gradients (see :class:`DepthwiseRunner`).
    """

    def __init__(self, net: nn.Module, batch: SpectralBatch, compile_kernels: bool = True):
        self.batch = batch
        self.runner = DepthwiseRunner(batch.taps, CompiledTaps() if compile_kernels else None)
        self.cells = [FusedCell(cell, self.batch, self.runner) for cell in net.cells]

    def __call__(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weights = self.batch.weights(net.training)
        s0, s1 = net.stem(x)
        for cell, fused in zip(net.cells, self.cells):
            s0, s1 = s1, fused(s0, s1, weights, net.mixing_weights(cell))
        return net.classifier(net.global_pooling(s1).flatten(1))


def fused_conv_order(net: nn.Module) -> list[OpConv]:
    """Every op conv of a supernet, in the order the fused forward consumes them."""
    return [conv for cell in net.cells for conv in FusedCell.conv_order(cell)]
