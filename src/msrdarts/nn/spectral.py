"""Spectral normalisation of convolutions as operators on their real input (SPEC section 2).

``W = C * W_orig / sigma(W_orig)`` where sigma is the largest singular value of the conv as a
linear map on its actual input shape (C_in, H, W), with its zero padding, stride, dilation and
groups: not the norm of the reshaped kernel matrix. A 1x1 conv without padding has the operator
norm of its C_out x C_in matrix on any input, so its sigma comes from plain matrix power
iteration (as in the authors' code). Other convs (the depthwise ones) use block power iteration
with ``conv2d`` (A) and ``conv_transpose2d`` (A^T): per channel group a block of vectors tracks the
top singular subspace (:func:`block_step`), so a singular value that overtakes the tracked one is
followed at once. The vectors persist across steps and in checkpoints, start converged, and are
recomputed every few steps by a restarted block Krylov refresh (:func:`block_refresh`, or
:func:`dense_refresh` on small maps; see :class:`ConvSpectralNorm`).

The parametrization is registered with ``torch.nn.utils.parametrize``: ``conv.weight`` is the
normalised weight, ``conv.parametrizations.weight.original`` the trained one.

The batched form for whole networks is :mod:`msrdarts.nn.spectral_batch`.

One home each, for both paths: the probe a refresh starts from (:mod:`msrdarts.nn.probe`), the
conv operator and its power iteration (:class:`ConvOperator`), the block step and the refreshes
(:mod:`msrdarts.nn.block_power`: :func:`block_step`, :func:`block_refresh`, :func:`dense_refresh`),
the convergence loop at construction
(:func:`converge_sigmas`), the unfold form of G (:func:`unfold_dsigma`) and sigma = <W, G>
(:meth:`_Dsigma.sigmas`). The batch keeps two faster forms of G for its depthwise groups (dense
operators on small maps, one conv of u with v on larger ones): they sum in another order than the
unfold form, so the per-conv path keeps the unfold form and its results to the last bit.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .block_power import (RefreshInput, block_refresh, block_step, dense_refresh, normalize_groups, small_top_vectors,
                          stack_block)
from .probe import circular_probe, with_probe
from .kernels import DenseTaps, _Geometry, conv_adjoint
from .ops import OpConv


#: A refresh's bound on Krylov steps (:func:`block_refresh`), and its convergence tolerance.
REFRESH_STEPS, REFRESH_TOL = 6, 1e-5
#: Depthwise convs on maps of at most this many pixels use their dense per-channel operators
#: (:func:`depthwise_dense`) for power iteration and refresh: on such maps a conv call costs more
#: than the (H*W, H'*W') products.
DENSE_MAX_PIXELS = 16
#: Depthwise convs on such maps whose input or output has at most this many pixels are normalised
#: exactly at every training forward (:func:`small_top_vectors`): a few operations on s x s Gram
#: matrices, cheaper than a block step and never in need of a refresh.
EXACT_MAX_SIDE = 4


@torch.no_grad()
def matrix_top_vectors(w: torch.Tensor, eps: float = 1e-12, squarings: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Top singular vectors of each matrix of ``w`` (..., m, n): (u (..., n), v (..., m)).

    u is the top eigenvector of the n x n Gram matrix G = W^T W: G^(2^squarings) (in w's
    precision, at least float32; trace-normalised before each squaring) is the projector onto it
    up to (l2/l1)^(2^squarings), and its column with the largest diagonal is a multiple of it. Batched products of C x C
    matrices: several times cheaper than a batched ``eigh`` of hundreds of small matrices, which
    LAPACK solves one by one. Where the top two eigenvalues are too close for 4,096 powers to
    separate, u is a mix of their eigenvectors and v^T W u is within (1 - l2/l1) of the top
    singular value, relative, times the mix's weight off the top. v = W u / ||W u||.
    """
    P = (w.mT @ w).to(torch.promote_types(w.dtype, torch.float32))
    tiny = torch.finfo(P.dtype).tiny
    for _ in range(squarings):
        P = P / P.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True).unsqueeze(-1).clamp_min(tiny)
        P = P @ P
    col = P.diagonal(dim1=-2, dim2=-1).argmax(-1, keepdim=True)                     # (..., 1)
    u = P.gather(-1, col.unsqueeze(-2).expand(*P.shape[:-1], 1))[..., 0]           # (..., n)
    u = u + tiny * F.one_hot(col[..., 0], u.shape[-1]).to(u.dtype)                # a unit vector if W = 0
    u = F.normalize(u, dim=-1, eps=tiny).to(w.dtype)
    return u, F.normalize((w @ u[..., None])[..., 0], dim=-1, eps=eps)


