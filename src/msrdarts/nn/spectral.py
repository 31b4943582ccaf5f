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

**Batched** (:class:`SpectralBatch`). A supernet has hundreds of normalised convs; the fused
forward (:mod:`msrdarts.nn.fused`) normalises them all at once, and both forwards converge and
refresh them this way. All normalised convs of the network with the same shape form one group,
and each group advances the persistent power-iteration vectors of all its convs at once,
gathered from and written back to the convs' own buffers:

- pointwise C x C matrices (N of them): batched matrix-vector products, (N, C, C) x (N, C);
- depthwise kernels with the same (C, k, dilation, stride, input size): on maps of at most 16
  pixels (``SpectralBatch.DENSE_MAX_PIXELS``), batched products with each channel's dense
  (H*W, H'*W') operator (:class:`msrdarts.nn.kernels.DenseTaps`); on larger maps a single
  grouped conv and transposed conv over the N*C channels.

Groups are ordered so that the weights one fused conv needs are a contiguous slice: no gather
per use. On small maps several groups iterate as one bundle (:meth:`SpectralBatch.bundles`), and
each bundle's vectors are views of one tensor (:meth:`SpectralBatch.link`). Then each group's
G = d(v^T A u)/dW (v u^T for the 1x1 convs, one conv of u with v for the depthwise ones,
:func:`_depthwise_grads`) gives sigma = <W, G>, and every group's ``W * target / sigma`` runs as
one autograd node (:class:`_Normalize`).

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
import operator
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .kernels import DenseTaps, _Geometry, conv_adjoint
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


def _sn(conv: OpConv) -> ConvSpectralNorm | None:
    if parametrize.is_parametrized(conv, "weight"):
        return next(p for p in conv.parametrizations.weight if isinstance(p, ConvSpectralNorm))
    return None


def _raw_slot(conv: OpConv) -> tuple[dict, str]:
    """Where the conv's trained weight lives: (a module's ``_parameters``, key)."""
    if parametrize.is_parametrized(conv, "weight"):
        return conv.parametrizations.weight._parameters, "original"
    return conv._parameters, "weight"


@dataclass
class _Slice:
    """A run of consecutive convs of one group: the weights one fused conv uses (msrdarts.nn.fused)."""

    group: int      # index into SpectralBatch.groups
    start: int      # first conv of the slice within the group
    count: int


class SpectralBatch:
    """Normalised weights of many convs, computed group by group (see the module docstring).

    ``convs`` must be listed in the order their weights are consumed (the fused forward's:
    :func:`msrdarts.nn.fused.fused_conv_order`); :meth:`slice_of` maps a run of consecutive convs
    of one group to its position. The reference forward normalises each conv in its own
    parametrization, and uses a batch (of its convs in module order) to converge and refresh.
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
        replaces them, and the network links again (:meth:`msrdarts.nn.supernet.SuperNet._apply`)."""
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

            converge_sigmas(sigmas, len(sns), tol, max_iterations)

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
        probe = circular_probe(w, sn.input_hw, sn.dilation, n, sn.eps)
        op = ConvOperator(w, _Geometry.of(sn), sn.input_hw, n)
        vectors.write(*refresh_vectors(vectors.u().view(1, n, *sn.input_hw), probe, op, iterations, sn.eps))

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
            u, v = ConvOperator(wd, geo, sn.input_hw, groups).power_iterate(u, iterations, sn.eps)
            vectors.write(u, v)
        if all(p.sn.depthwise for p in parts):
            # One conv of u with v for all parts, far cheaper than unfolding u. ConvSpectralNorm.dsigma
            # (the reference forward, every step) keeps the unfold form: the conv sums in another
            # order, so one form for both would change the reference path's results in the last bits.
            return _depthwise_grads(parts, u, v)
        grads = []
        u_parts = u.split([p.w.shape[0] * p.w.shape[2] * p.sn.groups for p in parts], 1)      # N*Ci each
        v_parts = v.split([p.w.shape[0] * p.w.shape[1] for p in parts], 1)                  # N*Co each
        for p, u_p, v_p in zip(parts, u_parts, v_parts):       # the N convs as one conv of N*groups groups
            G = unfold_dsigma(u_p, v_p, _Geometry.of(p.sn), p.w.shape[0] * p.sn.groups)
            grads.append(_Dsigma(G.view_as(p.w), p.sn.groups))
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
