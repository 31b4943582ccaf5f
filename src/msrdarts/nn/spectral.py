"""Spectral normalisation of convolutions as operators on their real input (SPEC section 2).

``W = C * W_orig / sigma(W_orig)`` where sigma is the largest singular value of the conv as a
linear map on its actual input shape (C_in, H, W), with its zero padding, stride, dilation and
groups: not the norm of the reshaped kernel matrix. A 1x1 conv without padding has the operator
norm of its C_out x C_in matrix on any input, so its sigma comes from plain matrix power
iteration (as in the authors' code). Other convs (the depthwise ones) use power iteration with
``conv2d`` (A) and ``conv_transpose2d`` (A^T), one vector per channel group. The vectors persist
across steps and in checkpoints, start converged, and are checked against an exact or fresh
answer every few steps (see :class:`ConvSpectralNorm`).

The parametrization is registered with ``torch.nn.utils.parametrize``: ``conv.weight`` is the
normalised weight, ``conv.parametrizations.weight.original`` the trained one.

The batched form for whole networks is :mod:`msrdarts.nn.spectral_batch`.

One home each, for both paths: the probe a refresh starts from (:func:`circular_probe`), the
conv operator and its power iteration (:class:`ConvOperator`), the refresh, which also converges the
vectors at construction (:func:`refresh_vectors`), the unfold form of G (:func:`unfold_dsigma`) and sigma = <W, G>
(:meth:`_Dsigma.sigmas`). The batch keeps two faster forms of G for its depthwise groups (dense
operators on small maps, one conv of u with v on larger ones): they sum in another order than the
unfold form, so the per-conv path keeps the unfold form and its results to the last bit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .kernels import _Geometry, conv_adjoint
from .ops import OpConv
from .spectrum import kernel_spectrum


def _normalize(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """Scale each (sample, group) block of ``x`` (shape (B, C, ...)) to unit norm."""
    flat = x.reshape(x.shape[0], groups, -1)
    return (flat / flat.norm(dim=2, keepdim=True).clamp_min(eps)).view_as(x)


@torch.no_grad()
def circular_top_vectors(weight: torch.Tensor, input_hw: tuple[int, int], dilation: int, groups: int) -> torch.Tensor:
    """Per group, a top right singular vector of the conv with *circular* boundary, shape (1, C_in, H, W).

    It is Re(r exp(2 pi i f.x)) at the frequency f of the largest singular value of K^(f)
    (msrdarts.nn.spectrum), a real eigenvector of A^T A. The zero-padded operator differs only at the
    border, so this starts power iteration close to its answer.
    """
    H, W = input_hw
    spec = kernel_spectrum(weight, input_hw, dilation, groups).permute(2, 0, 1, 3, 4)  # (g, H, W, co/g, ci/g)
    if spec.shape[-1] == 1:  # depthwise: K^(f) is a column; its norm is the singular value, r = 1
        s = spec.abs().square().sum(-2).squeeze(-1)                            # (g, H, W)
        top = s.flatten(1).argmax(1)
        r = torch.ones(groups, 1, dtype=spec.dtype, device=spec.device)
    else:
        _, sv, vh = torch.linalg.svd(spec)
        top = sv[..., 0].flatten(1).argmax(1)                                 # (g,) flat frequency index
    f1, f2 = top // W, top % W
    if spec.shape[-1] != 1:
        r = vh[torch.arange(groups), f1, f2, 0]                                # (g, ci/g) complex
    ys = torch.arange(H, device=weight.device, dtype=r.real.dtype)
    xs = torch.arange(W, device=weight.device, dtype=r.real.dtype)
    phase = 2 * math.pi * (f1[:, None, None] * ys[None, :, None] / H + f2[:, None, None] * xs[None, None, :] / W)
    wave = torch.polar(torch.ones_like(phase), phase)                        # (g, H, W)
    u = (r[:, :, None, None] * wave[:, None]).real                           # (g, ci/g, H, W)
    return _normalize(u.reshape(1, -1, H, W).to(weight.dtype), groups, 1e-12)


@torch.no_grad()
def matrix_top_vectors(w: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top singular vectors of each matrix of ``w`` (..., m, n): (u (..., n), v (..., m)).

    u is the top eigenvector of the n x n Gram matrix (a batched ``eigh``, about half the cost of
    an SVD), v = W u / ||W u||; then v^T W u is the largest singular value.
    """
    u = torch.linalg.eigh(w.mT @ w).eigenvectors[..., -1]
    return u, F.normalize((w @ u[..., None])[..., 0], dim=-1, eps=eps)


