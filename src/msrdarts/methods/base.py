"""The search-method interface and its registry (NASLib's ``MetaOptimizer`` shape).

A method is a step, not a loop: the one search loop (:mod:`msrdarts.runs.search`) trains the
supernet weights and calls the method at fixed points. Adding a method is one file in this
folder that subclasses :class:`Method` and registers it with :func:`register_method`, plus a
preset; the supernet and the loop know no method by name.

Order of calls in a run::

    Method.validate(cfg)                  settings check (class method, before anything is built)
    Method.supernet_options(cfg)          the method's own SuperNet arguments (e.g. its mixed edge)
    Method.stages(cfg)                    how many stages the search has (1; P-DARTS: 3): stage s is
                                          a search run of Method.stage_config(cfg, s, previous)
    m = Method(cfg)
    m.adapt(net)                          add what the method needs to the supernet
    m.setup(net, weight_optimizer, ctx)   its optimisers and data (ctx: SearchContext)
    m.load_state_dict(ckpt[...])          on --resume
    per epoch:  m.new_epoch(epoch, fresh)      (fresh: not a resumed mid-epoch position)
                m.step_hook(epoch_seed, start) -> before_step(step, x, y) or None
                m.derive(net) -> Derivation (scores, genotype, per-cell ones)   after the epoch
    m.state_dict()                        what a checkpoint keeps (plain data and tensors)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from ..errors import ConfigError
from ..genotype import CellGenotypes, Genotype

BeforeStep = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class Derivation:
    """What a method reads off the supernet after an epoch: its score table per cell type
    (2, edges, ops) [normal, reduce] and the genotype; optionally the table of every cell
    (layers, edges, ops) and one genotype per cell (SPEC section 4a)."""

    scores: torch.Tensor
    genotype: Genotype
    cell_scores: torch.Tensor | None = None
    cells: CellGenotypes | None = None
    #: Further genotypes read off the same weights, by name (MSR-DARTS: "max" and "cells-max", the
    #: authors' max-stable-rank ablation; a search writes each as genotype-NAME.json).
    ablations: dict[str, Genotype | CellGenotypes] = field(default_factory=dict)
    #: Further plain-data results a method keeps in each epoch's history record, by key (P-DARTS:
    #: ``kept_ops``, the candidate ops of every edge in its next stage).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchContext:
    """What a method may use from the run: the device settings, the process group's gradient
    average (None in one process), and a maker of search-valid loaders (DARTS's alpha batches)."""

    accel: Any
    average: Callable[[torch.Tensor], torch.Tensor] | None
    valid_batches: Callable[[int, int], Iterable[tuple[torch.Tensor, torch.Tensor]]]


class Method:
    """Base class: a method with no architecture state of its own."""

    #: The name used by --method and in config.json.
    name: ClassVar[str] = ""
    #: Settings this method brings on top of a preset (a flag still wins), e.g. DARTS turns
    #: spectral normalisation off.
    defaults: ClassVar[dict[str, Any]] = {}
    #: Settings only this method reads: a switch to another method resets them to the config's
    #: defaults unless given (the authors preset's srsoftmax mixing means nothing to DARTS).
    owns: ClassVar[tuple[str, ...]] = ()
    #: The key of its per-(edge, op) score table in history.jsonl, and whether lower scores win.
    score_key: ClassVar[str] = ""
    lower_wins: ClassVar[bool] = True
    @classmethod
    def validate(cls, cfg: Any) -> None:
        """Raise ConfigError for settings this method cannot run with."""

    @classmethod
    def supernet_options(cls, cfg: Any) -> dict[str, Any]:
        """Keyword arguments of :class:`msrdarts.nn.supernet.SuperNet` this method builds its supernet
        with (PC-DARTS: ``edge``, its partial-channel mixed edge)."""
        return {}

    @classmethod
    def stages(cls, cfg: Any) -> int:
        """The number of stages: each one its own search run in ``RUN/stage-K`` (1: a plain run)."""
        return 1

    @classmethod
    def stage_config(cls, cfg: Any, stage: int, previous: dict[str, Any] | None) -> Any:
        """The config of stage ``stage`` (0-based), given the last history record of the previous
        stage (None for the first)."""
        return cfg

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def adapt(self, net: nn.Module) -> None:
        """Add what the method needs to a freshly built supernet (parameters, mixing)."""

    def setup(self, net: nn.Module, weight_optimizer: torch.optim.Optimizer, ctx: SearchContext) -> None:
        """Create the method's optimisers and data streams."""

    def new_epoch(self, epoch: int, fresh: bool) -> None:
        """Called before each epoch (``fresh`` False when it resumes a mid-epoch checkpoint)."""

    def step_hook(self, epoch_seed: int, start: int) -> BeforeStep | None:
        """The ``before_step(step, x, y)`` of an epoch that starts at step ``start``, or None."""
        return None

    def derive(self, net: nn.Module) -> Derivation:
        """The score tables and the genotype(s) read off the supernet."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any] | None:
        return None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: adds a :class:`Method` subclass under its ``name``; duplicates are refused."""
    if not cls.name or cls.name in _METHODS:
        raise ValueError(f"search method {cls.name!r} is unnamed or already registered")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return list(_METHODS)


def get_method(name: str) -> type[Method]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ConfigError(f"--method={name!r}: unknown; allowed: {', '.join(_METHODS)}") from None
