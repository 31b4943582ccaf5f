"""Typed run configurations, their validation, and the presets that reproduce published protocols.

Pure data: this module imports no network, data or method code. A preset is a complete
:class:`SearchConfig` or :class:`TrainConfig`; a search method adds its own defaults on top
(:func:`msrdarts.api.search_config`), and flags override single fields. The help text of every
field lives in its ``metadata`` so the CLI and the docs say the same thing. Each setting is
checked here, once, with one message; the allowed values of the enumerated settings live here
too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .primitives import MSR_PRIMITIVES, SPACES, can_fuse, fusable_ops, list_primitives

#: Allowed values of the enumerated settings (one home: the modules that act on them import these).
AMP_MODES = ("auto", "bf16", "off")
SWITCHES = ("auto", "on", "off")
LOADING_MODES = ("auto", "memory", "stream")
PROGRESS_MODES = ("auto", "on", "off")
#: Supernet forward implementations: "fused" (see msrdarts.nn.fused), "reference" (one module call
#: per op), "auto" (fused where the ops allow it).
IMPLS = ("auto", "fused", "reference")
#: Evaluation network implementations: "fast" (the same function, faster on the CPU: see
#: msrdarts.nn.network.Network), "reference" (DARTS's network in plain PyTorch ops), "auto" (fast).
EVAL_IMPLS = ("auto", "fast", "reference")
#: Edge mixing of --method msr.
MSR_MIXING = ("sum", "srsoftmax")
#: --method msr: the op and edges of lowest stable rank (the method) or highest (the authors' ablation).
SELECT_MODES = ("min", "max")


def _f(default: Any, help: str, cli: bool = True) -> Any:
    """A setting with its help text; ``cli=False``: set by the program (recorded in config.json),
    no flag."""
    return field(default=default, metadata={"help": help, "cli": cli})


class _Config:
    """JSON round trip shared by the run configs (tuples are stored as lists)."""

    def __post_init__(self) -> None:
        if isinstance(getattr(self, "progress", None), bool):   # progress=True/False as before auto/on/off
            object.__setattr__(self, "progress", "auto" if self.progress else "off")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Any:
        known = {f.name: f for f in fields(cls)}
        data = {k: v for k, v in data.items() if k not in ("runtime", "origin")}  # what config.json adds on top
        if isinstance(data.get("progress"), bool):   # written before --progress took auto/on/off: True was
            data["progress"] = "auto" if data["progress"] else "off"   # the default, bars where they help
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(known[k].default, tuple) else v for k, v in data.items()})


_DATASET_HELP = ("data set: digits (offline demo), cifar10, cifar100, svhn (torchvision), imagenet (--data holding "
                 "train/ and val/ class folders), or folder (your images: --data holding train/ and val/ or test/ "
                 "class folders)")


@dataclass(frozen=True)
class _DataConfig(_Config):
    """The data and device settings shared by search and train runs."""

    dataset: str = _f("cifar10", _DATASET_HELP)
    data: str = _f("data", "folder holding (or receiving) the data set files")
    download: bool = _f(False, "let torchvision download the data set into --data if it is missing")
    image_size: int = _f(0, "image side in pixels for folder and imagenet (0: the data set's own: folder 32, "
                            "imagenet 224); up to 64 px the CIFAR pipeline, above it ImageNet's")
    loading: str = _f("auto", "'memory' (decoded once, held on the device as uint8), 'stream' (decoded per batch "
                              "by --workers processes) or 'auto' (memory for images of at most 64 px and 2 GiB)")
    workers: int = _f(-1, "DataLoader worker processes decoding streamed images (-1: one per core, at most 8; "
                          "0: in the main process)")
    device: str = _f("auto", "'auto' (the accelerator if any, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps' ...")
    amp: str = _f("auto", "bf16 autocast of forward and backward: 'bf16', 'off', or 'auto' (bf16 on an accelerator, "
                          "off on the CPU); spectral norms and stable ranks stay in float32")
    channels_last: str = _f("auto", "channels_last memory format: 'on', 'off', or 'auto' (on on an accelerator; on the "
                                    "CPU, on for training with --impl fast, off otherwise)")
    compile: str = _f("auto", "torch.compile the network: 'on', 'off', or 'auto' (on on an accelerator); falls back "
                              "to eager with a message where compiling fails. On the CPU the fused search also "
                              "compiles its large depthwise weight gradients unless this is 'off'")
    checkpoint_every: int = _f(0, "also checkpoint every N training steps within an epoch (0: at epoch ends only); "
                                  "for long epochs such as ImageNet's")

    def _validate_data(self) -> None:
        from .data.registry import list_datasets   # pure data, like this module

        for name, allowed in (("amp", AMP_MODES), ("channels_last", SWITCHES), ("compile", SWITCHES),
                              ("loading", LOADING_MODES), ("progress", PROGRESS_MODES)):
            check_choice(name, getattr(self, name), allowed)
        check_choice("dataset", self.dataset, list_datasets())
        if not isinstance(self.image_size, int) or self.image_size < 0:
            raise ConfigError(f"--image-size={self.image_size}: must be an integer >= 0 (0: the data set's own)")
        if 0 < self.image_size < 8:
            raise ConfigError(f"--image-size={self.image_size}: need at least 8 px")
        if not isinstance(self.workers, int) or self.workers < -1:
            raise ConfigError(f"--workers={self.workers}: must be -1 (auto), 0 or a positive integer")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every={self.checkpoint_every}: must be 0 (epoch ends only) or a "
                              f"positive number of steps")


@dataclass(frozen=True)
class SearchConfig(_DataConfig):
    """Everything an MSR-DARTS search run depends on (stored as config.json in the run folder)."""

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
    subset: float = _f(0.0, "class-balanced fraction of the training images sampled for search-train, with a disjoint "
                            "--subset-valid fraction for search-valid (PC-DARTS's ImageNet search: 0.1); 0: split all "
                            "images by --train-portion")
    subset_valid: float = _f(0.025, "class-balanced fraction of the training images for search-valid when --subset is set")
    split_seed: int = _f(0, "seed of the search-train / search-valid split")
    seed: int = _f(2, "seed of weights, batch order and augmentation")
    mixing: str = _f("sum", "edge mixing: 'sum' (paper) or 'srsoftmax' (authors' code: softmax(-stable rank))")
    impl: str = _f("auto", "supernet forward: 'fused' (edges leaving a node computed together, batched spectral "
                           "norms), 'reference' (one module call per op), 'auto' (fused where the ops allow it); "
                           "the same function either way")
    spectral_norm: bool = _f(True, "spectrally normalise every conv inside every op to operator norm 1")
    sn_iterations: int = _f(1, "power iterations per training forward of each normalised conv")
    sn_refresh_every: int = _f(5, "steps between resets of the pointwise (1x1) convs' power iterations to their exact "
                                   "top singular vectors (batched squarings of their Gram matrices; steps counted over the "
                                   "whole search, from its first)")
    sn_refresh_depthwise_every: int = _f(100, "also refresh all convs after every this-many steps (none after the "
                                              "first), whatever --sn-refresh-drift says (counted as "
                                              "--sn-refresh-every; a bound: the drift trigger decides when the "
                                              "depthwise convs need it)")
    sn_refresh_drift: float = _f(0.15, "refresh a bundle of depthwise convs (those of one map size and stride; block "
                                       "Krylov refreshes of their tracked top-3 singular subspaces, which catch a "
                                       "singular value outside the block that overtakes) after a step that moved one "
                                       "of its convs' weights by more than this fraction (relative Frobenius norm) "
                                       "since the bundle's last refresh; convs on maps of at most 4 pixels in or out "
                                       "are exact at every step and need none; 0: only on "
                                       "--sn-refresh-depthwise-every (BENCHMARKS.md, spectral norms during a search)")
    checkpoint_cells: bool = _f(False, "keep only each cell's inputs for the backward and run the cell again there "
                                       "(activation checkpointing; fused forward only): less memory, more compute "
                                       "(BENCHMARKS.md, search step)")
    recompute_depthwise: str = _f("auto", "keep only each ReLU-depthwise-pointwise-BN block's input and output for the "
                                          "backward and compute its depthwise conv again there (fused forward only): "
                                          "under half of what autograd keeps, for 1.15-1.2x the plain fused step's time. "
                                          "'on', 'off', or 'auto' (on where the plain step's estimated peak at the batch "
                                          "per process exceeds the device's free memory; the log says which); a bare "
                                          "--recompute-depthwise is 'on' (BENCHMARKS.md, search step)")
    primitives: tuple[str, ...] = _f(MSR_PRIMITIVES, "candidate ops, comma-separated (or name a space with --space)")
    method: str = _f("msr", "search method: 'msr' (MSR-DARTS: no architecture parameters, stable-rank selection), "
                            "'darts' (the DARTS baseline: learned alphas, softmax mixing, alternating updates; brings "
                            "--no-spectral-norm unless given), 'pc-darts' (DARTS with partial "
                            "channels and edge normalisation) or 'p-darts' (DARTS in stages of growing depth, "
                            "dropping ops between them)")
    space: str = _f("", "the candidate ops by name: 'msr' (4 conv ops) or 'darts' (the 8 DARTS ops); empty: "
                        "--primitives")
    order: int = _f(1, "--method darts: 1 (first-order alpha gradient) or 2 (unrolled second-order, finite differences)")
    arch_lr: float = _f(3e-4, "--method darts: Adam learning rate of the alphas (betas 0.5, 0.999)")
    arch_weight_decay: float = _f(1e-3, "--method darts: weight decay of the alphas")
    arch_start: int = _f(0, "--method darts / pc-darts: epochs of weights-only warm-up before the architecture "
                            "steps start (PC-DARTS: 15 on CIFAR-10, 35 on ImageNet)")
    stage_layers: tuple[int, ...] = _f((), "--method p-darts: cells of the supernet in each stage (P-DARTS: 5,11,17); "
                                            "--epochs is per stage")
    stage_keep: tuple[int, ...] = _f((), "--method p-darts: ops each edge keeps after each stage, by softmax(alpha) "
                                         "(P-DARTS: 5,3,1; the last must be 1: the final op)")
    skip_dropout: tuple[float, ...] = _f((), "--method p-darts: dropout rate on skip connections in each stage, "
                                             "decayed within the stage (P-DARTS: 0.1,0.4,0.7 on CIFAR-10, 0.1,0.2,0.3 "
                                             "on CIFAR-100)")
    max_skips: int = _f(2, "--method p-darts: at most this many skip connections in the final normal cell (-1: no limit)")
    stage: int = _f(0, "--method p-darts: the stage this run is (0-based; set by the staged search)", cli=False)
    edge_ops: tuple = _f((), "--method p-darts: every edge's candidate ops in this stage, (normal, reduce) (set by "
                             "the staged search from the previous stage's alphas)", cli=False)
    partial_channels: int = _f(4, "--method pc-darts: K, the channel proportion: 1/K of each edge's channels go "
                                  "through its ops, the rest bypass them (PC-DARTS: 4 on CIFAR-10, 2 on ImageNet)")
    select: str = _f("min", "--method msr: pick the op and edges of lowest stable rank ('min', the method) or of "
                            "highest ('max', the authors' ablation)")
    rank_per_pixel: bool = _f(False, "divide stable ranks by the conv's H*W before averaging over cells")
    authors_reduce_resolution: bool = _f(
        False, "authors' quirk: rank the stride-1 edges of reduction cells at the cell's input resolution")
    progress: str = _f("auto", "progress bars: 'on', 'off', or 'auto' (bars on a terminal; to a file or pipe, "
                               "one line per epoch only)")
    tensorboard: bool = _f(True, "write TensorBoard event files into RUN/tensorboard/ (when the tensorboard package "
                                 "is installed: pip install tensorboard)")
    plots: bool = _f(True, "draw the run's pictures into RUN/plots/ when it ends (again any time: msrdarts plot RUN)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, kind in (("stage_layers", int), ("stage_keep", int), ("skip_dropout", float)):
            try:   # from the command line: strings; from config.json: numbers
                object.__setattr__(self, name, tuple(kind(v) for v in getattr(self, name)))
            except (TypeError, ValueError):
                raise ConfigError(f"{_flag(name)}={getattr(self, name)!r}: need comma-separated "
                                  f"{'integers' if kind is int else 'numbers'}") from None
        if self.edge_ops:   # config.json stores lists
            object.__setattr__(self, "edge_ops", tuple(tuple(tuple(e) for e in t) for t in self.edge_ops))
        if isinstance(self.recompute_depthwise, bool):   # written before it took auto/on/off
            object.__setattr__(self, "recompute_depthwise", "on" if self.recompute_depthwise else "off")

    def validate(self) -> "SearchConfig":
        """Raise ConfigError naming the first invalid field; return self. The chosen method checks
        its own settings on top (``Method.validate``)."""
        check_positive(**{n: getattr(self, n) for n in ("batch_size", "epochs", "sn_iterations", "sn_refresh_every",
                                                       "sn_refresh_depthwise_every", "partial_channels")})
        if not isinstance(self.arch_start, int) or isinstance(self.arch_start, bool) or self.arch_start < 0:
            raise ConfigError(f"--arch-start={self.arch_start!r}: must be an integer >= 0 (epochs of warm-up)")
        check_network(self.layers, self.channels)
        for name in ("lr", "lr_min", "momentum", "weight_decay", "grad_clip", "bn_recalibration", "sn_refresh_drift"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)}={getattr(self, name)}: must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"--lr={self.lr}: must be > 0")
        if not 0.0 < self.train_portion < 1.0:
            raise ConfigError(f"--train-portion={self.train_portion}: must be strictly between 0 and 1")
        if not 0.0 <= self.subset < 1.0:
            raise ConfigError(f"--subset={self.subset}: must be in [0, 1) (0: no subset)")
        if self.subset and not (0.0 < self.subset_valid < 1.0 and self.subset + self.subset_valid <= 1.0):
            raise ConfigError(f"--subset-valid={self.subset_valid}: must be in (0, 1) with --subset + --subset-valid <= 1")
        self._validate_data()
        if self.rank_per_pixel and self.authors_reduce_resolution:
            raise ConfigError("--rank-per-pixel and --authors-reduce-resolution exclude each other "
                              "(per-pixel ranks have no resolution left to misstate)")
        check_choice("mixing", self.mixing, MSR_MIXING)
        check_choice("select", self.select, SELECT_MODES)
        check_choice("recompute_depthwise", self.recompute_depthwise, SWITCHES)
        if self.space:
            check_choice("space", self.space, list(SPACES))
            if self.primitives != MSR_PRIMITIVES:
                raise ConfigError("give --space or --primitives, not both")
        check_ops(self.ops, self.impl, "--space" if self.space else "--primitives")
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"--method={self.method!r}: must name a search method")
        return self

    @property
    def ops(self) -> tuple[str, ...]:
        """The supernet's candidate ops: the named --space, else --primitives."""
        return SPACES[self.space] if self.space else self.primitives


