"""P-DARTS (Chen et al., ICCV 2019), ``msrdarts search --method p-darts``: DARTS in stages of
growing depth with op dropping between them (SPEC section 10).

* **Stages.** ``--stage-layers 5,11,17``: stage s is a search run of its own (``RUN/stage-K``)
  with a supernet of that many cells, ``--epochs`` epochs (25), fresh weights, alphas and
  optimisers, and ``--arch-start`` (10) epochs of weights only before the architecture steps.
* **Op dropping.** After stage s every edge keeps its ``--stage-keep[s]`` strongest ops by
  softmax(alpha) at the stage's last epoch (8 -> 5 -> 3 candidates), separately for normal and
  reduce; the next stage's supernet has only those (``SuperNet(edge_ops=...)``). An edge never
  keeps ``none`` alone: with one op to keep and ``none`` strongest, it keeps its best other op.
  The last count must be 1: the final genotype's op per edge (the strongest but ``none``).
* **Dropout on skip connections** (``--skip-dropout``, one rate per stage): identity skips pass
  through dropout of rate r (E - e - 1) / E in the weights-only epochs e < A, then
  r exp(-0.2 (e - A)) (their code; E epochs per stage, A = ``--arch-start``).
* **Final genotype.** Read off the last stage's last epoch (as their code): per edge the strongest
  op but ``none``, per node the 2 strongest edges; then, while the normal cell has more than
  ``--max-skips`` (2) skip connections, the weakest chosen skip is removed from its edge's
  candidates and the cell is derived again (the edge falls back to its next-best op, and the
  node may choose another edge).
* First-order architecture steps by Adam (their 6e-4, betas (0.5, 0.999), wd 1e-3), the
  architecture gradient clipped to ``--grad-clip``, as their code.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn

from ..config import check_network
from ..errors import ConfigError
from ..genotype import Genotype, num_edges, pairs
from ..nn.edges import SkipDropMixedOp
from .base import Derivation, register_method
from .darts import DARTS, add_alphas
from .derive import derive_cell

SKIP, NONE = "skip_connect", "none"
#: The within-stage decay of the skip dropout after the architecture steps start (their code).
DROPOUT_DECAY = 0.2


def skip_dropout_rate(rate: float, epoch: int, epochs: int, arch_start: int) -> float:
    """The dropout rate on skip connections in epoch ``epoch`` (0-based) of a stage."""
    if epoch < arch_start:
        return rate * (epochs - epoch - 1) / epochs
    return rate * math.exp(-DROPOUT_DECAY * (epoch - arch_start))


def keep_ops(probs: torch.Tensor, available: torch.Tensor, primitives: Sequence[str], k: int
             ) -> tuple[tuple[str, ...], ...]:
    """Per edge the ``k`` available ops of highest ``probs`` (edges, ops), in the primitives' order;
    ties go to the lower op index; an edge never keeps ``none`` alone."""
    out = []
    for p, avail in zip(probs.double(), available):
        ids = [i for i in range(len(primitives)) if avail[i]]
        ranked = sorted(ids, key=lambda i: (-float(p[i]), i))
        kept = ranked[:k]
        if all(primitives[i] == NONE for i in kept):
            others = [i for i in ranked if primitives[i] != NONE]
            if not others:
                raise ValueError("an edge has no candidate op but none")
            kept = kept[:-1] + others[:1]
        out.append(tuple(primitives[i] for i in sorted(kept)))
    return tuple(out)


def limited_skips(costs: torch.Tensor, primitives: Sequence[str], steps: int, max_skips: int
                  ) -> list[tuple[str, int]]:
    """The derived cell (the shared routine on ``costs``, ``none`` excluded) with at most
    ``max_skips`` skip connections: while there are more, the chosen skip of highest cost (lowest
    strength; ties: the lower edge) is removed from its edge's candidates and the cell derived
    again. A skip whose edge has no other candidate stays (the limit is then not met)."""
    costs = costs.detach().to("cpu", torch.float64).clone()
    if NONE in primitives:
        costs[:, primitives.index(NONE)] = float("inf")
    skip = primitives.index(SKIP) if SKIP in primitives else None
    while True:
        cell = derive_cell(costs, primitives, steps)
        if skip is None or max_skips < 0:
            return cell
        chosen = [num_edges(i // 2) + src for i, (op, src) in enumerate(cell) if op == SKIP]
        if len(chosen) <= max_skips:
            return cell
        removable = [e for e in chosen if torch.isfinite(torch.cat([costs[e, :skip], costs[e, skip + 1:]])).any()]
        if not removable:
            return cell
        weakest = max(removable, key=lambda e: (float(costs[e, skip]), -e))
        costs[weakest, skip] = float("inf")


@register_method
class PDARTS(DARTS):
    name = "p-darts"
    defaults = {"spectral_norm": False}
    owns = DARTS.owns + ("stage_layers", "stage_keep", "skip_dropout", "max_skips", "stage", "edge_ops")
    score_key = "alpha"
    lower_wins = False
    clip_arch_grad = True

    @classmethod
    def validate(cls, cfg: Any) -> None:
        super().validate(cfg)
        n = len(cfg.stage_layers)
        if not n:
            raise ConfigError("--method p-darts: give --stage-layers, --stage-keep and --skip-dropout (one value per "
                              "stage), or start from --preset p-darts-cifar10")
        if len(cfg.stage_keep) != n or len(cfg.skip_dropout) != n:
            raise ConfigError(f"--stage-layers={','.join(map(str, cfg.stage_layers))}: --stage-keep and "
                              f"--skip-dropout need one value per stage ({n})")
        for layers in cfg.stage_layers:
            check_network(layers, cfg.channels)
        keep, ops = cfg.stage_keep, len(cfg.ops)
        if keep[-1] != 1 or keep[0] >= ops or any(a <= b for a, b in zip(keep, keep[1:])):
            raise ConfigError(f"--stage-keep={','.join(map(str, keep))}: must fall strictly from below the {ops} "
                              f"ops of the space to 1 (P-DARTS: 5,3,1 of 8)")
        if any(not 0.0 <= r < 1.0 for r in cfg.skip_dropout):
            raise ConfigError(f"--skip-dropout={','.join(map(str, cfg.skip_dropout))}: rates must be in [0, 1)")
        if cfg.max_skips < -1:
            raise ConfigError(f"--max-skips={cfg.max_skips}: must be >= 0, or -1 for no limit")
        if not 0 <= cfg.stage < n:
            raise ConfigError(f"stage={cfg.stage}: must be in 0..{n - 1}")
        if cfg.impl == "fused":
            raise ConfigError("--method p-darts: edges with different ops have no fused forward; use --impl "
                              "reference or auto")

    @classmethod
    def stages(cls, cfg: Any) -> int:
        return len(cfg.stage_layers)

    @classmethod
    def stage_config(cls, cfg: Any, stage: int, previous: dict[str, Any] | None) -> Any:
        edge_ops: Any = ()
        if stage > 0:
            if previous is None or "kept_ops" not in previous:
                raise ConfigError(f"stage {stage + 1}: the previous stage's last epoch recorded no kept ops")
            edge_ops = (tuple(map(tuple, previous["kept_ops"]["normal"])),
                        tuple(map(tuple, previous["kept_ops"]["reduce"])))
        return replace(cfg, stage=stage, layers=cfg.stage_layers[stage], edge_ops=edge_ops)

    @classmethod
    def supernet_options(cls, cfg: Any) -> dict[str, Any]:
        return {"edge": SkipDropMixedOp, "edge_ops": cfg.edge_ops or None}

    def adapt(self, net: nn.Module) -> None:
        k = {len(ops) for table in (self.cfg.edge_ops or ()) for ops in table} or {len(net.primitives)}
        if len(k) != 1:
            raise ConfigError("edge_ops: every edge needs the same number of candidate ops")
        for a in add_alphas(net, k.pop()).arch_parameters():   # trained by the Architect's own steps only
            a.requires_grad_(False)
        self.net = net

    def new_epoch(self, epoch: int, fresh: bool) -> None:
        super().new_epoch(epoch, fresh)
        cfg = self.cfg
        p = skip_dropout_rate(cfg.skip_dropout[cfg.stage], epoch, cfg.epochs, cfg.arch_start)
        for m in self.net.modules():
            if isinstance(m, SkipDropMixedOp):
                m.p = p

    def available(self, primitives: Sequence[str]) -> torch.Tensor:
        """(2, edges, ops) bool: which of ``primitives`` each edge has in this stage."""
        E = num_edges(self.net.steps)
        if not self.cfg.edge_ops:
            return torch.ones(2, E, len(primitives), dtype=torch.bool)
        return torch.tensor([[[p in ops for p in primitives] for ops in table] for table in self.cfg.edge_ops])

    def derive(self, net: nn.Module) -> Derivation:
        """softmax(alpha) spread over the whole space (0 for dropped ops), the genotype (with the
        skip limit in the last stage) and, before the last stage, the ops every edge keeps."""
        primitives, cfg = net.primitives, self.cfg
        avail = self.available(primitives)
        probs = torch.softmax(net.alphas.detach().float(), dim=-1).cpu()
        table = torch.zeros(avail.shape)
        table[avail] = probs.reshape(-1)
        costs = (-table).masked_fill(~avail, float("inf"))
        last = cfg.stage == len(cfg.stage_layers) - 1
        normal = limited_skips(costs[0], primitives, net.steps, cfg.max_skips if last else -1)
        reduce = limited_skips(costs[1], primitives, net.steps, -1)
        concat = tuple(range(2 + net.steps - net.multiplier, net.steps + 2))
        genotype = Genotype(pairs(normal), concat, pairs(reduce), concat)
        extra = {}
        if not last:
            k = cfg.stage_keep[cfg.stage]
            extra["kept_ops"] = {kind: [list(ops) for ops in keep_ops(table[t], avail[t], primitives, k)]
                                 for t, kind in enumerate(("normal", "reduce"))}
        return Derivation(table, genotype, extra=extra)
