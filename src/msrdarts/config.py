"""Typed run configurations and the presets that reproduce published protocols.

A preset is a complete :class:`SearchConfig`; command-line flags override single fields. The
help text of every field lives in its ``metadata`` so the CLI and the docs say the same thing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError
from .ops import MSR_PRIMITIVES, list_ops
from .supernet import MIXING_MODES


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


class _Config:
    """JSON round trip shared by the run configs (tuples are stored as lists)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Any:
        known = {f.name: f for f in fields(cls)}
        data = {k: v for k, v in data.items() if k != "runtime"}  # what config.json adds on top
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(known[k].default, tuple) else v for k, v in data.items()})


@dataclass(frozen=True)
class SearchConfig(_Config):
    """Everything an MSR-DARTS search run depends on (stored as config.json in the run folder)."""

    dataset: str = _f("cifar10", "data set: digits (offline demo), cifar10, cifar100, svhn, or folder (--data "
                                 "holding train/ and val/ or test/ class folders)")
    data: str = _f("data", "folder holding (or receiving) the data set files")
    download: bool = _f(False, "let torchvision download the data set into --data if it is missing")
    layers: int = _f(8, "cells in the supernet (reduction cells at L/3 and 2L/3)")
    channels: int = _f(16, "initial channels C")
    batch_size: int = _f(128, "images per step")
    epochs: int = _f(50, "training epochs of the supernet weights")
    lr: float = _f(0.025, "initial SGD learning rate (cosine-annealed to --lr-min)")
    lr_min: float = _f(0.001, "final learning rate of the cosine schedule")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(3e-4, "L2 weight decay")
    grad_clip: float = _f(5.0, "gradient-norm clipping threshold (0 disables)")
    bn_recalibration: int = _f(0, "batches of search-train images used to recompute BN statistics before each "
                                  "validation (0: running averages, as the authors' code)")
    train_portion: float = _f(0.8, "fraction of the training set used for search-train (rest: search-valid)")
    split_seed: int = _f(0, "seed of the search-train / search-valid split")
    seed: int = _f(2, "seed of weights, batch order and augmentation")
    mixing: str = _f("sum", "edge mixing: 'sum' (paper) or 'srsoftmax' (authors' code: softmax(-stable rank))")
    spectral_norm: bool = _f(True, "spectrally normalise every conv inside every op to operator norm 1")
    sn_iterations: int = _f(1, "power iterations per training forward of each normalised conv")
    sn_refresh_every: int = _f(10, "steps between checks of every depthwise conv's power iteration against a "
                                   "fresh circular-boundary start (catches singular values that overtake)")
    primitives: tuple[str, ...] = _f(MSR_PRIMITIVES, "candidate ops, comma-separated")
    rank_per_pixel: bool = _f(False, "divide stable ranks by the conv's H*W before averaging over cells")
    authors_reduce_resolution: bool = _f(
        False, "authors' quirk: rank the stride-1 edges of reduction cells at the cell's input resolution")
    device: str = _f("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps' ...")
    progress: bool = _f(True, "show a progress bar per epoch")

    def validate(self) -> "SearchConfig":
        """Raise ConfigError naming the first invalid field; return self."""
        from .data import list_datasets

        for name in ("layers", "channels", "batch_size", "epochs", "sn_iterations", "sn_refresh_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{_flag(name)}={value}: must be a positive integer")
        if self.layers < 3:
            raise ConfigError(f"--layers={self.layers}: need at least 3 cells (normal and reduction cells)")
        if self.channels < 2:
            raise ConfigError(f"--channels={self.channels}: need at least 2")
        for name in ("lr", "lr_min", "momentum", "weight_decay", "grad_clip", "bn_recalibration"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)}={getattr(self, name)}: must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"--lr={self.lr}: must be > 0")
        if not 0.0 < self.train_portion < 1.0:
            raise ConfigError(f"--train-portion={self.train_portion}: must be strictly between 0 and 1")
        if self.dataset not in list_datasets():
            raise ConfigError(f"--dataset={self.dataset!r}: unknown; allowed: {', '.join(list_datasets())}")
        if self.rank_per_pixel and self.authors_reduce_resolution:
            raise ConfigError("--rank-per-pixel and --authors-reduce-resolution exclude each other "
                              "(per-pixel ranks have no resolution left to misstate)")
        if self.mixing not in MIXING_MODES:
            raise ConfigError(f"--mixing={self.mixing!r}: unknown; allowed: {', '.join(MIXING_MODES)}")
        unknown = [p for p in self.primitives if p not in list_ops()]
        if unknown:
            raise ConfigError(f"--primitives: unknown op(s) {', '.join(unknown)}; known: {', '.join(list_ops())}")
        if not self.primitives or len(set(self.primitives)) != len(self.primitives):
            raise ConfigError(f"--primitives: need a non-empty list of distinct ops, got {','.join(self.primitives)}")
        convless = [p for p in self.primitives if p in ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect")]
        if convless:
            raise ConfigError(f"--primitives: MSR-DARTS ranks ops by the stable rank of their last conv; "
                              f"{', '.join(convless)} have none (allowed: sep_conv_*, dil_conv_*)")
        return self

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: Presets by name, each citing the protocol it reproduces.
SEARCH_PRESETS: dict[str, SearchConfig] = {
    # SPEC section 5 / the authors' code: 8 cells, C = 16, 4:1 split, SGD 0.025 cosine to 0.001,
    # wd 3e-4, clip 5, 50 epochs, batch 128.
    "cifar10": SearchConfig(),
    # Offline demo: scikit-learn's digits (8 x 8 grey), a 5-cell C = 8 supernet, a few minutes on 2 CPU cores.
    # Few steps per epoch, so BN statistics are recomputed before validation.
    "quick": SearchConfig(dataset="digits", layers=5, channels=8, batch_size=64, epochs=8, lr=0.05,
                          bn_recalibration=8),
}


def get_preset(name: str) -> SearchConfig:
    try:
        return SEARCH_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(SEARCH_PRESETS)}") from None