#: :func:`matrix_top_vectors_of` pads matrices of several shapes into one batch while the padded
#: batch's Gram squarings cost at most this many multiply-adds each (a few hundred microseconds),
#: and at most PAD_MAX_WASTE times those of the unpadded matrices.
PAD_MAX_MACS, PAD_MAX_WASTE = 1 << 25, 1.5


def matrix_top_vectors_of(ws: list[torch.Tensor], eps: float = 1e-12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`matrix_top_vectors` of several batches of matrices ``ws`` (each (N_i, m_i, n_i)), in as
    few batches as cheap: largest first, each batch zero-padded to its largest m and n while that
    costs at most :data:`PAD_MAX_MACS` per squaring and at most :data:`PAD_MAX_WASTE` times the
    unpadded arithmetic (on small matrices a squaring costs its kernel calls, not its arithmetic;
    on 32 x 32 ones the arithmetic counts). Zero rows and columns change neither the top singular
    value nor the vectors (their padded entries are exactly zero, and an all-zero matrix still
    gets a unit u on its first coordinate)."""
    order = sorted(range(len(ws)), key=lambda i: -ws[i].shape[2])
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        if b is not None and ws[i].dtype == ws[b[0]].dtype:
            n = ws[b[0]].shape[2]
            count = sum(ws[j].shape[0] for j in b + [i])
            if count * n ** 3 <= PAD_MAX_MACS and count * n ** 3 <= PAD_MAX_WASTE * sum(
                    ws[j].shape[0] * ws[j].shape[2] ** 3 for j in b + [i]):
                b.append(i)
                continue
        batches.append([i])
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(ws)
    for b in batches:
        if len(b) == 1:
            out[b[0]] = matrix_top_vectors(ws[b[0]], eps)
            continue
        m, n = max(ws[i].shape[1] for i in b), max(ws[i].shape[2] for i in b)
        padded = torch.cat([F.pad(ws[i], (0, n - ws[i].shape[2], 0, m - ws[i].shape[1])) for i in b])
        u, _ = matrix_top_vectors(padded, eps)
        for i, u_w in zip(b, u.split([ws[i].shape[0] for i in b])):
            w = ws[i]
            u_w = F.normalize(u_w[:, :w.shape[2]], dim=-1, eps=torch.finfo(u_w.dtype).tiny)
            out[i] = (u_w, F.normalize((w @ u_w[..., None])[..., 0], dim=-1, eps=eps))
    return out


@torch.no_grad()
def matrix_power_iteration(w: torch.Tensor, u: torch.Tensor, iterations: int, eps: float = 1e-12
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``iterations`` power iterations on each matrix of ``w`` (..., m, n) from the unit vectors
    ``u`` (..., n): returns the new (u, v), v (..., m). Needs ``iterations`` >= 1."""
    for _ in range(iterations):
        v = F.normalize((w @ u[..., None])[..., 0], dim=-1, eps=eps)
        u = F.normalize((v[..., None, :] @ w)[..., 0, :], dim=-1, eps=eps)
    return u, v


def depthwise_dense(w: torch.Tensor, geo: _Geometry, input_hw: tuple[int, int], taps: DenseTaps) -> torch.Tensor:
    """The dense operators M_c (C, H*W, H'*W') of the depthwise conv with weights w (C, 1, k, k):
    channel c maps x_c to x_c M_c (see :class:`msrdarts.nn.kernels.DenseTaps`)."""
    T = taps(geo.kernel_size, geo.stride, geo.padding, geo.dilation, input_hw, w.dtype, w.device)   # (k*k, HW, L)
    return (w.reshape(w.shape[0], -1) @ T.reshape(T.shape[0], -1)).view(w.shape[0], *T.shape[1:])


class ConvOperator(NamedTuple):
    """The grouped conv with weights ``w`` and geometry ``geo`` as a linear operator A on inputs
    (C_in, *input_hw): the map whose top singular value sigma is. A single conv's
    (:meth:`ConvSpectralNorm.conv_operator`) or many convs' as one grouped conv (N*groups groups:
    :class:`SpectralBatch`)."""

    w: torch.Tensor
    geo: _Geometry
    input_hw: tuple[int, int]
    groups: int

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, None, self.geo.stride, self.geo.padding, self.geo.dilation, self.groups)

    def At(self, y: torch.Tensor) -> torch.Tensor:
        """The adjoint (:func:`msrdarts.nn.kernels.conv_adjoint`)."""
        return conv_adjoint(y, self.w, self.input_hw, self.geo.stride, self.geo.padding, self.geo.dilation,
                            self.groups)

    def A_rows(self, x: torch.Tensor) -> torch.Tensor:
        """A on blocks of vectors per group: (groups, r, C_in/groups*H*W) -> (groups, r, C_out/groups*H'*W')."""
        r = x.shape[1]
        y = self.A(x.transpose(0, 1).reshape(r, -1, *self.input_hw))
        return y.reshape(r, self.groups, -1).transpose(0, 1)

    def At_rows(self, y: torch.Tensor) -> torch.Tensor:
        """A^T on blocks of vectors per group (the inverse shapes of :meth:`A_rows`)."""
        r = y.shape[1]
        x = self.At(y.transpose(0, 1).reshape(r, -1, *self.geo.out_size(self.input_hw)))
        return x.reshape(r, self.groups, -1).transpose(0, 1)

    @torch.no_grad()
    def power_iterate(self, u: torch.Tensor, iterations: int, eps: float, basis: torch.Tensor | None = None,
                      block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``iterations`` (>= 1) power iterations from u (1, C_in, H, W), unit per group: the new
        (u, v, basis), v (1, C_out, H', W'). With a ``basis`` (groups, b-1, C_in/groups*H*W), block
        iterations (:func:`block_step`) that keep ``block`` vectors (default b; b - 1 where the
        basis carries an extra vector for the first step, :func:`with_probe`). For the pair,
        v^T A u is a lower bound of each group's top singular value."""
        if basis is None:
            for _ in range(iterations):
                v = normalize_groups(self.A(u), self.groups, eps)
                u = normalize_groups(self.At(v), self.groups, eps)
            return u, v, None
        in_shape, out_shape = u.shape, (1, self.w.shape[0], *self.geo.out_size(self.input_hw))
        u = u.reshape(self.groups, -1)
        block = basis.shape[1] + 1 if block is None else block
        for _ in range(iterations):
            Z = self.A_rows(stack_block(u, basis))
            u, v, basis = block_step(Z, self.At_rows(Z), eps, block)
        return u.reshape(in_shape), v.reshape(out_shape), basis

    @torch.no_grad()
    def refresh(self, u: torch.Tensor, basis: torch.Tensor | None, probe: torch.Tensor, max_steps: int,
                tol: float, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:func:`block_refresh` from u (1, C_in, H, W), its ``basis`` (groups, b-1, n) or None
        (b = 1) and ``probe`` (1, C_in, H, W): the new (u, v, basis) in those shapes."""
        g = self.groups
        rows = [u.reshape(g, 1, -1)] + ([] if basis is None else [basis]) + [probe.reshape(g, 1, -1)]
        block = 1 if basis is None else basis.shape[1] + 1
        [(new_u, new_v, new_basis)] = block_refresh([RefreshInput(self.A_rows, self.At_rows, torch.cat(rows, 1))],
                                                    block, max_steps, tol, eps)
        out_shape = (1, self.w.shape[0], *self.geo.out_size(self.input_hw))
        return new_u.reshape(u.shape), new_v.reshape(out_shape), None if basis is None else new_basis


@torch.no_grad()
def converge_sigmas(sigmas: Callable[[list[int], int], torch.Tensor], count: int, tol: float,
                    max_iterations: int) -> None:
    """Power-iterate ``count`` operators to convergence: 10 iterations at a time, until each one's
    sigma estimate changes by at most ``tol`` (relative) over 10 iterations, or ``max_iterations``.

    ``sigmas(active, n)`` advances the operators listed in ``active`` by n iterations (n = 0 at
    first) and returns their sigma estimates (len(active),). Converged operators leave ``active``
    (so does one whose sigma is NaN: more iterations cannot help it); each check syncs once.
    """
    active = list(range(count))                 # operators still converging
    last = sigmas(active, 0)
    for _ in range(0, max_iterations, 10):
        now = sigmas(active, 10)
        moving = ((now - last).abs() > tol * now).tolist()
        active, last = [i for i, m in zip(active, moving) if m], now[torch.tensor(moving, dtype=torch.bool)]
        if not active:
            break


@torch.no_grad()
def unfold_dsigma(u: torch.Tensor, v: torch.Tensor, geo: _Geometry, groups: int) -> torch.Tensor:
    """G = d(v^T A u)/dW for the grouped conv A of geometry ``geo``, from u (1, C_in, H, W) and
    v (1, C_out, H', W'): (groups, C_out/groups, C_in/groups*kh*kw), to be viewed as the weights.

    G[o, i, p, q] = sum over output pixels of v[o] * (the input patch tap (p, q) of u)[i]: one
    unfold and one batched matmul (the conv weight-gradient kernels are slow for batch-1
    depthwise convs on the CPU).
    """
    patches = F.unfold(u, geo.kernel_size, geo.dilation, geo.padding, geo.stride)    # (1, C_in*kh*kw, L)
    patches = patches.view(groups, -1, patches.shape[-1])                              # (g, C_in/g*kh*kw, L)
    v = v.reshape(groups, -1, patches.shape[-1])                                       # (g, C_out/g, L)
    return torch.bmm(v, patches.transpose(1, 2))


class _Dsigma:
    """d(v^T A u)/dW of N convs of one group, a constant (u and v do not depend on W): G, shaped
    like their weights W (N, Co, Ci/g, k, k). Each conv's sigma is the max over its groups j of
    <W_j, G_j>, so ``sigmas`` gives (N, groups) and ``add_grad`` adds sum_j coef[:, j] G_j.
    (:meth:`ConvSpectralNorm.sigma` is ``sigmas`` of its one conv, with autograd.)"""

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


def polyphase_geometry(kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                       dilation: tuple[int, int], input_hw: tuple[int, int]
                       ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(padding, dilation, input_hw) of the smallest conv with the same singular values.

    A stride-1 conv with dilation d (per axis), padding a multiple of d, on an input whose sides
    are multiples of d maps each of the d0*d1 sub-lattices x[a::d0, b::d1] of its input to the
    same sub-lattice of its output, by the undilated kernel with padding p/d on an (H/d, W/d)
    map, the same for every sub-lattice: the operator is d0*d1 copies of that one, and each of
    its singular values appears d0*d1 times. Power iteration on the full operator then tracks a
    top singular value of multiplicity 4 (dilation 2) with a block of 3 vectors, and loses it
    when the next cluster of 4 overtakes; on the small one it is single and the problem is 4x
    smaller (a dil_conv on an 8x8 map becomes a 4x4 one, which the dense path takes). Other convs
    keep their geometry."""
    H, W = input_hw
    if stride != (1, 1) or dilation == (1, 1) or any(
            n % d or p % d for n, p, d in zip((H, W), padding, dilation)):
        return tuple(padding), tuple(dilation), (H, W)
    return ((padding[0] // dilation[0], padding[1] // dilation[1]), (1, 1),
            (H // dilation[0], W // dilation[1]))


class ConvSpectralNorm(nn.Module):
    """Parametrization ``weight -> target * weight / sigma(weight)`` for one conv.

    sigma is the operator norm of the conv on its input (C_in, H, W), estimated as v^T A u for
    unit vectors u (input side, buffer ``u``) and v (output side, buffer ``v``) that power
    iteration keeps near the top singular pair; v^T A u is then a lower bound of sigma, differentiable
    in the weight with the exact gradient of the top singular value when (u, v) is exact.
    - 1x1 convs without padding (the pointwise convs): the operator is the C_out x C_in matrix on
      any input, so u (C_in,) and v (C_out,) are plain matrix power-iteration vectors. They start
      at the exact top singular vectors, and :meth:`refresh` resets them to the exact ones.
    - other convs: block power iteration with conv2d / conv_transpose2d per group (per channel
      for depthwise convs, whose operator is block-diagonal), sigma = max over groups. Each group
      tracks ``block`` unit vectors (u and the rows of buffer ``basis``, (groups, block-1, n)): each
      training forward applies A^T A to them ``n_power_iterations`` times and keeps the best vector
      of their span as u (:func:`block_step`), so that a singular value overtaking the tracked one,
      which happens where the top ones are close, is already in the block. The vectors start at
      the circular-boundary top singular vectors and are iterated to convergence at construction.
      :meth:`refresh` (every few steps, through :func:`refresh_spectral_norms` or the batched
      :meth:`msrdarts.nn.spectral_batch.SpectralBatch.refresh`) recomputes the top singular
      vectors by a restarted block Krylov method (:func:`block_refresh`) from the block, the
      circular top vector and a random vector, or from the dense operator of a depthwise conv on
      at most :data:`DENSE_MAX_PIXELS` pixels (:func:`dense_refresh`); a group keeps its vectors
      where that does not raise its estimate, so a refresh never lowers one. ``block=1`` is plain
      power iteration (no ``basis`` buffer).

    Args:
        conv: the conv whose ``weight`` this will parametrize (its geometry is copied).
        input_hw: spatial size of the conv's input (a dilated stride-1 conv's ``u`` and ``v`` live on
            the smaller map of :func:`polyphase_geometry`, as do ``input_hw``, ``padding`` and
            ``dilation`` here).
        n_power_iterations: iterations per training forward.
        target: the operator norm to normalise to (C in the paper, 1 by default).
        block: vectors tracked per group for non-1x1 convs (3 by default; 1x1 convs track 1).
    """

    def __init__(self, conv: nn.Conv2d, input_hw: tuple[int, int], n_power_iterations: int = 1,
                 target: float = 1.0, eps: float = 1e-12, init_tol: float = 1e-7,
                 max_init_iterations: int = 500, converge: bool = True, block: int = 3):
        super().__init__()
        if n_power_iterations < 1:
            raise ValueError("n_power_iterations must be >= 1")
        if block < 1:
            raise ValueError("block must be >= 1")
        # the geometry whose operator has this conv's singular values (polyphase_geometry)
        self.stride, self.kernel_size, self.groups = conv.stride, conv.kernel_size, conv.groups
        self.padding, self.dilation, self.input_hw = polyphase_geometry(conv.kernel_size, conv.stride, conv.padding,
                                                                        conv.dilation, input_hw)
        self.n_power_iterations, self.target, self.eps = n_power_iterations, target, eps
        self.matrix = conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
        self.block = 1   # 1x1 convs: one matrix power-iteration vector (their top values are apart)
        self.depthwise = conv.groups == conv.in_channels == conv.out_channels
        n, m = self.input_hw[0] * self.input_hw[1], math.prod(_Geometry.of(self).out_size(self.input_hw))
        #: exact top singular vectors at every training forward (see EXACT_MAX_SIDE), no block steps
        self.exact = self.depthwise and n <= DENSE_MAX_PIXELS and min(n, m) <= EXACT_MAX_SIDE
        weight = conv.weight.detach()
        if self.matrix:   # exact at once (or batched by the caller: converge=False starts anywhere)
            if converge:
                u, v = matrix_top_vectors(weight.flatten(1), eps)
            else:
                u = weight.new_full((conv.in_channels,), conv.in_channels ** -0.5)
                v = weight.new_full((conv.out_channels,), conv.out_channels ** -0.5)
            self.register_buffer("u", u)                                     # (C_in,), unit
            self.register_buffer("v", v)                                     # (C_out,), unit
            return
        self.block = block
        u = self._circular_u(weight)
        self.register_buffer("u", u)                                         # (1, C_in, H, W), unit per group
        self.register_buffer("v", normalize_groups(self._A(u, weight), self.groups, eps))  # (1, C_out, H', W')
        if block > 1:   # the rest of the tracked subspace, (groups, block-1, C_in/groups*H*W), unit rows
            n = u.numel() // self.groups
            start = torch.randn(self.groups, block - 1, n, generator=torch.Generator().manual_seed(0),
                                dtype=u.dtype).to(u.device)
            self.register_buffer("basis", F.normalize(start, dim=-1))
            self._probe_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}   # depthwise_circular_probe's
        if not converge:   # the caller converges many convs at once (SpectralBatch.converge)
            return

        def sigmas(active: list[int], iterations: int) -> torch.Tensor:   # this conv is the only operator
            if iterations:
                self._power_iterate(weight, iterations)
            return self._group_sigmas(weight).max().view(1)

        converge_sigmas(sigmas, 1, init_tol, max_init_iterations)

    def _circular_u(self, weight: torch.Tensor) -> torch.Tensor:
        return circular_probe(weight, self.input_hw, self.dilation, self.groups, self.eps)

    def conv_operator(self, weight: torch.Tensor) -> ConvOperator:
        """The conv with weights ``weight`` as the operator A on this conv's input."""
        return ConvOperator(weight, _Geometry.of(self), self.input_hw, self.groups)

    def _A(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv_operator(w).A(x)

    def _At(self, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.conv_operator(w).At(y)

    @torch.no_grad()
    def _power_iterate(self, weight: torch.Tensor, n: int) -> None:
        if self.matrix:
            u, v = matrix_power_iteration(weight.flatten(1), self.u, n, self.eps)
            self.u.copy_(u)
            self.v.copy_(v)
            return
        if self.exact:
            self._store_exact(weight)
            return
        basis, op = self._basis(), self.conv_operator(weight)
        if basis is not None and self.depthwise:   # an extra vector: today's circular top vector (as SpectralBatch)
            basis = with_probe(basis, weight, (self.kernel_size, self.dilation, self.input_hw), self._probe_tables)
        self._store(*op.power_iterate(self.u, n, self.eps, basis, self.block))

    def _store_exact(self, weight: torch.Tensor) -> None:
        """The exact top singular vectors of each channel's dense operator (:func:`small_top_vectors`)."""
        [(u, v)] = small_top_vectors([depthwise_dense(weight, _Geometry.of(self), self.input_hw, DenseTaps())],
                                     self.eps)
        self._store(u, v, None)

    def _basis(self) -> torch.Tensor | None:
        return self.basis if self.block > 1 else None

    def _store(self, u: torch.Tensor, v: torch.Tensor, basis: torch.Tensor | None) -> None:
        self.u.copy_(u.view_as(self.u))
        self.v.copy_(v.view_as(self.v))
        if basis is not None:
            self.basis.copy_(basis)

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor, iterations: int = REFRESH_STEPS, tol: float = REFRESH_TOL) -> None:
        """Block Krylov refresh (:func:`block_refresh`) from the tracked block and the circular
        probe, at most ``iterations`` Krylov steps, fewer where the top Ritz value has converged to
        ``tol``. A 1x1 conv's vectors become the exact top singular vectors."""
        if self.matrix:
            u, v = matrix_top_vectors(weight.flatten(1), self.eps)
            self.u.copy_(u)
            self.v.copy_(v)
            return
        if self.exact:
            self._store_exact(weight)
            return
        probe = self._circular_u(weight)
        if self.depthwise and self.input_hw[0] * self.input_hw[1] <= DENSE_MAX_PIXELS:
            C = self.groups
            rows = [self.u.view(C, 1, -1)] + ([] if self.block == 1 else [self.basis]) + [probe.view(C, 1, -1)]
            M = depthwise_dense(weight, _Geometry.of(self), self.input_hw, DenseTaps())
            u, v, basis = dense_refresh(M, torch.cat(rows, 1), self.block, self.eps)
            self._store(u, v, basis if self.block > 1 else None)
            return
        self._store(*self.conv_operator(weight).refresh(self.u, self._basis(), probe, iterations, tol, self.eps))

    @torch.no_grad()
    def dsigma(self, weight: torch.Tensor) -> torch.Tensor:
        """G = d(v^T A u)/dW for the current vectors, shaped like the weight; block g belongs to
        group g (v u^T for a 1x1 conv, else :func:`unfold_dsigma`)."""
        if self.matrix:
            return torch.outer(self.v, self.u).view_as(weight)
        return unfold_dsigma(self.u, self.v, _Geometry.of(self), self.groups).view_as(weight)

    def _group_sigmas(self, weight: torch.Tensor) -> torch.Tensor:
        # v^T A u is linear in the weight, so it equals <W, G> with G = dsigma(W): one elementwise
        # product instead of a conv with autograd (the same value and the same gradient).
        return _Dsigma(self.dsigma(weight), self.groups).sigmas(weight.unsqueeze(0))[0]      # (groups,)

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """The operator norm estimate, differentiable in ``weight``."""
        return self._group_sigmas(weight).max()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(weight.device.type, enabled=False):   # norms in the weight's own precision
            if self.training:
                self._power_iterate(weight.detach(), self.n_power_iterations)
            return weight * (self.target / self.sigma(weight))


def apply_spectral_norm(model: nn.Module, n_power_iterations: int = 1, target: float = 1.0,
                        converge: bool = True) -> int:
    """Spectrally normalise every :class:`OpConv` of ``model``; returns how many.

    Each conv must know its ``input_hw`` (see :func:`msrdarts.nn.ops.record_input_sizes`). With
    ``converge=False`` the power iterations start at the circular-boundary vectors and the caller
    converges them (batched, as :class:`msrdarts.nn.supernet.SuperNet` does).
    """
    count = 0
    for conv in model.modules():
        if isinstance(conv, OpConv) and not parametrize.is_parametrized(conv, "weight"):
            if conv.input_hw is None:
                raise RuntimeError("record_input_sizes() must run before apply_spectral_norm()")
            parametrize.register_parametrization(
                conv, "weight", ConvSpectralNorm(conv, conv.input_hw, n_power_iterations, target=target,
                                                 converge=converge))
            count += 1
    return count


@torch.no_grad()
def fill_missing_matrix_vectors(model: nn.Module, missing_keys: list[str]) -> list[str]:
    """Checkpoints written before 1x1 convs had power-iteration vectors lack their ``u`` and
    ``v``: set those to the exact top singular vectors of the loaded weights (what the old code
    computed every step). Checkpoints written before block power iteration lack the ``basis`` of
    the other convs: those keep their start value. Returns the missing keys this accounts for."""
    missing, filled = set(missing_keys), []
    for name, sn in model.named_modules():
        if isinstance(sn, ConvSpectralNorm) and sn.block > 1 and f"{name}.basis" in missing:
            filled.append(f"{name}.basis")   # written before block iteration: the start basis serves,
            continue                         # the block steps turn it to the tracked subspace
        keys = [f"{name}.u", f"{name}.v"]
        if isinstance(sn, ConvSpectralNorm) and sn.matrix and all(k in missing for k in keys):
            conv = model.get_submodule(name.rsplit(".parametrizations.", 1)[0])
            u, v = matrix_top_vectors(conv.parametrizations.weight.original.flatten(1), sn.eps)
            sn.u.copy_(u)
            sn.v.copy_(v)
            filled += keys
    return filled


@torch.no_grad()
def drop_regridded_vectors(model: nn.Module, state: dict[str, torch.Tensor]
                           ) -> tuple[dict[str, torch.Tensor], set[str]]:
    """``state`` without the power-iteration vectors whose shapes no longer match ``model``'s
    (checkpoints written before :func:`polyphase_geometry`: a dilated conv's vectors on its full
    map), and the names of those :class:`ConvSpectralNorm` modules, whose vectors
    :func:`refresh_regridded` recomputes once the rest has loaded."""
    own, drop = model.state_dict(), set()
    for name, sn in model.named_modules():
        if isinstance(sn, ConvSpectralNorm):
            for b in ("u", "v", "basis"):
                key = f"{name}.{b}"
                if key in state and key in own and state[key].shape != own[key].shape:
                    drop.add(name)
    return {k: v for k, v in state.items() if k.rsplit(".", 1)[0] not in drop}, drop


@torch.no_grad()
def refresh_regridded(model: nn.Module, names: set[str]) -> None:
    """Recompute the vectors of the :class:`ConvSpectralNorm` modules ``names`` (from
    :func:`drop_regridded_vectors`) for their loaded weights."""
    for name in sorted(names):
        conv = model.get_submodule(name.rsplit(".parametrizations.", 1)[0])
        model.get_submodule(name).refresh(conv.parametrizations.weight.original.detach())


def refresh_spectral_norms(model: nn.Module, iterations: int = REFRESH_STEPS) -> None:
    """Run :meth:`ConvSpectralNorm.refresh` for every spectrally normalised conv of ``model``."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, ConvSpectralNorm):
                    p.refresh(m.parametrizations.weight.original.detach(), iterations)


# ---------------------------------------------------------------------------------------------
# Batched: many convs' spectral norms at once (see the module docstring).
