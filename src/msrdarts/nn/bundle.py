"""A bundle of normalised convs computed as one (SPEC section 2): the pieces
:class:`msrdarts.nn.spectral_batch.SpectralBatch` packs them with.

- :class:`_Part`: one group's share of a bundle (its representative spectral norm and weights);
- :class:`_Vectors`: the bundle's power-iteration buffers, each set as one 1-D tensor;
- :func:`_union_kernel`: depthwise convs of several kernels and dilations, all "same"-padded with
  one stride, as one grouped conv (:func:`_union_geometry`, each kernel at :func:`_taps_in`), and
  :func:`_depthwise_grads`, their sigma gradients from one conv of u with v.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels import _Geometry
from .spectral import ConvSpectralNorm, _Dsigma


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

    def __init__(self, us: list[torch.Tensor], vs: list[torch.Tensor], bases: list[torch.Tensor] | None = None,
                 flat: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None):
        self.us, self.vs, self.bases, self.flat = us, vs, bases or [], flat

    def u(self) -> torch.Tensor:
        return self.flat[0] if self.flat is not None else self._pack(self.us)

    def v(self) -> torch.Tensor:
        return self.flat[1] if self.flat is not None else self._pack(self.vs)

    def basis(self) -> torch.Tensor | None:
        """The block iterations' bases (None where the convs track one vector)."""
        if not self.bases:
            return None
        return self.flat[2] if self.flat is not None else self._pack(self.bases)

    def packable(self) -> bool:
        """Whether the buffers can share one tensor (one dtype and device)."""
        return len({(t.dtype, t.device) for t in self.us + self.vs + self.bases}) == 1

    @staticmethod
    def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    @staticmethod
    def unpack(packed: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """The views of ``packed`` (1-D) that hold each of ``like``'s tensors."""
        return [p.view(t.shape) for p, t in zip(packed.split([t.numel() for t in like]), like)]

    @torch.no_grad()
    def write(self, u: torch.Tensor, v: torch.Tensor, basis: torch.Tensor | None = None) -> None:
        """Store u, v and the basis (any shapes holding the packed elements in order) into the buffers."""
        for new, buffers, which in ((u, self.us, 0), (v, self.vs, 1), (basis, self.bases, 2)):
            if new is None or not buffers:
                continue
            if self.flat is None:
                torch._foreach_copy_(buffers, self.unpack(new.reshape(-1), buffers))
            elif new is not self.flat[which]:
                self.flat[which].copy_(new.reshape(-1))


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
