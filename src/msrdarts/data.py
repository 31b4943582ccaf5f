"""Data sets, the search split, and a device-side loader for data sets that fit in memory.

Every data set is decoded once into uint8 NCHW tensors (:class:`ImageData`). The
:class:`DeviceLoader` keeps them on the training device and does shuffling, random crop (zero
padding), horizontal flip and normalisation there, one batch at a time: no worker processes, no
per-image Python. Its randomness comes from one CPU ``torch.Generator`` whose state is
checkpointed, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import ConfigError, DataError


@dataclass
class ImageData:
    """A decoded data set: uint8 images (N, C, H, W), int64 labels, and how to augment them."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]      # per channel, in [0, 1] units
    std: tuple[float, ...]
    crop_padding: int = 0        # random crop after zero padding by this many pixels (0: none)
    flip: bool = False           # random horizontal flip (not for digits)
    stem: str = "cifar"

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def input_size(self) -> int:
        return self.x_train.shape[-1]


@dataclass(frozen=True)
class DatasetInfo:
    """What a network needs to know about a data set without loading it."""

    num_classes: int
    in_channels: int
    input_size: int
    stem: str


#: Shapes of the data sets (ImageNet is listed for network sizes; it has no loader yet).
DATASET_INFO: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(10, 1, 8, "cifar"),
    "cifar10": DatasetInfo(10, 3, 32, "cifar"),
    "cifar100": DatasetInfo(100, 3, 32, "cifar"),
    "svhn": DatasetInfo(10, 3, 32, "cifar"),
    "imagenet": DatasetInfo(1000, 3, 224, "imagenet"),
}


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASET_INFO[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(DATASET_INFO)}") from None


DatasetLoader = Callable[[Path, bool], ImageData]
_DATASETS: dict[str, DatasetLoader] = {}


def register_dataset(name: str) -> Callable[[DatasetLoader], DatasetLoader]:
    def deco(fn: DatasetLoader) -> DatasetLoader:
        if name in _DATASETS:
            raise ValueError(f"data set {name!r} is already registered")
        _DATASETS[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    return list(_DATASETS)


def load_dataset(name: str, root: str | Path = "data", download: bool = False) -> ImageData:
    """Decode data set ``name`` (files under ``root``; torchvision downloads only if ``download``)."""
    if name not in _DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(_DATASETS)}")
    return _DATASETS[name](Path(root), download)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.float().div_(255)
    return tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(xf.std(dim=(0, 2, 3)).tolist())


