"""The one table of data sets: every name ``--dataset`` accepts, with the facts known before loading it.

Pure data (standard library and :mod:`msrdarts.errors` only), so that the config can validate
``--dataset`` and ``msrdarts info`` can size a network without importing torch. The functions
that read a data set's files live in :mod:`msrdarts.data.readers` and attach themselves to a
name of this table with :func:`reader`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from ..errors import ConfigError

#: Default side of a ``folder`` data set's images (the CIFAR pipeline).
FOLDER_SIZE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """What a network needs to know about a data set without loading it."""

    num_classes: int
    in_channels: int
    input_size: int
    stem: str


@dataclass(frozen=True)
class DatasetSpec:
    """One data set's facts. ``None``: not fixed by the data set, found from its files by the reader."""

    name: str
    about: str
    num_classes: int | None = None
    in_channels: int | None = None
    size: int | None = None              # native side in px; an image folder's default side
    stem: str | None = None              # network stem for the native size
    resizable: bool = False              # an image folder: --image-size and --loading apply
    mean: tuple[float, ...] | None = None  # per channel, in [0, 1] units (None: measured on the train images)
    std: tuple[float, ...] | None = None
    crop_padding: int | None = None      # training augmentation: random crop after zero padding (None: by size)
    flip: bool | None = None             # training augmentation: random horizontal flip (None: by size)
    test_dirs: tuple[str, ...] = ()      # an image folder: its test split's folder, first one present

    @property
    def info(self) -> DatasetInfo | None:
        """The network-facing shape, if the data set fixes it."""
        if None in (self.num_classes, self.in_channels, self.size, self.stem):
            return None
        return DatasetInfo(self.num_classes, self.in_channels, self.size, self.stem)  # type: ignore[arg-type]


_TABLE: dict[str, DatasetSpec] = {spec.name: spec for spec in (
    DatasetSpec("digits", "scikit-learn's 1,797 handwritten digits (8 x 8), shipped with the package; a fixed "
                "80/20 train/test split (seed 0)", 10, 1, 8, "cifar", crop_padding=1, flip=False),
    DatasetSpec("cifar10", "CIFAR-10 through torchvision (50k train / 10k test, 32 x 32)", 10, 3, 32, "cifar",
                mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), crop_padding=4, flip=True),
    DatasetSpec("cifar100", "CIFAR-100 through torchvision (50k train / 10k test, 32 x 32)", 100, 3, 32, "cifar",
                mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), crop_padding=4, flip=True),
    DatasetSpec("svhn", "SVHN through torchvision (73k train / 26k test, 32 x 32; digits, so no flips)", 10, 3, 32,
                "cifar", mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970), crop_padding=4, flip=False),
    DatasetSpec("npz", "arrays in one .npz file (--data FILE): uint8 x_train, x_test and integer y_train, y_test"),
    DatasetSpec("folder", "a user's images: --data holding train/<class>/* and val/<class>/* (or test/)",
                size=FOLDER_SIZE, resizable=True, test_dirs=("val", "test")),
    DatasetSpec("imagenet", "ILSVRC-2012 as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG folders (not downloadable)",
                1000, 3, 224, "imagenet", resizable=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, test_dirs=("val",)),
)}

#: The function that reads each data set's files (filled in by :mod:`msrdarts.data.readers`).
_READERS: dict[str, Callable[..., Any]] = {}

R = TypeVar("R", bound=Callable[..., Any])


def list_datasets() -> list[str]:
    """Every data set name, in table order."""
    return list(_TABLE)


def dataset_spec(name: str) -> DatasetSpec:
    """The table entry of ``name`` (a ConfigError naming the allowed ones if there is none)."""
    try:
        return _TABLE[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(_TABLE)}") from None


def dataset_info(name: str) -> DatasetInfo:
    """Classes, channels, side and stem of a data set with a fixed shape (``msrdarts info`` and ``sample``)."""
    fixed = [n for n, spec in _TABLE.items() if spec.info is not None]
    spec = _TABLE.get(name)
    if spec is None:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(fixed)}")
    if spec.info is None:
        raise ConfigError(f"dataset {name!r} takes its shape from its files; allowed: {', '.join(fixed)}")
    return spec.info


def reader(name: str) -> Callable[[R], R]:
    """Decorator: make the function the reader of table entry ``name``.

    A reader takes (DataOptions, DatasetSpec) and returns the loaded data set. Refuses a name that
    is not in the table (add its facts there first) and a name that already has a reader.
    """
    if name not in _TABLE:
        raise ValueError(f"data set {name!r} is not in the registry table; allowed: {', '.join(_TABLE)}")

    def attach(fn: R) -> R:
        if name in _READERS:
            raise ValueError(f"data set {name!r} already has a reader ({_READERS[name].__qualname__})")
        _READERS[name] = fn
        return fn

    return attach


def reader_of(name: str) -> Callable[..., Any]:
    """The reader attached to ``name`` (an unknown name is a ConfigError)."""
    dataset_spec(name)
    try:
        return _READERS[name]
    except KeyError:
        raise LookupError(f"data set {name!r} has no reader; import msrdarts.data.readers") from None
