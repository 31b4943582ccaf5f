"""The Python API: what ``import msrdarts`` offers, and what the command line calls.

    import msrdarts
    found = msrdarts.search("quick", out="runs/quick", epochs=2)        # -> SearchResult
    trained = msrdarts.train(found.genotype, "quick", out="runs/quick-train", epochs=3)  # -> TrainResult
    msrdarts.stable_rank(torch.nn.Conv2d(16, 16, 3, padding=1), input_size=32)

A configuration is a preset name (:func:`presets`) or a config object, with single settings
overridden by keyword (the CLI's flags, with ``_`` for ``-``). A search method brings its own
defaults on top of the preset (``method="darts"``: no spectral normalisation, the DARTS space);
an explicit setting still wins, and config.json records which setting came from where.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .config import SEARCH_PRESETS, TRAIN_PRESETS, SearchConfig, TrainConfig, get_preset, get_train_preset
from .errors import ConfigError
from .genotype import CellGenotypes, Genotype


def presets() -> dict[str, list[str]]:
    """The preset names of each command: ``{"search": [...], "train": [...]}``."""
    return {"search": list(SEARCH_PRESETS), "train": list(TRAIN_PRESETS)}


def _settings(cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; see msrdarts "
                          f"{'search' if cls is SearchConfig else 'train'} --help")
    if isinstance(given.get("primitives"), str):
        given["primitives"] = tuple(p.strip() for p in given["primitives"].split(",") if p.strip())
    return given


def search_config(config_or_preset: str | SearchConfig = "cifar10", **overrides: Any
                  ) -> tuple[SearchConfig, dict[str, Any]]:
    """The validated search config and its origin: the preset, the settings the method brought
    (when the method differs from the preset's), and the overridden settings."""
    from .methods import get_method

    if isinstance(config_or_preset, SearchConfig):
        base, preset = config_or_preset, None
    else:
        base, preset = get_preset(config_or_preset), config_or_preset
    given = _settings(SearchConfig, overrides)
    name = given.get("method", base.method)
    method = get_method(name)
    brought: dict[str, Any] = {}
    if name != base.method:
        try:
            previous = get_method(base.method).owns
        except ConfigError:
            previous = ()
        plain = SearchConfig()
        brought = {k: getattr(plain, k) for k in previous if k not in given and getattr(base, k) != getattr(plain, k)}
        brought.update({k: v for k, v in method.defaults.items() if k not in given})
    if "primitives" in given and "space" not in given and base.space:
        brought["space"] = ""   # the user's own ops replace the preset's named space
    cfg = replace(base, **brought, **given).validate()
    method.validate(cfg)
    origin = {"preset": preset, "method": name, "method_defaults": sorted(brought), "overrides": sorted(given)}
    return cfg, origin


def train_config(config_or_preset: str | TrainConfig = "cifar10", **overrides: Any
                 ) -> tuple[TrainConfig, dict[str, Any]]:
    """The validated training config and its origin (the preset and the overridden settings)."""
    from .zoo import load_genotype

    if isinstance(config_or_preset, TrainConfig):
        base, preset = config_or_preset, None
    else:
        base, preset = get_train_preset(config_or_preset), config_or_preset
    given = _settings(TrainConfig, overrides)
    brought: dict[str, Any] = {}
    if "layers" not in given:   # a per-cell genotype sets the depth: one network cell per entry
        try:
            geno = load_genotype(given.get("genotype", base.genotype))
        except ConfigError:
            geno = None   # the run names the problem (or, on --resume, uses the genotype it checkpointed)
        if isinstance(geno, CellGenotypes) and geno.layers != base.layers:
            brought["layers"] = geno.layers
    cfg = replace(base, **given, **brought).validate()
    origin = {"preset": preset, "overrides": sorted(given)}
    if brought:
        origin["genotype_defaults"] = sorted(brought)
    return cfg, origin


def search(config_or_preset: str | SearchConfig, out: str | os.PathLike, *, resume: bool = False,
           log: Callable[[str], None] = print, on_epoch_end: Callable[[int, dict], None] | None = None,
           **overrides: Any) -> Any:
    """Run (or resume) a search into the folder ``out``; returns a
    :class:`msrdarts.runs.search.SearchResult` (genotype, best epoch, history, run folder)."""
    from .runs.search import run_search

    cfg, origin = search_config(config_or_preset, **overrides)
    return run_search(cfg, Path(out), resume=resume, on_epoch_end=on_epoch_end, log=log, origin=origin)


def train(genotype: Genotype | CellGenotypes | str | os.PathLike, config_or_preset: str | TrainConfig, out: str | os.PathLike, *,
          resume: bool = False, log: Callable[[str], None] = print,
          on_epoch_end: Callable[[int, dict], None] | None = None, **overrides: Any) -> Any:
    """Train ``genotype`` (a Genotype or per-cell CellGenotypes, a genotype file of either form, a DARTS
    string or a zoo name) from scratch
    into the folder ``out``; returns a :class:`msrdarts.runs.train.TrainResult` (results, history)."""
    from .runs.train import run_train

    spec = str(genotype) if isinstance(genotype, (Genotype, CellGenotypes)) else os.fspath(genotype)
    cfg, origin = train_config(config_or_preset, genotype=spec, **overrides)
    return run_train(cfg, Path(out), resume=resume, on_epoch_end=on_epoch_end, log=log, origin=origin)


def _conv_weight(conv_or_weight: torch.nn.Module | torch.Tensor, raw: bool) -> tuple[torch.Tensor, int, int]:
    """(weight, dilation, groups); ``raw``: the trained weight before a spectral normalisation."""
    if isinstance(conv_or_weight, torch.Tensor):
        return conv_or_weight.detach(), 1, 1
    if not isinstance(conv_or_weight, torch.nn.Conv2d):
        raise ConfigError(f"expected a torch.nn.Conv2d or a 4-D weight, got {type(conv_or_weight).__name__}")
    from .nn.supernet import raw_weight

    conv = conv_or_weight
    if conv.stride != (1, 1):
        raise ConfigError(f"stable rank and spectral norm are defined here for stride-1 convs, got {conv.stride}")
    if conv.dilation[0] != conv.dilation[1]:
        raise ConfigError(f"dilation {conv.dilation}: need equal dilations")
    return (raw_weight(conv) if raw else conv.weight).detach(), conv.dilation[0], conv.groups


def stable_rank(conv_or_weight: torch.nn.Module | torch.Tensor, input_size: int | tuple[int, int],
                dilation: int | None = None, groups: int | None = None) -> float:
    """||A||_F^2 / ||A||_2^2 of a stride-1 conv A as an operator on an ``input_size`` input
    (circular boundary, SPEC section 3). Takes a ``Conv2d`` (its dilation and groups) or a weight."""
    from .nn.spectrum import conv_stable_rank

    w, d, g = _conv_weight(conv_or_weight, raw=True)   # scale-free: the same before and after normalising
    return conv_stable_rank(w, input_size, dilation or d, groups or g)


def spectral_norm(conv_or_weight: torch.nn.Module | torch.Tensor, input_size: int | tuple[int, int],
                  dilation: int | None = None, groups: int | None = None) -> float:
    """The operator norm ||A||_2 (largest singular value) of a stride-1 conv on an ``input_size``
    input (circular boundary): what MSR-DARTS's spectral normalisation divides by."""
    from .nn.spectrum import conv_singular_values

    w, d, g = _conv_weight(conv_or_weight, raw=False)   # the weight the conv applies
    return float(conv_singular_values(w, input_size, dilation or d, groups or g)[0])