@register_dataset("digits")
def _digits(root: Path, download: bool) -> ImageData:
    """scikit-learn's 1,797 handwritten digits (8 x 8, 10 classes), shipped with the package.

    A fixed 80/20 train/test split (seed 0), independent of the run's seed.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)  # 0..16 -> 0..255
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    mean, std = _channel_stats(x[tr])
    return ImageData("digits", x[tr], y[tr], x[te], y[te], DATASET_INFO["digits"].num_classes, mean, std,
                     crop_padding=1, flip=False)


def _torchvision(name: str, root: Path, download: bool, marker: str, size_mb: int, make) -> tuple:
    """(train, test) torchvision data sets, with a clear error when the files are not there."""
    if not download and not (root / marker).exists():
        raise DataError(f"{name} not found in {root}/{marker}; pass --download to fetch it with torchvision "
                        f"({size_mb} MB) or point --data at the folder that holds it")
    try:
        return make(str(root), True, download), make(str(root), False, download)
    except (RuntimeError, OSError) as e:
        raise DataError(f"{name} in {root} is unreadable ({e}); delete it and pass --download") from None


def _hwc_to_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)


@register_dataset("cifar10")
def _cifar10(root: Path, download: bool) -> ImageData:
    """CIFAR-10 through torchvision (50k train / 10k test, 32 x 32)."""
    from torchvision.datasets import CIFAR10

    train, test = _torchvision("CIFAR-10", root, download, "cifar-10-batches-py", 163,
                               lambda r, tr, dl: CIFAR10(r, train=tr, download=dl))
    (x_tr, y_tr), (x_te, y_te) = _hwc_to_tensors(train), _hwc_to_tensors(test)
    return ImageData("cifar10", x_tr, y_tr, x_te, y_te, DATASET_INFO["cifar10"].num_classes,
                     (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), crop_padding=4, flip=True)


@register_dataset("cifar100")
def _cifar100(root: Path, download: bool) -> ImageData:
    """CIFAR-100 through torchvision (50k train / 10k test, 32 x 32, 100 classes)."""
    from torchvision.datasets import CIFAR100

    train, test = _torchvision("CIFAR-100", root, download, "cifar-100-python", 161,
                               lambda r, tr, dl: CIFAR100(r, train=tr, download=dl))
    (x_tr, y_tr), (x_te, y_te) = _hwc_to_tensors(train), _hwc_to_tensors(test)
    return ImageData("cifar100", x_tr, y_tr, x_te, y_te, DATASET_INFO["cifar100"].num_classes,
                     (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), crop_padding=4, flip=True)


@register_dataset("svhn")
def _svhn(root: Path, download: bool) -> ImageData:
    """SVHN through torchvision (73k train / 26k test, 32 x 32; digits, so no flips)."""
    from torchvision.datasets import SVHN

    train, test = _torchvision("SVHN", root, download, "train_32x32.mat", 182,
                               lambda r, tr, dl: SVHN(r, split="train" if tr else "test", download=dl))
    x_tr, y_tr = torch.from_numpy(train.data), torch.from_numpy(train.labels.astype(np.int64))
    x_te, y_te = torch.from_numpy(test.data), torch.from_numpy(test.labels.astype(np.int64))
    return ImageData("svhn", x_tr, y_tr, x_te, y_te, DATASET_INFO["svhn"].num_classes,
                     (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), crop_padding=4, flip=False)


FOLDER_SIZE = 32  # side every image of a `folder` data set is resized to (the in-memory small-data path)


@register_dataset("folder")
def _folder(root: Path, download: bool) -> ImageData:
    """A user's images: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``), ImageFolder layout.

    Decoded once, converted to RGB and resized to FOLDER_SIZE x FOLDER_SIZE, held as uint8.
    """
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import ImageFolder

    if not root.is_dir():
        raise DataError(f"--data {root}: no such folder (expected {root}/train and {root}/val or {root}/test)")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"--data {root}: needs a train/ folder and a val/ or test/ folder, one subfolder per class")
    splits = []
    for d in (root / "train", test_dir):
        try:
            ds = ImageFolder(str(d))
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"{d}: no images ({str(e).splitlines()[0]})") from None
        splits.append(ds)
    if splits[0].classes != splits[1].classes:
        only_train = sorted(set(splits[0].classes) - set(splits[1].classes))
        only_test = sorted(set(splits[1].classes) - set(splits[0].classes))
        raise DataError(f"--data {root}: train and {test_dir.name} classes differ "
                        f"(only in train: {only_train or '-'}; only in {test_dir.name}: {only_test or '-'})")

    def decode(ds) -> tuple[torch.Tensor, torch.Tensor]:
        images = []
        for path, _ in ds.samples:
            try:
                with Image.open(path) as im:
                    im = im.convert("RGB").resize((FOLDER_SIZE, FOLDER_SIZE), Image.BILINEAR)
                    images.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()))
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"{path}: unreadable image ({e})") from None
        return torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)

    (x_tr, y_tr), (x_te, y_te) = decode(splits[0]), decode(splits[1])
    mean, std = _channel_stats(x_tr)
    return ImageData("folder", x_tr, y_tr, x_te, y_te, len(splits[0].classes), mean, std, crop_padding=4, flip=True)


def search_split(n: int, train_fraction: float = 0.8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (search-train, search-valid) index sets of a training set of size n (4:1 by default).

    A seeded permutation, so the split is reproducible and independent of the data order.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"train_portion={train_fraction}: must be strictly between 0 and 1")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(train_fraction * n))
    if k == 0 or k == n:
        raise ConfigError(f"train_portion={train_fraction} leaves an empty split of {n} images")
    return perm[:k], perm[k:]


class DeviceLoader:
    """Mini-batches from uint8 images held on ``device``, augmented and normalised there.

    Each iteration is one epoch: a fresh permutation (if ``shuffle``) from ``generator``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], device: torch.device | str, shuffle: bool = False,
                 crop_padding: int = 0, flip: bool = False, drop_last: bool = False,
                 generator: torch.Generator | None = None, cutout: int = 0):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be a positive integer")
        self.device = torch.device(device)
        self.images = images.to(self.device)  # uint8: 4x less memory than float
        self.labels = labels.to(self.device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.crop_padding, self.flip, self.cutout = crop_padding, flip, cutout
        self.generator = generator if generator is not None else torch.Generator()
        c = images.shape[1]
        self.mean = torch.tensor(mean, device=self.device).view(1, c, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, c, 1, 1) * 255

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size].to(self.device)
            x = self.images[idx]
            if self.crop_padding or self.flip:
                x = self._augment(x)
            x = (x.float() - self.mean) / self.std
            if self.cutout:
                x = self._cutout(x)
            yield x, self.labels[idx]

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random crop of the zero-padded batch (one offset per image) and random flip, in uint8."""
        B, _, H, W = x.shape
        p = self.crop_padding
        if p:
            x = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (B,), generator=self.generator).to(self.device)
            dx = torch.randint(0, 2 * p + 1, (B,), generator=self.generator).to(self.device)
            rows = (dy[:, None] + torch.arange(H, device=self.device))[:, None, :, None]  # (B, 1, H, 1)
            cols = (dx[:, None] + torch.arange(W, device=self.device))[:, None, None, :]  # (B, 1, 1, W)
            x = x[torch.arange(B, device=self.device)[:, None, None, None],
                  torch.arange(x.shape[1], device=self.device)[None, :, None, None], rows, cols]
        if self.flip:
            mask = (torch.rand(B, generator=self.generator) < 0.5).to(self.device)
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        return x

    def _cutout(self, x: torch.Tensor) -> torch.Tensor:
        """Zero one cutout x cutout square per image (centre uniform over the image, clipped at the
        border), after normalisation, as DARTS's Cutout does."""
        B, _, H, W = x.shape
        cy = torch.randint(0, H, (B,), generator=self.generator).to(self.device)
        cx = torch.randint(0, W, (B,), generator=self.generator).to(self.device)
        half = self.cutout // 2
        rows = torch.arange(H, device=self.device)[None, :]
        cols = torch.arange(W, device=self.device)[None, :]
        in_rows = (rows >= (cy[:, None] - half)) & (rows < (cy[:, None] - half + self.cutout))   # (B, H)
        in_cols = (cols >= (cx[:, None] - half)) & (cols < (cx[:, None] - half + self.cutout))   # (B, W)
        hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
        return x.masked_fill(hole, 0.0)