@torch.no_grad()
def matrix_power_iteration(w: torch.Tensor, u: torch.Tensor, iterations: int, eps: float = 1e-12
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``iterations`` power iterations on each matrix of ``w`` (..., m, n) from the unit vectors
    ``u`` (..., n): returns the new (u, v), v (..., m). Needs ``iterations`` >= 1."""
    for _ in range(iterations):
        v = F.normalize((w @ u[..., None])[..., 0], dim=-1, eps=eps)
        u = F.normalize((v[..., None, :] @ w)[..., 0, :], dim=-1, eps=eps)
    return u, v


@torch.no_grad()
def circular_probe(weight: torch.Tensor, input_hw: tuple[int, int], dilation: tuple[int, int], groups: int,
                   eps: float) -> torch.Tensor:
    """Where power iteration starts and what a refresh probes with, (1, C_in, H, W), unit per group:
    the circular top vectors (:func:`circular_top_vectors`) where the dilation is the same along
    both axes, else the uniform vector."""
    if dilation[0] == dilation[1]:
        return circular_top_vectors(weight, input_hw, dilation[0], groups)
    return _normalize(weight.new_ones(1, weight.shape[1] * groups, *input_hw), groups, eps)


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

    @torch.no_grad()
    def power_iterate(self, u: torch.Tensor, iterations: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``iterations`` (>= 1) power iterations from u (1, C_in, H, W), unit per group: the new
        (u, v), v (1, C_out, H', W'). For the pair, v^T A u = ||A^T v|| per group before the last
        normalisation: a lower bound of that group's top singular value."""
        for _ in range(iterations):
            v = _normalize(self.A(u), self.groups, eps)
            u = _normalize(self.At(v), self.groups, eps)
        return u, v


#: A refresh stops when, in every group, the residuals ||B x - theta x|| of the two top Ritz pairs of
#: B = A^T A are at most this fraction of the top theta (then theta is within that fraction of an
#: eigenvalue), or after :data:`REFRESH_MAX_ITERATIONS` iterations.
REFRESH_TOL = 1e-4
REFRESH_MAX_ITERATIONS = 40


@torch.no_grad()
def refresh_vectors(u: torch.Tensor, probe: torch.Tensor, op: ConvOperator, eps: float, tol: float = REFRESH_TOL,
                    max_iterations: int = REFRESH_MAX_ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """The top singular pair of each group of ``op``, found from the tracked vector ``u`` and the
    ``probe`` (each (1, C_in, H, W), unit per group). Returns (u, v), each (groups, -1).

    Rayleigh-Ritz on B = A^T A over a growing subspace per group (block Lanczos): it starts as
    [u, probe, a fixed pseudo-random vector], and each iteration adds the residuals B x - theta x
    of the two top Ritz pairs, orthogonalised twice, until in every group both residuals are at
    most ``tol`` times the top theta, the subspace is the whole input space, or after
    ``max_iterations``. Power iteration would need hundreds of iterations where the top singular
    values are close together or have just crossed (the usual case for small depthwise convs under
    training); the subspace holds the near-top directions at once. A test on the change of theta
    alone stops early on a plateau (theta near the second singular value while the first is still
    growing in); two converged residuals and the random start keep it from settling there. The
    subspace contains ``u``, so the answer is never worse than the tracked vector; sqrt(theta)
    stays a lower bound of the true norm, as every estimate here is.
    """
    g = op.groups
    shape = u.shape[1:]
    n = u.numel() // g                                  # one group's input size

    def B(cols: torch.Tensor) -> torch.Tensor:        # (g, n, k) -> (g, n, k), all columns in one batch
        k = cols.shape[-1]
        y = op.At(op.A(cols.permute(2, 0, 1).reshape(k, *shape)))
        return y.reshape(k, g, -1).permute(1, 2, 0)

    def orthonormal_to(Q: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """R's columns made orthonormal and orthogonal to Q's. Twice over: where a group's residual
        is (nearly) zero, the first pass's QR returns arbitrary unit columns, which the second
        makes orthogonal to Q (any direction outside Q is a valid addition to the subspace)."""
        for _ in range(2):
            R = torch.linalg.qr(R - Q @ (Q.mT @ R)).Q
        return R

    # one fixed pseudo-random vector for every group: a group's answer depends on nothing but its own operator
    rand = torch.randn(n, generator=torch.Generator(u.device).manual_seed(0), device=u.device, dtype=u.dtype).expand(g, n)
    start = torch.stack([u.reshape(g, n), probe.reshape(g, n), rand], -1)[..., :n]
    Q = torch.linalg.qr(start).Q                                                        # (g, n, k)
    BQ = B(Q)
    H = Q.mT @ BQ                                        # Q^T B Q, grown by a border per iteration
    done = top = None
    for iteration in range(max_iterations + 1):
        evals, evecs = torch.linalg.eigh((H + H.mT) / 2)                                # ascending
        theta = evals[:, -1]
        x = (Q @ evecs[:, :, -1:])[..., 0]                                               # top Ritz vectors, (g, n)
        width = min(2, n - Q.shape[-1], Q.shape[-1])     # the residuals that still fit in the space
        Y = evecs[:, :, -max(width, 1):]
        R = BQ @ Y - (Q @ Y) * evals[:, None, -Y.shape[-1]:]                             # residuals, (g, n, w)
        converged = (R.norm(dim=1) <= tol * theta.abs()[:, None]).all(1)
        # a group that has converged keeps its answer, so each group's result is its own alone
        top = x if top is None else torch.where(done[:, None], top, x)
        done = converged if done is None else done | converged
        if width <= 0 or iteration == max_iterations or bool(done.all()):
            break
        R = orthonormal_to(Q, R)
        BR = B(R)
        side = Q.mT @ BR
        H = torch.cat([torch.cat([H, side], -1), torch.cat([side.mT, R.mT @ BR], -1)], -2)
        Q, BQ = torch.cat([Q, R], -1), torch.cat([BQ, BR], -1)
    u = _normalize(top.reshape(1, *shape), g, eps)
    v = _normalize(op.A(u), g, eps)
    return u.reshape(g, -1), v.reshape(g, -1)


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


class ConvSpectralNorm(nn.Module):
    """Parametrization ``weight -> target * weight / sigma(weight)`` for one conv.

    sigma is the operator norm of the conv on its input (C_in, H, W), estimated as v^T A u for
    unit vectors u (input side, buffer ``u``) and v (output side, buffer ``v``) that power
    iteration keeps near the top singular pair; v^T A u is then a lower bound of sigma, differentiable
    in the weight with the exact gradient of the top singular value when (u, v) is exact.
    - 1x1 convs without padding (the pointwise convs): the operator is the C_out x C_in matrix on
      any input, so u (C_in,) and v (C_out,) are plain matrix power-iteration vectors. They start
      at the exact top singular vectors, and :meth:`refresh` resets them to the exact ones.
    - other convs: power iteration with conv2d / conv_transpose2d, one unit vector per group
      (per channel for depthwise convs, whose operator is block-diagonal), sigma = max over
      groups. The vectors persist across steps (buffers ``u``, ``v``) and advance
      ``n_power_iterations`` per training forward. :meth:`refresh` (at construction, and every
      few steps from the search loop through :func:`refresh_spectral_norms`) sets them to the
      top singular pair by Rayleigh-Ritz over a subspace started from ``u`` and the circular
      top vector (:func:`refresh_vectors`), iterated until the estimate converges: a singular
      value that overtakes the tracked one, which one power iteration per step would take
      hundreds of steps to find, is caught at the next refresh.

    Args:
        conv: the conv whose ``weight`` this will parametrize (its geometry is copied).
        input_hw: spatial size of the conv's input.
        n_power_iterations: iterations per training forward.
        target: the operator norm to normalise to (C in the paper, 1 by default).
    """

    def __init__(self, conv: nn.Conv2d, input_hw: tuple[int, int], n_power_iterations: int = 1,
                 target: float = 1.0, eps: float = 1e-12, converge: bool = True):
        super().__init__()
        if n_power_iterations < 1:
            raise ValueError("n_power_iterations must be >= 1")
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups, self.kernel_size = conv.groups, conv.kernel_size
        self.n_power_iterations, self.target, self.eps = n_power_iterations, target, eps
        self.input_hw = tuple(input_hw)
        self.matrix = conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
        self.depthwise = conv.groups == conv.in_channels == conv.out_channels
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
        u = self._circular_u(weight)
        self.register_buffer("u", u)                                         # (1, C_in, H, W), unit per group
        self.register_buffer("v", _normalize(self._A(u, weight), self.groups, eps))  # (1, C_out, H', W')
        if converge:   # else the caller converges many convs at once (SpectralBatch.refresh)
            self.refresh(weight)

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
        u, v = self.conv_operator(weight).power_iterate(self.u, n, self.eps)
        self.u.copy_(u)
        self.v.copy_(v)

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor, tol: float = REFRESH_TOL, max_iterations: int = REFRESH_MAX_ITERATIONS
                ) -> None:
        """Set the vectors to the top singular pair of each group (:func:`refresh_vectors`, from
        ``u`` and the circular probe). A 1x1 conv's vectors become the exact top singular vectors."""
        if self.matrix:
            u, v = matrix_top_vectors(weight.flatten(1), self.eps)
            self.u.copy_(u)
            self.v.copy_(v)
            return
        u, v = refresh_vectors(self.u, self._circular_u(weight), self.conv_operator(weight), self.eps, tol,
                               max_iterations)
        self.u.copy_(u.view_as(self.u))
        self.v.copy_(v.view_as(self.v))

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
    computed every step). Returns the missing keys this accounts for."""
    missing, filled = set(missing_keys), []
    for name, sn in model.named_modules():
        keys = [f"{name}.u", f"{name}.v"]
        if isinstance(sn, ConvSpectralNorm) and sn.matrix and all(k in missing for k in keys):
            conv = model.get_submodule(name.rsplit(".parametrizations.", 1)[0])
            u, v = matrix_top_vectors(conv.parametrizations.weight.original.flatten(1), sn.eps)
            sn.u.copy_(u)
            sn.v.copy_(v)
            filled += keys
    return filled


def refresh_spectral_norms(model: nn.Module, tol: float = REFRESH_TOL, max_iterations: int = REFRESH_MAX_ITERATIONS
                           ) -> None:
    """Run :meth:`ConvSpectralNorm.refresh` for every spectrally normalised conv of ``model``."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, ConvSpectralNorm):
                    p.refresh(m.parametrizations.weight.original.detach(), tol, max_iterations)


# ---------------------------------------------------------------------------------------------
# Batched: many convs' spectral norms at once (see the module docstring).
