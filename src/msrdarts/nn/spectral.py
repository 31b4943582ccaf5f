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
conv operator and its power iteration (:class:`ConvOperator`), the refresh's choice between
probe and tracked vector (:func:`refresh_vectors`), the convergence loop at construction
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


@torch.no_grad()
def refresh_vectors(u: torch.Tensor, probe: torch.Tensor, op: ConvOperator, iterations: int, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Power-iterate ``u`` and ``probe`` (each (1, C_in, H, W)) side by side through the operator
    ``op``; per group, keep whichever gives the larger sigma estimate (both are lower bounds of
    the true one). Returns the kept (u, v), each (groups, -1)."""
    groups = op.groups
    u = torch.cat([u, probe])                                                  # (2, C_in, H, W)
    for _ in range(iterations):
        v = _normalize(op.A(u), groups, eps)
        at_v = op.At(v)
        est = at_v.reshape(2, groups, -1).norm(dim=2)                          # lower bounds, (2, groups)
        u = _normalize(at_v, groups, eps)
    use_probe = (est[1] > est[0]).view(groups, 1)
    return (torch.where(use_probe, u[1].reshape(groups, -1), u[0].reshape(groups, -1)),
            torch.where(use_probe, v[1].reshape(groups, -1), v[0].reshape(groups, -1)))


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
      groups. The vectors start at the circular-boundary top singular vectors, are iterated to
      convergence at construction, persist across steps (buffers ``u``, ``v``), and advance
      ``n_power_iterations`` per training forward. :meth:`refresh` (called every few steps by
      the search loop through :func:`refresh_spectral_norms`) iterates a probe started at the
      current circular top vector and keeps, per group, whichever of the probe and ``u`` gives
      the larger sigma: a singular value that overtakes the tracked one is caught within a few
      steps instead of hundreds, and since both are lower bounds of the true norm, the choice
      adds no bias.

    Args:
        conv: the conv whose ``weight`` this will parametrize (its geometry is copied).
        input_hw: spatial size of the conv's input.
        n_power_iterations: iterations per training forward.
        target: the operator norm to normalise to (C in the paper, 1 by default).
    """

    def __init__(self, conv: nn.Conv2d, input_hw: tuple[int, int], n_power_iterations: int = 1,
                 target: float = 1.0, eps: float = 1e-12, init_tol: float = 1e-7,
                 max_init_iterations: int = 500, converge: bool = True):
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
        u, v = self.conv_operator(weight).power_iterate(self.u, n, self.eps)
        self.u.copy_(u)
        self.v.copy_(v)

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor, iterations: int = 3) -> None:
        """Iterate ``u`` and a circular-start probe side by side; keep the better vector per group.
        A 1x1 conv's vectors become the exact top singular vectors."""
        if self.matrix:
            u, v = matrix_top_vectors(weight.flatten(1), self.eps)
            self.u.copy_(u)
            self.v.copy_(v)
            return
        u, v = refresh_vectors(self.u, self._circular_u(weight), self.conv_operator(weight), iterations, self.eps)
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


def refresh_spectral_norms(model: nn.Module, iterations: int = 3) -> None:
    """Run :meth:`ConvSpectralNorm.refresh` for every spectrally normalised conv of ``model``."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            for p in m.parametrizations.weight:
                if isinstance(p, ConvSpectralNorm):
                    p.refresh(m.parametrizations.weight.original.detach(), iterations)


# ---------------------------------------------------------------------------------------------
# Batched: many convs' spectral norms at once (see the module docstring).