def with_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """``cfg`` with the non-None entries of ``overrides`` replaced, validated."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None}).validate()


@dataclass(frozen=True)
class TrainConfig(_Config):
    """Everything a from-scratch training run depends on (stored as config.json in the run folder)."""

    genotype: str = _f("MSR_DARTS", "genotype.json, a DARTS Genotype(...) string or file, or a zoo name")
    dataset: str = _f("cifar10", "data set: digits (offline demo), cifar10, cifar100, svhn, or folder (--data "
                                 "holding train/ and val/ or test/ class folders)")
    data: str = _f("data", "folder holding (or receiving) the data set files")
    download: bool = _f(False, "let torchvision download the data set into --data if it is missing")
    layers: int = _f(20, "cells (reduction cells at L/3 and 2L/3)")
    channels: int = _f(36, "initial channels C")
    batch_size: int = _f(96, "images per step")
    epochs: int = _f(600, "training epochs")
    lr: float = _f(0.025, "initial SGD learning rate (cosine-annealed to --lr-min)")
    lr_min: float = _f(0.0, "final learning rate of the cosine schedule")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(3e-4, "L2 weight decay")
    grad_clip: float = _f(5.0, "gradient-norm clipping threshold (0 disables)")
    auxiliary_weight: float = _f(0.4, "weight of the auxiliary head's loss (0 disables the head)")
    drop_path: float = _f(0.2, "drop-path probability, ramped linearly from 0 (epoch e uses drop_path * e / epochs)")
    cutout: int = _f(16, "cutout square side in pixels (0 disables)")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss (ImageNet protocol: 0.1)")
    schedule: str = _f("cosine", "learning-rate schedule: 'cosine' (to --lr-min) or 'step' (x0.97 per epoch, DARTS ImageNet)")
    warmup_epochs: int = _f(0, "epochs of linear learning-rate warm-up before the schedule")
    seed: int = _f(0, "seed of weights, batch order and augmentation")
    device: str = _f("auto", "'auto' (the accelerator if any, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps' ...")
    progress: bool = _f(True, "show a progress bar per epoch")

    def validate(self) -> "TrainConfig":
        from .data import list_datasets

        for name in ("layers", "channels", "batch_size", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{_flag(name)}={value}: must be a positive integer")
        for name in ("lr_min", "momentum", "weight_decay", "grad_clip", "auxiliary_weight", "cutout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)}={getattr(self, name)}: must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"--lr={self.lr}: must be > 0")
        if self.lr_min > self.lr:
            raise ConfigError(f"--lr-min={self.lr_min}: must not exceed --lr={self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing={self.label_smoothing}: must be in [0, 1)")
        if self.schedule not in ("cosine", "step"):
            raise ConfigError(f"--schedule={self.schedule!r}: unknown; allowed: cosine, step")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"--warmup-epochs={self.warmup_epochs}: must be in 0..epochs-1")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"--drop-path={self.drop_path}: must be in [0, 1)")
        if self.dataset not in list_datasets():
            raise ConfigError(f"--dataset={self.dataset!r}: unknown; allowed: {', '.join(list_datasets())}")
        return self


#: Training presets, each citing the protocol it reproduces.
TRAIN_PRESETS: dict[str, TrainConfig] = {
    # DARTS protocol (SPEC section 5): L = 20, C = 36, 600 epochs, batch 96, SGD 0.025 cosine, wd 3e-4,
    # cutout 16, auxiliary 0.4, drop path 0.2, clip 5, all 50k training images, 10k test images.
    "cifar10": TrainConfig(),
    # The paper's Table 1 comparison at the search depth (L = 8).
    "cifar10-l8": TrainConfig(layers=8),
    # The DARTS protocol on CIFAR-100 and SVHN (the usual transfer settings of DARTS-family papers).
    "cifar100": TrainConfig(dataset="cifar100"),
    "svhn": TrainConfig(dataset="svhn"),
    # Offline demo on digits: a 5-cell C = 16 network, about a minute on 2 CPU cores.
    "quick": TrainConfig(dataset="digits", layers=5, channels=16, batch_size=64, epochs=15, lr=0.05, cutout=0,
                         drop_path=0.1),
}


def get_train_preset(name: str) -> TrainConfig:
    try:
        return TRAIN_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(TRAIN_PRESETS)}") from None
