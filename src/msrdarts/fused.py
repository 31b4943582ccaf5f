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
  - the m pointwise convs are one batched matmul, (m, C, C) x (B, m, C, H*W), its output made
    contiguous (B, m*C, H, W): BN and convs on the matmul's (m, C, B, H*W) order are slow;
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
  gather per use. On small maps several groups iterate as one bundle
  (:meth:`SpectralBatch.bundles`), and each bundle's vectors are views of one tensor
  (:meth:`SpectralBatch.link`). Then each group's G = d(v^T A u)/dW (v u^T for the 1x1 convs,
  one conv of u with v for the depthwise ones, :func:`_depthwise_grads`) gives sigma = <W, G>,
  and every group's ``W * target / sigma`` runs as one autograd node (:class:`_Normalize`).

The modules are the reference's: every conv keeps its spectral-norm parametrization (so
``conv.weight`` is its normalised weight, and checkpoints, stable ranks and derivation do not
depend on the implementation). The fused path only reads their parameters and buffers and
writes back exactly the state the reference forward would update (power-iteration vectors, BN
running statistics). tests/test_fused.py checks forward, gradients and state against the
reference in float64.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .derive import edge_index
from .ops import CompiledTaps, DilConv, OpConv, SepConv, conv_adjoint, depthwise_conv2d, use_fast_depthwise
from .spectral import (ConvSpectralNorm, _normalize, circular_top_vectors, matrix_power_iteration, matrix_top_vectors,
                       refresh_vectors)

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
        self._vector_cache: dict[tuple, list[dict]] = {}
        self._bundles: list[list[int]] | None = None
        self._linked: dict[tuple, _Vectors] = {}     # per bundle, its linked buffers (see link)
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

    def _vectors(self, bundle: Sequence[int]) -> "_Vectors":
        """The power-iteration buffers (u's and v's) of every conv of the bundle's groups, read
        from the modules' buffer dicts (looked up once), so that buffers replaced by ``.to()`` or
        substituted by ``functional_call`` are the ones used. Where they are still the views that
        :meth:`link` made them, the bundle's u's (and v's) are read and written as one tensor."""
        key = tuple(bundle)
        if key not in self._vector_cache:
            self._vector_cache[key] = [sn._buffers for g in bundle for sn in self._norms()[g]]
        slots = self._vector_cache[key]
        us, vs = list(map(operator.itemgetter("u"), slots)), list(map(operator.itemgetter("v"), slots))
        linked = self._linked.get(key)
        if linked is not None and all(map(operator.is_, us, linked.us)) and all(map(operator.is_, vs, linked.vs)):
            return linked
        return _Vectors(us, vs)

    @torch.no_grad()
    def link(self) -> None:
        """Make the u (and v) buffers of each bundle's convs views of one 1-D tensor (see
        :class:`_Vectors`), so that a training step reads and writes a bundle's
        vectors with one operation instead of one per conv. The buffers stay the modules' own
        (state_dict, load_state_dict and DDP's buffer broadcasts see them as before); ``.to()``
        replaces them, and the network links again (:meth:`msrdarts.supernet.SuperNet._apply`)."""
        self._linked = {}
        for bundle in self.bundles():
            vectors = self._vectors(bundle)
            if not vectors.packable():
                continue
            flat = (vectors.u(), vectors.v())
            us, vs = vectors.unpack(flat[0], vectors.us), vectors.unpack(flat[1], vectors.vs)
            for sn, u, v in zip((sn for g in bundle for sn in self._norms()[g]), us, vs):
                sn._buffers["u"], sn._buffers["v"] = u, v
            self._linked[tuple(bundle)] = _Vectors(us, vs, flat)

    def weights(self, training: bool) -> list[torch.Tensor]:
        """Per group, the stacked normalised weights (N, C_out, C_in/groups, k, k).

        In training mode the bundles (see :meth:`bundles`) first advance their power iterations
        (and store the vectors back in each conv's buffers), as each conv's parametrization
        would. Then every group is scaled by target / sigma in one autograd node (:class:`_Normalize`).
        """
        out = [torch.stack(self._raws(g)) for g in range(len(self.groups))]    # (N, Co, Ci/g, k, k)
        norms = self._norms()
        normalised, grads = [], []
        with torch.autocast(out[0].device.type, enabled=False):                   # norms always in fp32+
            wide = {g: _wide(out[g]) for bundle in self.bundles() for g in bundle}
            for bundle in self.bundles():
                parts = [_Part(g, norms[g][0], wide[g].detach()) for g in bundle]
                iterations = parts[0].sn.n_power_iterations if training else 0
                grads += self._sigma_grads(parts, self._vectors(bundle), iterations)
                normalised += bundle
            if normalised:
                scaled = _Normalize.apply(grads, [self._targets(g, wide[g]) for g in normalised],
                                          *[wide[g] for g in normalised])
                for g, w in zip(normalised, scaled):
                    out[g] = w
        return out

    def _targets(self, g: int, w: torch.Tensor) -> float | torch.Tensor:
        targets = list(map(operator.attrgetter("target"), self._norms()[g]))
        if targets.count(targets[0]) == len(targets):
            return targets[0]
        return w.new_tensor(targets)

    def bundles(self) -> list[list[int]]:
        """The normalised groups, in bundles whose vectors are one tensor (see :meth:`link`).

        The depthwise groups on maps of at most :data:`DenseTaps.MAX_PIXELS` pixels with the same
        input size and stride and "same" padding iterate as one computation (dense operators of
        one shape, or kernels embedded in one larger kernel): on small maps the cost of a group is
        its number of kernel calls, not their size (23 groups but 6 bundles at the quick preset).
        All pointwise groups form one bundle too; each of them iterates on its own block of the
        bundle's vectors (batched matrix-vector products need one matrix shape). On larger maps
        each group iterates alone.
        """
        if self._bundles is None:
            keys: dict[tuple, list[int]] = {}
            for g, sns in enumerate(self._norms()):
                if sns[0] is not None:
                    keys.setdefault(self._bundle_key(g, sns[0]), []).append(g)
            self._bundles = list(keys.values())
        return self._bundles

    def _bundle_key(self, g: int, sn: ConvSpectralNorm) -> tuple:
        iteration = (sn.n_power_iterations, sn.eps)
        if sn.matrix:
            return ("matrix", *iteration)
        same_padding = all(2 * sn.padding[i] == sn.dilation[i] * (sn.kernel_size[i] - 1) for i in range(2))
        if sn.depthwise and same_padding and sn.input_hw[0] * sn.input_hw[1] <= DenseTaps.MAX_PIXELS:
            return ("depthwise", sn.input_hw, sn.stride, *iteration)
        return ("alone", g)

    def _group_vectors(self, g: int, convs: Sequence[int] | None = None) -> "_Vectors":
        """The buffers of group g's convs (or of its ``convs``), packed apart from their bundle."""
        sns = self._norms()[g]
        sns = sns if convs is None else [sns[i] for i in convs]
        return _Vectors([sn.u for sn in sns], [sn.v for sn in sns])

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

            def sigmas(convs: list[int], iterations: int) -> torch.Tensor:
                part = _Part(g, sns[0], w[convs])
                dsigma = self._sigma_grads([part], self._group_vectors(g, convs), iterations)[0]
                return dsigma.sigmas(part.w).amax(1)

            active = list(range(len(sns)))              # convs still converging
            last = sigmas(active, 0)
            for _ in range(0, max_iterations, 10):
                now = sigmas(active, 10)
                moving = ((now - last).abs() > tol * now).tolist()
                active, last = [i for i, m in zip(active, moving) if m], now[torch.tensor(moving, dtype=torch.bool)]
                if not active:
                    break

    @torch.no_grad()
    def refresh(self, iterations: int = 3) -> None:
        """:meth:`ConvSpectralNorm.refresh` for every conv: the 1x1 convs' vectors become exact
        in one batched ``eigh`` per group; the depthwise convs of a group refresh as one grouped
        conv (:meth:`_refresh_depthwise`); any other conv runs its own refresh."""
        for g, sns in enumerate(self._norms()):
            if sns[0] is None:
                continue
            if sns[0].matrix:
                self._exact_matrix_vectors(g)
            elif sns[0].depthwise:
                self._refresh_depthwise(g, iterations)
            else:
                for w, sn in zip(self._raws(g), sns):
                    sn.refresh(w.detach(), iterations)

    def _refresh_depthwise(self, g: int, iterations: int) -> None:
        """:meth:`ConvSpectralNorm.refresh` of group g's N depthwise convs at once. Their channels
        are independent operators, so the N convs of C channels are one depthwise conv of N*C
        channels: the same probe (the circular top vector of each channel), the same iterations,
        the same choice per channel (one call instead of N: the whole refresh of the quick preset's
        supernet went from 0.6 s to 0.1 s)."""
        sn = self._norms()[g][0]
        w = torch.stack(self._raws(g)).detach().flatten(0, 1)                           # (N*C, 1, k, k)
        n = w.shape[0]
        vectors = self._group_vectors(g)
        if sn.dilation[0] == sn.dilation[1]:
            probe = circular_top_vectors(w, sn.input_hw, sn.dilation[0], n)
        else:
            probe = _normalize(w.new_ones(1, n, *sn.input_hw), n, sn.eps)
        geo = _Geometry.of(sn)
        vectors.write(*refresh_vectors(vectors.u().view(1, n, *sn.input_hw), probe,
                                       lambda x: F.conv2d(x, w, None, geo.stride, geo.padding, geo.dilation, n),
                                       lambda y: _adjoint(geo, sn.input_hw, y, w, n), n, iterations, sn.eps))

    def _exact_matrix_vectors(self, g: int) -> None:
        """Set group g's 1x1 convs' vectors to their exact top singular vectors (one batched eigh)."""
        w = torch.stack(self._raws(g)).detach()
        self._group_vectors(g).write(*matrix_top_vectors(w.flatten(2), self._norms()[g][0].eps))

    @torch.no_grad()
    def _sigma_grads(self, parts: list["_Part"], vectors: "_Vectors", iterations: int) -> list["_Dsigma"]:
        """Per part, d(v^T A u)/dW of its N convs (see :class:`_Dsigma`), after ``iterations``
        power iterations run together for all parts (one bundle, see :meth:`bundles`) on
        ``vectors``, which are read and stored back."""
        sn = parts[0].sn
        if sn.matrix:
            return self._matrix_grads(parts, vectors, iterations)
        if sn.depthwise and sn.input_hw[0] * sn.input_hw[1] <= self.DENSE_MAX_PIXELS:
            return self._dense_grads(parts, vectors, iterations)
        return self._conv_grads(parts, vectors, iterations)

    def _matrix_grads(self, parts: list["_Part"], vectors: "_Vectors", iterations: int) -> list["_Dsigma"]:
        """1x1 convs: per part, u (N, C_in) and v (N, C_out), batched matrix-vector products."""
        u, v = vectors.u(), vectors.v()
        shapes = [p.w.shape[:3] for p in parts]                                      # (N, Co, Ci)
        us = [b.view(n, ci) for b, (n, _, ci) in zip(u.split([n * ci for n, _, ci in shapes]), shapes)]
        vs = [b.view(n, co) for b, (n, co, _) in zip(v.split([n * co for n, co, _ in shapes]), shapes)]
        out = []
        for p, u_p, v_p in zip(parts, us, vs):
            if iterations:
                new_u, new_v = matrix_power_iteration(p.w.flatten(2), u_p, iterations, p.sn.eps)
                u_p.copy_(new_u)
                v_p.copy_(new_v)
            else:      # u_p and v_p are views of the buffers, which a later forward overwrites
                new_u, new_v = u_p.clone(), v_p.clone()
            out.append(_OuterDsigma(new_v, new_u))
        if iterations:
            vectors.write(u, v)
        return out

    def _dense_grads(self, parts: list["_Part"], vectors: "_Vectors", iterations: int) -> list["_Dsigma"]:
        """Depthwise convs on small maps: per channel c, A_c = M_c^T with M_c (HW, L) its dense
        operator (see DenseTaps), so A u = u M and A^T v = M v, batched over all channels of all
        parts (same input and output sizes, any kernel)."""
        taps = [self.taps(p.sn.kernel_size, p.sn.stride, p.sn.padding, p.sn.dilation, p.sn.input_hw, p.w.dtype,
                          p.w.device) for p in parts]
        hw, L = taps[0].shape[1:]
        taps = [T.view(T.shape[0], hw * L) for T in taps]                            # (k*k, HW*L) each
        channels = [p.w.shape[0] * p.w.shape[1] for p in parts]
        u, v = vectors.u().view(-1, hw), vectors.v().view(-1, L)                   # (sum N*C, HW), (sum N*C, L)
        eps = parts[0].sn.eps
        if iterations:
            M = u.new_empty(sum(channels), hw * L)
            for p, T, rows in zip(parts, taps, M.split(channels)):
                torch.mm(p.w.reshape(rows.shape[0], -1), T, out=rows)
            M = M.view(-1, hw, L)
            for _ in range(iterations):
                v = F.normalize(torch.bmm(u.unsqueeze(1), M).squeeze(1), dim=1, eps=eps)
                u = F.normalize(torch.bmm(M, v.unsqueeze(2)).squeeze(2), dim=1, eps=eps)
            vectors.write(u, v)
        # G[c, t] = sum_{i,l} u[c, i] T[t, i, l] v[c, l] = d(v^T A u)/dw[c, t]
        outer = (u.unsqueeze(2) * v.unsqueeze(1)).view(-1, hw * L).split(channels)
        return [_Dsigma((o @ T.mT).view_as(p.w), p.sn.groups) for o, T, p in zip(outer, taps, parts)]

    def _conv_grads(self, parts: list["_Part"], vectors: "_Vectors", iterations: int) -> list["_Dsigma"]:
        """Other convs: u (1, sum N*C_in, H, W) and v (1, sum N*C_out, H', W'); their union is one
        grouped conv with N times the groups (for depthwise convs of different kernels, each
        kernel embedded in the smallest kernel that spans all, see :func:`_union_geometry`)."""
        sn = parts[0].sn
        groups = sum(p.sn.groups * p.w.shape[0] for p in parts)
        u = vectors.u().view(1, -1, *sn.input_hw)
        v = vectors.v().view(1, -1, *_Geometry.of(sn).out_size(sn.input_hw))
        if iterations:
            geo, wd = _union_kernel(parts)                                          # (sum N*Co, Ci/g, K, K)
            for _ in range(iterations):
                v = _normalize(F.conv2d(u, wd, None, geo.stride, geo.padding, geo.dilation, groups), groups, sn.eps)
                u = _normalize(_adjoint(geo, sn.input_hw, v, wd, groups), groups, sn.eps)
            vectors.write(u, v)
        if all(p.sn.depthwise for p in parts):
            return _depthwise_grads(parts, u, v)
        grads = []
        u_parts = u.split([p.w.shape[0] * p.w.shape[2] * p.sn.groups for p in parts], 1)      # N*Ci each
        v_parts = v.split([p.w.shape[0] * p.w.shape[1] for p in parts], 1)                  # N*Co each
        for p, u_p, v_p in zip(parts, u_parts, v_parts):       # G = d(v^T A u)/dW, one unfold + one bmm
            n_groups = p.w.shape[0] * p.sn.groups
            c_out, c_in_g, kh, kw = p.w.shape[1:]
            patches = F.unfold(u_p, (kh, kw), p.sn.dilation, p.sn.padding, p.sn.stride)   # (1, N*Ci*k*k, L)
            patches = patches.view(n_groups, c_in_g * kh * kw, -1)
            vv = v_p.reshape(n_groups, c_out // p.sn.groups, -1)
            grads.append(_Dsigma(torch.bmm(vv, patches.transpose(1, 2)).view_as(p.w), p.sn.groups))
        return grads


@dataclass
class _Part:
    """One group's share of a bundle's spectral-norm computation."""

    group: int
    sn: ConvSpectralNorm        # a representative (the geometry)
    w: torch.Tensor             # (N, Co, Ci/g, k, k), float32 or wider, detached


class _Vectors:
    """The u and v power-iteration buffers of the convs of a bundle, each set as one 1-D tensor:
    the buffers' elements concatenated in conv order. Viewed per group of N 1x1 convs, that is a
    block (N, C); for other convs (one input and one output map size per bundle), the input u
    (1, sum C_in, H, W) and output v (1, sum C_out, H', W') of their union as one grouped conv.

    Where the buffers are the views of ``flat`` that :meth:`SpectralBatch.link` made them, reading
    is free and writing is one copy; otherwise a concatenation and a foreach copy.
    """

    def __init__(self, us: list[torch.Tensor], vs: list[torch.Tensor],
                 flat: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.us, self.vs, self.flat = us, vs, flat

    def u(self) -> torch.Tensor:
        return self.flat[0] if self.flat is not None else self._pack(self.us)

    def v(self) -> torch.Tensor:
        return self.flat[1] if self.flat is not None else self._pack(self.vs)

    def packable(self) -> bool:
        """Whether the buffers can share one tensor (one dtype and device)."""
        return len({(t.dtype, t.device) for t in self.us + self.vs}) == 1

    @staticmethod
    def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    @staticmethod
    def unpack(packed: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """The views of ``packed`` (1-D) that hold each of ``like``'s tensors."""
        return [p.view(t.shape) for p, t in zip(packed.split([t.numel() for t in like]), like)]

    @torch.no_grad()
    def write(self, u: torch.Tensor, v: torch.Tensor) -> None:
        """Store u and v (any shapes holding the packed elements in order) into the buffers."""
        for new, buffers, which in ((u, self.us, 0), (v, self.vs, 1)):
            if self.flat is None:
                torch._foreach_copy_(buffers, self.unpack(new.reshape(-1), buffers))
            elif new is not self.flat[which]:
                self.flat[which].copy_(new.reshape(-1))


class _Dsigma:
    """d(v^T A u)/dW of N convs of one group, a constant (u and v do not depend on W): G, shaped
    like their weights W (N, Co, Ci/g, k, k). Each conv's sigma is the max over its groups j of
    <W_j, G_j>, so ``sigmas`` gives (N, groups) and ``add_grad`` adds sum_j coef[:, j] G_j."""

    def __init__(self, G: torch.Tensor, groups: int):
        self.G, self.groups = G, groups

    def sigmas(self, w: torch.Tensor) -> torch.Tensor:
        return (w * self.G).reshape(w.shape[0], self.groups, -1).sum(-1)

    def add_grad(self, base: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return base + (self.G.reshape(base.shape[0], self.groups, -1) * coef[..., None]).view_as(base)


class _OuterDsigma(_Dsigma):
    """1x1 convs: G = v u^T for v (N, C_out) and u (N, C_in), never formed in the forward."""

    def __init__(self, v: torch.Tensor, u: torch.Tensor):
        self.v, self.u, self.groups = v, u, 1

    def sigmas(self, w: torch.Tensor) -> torch.Tensor:
        wu = torch.bmm(w.reshape(w.shape[0], *w.shape[1:3]), self.u.unsqueeze(2))    # (N, Co, 1)
        return torch.bmm(self.v.unsqueeze(1), wu).view(-1, 1)

    def add_grad(self, base: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        n, co, ci = base.shape[:3]
        return torch.baddbmm(base.reshape(n, co, ci), (coef * self.v).unsqueeze(2), self.u.unsqueeze(1)
                             ).view_as(base)


class _Normalize(torch.autograd.Function):
    """``W -> target * W / sigma`` for many groups of convs at once: for each group, its weights
    W (N, ...) and a :class:`_Dsigma` giving each conv's sigma (the max over its groups of
    <W_j, G_j>).

    The values and gradients are those of autograd through ``W * (target / sigma(W))``, but as one
    node: its backward is the handful of products and sums that autograd would run per group,
    without autograd's per-operation bookkeeping (about 8 nodes per group before).
    """

    @staticmethod
    def forward(ctx, dsigmas: list[_Dsigma], targets: list, *ws: torch.Tensor):
        outs, stats = [], []
        for w, dsigma, target in zip(ws, dsigmas, targets):
            per_group = dsigma.sigmas(w)                                               # (N, groups)
            sigma = per_group.amax(1)
            scale = target / sigma
            outs.append(w * scale.view(-1, *[1] * (w.dim() - 1)))
            stats.append((per_group, sigma, scale))
        ctx.dsigmas, ctx.stats = dsigmas, stats
        ctx.save_for_backward(*ws)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *d_outs: torch.Tensor):
        d_ws = []
        for i, (w, dsigma, (per_group, sigma, scale), d_out) in enumerate(
                zip(ctx.saved_tensors, ctx.dsigmas, ctx.stats, d_outs)):
            if not ctx.needs_input_grad[2 + i]:
                d_ws.append(None)
                continue
            d_sigma = -(scale / sigma) * (d_out * w).reshape(w.shape[0], -1).sum(1)    # dL/dsigma, (N,)
            ties = (per_group == sigma[:, None]).to(w.dtype)                          # amax's rule: ties share
            share = ties / ties.sum(1, keepdim=True) * d_sigma[:, None]               # (N, groups)
            d_ws.append(dsigma.add_grad(d_out * scale.view(-1, *[1] * (w.dim() - 1)), share))
        return (None, None, *d_ws)


def _wide(w: torch.Tensor) -> torch.Tensor:
    return w if w.dtype in (torch.float32, torch.float64) else w.float()


def _union_geometry(parts: list[_Part]) -> _Geometry:
    """One geometry for all parts' convs: theirs if they share one; else, for depthwise convs of
    different kernels and dilations, all "same"-padded with one stride (one bundle), the undilated
    kernel that spans all of them (each kernel's taps sit at :func:`_taps_in` of it)."""
    geos = {_Geometry.of(p.sn) for p in parts}
    if len(geos) == 1:
        return geos.pop()
    span = tuple(max(p.sn.dilation[i] * (p.sn.kernel_size[i] - 1) + 1 for p in parts) for i in range(2))
    return _Geometry(span, tuple(parts[0].sn.stride), (span[0] // 2, span[1] // 2), (1, 1))


def _taps_in(geo: _Geometry, part: _Part) -> tuple[slice, slice]:
    """Where the part's kernel taps sit in the (K, K) kernel of the union geometry ``geo``."""
    out = []
    for i in range(2):
        start = (geo.padding[i] - part.sn.padding[i]) // geo.dilation[i]
        step = part.sn.dilation[i] // geo.dilation[i]
        out.append(slice(start, start + step * (part.sn.kernel_size[i] - 1) + 1, step))
    return out[0], out[1]


def _union_kernel(parts: list[_Part]) -> tuple[_Geometry, torch.Tensor]:
    """The parts' convs as one grouped conv: the union geometry and the stacked weights
    (sum N*Co, Ci/g, K, K), each kernel placed at its taps and zeros elsewhere (the operator is unchanged)."""
    geo = _union_geometry(parts)
    weights = [p.w.flatten(0, 1) for p in parts]
    if all(_Geometry.of(p.sn) == geo for p in parts):
        return geo, weights[0] if len(weights) == 1 else torch.cat(weights)
    out = weights[0].new_zeros(sum(w.shape[0] for w in weights), 1, *geo.kernel_size)
    for p, w, rows in zip(parts, weights, out.split([w.shape[0] for w in weights])):
        rows[(slice(None), 0, *_taps_in(geo, p))] = w[:, 0]
    return geo, out


def _depthwise_grads(parts: list[_Part], u: torch.Tensor, v: torch.Tensor) -> list["_Dsigma"]:
    """G = d(v^T A u)/dW of depthwise convs from u (1, C, H, W) and v (1, C, H', W') packed.

    G[c, p, q] = sum over output pixels (y, x) of v[c, y, x] * u_padded[c, s*y + d*p, s*x + d*q]:
    a depthwise conv of u with v as the kernel, with the roles of stride and dilation swapped.
    One such conv serves all parts at the union geometry (far cheaper than unfolding u: the
    output is only K x K per channel); each part's G is a strided view of it.
    """
    geo = _union_geometry(parts)
    C = u.shape[1]
    G = F.conv2d(u, v.reshape(C, 1, *v.shape[2:]), None, geo.dilation, geo.padding, geo.stride, C)[0]  # (C, >=K, >=K)
    out = []
    for p, rows in zip(parts, G.split([p.w.shape[0] * p.w.shape[1] for p in parts])):
        out.append(_Dsigma(rows[(slice(None), *_taps_in(geo, p))].view_as(p.w), p.sn.groups))
    return out


def _adjoint(geo: "_Geometry", input_hw: tuple[int, int], y: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    """The adjoint of the grouped conv of geometry ``geo`` (:func:`msrdarts.ops.conv_adjoint`)."""
    return conv_adjoint(y, w, input_hw, geo.stride, geo.padding, geo.dilation, groups)


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
    geometry: "_Geometry"   # of the depthwise convs (one per op kind and level)
    pointwise: _Slice
    bn: _FusedBN
    runner: "DepthwiseRunner"

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
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
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

    def __call__(self, x: torch.Tensor, w: torch.Tensor, geo: _Geometry) -> torch.Tensor:
        """The depthwise conv of x (B, C, H, W) with weights w (C, 1, kh, kw) and geometry ``geo``."""
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
        x, w = x.reshape(B, C, H * W), w.reshape(C, -1)
        if T.shape[2] >= B:   # M as large as x: rebuilt in the backward instead of kept (_DenseDepthwise)
            y = _DenseDepthwise.apply(x, w, T)
        else:
            y = torch.einsum("bci,cil->bcl", x, _dense_operators(w, T))                   # per channel: X_c M_c
        return y.view(B, C, *geo.out_size((H, W)))


def _dense_operators(w: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """Each channel's dense operator M_c = sum_t w[c, t] T[t]: (C, HW, L) from w (C, k*k) and T (k*k, HW, L)."""
    kk, hw, L = T.shape
    return torch.matmul(w, T.view(kk, hw * L)).view(-1, hw, L)


class _DenseDepthwise(torch.autograd.Function):
    """y[b, c] = x[b, c] M_c for x (B, C, HW), w (C, k*k), the taps T (k*k, HW, L): a depthwise
    conv on a small map (see :class:`DepthwiseRunner`).

    Autograd through the two matmuls would keep every M (C, HW, L) until the backward: on 8 x 8
    maps with stride 1 that is 16 KB a channel, as much as a batch of 64 of the input, for each of
    the dozens of such convs of a step. This keeps x and w only and builds M again in the backward
    (one small matmul). Under autocast the backward runs in the gradient's dtype, as autograd's would.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.taps = T
        return torch.einsum("bci,cil->bcl", x, _dense_operators(w, T))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        T = ctx.taps.to(dy.dtype)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.einsum("bcl,cil->bci", dy, _dense_operators(w.to(dy.dtype), T)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dM = torch.einsum("bci,bcl->cil", x.to(dy.dtype), dy)                          # (C, HW, L)
            dw = torch.matmul(dM.reshape(dM.shape[0], -1), T.view(T.shape[0], -1).mT).to(w.dtype)
        return dx, dw, None


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
