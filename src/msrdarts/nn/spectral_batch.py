"""Batched spectral normalisation of a whole network's op convs (SPEC section 2).

A supernet has hundreds of normalised convs; the fused
forward (:mod:`msrdarts.nn.fused`) normalises them all at once, and both forwards converge and
refresh them this way. All normalised convs of the network with the same shape form one group,
and each group advances the persistent power-iteration vectors of all its convs at once,
gathered from and written back to the convs' own buffers:

- pointwise C x C matrices (N of them): batched matrix-vector products, (N, C, C) x (N, C);
- depthwise kernels with the same (C, k, dilation, stride, input size): block power iteration
  (:func:`msrdarts.nn.block_power.block_step`, the u, v and basis buffers) on maps of at most 16
  pixels (``SpectralBatch.DENSE_MAX_PIXELS``) by batched products with each channel's dense
  (H*W, H'*W') operator (:class:`msrdarts.nn.kernels.DenseTaps`), on larger maps by a single
  grouped conv and transposed conv over the N*C channels.

A refresh (:meth:`SpectralBatch.refresh`) recomputes all of them: exact vectors for the pointwise
convs, the dense refresh on small maps, and one restarted block Krylov refresh for all other
bundles at once (:func:`msrdarts.nn.block_power.block_refresh`).

Groups are ordered so that the weights one fused conv needs are a contiguous slice: no gather
per use. On small maps several groups iterate as one bundle (:meth:`SpectralBatch.bundles`), and
each bundle's vectors are views of one tensor (:meth:`SpectralBatch.link`). Then each group's
G = d(v^T A u)/dW (v u^T for the 1x1 convs, one conv of u with v for the depthwise ones,
:func:`msrdarts.nn.bundle._depthwise_grads`) gives sigma = <W, G>, and every group's ``W * target / sigma`` runs as
one autograd node (:class:`msrdarts.nn.spectral._Normalize`).

The per-conv mechanism it batches (power iteration, probes, convergence, sigma = <W, G>) is
:mod:`msrdarts.nn.spectral`; how a bundle's convs are packed as one (its vectors, its union
kernel) is :mod:`msrdarts.nn.bundle`; the weights' drift since each refresh, :mod:`msrdarts.nn.drift`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .kernels import DenseTaps, _Geometry
from .ops import OpConv
from .block_power import (RefreshInput, block_coefficients, block_grams, block_refresh, block_update, dense_refresh,
                          small_top_vectors, stack_block)
from .bundle import _Part, _Vectors, _depthwise_grads, _union_kernel, _wide
from .drift import DriftReference
from .probe import circular_probe, with_probe
from .spectral import (DENSE_MAX_PIXELS, REFRESH_STEPS, REFRESH_TOL, _Dsigma, _Normalize, _OuterDsigma, ConvOperator,
                       ConvSpectralNorm, converge_sigmas, matrix_power_iteration, matrix_top_vectors_of, unfold_dsigma)


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
    DENSE_MAX_PIXELS = DENSE_MAX_PIXELS

    def __init__(self, convs: Sequence[OpConv]):
        self.taps = DenseTaps()
        self.groups: list[list[OpConv]] = []
        self._sn_cache: list[list[ConvSpectralNorm | None]] | None = None
        self._raw_cache: list[list[tuple[dict, str]]] | None = None
        self._vector_cache: dict[tuple, list[dict]] = {}
        self._bundles: list[list[int]] | None = None
        self._names: list[str] | None = None
        self._classes: list[list[int]] | None = None
        self._target_cache: dict[tuple, float | list[float]] = {}
        self._probe_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}   # see depthwise_circular_probe
        self._linked: dict[tuple, _Vectors] = {}     # per bundle, its linked buffers (see link)
        self._drift = DriftReference()   # per normalised non-1x1 group, its weights at the last refresh
        keys: dict[tuple, int] = {}
        self.where: dict[int, tuple[int, int]] = {}
        for conv in convs:
            sn = _sn(conv)
            key = (tuple(conv.weight.shape) if sn is None else None, conv.in_channels, conv.out_channels,
                   conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups, conv.input_hw,
                   None if sn is None else (sn.matrix, sn.n_power_iterations, sn.block))
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
        bases = [slot["basis"] for slot in slots] if "basis" in slots[0] else []
        linked = self._linked.get(key)
        if (linked is not None and all(map(operator.is_, us, linked.us)) and all(map(operator.is_, vs, linked.vs))
                and all(map(operator.is_, bases, linked.bases))):
            return linked
        return _Vectors(us, vs, bases)

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
            flat = (vectors.u(), vectors.v(), vectors.basis())
            us, vs = vectors.unpack(flat[0], vectors.us), vectors.unpack(flat[1], vectors.vs)
            bases = vectors.unpack(flat[2], vectors.bases) if vectors.bases else []
            for k, (sn, u, v) in enumerate(zip((sn for g in bundle for sn in self._norms()[g]), us, vs)):
                sn._buffers["u"], sn._buffers["v"] = u, v
                if bases:
                    sn._buffers["basis"] = bases[k]
            self._linked[tuple(bundle)] = _Vectors(us, vs, bases, flat)

    def weights(self, training: bool) -> list[torch.Tensor]:
        """Per group, the stacked normalised weights (N, C_out, C_in/groups, k, k).

        The groups whose convs have one weight shape (and one kind of spectral norm) are stacked as
        one tensor and normalised as one (:meth:`classes`), each group a slice of it. In training
        mode the bundles (see :meth:`bundles`) first advance their power iterations (and store the
        vectors back in each conv's buffers), as each conv's parametrization would. Then every
        class is scaled by target / sigma in one autograd node (:class:`_Normalize`).
        """
        classes, norms = self.classes(), self._norms()
        stacks = [torch.stack([r for g in cls for r in self._raws(g)]) for cls in classes]   # (N, Co, Ci/g, k, k)
        out: list[torch.Tensor] = [None] * len(self.groups)   # type: ignore[list-item]
        for cls, w in zip(classes, stacks):
            for g, part in self._split_class(cls, w).items():
                out[g] = part
        if not self.bundles():
            return out
        with torch.autocast(stacks[0].device.type, enabled=False):                  # norms always in fp32+
            wide_stacks = {k: _wide(w) for k, (cls, w) in enumerate(zip(classes, stacks))
                           if norms[cls[0]][0] is not None}
            wide = {}
            for k, w in wide_stacks.items():
                wide.update(self._split_class(classes[k], w.detach()))
            work = []                                   # (parts, vectors, power iterations to run)
            for bundle in self.bundles():
                parts = [_Part(g, norms[g][0], wide[g]) for g in bundle]
                work.append((parts, self._vectors(bundle), parts[0].sn.n_power_iterations if training else 0))
            self._iterate([job for job in work if job[2] and not job[0][0].sn.matrix   # all together
                           and not job[0][0].sn.exact])
            self._exact([job[:2] for job in work if job[2] and job[0][0].sn.exact])
            grads: dict[int, _Dsigma] = {}
            for parts, vectors, iterations in work:
                grads.update(zip((p.group for p in parts),
                                 self._sigma_grads(parts, vectors, iterations if parts[0].sn.matrix else 0)))
            ks = list(wide_stacks)
            scaled = _Normalize.apply([_joined([grads[g] for g in classes[k]]) for k in ks],
                                      [self._targets(classes[k]) for k in ks], *[wide_stacks[k] for k in ks])
            for k, w in zip(ks, scaled):
                for g, part in self._split_class(classes[k], w).items():
                    out[g] = part
        return out

    def _split_class(self, cls: list[int], w: torch.Tensor) -> dict[int, torch.Tensor]:
        """A class's stacked tensor (:meth:`classes`) back in its groups' slices, by group."""
        return dict(zip(cls, w.split([len(self.groups[g]) for g in cls]) if len(cls) > 1 else [w]))

    def classes(self) -> list[list[int]]:
        """The groups, in classes whose convs' weights stack into one tensor (one weight shape,
        dtype and kind of spectral norm: none, 1x1, or per group of channels), in group order:
        stacking and normalising a class costs what one group did (about half as many at the
        quick preset: a weight shape recurs across dilations, strides and map sizes)."""
        if self._classes is None:
            keys: dict[tuple, list[int]] = {}
            for g, (convs, sns) in enumerate(zip(self.groups, self._norms())):
                raw = self._raws(g)[0]
                sn = sns[0]
                kind = None if sn is None else (sn.matrix, sn.groups)
                keys.setdefault((tuple(raw.shape), raw.dtype, kind), []).append(g)
            self._classes = list(keys.values())
        return self._classes

    def _targets(self, cls: list[int]) -> float | torch.Tensor:
        """The class's target norms: one float where all its convs share it (the usual case), else
        one per conv. Read once, like the spectral-norm modules (:meth:`_norms`)."""
        key = tuple(cls)
        if key not in self._target_cache:
            targets = [sn.target for g in cls for sn in self._norms()[g]]
            self._target_cache[key] = targets[0] if targets.count(targets[0]) == len(targets) else targets
        targets = self._target_cache[key]
        if not isinstance(targets, list):
            return targets
        return self._raws(cls[0])[0].new_tensor(targets, dtype=_wide(self._raws(cls[0])[0]).dtype)

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
        iteration = (sn.n_power_iterations, sn.eps, sn.block)
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
        return _Vectors([sn.u for sn in sns], [sn.v for sn in sns], [sn.basis for sn in sns if sn.block > 1])

    @torch.no_grad()
    def converge(self, tol: float = 1e-6, max_iterations: int = 500) -> None:
        """Converge every group's vectors, as each ConvSpectralNorm would alone at construction,
        one batched computation per group: the exact top singular vectors of the 1x1 convs;
        for the others a refresh (:meth:`refresh`, which starts their tracked subspaces near the
        answer in a few Krylov steps), then block power iteration until each sigma changes by at
        most ``tol`` (relative) over 10 iterations."""
        self.refresh(REFRESH_STEPS, tol)                 # the 1x1 convs' vectors are exact from here
        for g, sns in enumerate(self._norms()):
            if sns[0] is None or sns[0].matrix or sns[0].exact:
                continue
            w = torch.stack(self._raws(g))

            def sigmas(convs: list[int], iterations: int) -> torch.Tensor:
                part, vectors = _Part(g, sns[0], w[convs]), self._group_vectors(g, convs)
                if iterations:
                    self._iterate([([part], vectors, iterations)])
                return self._sigma_grads([part], vectors, 0)[0].sigmas(part.w).amax(1)

            converge_sigmas(sigmas, len(sns), tol, max_iterations)

    @torch.no_grad()
    def refresh(self, iterations: int = REFRESH_STEPS, tol: float = REFRESH_TOL, depthwise: bool = True,
                bundles: Sequence[int] | None = None) -> None:
        """:meth:`ConvSpectralNorm.refresh` for every conv: the 1x1 convs' vectors become exact
        by batched squarings of their Gram matrices, all shapes in one padded batch where cheap
        (:func:`matrix_top_vectors_of`); the other convs (only where ``depthwise``) run one
        :func:`block_refresh` (up to ``iterations`` Krylov steps, converged to ``tol``) per block
        size, each bundle's convs as one grouped conv (their channels are independent operators,
        so the N convs of C channels of a group are one depthwise conv of N*C channels) and the
        Ritz problems of all of them solved together: a few hundred small operations per refresh,
        not per conv. The search refreshes the 1x1 convs more often than the others (their one
        power-iteration vector lags most, and their refresh costs least). ``bundles`` (indices into
        :meth:`bundles`, as :meth:`drifted` returns them) refreshes those bundles only, whatever
        ``depthwise`` says."""
        jobs: dict[tuple, list[tuple[RefreshInput, _Vectors]]] = {}
        for k, bundle in enumerate(self.bundles()):
            if bundles is not None and k not in bundles:
                continue
            sn = self._norms()[bundle[0]][0]
            if sn.matrix:     # each group's exact vectors, written to the bundle's buffers at once
                exact = matrix_top_vectors_of([torch.stack(self._raws(g)).detach().flatten(2) for g in bundle], sn.eps)
                self._vectors(bundle).write(torch.cat([u.reshape(-1) for u, _ in exact]),
                                            torch.cat([v.reshape(-1) for _, v in exact]))
                continue
            if not depthwise and bundles is None:
                continue
            if sn.exact:      # exact at every training forward: no drift to track; exact now too
                parts = [_Part(g, self._norms()[g][0], _wide(torch.stack(self._raws(g)).detach())) for g in bundle]
                self._exact([(parts, self._vectors(bundle))])
                continue
            raw = {g: torch.stack(self._raws(g)).detach() for g in bundle}   # a copy of the weights:
            self._drift.record(raw)         # what drift() compares against (it leaves the 1x1 convs out)
            parts = [_Part(g, self._norms()[g][0], _wide(raw[g])) for g in bundle]
            vectors = self._vectors(bundle)
            dense = sn.depthwise and sn.input_hw[0] * sn.input_hw[1] <= self.DENSE_MAX_PIXELS
            if dense:
                M = self._dense_operators(parts)
                groups = M.shape[0]
            else:
                A, At, groups = self._rows_operator(parts)
            rows = [vectors.u().view(groups, 1, -1)]          # the tracked block, then the circular probe
            if vectors.basis() is not None:
                rows.append(vectors.basis().view(groups, sn.block - 1, -1))
            rows.append(torch.cat([circular_probe(p.w.flatten(0, 1), sn.input_hw, p.sn.dilation,
                                                  p.w.shape[0] * p.sn.groups, sn.eps) for p in parts], 1).view(groups, 1, -1))
            start = torch.cat(rows, 1).to(parts[0].w.dtype)
            if dense:
                u, v, basis = dense_refresh(M, start, sn.block, sn.eps)
                vectors.write(u, v, basis if sn.block > 1 else None)
            else:
                jobs.setdefault((sn.block, sn.eps), []).append((RefreshInput(A, At, start), vectors))
        for (block, eps), items in jobs.items():
            results = block_refresh([item[0] for item in items], block, iterations, tol, eps)
            for (_, vectors), (u, v, basis) in zip(items, results):
                vectors.write(u, v, basis if block > 1 else None)

    @torch.no_grad()
    def drift(self) -> float:
        """The largest relative change ||W - W_r|| / ||W_r|| (Frobenius, per conv) of any non-1x1
        normalised conv's weight W since its last refresh W_r: how far the power iterations'
        vectors may be from the top singular pair (the largest of :meth:`bundle_drifts`). The 1x1
        convs are left out: their matrix power iteration lags least, and the trigger was sized on
        the depthwise convs (``bench/sn_accuracy.sh``). The first reference is the refresh at construction."""
        return max(self.bundle_drifts().values(), default=0.0)

    @torch.no_grad()
    def bundle_drifts(self) -> dict[int, float]:
        """Per bundle of non-1x1 convs (index into :meth:`bundles`), the largest relative change of
        one of its convs' weights since that bundle's last refresh (:meth:`msrdarts.nn.drift.DriftReference.changes`)."""
        out: dict[int, float] = {}
        bundle_of = self._bundle_of()
        for g, d in self._drift.changes(self._raws).items():
            k = bundle_of[g]
            out[k] = max(out.get(k, 0.0), d)
        return out

    def drifted(self, threshold: float) -> list[int]:
        """The bundles (indices into :meth:`bundles`) whose :meth:`bundle_drifts` exceed ``threshold``:
        what the search refreshes (each conv's error grows with its own drift, so a bundle whose
        weights barely moved keeps its vectors)."""
        return sorted(k for k, d in self.bundle_drifts().items() if d > threshold)

    def _bundle_of(self) -> dict[int, int]:
        return {g: k for k, bundle in enumerate(self.bundles()) for g in bundle}

    def bundle_names(self) -> list[str]:
        """A readable name per bundle (the search's history counts refreshes under it): "1x1" for
        the pointwise convs, else the input map and stride ("8x8/1"), with the kernel, dilation and
        conv count for a group that iterates alone; unique within the network."""
        if self._names is not None:
            return self._names
        names: list[str] = []
        for bundle in self.bundles():
            sn = self._norms()[bundle[0]][0]
            if sn.matrix:
                name = "1x1"
            else:
                name = f"{sn.input_hw[0]}x{sn.input_hw[1]}/{sn.stride[0]}"
                if self._bundle_key(bundle[0], sn)[0] == "alone":
                    name += f" k{sn.kernel_size[0]} d{sn.dilation[0]} x{len(self.groups[bundle[0]])}"
            base, n = name, 2
            while name in names:
                name, n = f"{base} #{n}", n + 1
            names.append(name)
        self._names = names
        return names

    def drift_reference(self) -> dict[str, torch.Tensor]:
        """What :meth:`drift` compares against (each normalised non-1x1 group's weights at its last
        refresh), keyed by group index: a checkpoint keeps it, so that a resumed search refreshes
        on the same steps as an uninterrupted one."""
        return self._drift.state()

    @torch.no_grad()
    def load_drift_reference(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`drift_reference`, on the device and in the dtype of the weights it is
        compared with; entries for groups this network lacks, or of another shape, are refused
        (ValueError) before anything changes."""
        new = {}
        for key, w in state.items():
            g = int(key) if key.isdigit() else -1
            if 0 <= g < len(self.groups) and self._norms()[g][0] is not None and self._norms()[g][0].exact:
                continue       # kept by a version that refreshed these convs: exact at every step now
            raws = self._raws(g) if g in self._drift.weights else None
            if raws is None or w.shape != (len(raws), *raws[0].shape):
                raise ValueError(f"drift reference {key!r} does not match this network's spectral-norm groups")
            new[g] = w.to(raws[0].device, raws[0].dtype)
        self._drift.record(new)

    @torch.no_grad()
    def apply_to_drift_reference(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` (what ``.to()``, ``.double()`` and the like apply to the network's tensors)
        to the drift reference, so that it stays comparable with the weights: per group (N, C_out,
        C_in/groups, k, k), seen as the 4-D weights ``fn`` is written for (a memory-format change
        refuses 5-D tensors)."""
        self._drift.apply(fn)

    def _rows_operator(self, parts: list["_Part"], union: tuple[_Geometry, torch.Tensor] | None = None
                       ) -> tuple[Callable, Callable, int]:
        """A and A^T of a bundle of non-1x1 convs on blocks of rows per group, (groups, b, n) ->
        (groups, b, m) and back, and its group count: dense per-channel operators on small maps
        (A x = x M, :func:`_dense_operators`), else the bundle as one grouped conv (:class:`ConvOperator`)
        of the :func:`_union_kernel` (``union``, where the caller has it already)."""
        sn = parts[0].sn
        if sn.depthwise and sn.input_hw[0] * sn.input_hw[1] <= self.DENSE_MAX_PIXELS:
            M = self._dense_operators(parts)
            return (lambda X: torch.bmm(X, M)), (lambda Z: torch.bmm(Z, M.mT)), M.shape[0]
        geo, wd = union if union is not None else _union_kernel(parts)
        groups = sum(p.sn.groups * p.w.shape[0] for p in parts)
        op = ConvOperator(wd, geo, sn.input_hw, groups)
        return op.A_rows, op.At_rows, groups

    def _taps(self, parts: list["_Part"]) -> list[torch.Tensor]:
        """Per part, the (k*k, H*W, H'*W') taps of its dense operators (:class:`DenseTaps`)."""
        return [self.taps(*_Geometry.of(p.sn), p.sn.input_hw, p.w.dtype, p.w.device) for p in parts]

    def _dense_operators(self, parts: list["_Part"]) -> torch.Tensor:
        """The dense operators M (sum N*C, H*W, H'*W') of all parts' channels, A x = x M
        (:func:`depthwise_dense`), built in place."""
        taps = self._taps(parts)
        channels = [p.w.shape[0] * p.w.shape[1] for p in parts]
        M = parts[0].w.new_empty(sum(channels), *taps[0].shape[1:])
        for p, T, rows in zip(parts, taps, M.split(channels)):
            torch.mm(p.w.reshape(rows.shape[0], -1), T.flatten(1), out=rows.flatten(1))
        return M

    @torch.no_grad()
    def _exact(self, jobs: list[tuple[list["_Part"], "_Vectors"]]) -> None:
        """The exact top singular vectors of every channel of the bundles of depthwise convs with a
        side of at most :data:`msrdarts.nn.spectral.EXACT_MAX_SIDE` pixels (``jobs``: parts, vectors),
        all in one :func:`small_top_vectors`, stored in their vectors."""
        if not jobs:
            return
        pairs = small_top_vectors([self._dense_operators(parts) for parts, _ in jobs], jobs[0][0][0].sn.eps)
        for (_, vectors), (u, v) in zip(jobs, pairs):
            vectors.write(u, v)

    @torch.no_grad()
    def _iterate(self, jobs: list[tuple[list["_Part"], "_Vectors", int]]) -> None:
        """The power iterations of the bundles of non-1x1 convs ``jobs`` (parts, vectors,
        iterations), read from and stored back in their vectors. Bundles that track a block run
        :func:`block_step` as each would alone, with the b x b problems of all of them (of one
        block size and dtype) solved together (:func:`block_coefficients`): a block step's cost is
        mostly those few hundred small operations, the same for 500 channels as for 5,000. Bundles
        that track one vector (``block=1``) run plain power iteration. A depthwise bundle's block
        takes, as an extra vector at the first step of each call, each channel's circular-boundary top vector of the
        current weights (:func:`with_probe`), and keeps the top ``block`` Ritz directions
        of the ``block + 1``: when training lifts a singular value whose vector lies outside the
        tracked block, the Rayleigh-Ritz step can see it before a refresh does (a refresh also
        starts from that vector), and one rising from just below the tracked ones stays tracked."""
        by_kind: dict[tuple, list] = {}
        for parts, vectors, iterations in jobs:
            probed = parts[0].sn.depthwise and parts[0].sn.block > 1
            union = _union_kernel(parts) if probed else None      # the probe's kernels, and the operator's
            A, At, groups = self._rows_operator(parts, union)
            u, basis, eps = vectors.u().view(groups, 1, -1), vectors.basis(), parts[0].sn.eps
            if basis is None:
                v = None
                for _ in range(iterations):
                    v = F.normalize(A(u), dim=-1, eps=eps)
                    u = F.normalize(At(v), dim=-1, eps=eps)
                vectors.write(u, v)
                continue
            basis = basis.view(groups, parts[0].sn.block - 1, -1)
            if probed:   # an extra vector: the circular top vector of today's weights
                geo, wd = union
                basis = with_probe(basis, wd, (geo.kernel_size, geo.dilation, parts[0].sn.input_hw), self._probe_tables)
            by_kind.setdefault((parts[0].sn.block, u.dtype), []).append(
                {"A": A, "At": At, "u": u[:, 0], "basis": basis, "v": None,
                 "left": iterations, "vectors": vectors, "eps": eps})
        for (block, _), items in by_kind.items():
            while True:
                rounds: dict[int, list] = {}   # by the rows of the block this step (block + 1 with a probe)
                for it in items:
                    if it["left"] > 0:
                        rounds.setdefault(it["basis"].shape[1] + 1, []).append(it)
                if not rounds:
                    break
                for active in rounds.values():
                    images = []
                    for it in active:
                        Z = it["A"](stack_block(it["u"], it["basis"]))
                        images.append((Z, it["At"](Z)))
                    grams = [block_grams(Z, Y) for Z, Y in images]
                    C = block_coefficients(torch.cat([g[0] for g in grams], -1), torch.cat([g[1] for g in grams], -1),
                                           block)
                    for it, (Z, Y), C_it in zip(active, images, C.split([Z.shape[0] for Z, _ in images])):
                        it["u"], it["v"], it["basis"] = block_update(C_it, Z, Y, it["eps"])
                        it["left"] -= 1
            for it in items:
                it["vectors"].write(it["u"], it["v"], it["basis"])

    @torch.no_grad()
    def _sigma_grads(self, parts: list["_Part"], vectors: "_Vectors", iterations: int = 0) -> list["_Dsigma"]:
        """Per part, d(v^T A u)/dW of its N convs (see :class:`_Dsigma`) from ``vectors``; for 1x1
        convs after ``iterations`` power iterations (others iterate in :meth:`_iterate`)."""
        sn = parts[0].sn
        if sn.matrix:
            return self._matrix_grads(parts, vectors, iterations)
        if sn.depthwise and sn.input_hw[0] * sn.input_hw[1] <= self.DENSE_MAX_PIXELS:
            return self._dense_grads(parts, vectors)
        return self._conv_grads(parts, vectors)

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

    def _dense_grads(self, parts: list["_Part"], vectors: "_Vectors") -> list["_Dsigma"]:
        """Depthwise convs on small maps: per channel c, A_c = M_c^T with M_c (HW, L) its dense
        operator (see DenseTaps), so G[c, t] = sum_{i,l} u[c, i] T[t, i, l] v[c, l] = d(v^T A u)/dw[c, t]."""
        taps = [T.flatten(1) for T in self._taps(parts)]                           # (k*k, HW*L) each
        channels = [p.w.shape[0] * p.w.shape[1] for p in parts]
        u, v = vectors.u().view(sum(channels), -1), vectors.v().view(sum(channels), -1)   # (sum N*C, HW), (.., L)
        outer = (u.unsqueeze(2) * v.unsqueeze(1)).view(u.shape[0], -1).split(channels)
        return [_Dsigma((o @ T.mT).view_as(p.w), p.sn.groups) for o, T, p in zip(outer, taps, parts)]

    def _conv_grads(self, parts: list["_Part"], vectors: "_Vectors") -> list["_Dsigma"]:
        """Other convs: u (1, sum N*C_in, H, W) and v (1, sum N*C_out, H', W') of their union as one
        grouped conv with N times the groups."""
        sn = parts[0].sn
        u = vectors.u().view(1, -1, *sn.input_hw)
        v = vectors.v().view(1, -1, *_Geometry.of(sn).out_size(sn.input_hw))
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


def _joined(dsigmas: list[_Dsigma]) -> _Dsigma:
    """The :class:`_Dsigma` of the convs of several groups stacked in one tensor (one class)."""
    if len(dsigmas) == 1:
        return dsigmas[0]
    if isinstance(dsigmas[0], _OuterDsigma):
        return _OuterDsigma(torch.cat([d.v for d in dsigmas]), torch.cat([d.u for d in dsigmas]))
    return _Dsigma(torch.cat([d.G for d in dsigmas]), dsigmas[0].groups)