def check_choice(name: str, value: Any, allowed: Any) -> None:
    """The one message for an enumerated setting with a value outside ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{_flag(name)}={value!r}: unknown; allowed: {', '.join(map(str, allowed))}")


def check_positive(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{_flag(name)}={value!r}: must be a positive integer")


def check_network(layers: int, channels: int) -> None:
    """Depth and width of a DARTS-style network (search or evaluation)."""
    check_positive(layers=layers, channels=channels)
    if layers < 3:
        raise ConfigError(f"--layers={layers}: need at least 3 cells (normal and reduction cells)")
    if channels < 2:
        raise ConfigError(f"--channels={channels}: need at least 2 (FactorizedReduce splits channels in two)")


def check_ops(ops: Any, impl: str = "auto", flag: str = "--primitives") -> None:
    """The candidate ops of a supernet and its forward implementation."""
    known = list_primitives()
    unknown = [p for p in ops if p not in known]
    if unknown:
        raise ConfigError(f"{flag}: unknown op(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if not ops or len(set(ops)) != len(ops):
        raise ConfigError(f"{flag}: need a non-empty list of distinct ops, got {','.join(ops)}")
    check_choice("impl", impl, IMPLS)
    if impl == "fused" and not can_fuse(ops):
        raise ConfigError(f"--impl=fused: supports the ops {', '.join(fusable_ops())}; use --impl reference")


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
    # ImageNet search (SPEC section 5): L = 14 cells on a class-balanced 10% of the training images,
    # with a disjoint 2.5% for search-valid (the authors' code, following PC-DARTS). The schedule is
    # PC-DARTS's ImageNet search (batch 1024, lr 0.5 cosine to 0, wd 3e-4, 50 epochs); SPEC gives none.
    "imagenet": SearchConfig(dataset="imagenet", layers=14, channels=16, batch_size=1024, epochs=50, lr=0.5,
                             lr_min=0.0, subset=0.1, subset_valid=0.025),
    # The DARTS baseline with DARTS's published search settings (Liu et al., 2019, and its code):
    # 8 cells, C = 16, batch 64, 50 epochs, a 1:1 split, SGD 0.025 cosine to 0.001, momentum 0.9,
    # wd 3e-4, clip 5; alphas by Adam 3e-4, betas (0.5, 0.999), wd 1e-3; second order (DARTS's
    # headline result), no spectral normalisation, the 8-op DARTS space.
    "darts-cifar10": SearchConfig(method="darts", space="darts", batch_size=64, train_portion=0.5, order=2,
                                  spectral_norm=False),
    # PC-DARTS (Xu et al., 2020, and its code; SPEC section 10): DARTS's space, 8 cells, C = 16, K = 4,
    # batch 256, SGD 0.1 cosine to 0, wd 3e-4, clip 5, 50 epochs, a 1:1 split; first-order
    # architecture steps by Adam 6e-4 (wd 1e-3) from epoch 16 on (15 epochs of weights only).
    "pc-darts-cifar10": SearchConfig(method="pc-darts", space="darts", batch_size=256, lr=0.1, lr_min=0.0,
                                     train_portion=0.5, arch_lr=6e-4, arch_start=15, partial_channels=4,
                                     spectral_norm=False),
    # P-DARTS (Chen et al., 2019, and its code; SPEC section 10): three stages of 5, 11 and 17 cells,
    # C = 16, 25 epochs each (10 of weights only), DARTS's space cut to 5, 3, then 1 op per edge,
    # dropout on skips 0.1, 0.4, 0.7, at most 2 skips in the normal cell; batch 96, SGD 0.025 cosine
    # to 0, wd 3e-4, clip 5, a 1:1 split; first-order Adam 6e-4 (wd 1e-3) steps, gradient clipped at 5.
    "p-darts-cifar10": SearchConfig(method="p-darts", space="darts", batch_size=96, lr_min=0.0, train_portion=0.5,
                                    epochs=25, arch_start=10, arch_lr=6e-4, stage_layers=(5, 11, 17),
                                    stage_keep=(5, 3, 1), skip_dropout=(0.1, 0.4, 0.7), max_skips=2,
                                    spectral_norm=False),
    # The same on CIFAR-100, with its dropout rates on skips (0.1, 0.2, 0.3).
    "p-darts-cifar100": SearchConfig(method="p-darts", space="darts", dataset="cifar100", batch_size=96, lr_min=0.0,
                                     train_portion=0.5, epochs=25, arch_start=10, arch_lr=6e-4,
                                     stage_layers=(5, 11, 17), stage_keep=(5, 3, 1), skip_dropout=(0.1, 0.2, 0.3),
                                     max_skips=2, spectral_norm=False),
    # PC-DARTS's ImageNet search: 8 cells, C = 16, K = 2 on a class-balanced 10 % of the training
    # images (2.5 % for the architecture steps), batch 1024, SGD 0.5 cosine to 0, Adam 6e-3 from epoch 36.
    "pc-darts-imagenet": SearchConfig(method="pc-darts", space="darts", dataset="imagenet", batch_size=1024, lr=0.5,
                                      lr_min=0.0, subset=0.1, subset_valid=0.025, arch_lr=6e-3, arch_start=35,
                                      partial_channels=2, spectral_norm=False),
    # Offline P-DARTS demo on digits: stages of 3, 4 and 5 cells at C = 8, 3 epochs each (1 of
    # weights only), DARTS's space cut to 5, 3, then 1 op per edge.
    "p-darts-quick": SearchConfig(method="p-darts", space="darts", dataset="digits", channels=8, batch_size=64,
                                  epochs=3, lr=0.05, lr_min=0.0, bn_recalibration=8, train_portion=0.5, arch_start=1,
                                  arch_lr=6e-4, stage_layers=(3, 4, 5), stage_keep=(5, 3, 1),
                                  skip_dropout=(0.1, 0.4, 0.7), max_skips=2, spectral_norm=False),
    # Exactly the authors' released search code path (SPEC sections 4a, 8): the cifar10 preset (their
    # batch 128, 4:1 split, schedule) with edges mixed by softmax(-R) of the raw stable ranks, refreshed
    # at every epoch, and their reduction-cell resolution quirk. What stays ours: spectral norms by
    # warm-started power iteration (theirs restart from random vectors every forward).
    "authors": SearchConfig(mixing="srsoftmax", authors_reduce_resolution=True),
}


def get_preset(name: str) -> SearchConfig:
    try:
        return SEARCH_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(SEARCH_PRESETS)}") from None


@dataclass(frozen=True)
class TrainConfig(_DataConfig):
    """Everything a from-scratch training run depends on (stored as config.json in the run folder)."""

    genotype: str = _f("MSR_DARTS", "genotype.json, a DARTS Genotype(...) string or file, or a zoo name")
    layers: int = _f(20, "cells (reduction cells at L/3 and 2L/3); a per-cell --genotype sets it to its cell count "
                           "unless given")
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
    impl: str = _f("auto", "evaluation network: 'fast' (same function, faster on the CPU: channels_last with "
                           "format-keeping gradients), 'reference' (DARTS's network in plain PyTorch ops, NCHW on the "
                           "CPU), or 'auto' (fast)")
    sync_bn: bool = _f(False, "under torchrun, BatchNorm statistics over the global batch (SyncBatchNorm) instead "
                              "of each rank's share")
    progress: str = _f("auto", "progress bars: 'on', 'off', or 'auto' (bars on a terminal; to a file or pipe, "
                               "one line per epoch only)")
    tensorboard: bool = _f(True, "write TensorBoard event files into RUN/tensorboard/ (when the tensorboard package "
                                 "is installed: pip install tensorboard)")
    plots: bool = _f(True, "draw the run's pictures into RUN/plots/ when it ends (again any time: msrdarts plot RUN)")

    def validate(self) -> "TrainConfig":
        check_positive(batch_size=self.batch_size, epochs=self.epochs)
        check_network(self.layers, self.channels)
        for name in ("lr_min", "momentum", "weight_decay", "grad_clip", "auxiliary_weight", "cutout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)}={getattr(self, name)}: must be >= 0")
        if self.lr <= 0:
            raise ConfigError(f"--lr={self.lr}: must be > 0")
        if self.lr_min > self.lr:
            raise ConfigError(f"--lr-min={self.lr_min}: must not exceed --lr={self.lr}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"--label-smoothing={self.label_smoothing}: must be in [0, 1)")
        check_choice("schedule", self.schedule, ("cosine", "step"))
        check_choice("impl", self.impl, EVAL_IMPLS)
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"--warmup-epochs={self.warmup_epochs}: must be in 0..epochs-1")
        if not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"--drop-path={self.drop_path}: must be in [0, 1)")
        self._validate_data()
        return self


#: Training presets, each citing the protocol it reproduces.
TRAIN_PRESETS: dict[str, TrainConfig] = {
    # DARTS protocol (SPEC section 5): L = 20, C = 36, 600 epochs, batch 96, SGD 0.025 cosine, wd 3e-4,
    # cutout 16, auxiliary 0.4, drop path 0.2, clip 5, all 50k training images, 10k test images.
    "cifar10": TrainConfig(),
    # The paper's Table 1 comparison at the search depth (L = 8).
    "cifar10-l8": TrainConfig(layers=8),
    # The paper's headline row (Table 2, SPEC section 4a): a per-cell genotype (--genotype
    # RUN/genotype-cells.json of an L = 8 search), L_eval = L_search = 8 at C = 36, DARTS protocol.
    "cifar10-cells": TrainConfig(layers=8),
    # The DARTS protocol on CIFAR-100 and SVHN (the usual transfer settings of DARTS-family papers).
    "cifar100": TrainConfig(dataset="cifar100"),
    "svhn": TrainConfig(dataset="svhn"),
    # ImageNet mobile setting (SPEC section 5, the authors' code): L = 14, C = 48, 224 px, batch 128,
    # SGD 0.1 cosine to 0 after 10 warm-up epochs, wd 3e-5, label smoothing 0.1, auxiliary 0.4, 300 epochs,
    # clip 5, no drop path and no cutout (DARTS's ImageNet script).
    "imagenet": TrainConfig(dataset="imagenet", layers=14, channels=48, batch_size=128, epochs=300, lr=0.1,
                            weight_decay=3e-5, label_smoothing=0.1, warmup_epochs=10, drop_path=0.0, cutout=0),
    # DARTS's own ImageNet schedule: 250 epochs, lr x0.97 per epoch, no warm-up.
    "imagenet-darts": TrainConfig(dataset="imagenet", layers=14, channels=48, batch_size=128, epochs=250, lr=0.1,
                                  weight_decay=3e-5, label_smoothing=0.1, schedule="step", drop_path=0.0, cutout=0),
    # Offline demo on digits: a 5-cell C = 16 network, about a minute on 2 CPU cores.
    "quick": TrainConfig(dataset="digits", layers=5, channels=16, batch_size=64, epochs=15, lr=0.05, cutout=0,
                         drop_path=0.1),
}


def get_train_preset(name: str) -> TrainConfig:
    try:
        return TRAIN_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(TRAIN_PRESETS)}") from None
