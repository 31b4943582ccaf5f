"""How far the normalised convs' weights have moved since their last refresh (SPEC section 2).

The search refreshes a bundle of depthwise convs' tracked singular vectors once some conv's weight
has drifted by more than ``sn_refresh_drift`` since that bundle's last refresh: the error of the
power iterations grows with that drift (``bench/sn_accuracy.py``). :class:`DriftReference` keeps the
weights of each refresh and measures the relative change against them;
:class:`msrdarts.nn.spectral_batch.SpectralBatch` records into it and reads per-bundle maxima off it.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch


class DriftReference:
    """Per normalised group (an index), its stacked weights (N, C_out, C_in/groups, k, k) at its
    last refresh, and the relative Frobenius change ||W - W_r|| / ||W_r|| of each conv since."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}
        self._inverse_norms: torch.Tensor | None = None   # 1 / ||W_r|| of every conv, in weights' order

    def record(self, weights: Mapping[int, torch.Tensor]) -> None:
        """Take ``weights`` (copies: they are kept) as these groups' references."""
        self.weights.update(weights)
        self._inverse_norms = None

    @torch.no_grad()
    def changes(self, raws: Callable[[int], list[torch.Tensor]]) -> dict[int, float]:
        """Per recorded group, the largest relative change of one of its convs (``raws(g)``: their
        current weights); ``inf`` where the weights were moved or reloaded (another shape, device
        or dtype). One sync and three operations per group."""
        if not self.weights:
            return {}
        changes, lengths = [], []
        for g, ref in self.weights.items():
            now = raws(g)
            if (len(now), *now[0].shape) != ref.shape or now[0].device != ref.device or now[0].dtype != ref.dtype:
                changes.append(ref.new_full((ref.shape[0],), float("inf")))                  # moved or reloaded
            else:
                changes.append(torch.linalg.vector_norm(torch.stack(now).sub_(ref), dim=(1, 2, 3, 4)))
            lengths.append(ref.shape[0])
        dtype = changes[0].dtype
        if self._inverse_norms is None:
            self._inverse_norms = torch.cat([torch.linalg.vector_norm(ref, dim=(1, 2, 3, 4)).to(dtype)
                                             for ref in self.weights.values()]).clamp_min(1e-12).reciprocal()
        relative = torch.cat([c.to(dtype) for c in changes]) * self._inverse_norms
        per_group = torch.segment_reduce(relative, "max", lengths=torch.tensor(lengths, device=relative.device))
        return dict(zip(self.weights, per_group.tolist()))

    def state(self) -> dict[str, torch.Tensor]:
        """The references, keyed by group index as a string (for a checkpoint)."""
        return {str(g): w.clone() for g, w in self.weights.items()}

    @torch.no_grad()
    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` (what ``.to()``, ``.double()`` and the like apply to a network's tensors) to
        every reference, seen as the 4-D weights ``fn`` is written for (a memory-format change
        refuses 5-D tensors)."""
        self.weights = {g: fn(w.flatten(0, 1)).reshape(w.shape) for g, w in self.weights.items()}
        self._inverse_norms = None
