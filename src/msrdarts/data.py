"""Data sets, search splits, and the two loaders: in-memory on the device, or streamed from files.

Small data sets (digits, CIFAR, SVHN, small image folders) are decoded once into uint8 NCHW
tensors (:class:`ImageData`). The :class:`DeviceLoader` keeps them on the training device and does
shuffling, random crop (zero padding), horizontal flip, normalisation and cutout there, one batch
at a time: no worker processes, no per-image Python.

Large ones (ImageNet, big or high-resolution folders) stay on disk (:class:`StreamData`): the
:class:`StreamLoader` decodes and augments them in DataLoader worker processes (``--workers``),
collates uint8 batches (pinned when the device is not the CPU), and normalises on the device.

Randomness comes from one CPU ``torch.Generator`` per loader whose state is checkpointed, so a
resumed run sees the same batches as an uninterrupted one. A streamed image's augmentation is
seeded from (epoch seed, image index), so it does not depend on the number of workers either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .errors import ConfigError, DataError

LOADING_MODES = ("auto", "memory", "stream")
#: ``--loading auto`` keeps a data set in memory if its decoded uint8 images take at most this.
MEMORY_BUDGET_BYTES = 2 << 30
#: Images of at most this side use the CIFAR pipeline (stem, pad-and-crop); larger ones the
#: ImageNet pipeline (stem with three stride-2 convs, RandomResizedCrop, colour jitter).
SMALL_IMAGE_MAX = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS_SAMPLE = 1000  # training images a streamed folder's channel mean and std are estimated from


@dataclass(frozen=True)
class DataOptions:
    """How to find and hold a data set (the data fields of a run config)."""

    root: Path = Path("data")
    download: bool = False
    image_size: int = 0          # side in pixels; 0: the data set's own (folder 32, imagenet 224)
    loading: str = "auto"        # one of LOADING_MODES
    workers: int = 0             # decoding processes for streamed data (0: in the main process)
    progress: bool = False


def resolve_workers(workers: int) -> int:
    """``-1`` (auto): one worker per available core, at most 8; otherwise the number given."""
    if workers >= 0:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


class _Data:
    """What search and train need from a data set, whichever way its images are held."""

    name: str
    num_classes: int
    mean: tuple[float, ...]      # per channel, in [0, 1] units
    std: tuple[float, ...]
    stem: str

    @property
    def train_labels(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def in_channels(self) -> int:
        raise NotImplementedError

    @property
    def input_size(self) -> int:
        raise NotImplementedError

    def loader(self, split: str, batch_size: int, device: torch.device | str, *,
               indices: torch.Tensor | None = None, augment: bool = False, shuffle: bool = False,
               drop_last: bool = False, generator: torch.Generator | None = None, cutout: int = 0,
               workers: int = 0, rank: int = 0, world: int = 1) -> Any:
        """Batches of split ``'train'`` or ``'test'`` (restricted to ``indices``), normalised, on ``device``.

        ``augment`` applies the data set's training augmentation; ``shuffle`` a fresh order per epoch.
        With ``world`` > 1, process ``rank`` gets its share of every global batch of ``batch_size``
        (see :func:`shard_bounds`).
        """
        raise NotImplementedError


@dataclass
class ImageData(_Data):
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
    def train_labels(self) -> torch.Tensor:
        return self.y_train

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def input_size(self) -> int:
        return self.x_train.shape[-1]

    def loader(self, split: str, batch_size: int, device: torch.device | str, *,
               indices: torch.Tensor | None = None, augment: bool = False, shuffle: bool = False,
               drop_last: bool = False, generator: torch.Generator | None = None, cutout: int = 0,
               workers: int = 0, rank: int = 0, world: int = 1) -> "DeviceLoader":
        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        if indices is not None:
            x, y = x[indices], y[indices]
        return DeviceLoader(x, y, batch_size, self.mean, self.std, device, shuffle=shuffle,
                            crop_padding=self.crop_padding if augment else 0, flip=self.flip and augment,
                            drop_last=drop_last, generator=generator, cutout=cutout if augment else 0,
                            rank=rank, world=world)


@dataclass(frozen=True)
class DatasetInfo:
    """What a network needs to know about a data set without loading it."""

    num_classes: int
    in_channels: int
    input_size: int
    stem: str


#: Shapes of the data sets with a fixed shape (``msrdarts info`` sizes networks from these).
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


DatasetLoader = Callable[[DataOptions], _Data]
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


def load_dataset(name: str, root: str | Path = "data", download: bool = False, *, image_size: int = 0,
                 loading: str = "auto", workers: int = 0, progress: bool = False) -> _Data:
    """Data set ``name`` (files under ``root``; torchvision downloads only if ``download``).

    ``image_size`` and ``loading`` apply to image folders (``folder``, ``imagenet``); the
    fixed-size data sets accept only their own size and are always held in memory.
    """
    if name not in _DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(_DATASETS)}")
    if loading not in LOADING_MODES:
        raise ConfigError(f"--loading={loading!r}: unknown; allowed: {', '.join(LOADING_MODES)}")
    if image_size < 0:
        raise ConfigError(f"--image-size={image_size}: must be >= 0 (0: the data set's own size)")
    fixed = DATASET_INFO.get(name) if name != "imagenet" else None
    if fixed is not None:
        if image_size not in (0, fixed.input_size):
            raise ConfigError(f"--image-size={image_size}: {name} images are {fixed.input_size} px; "
                              f"--image-size applies to folder and imagenet")
        if loading == "stream":
            raise ConfigError(f"--loading=stream: {name} is always held in memory; streaming applies to "
                              f"folder and imagenet")
    return _DATASETS[name](DataOptions(Path(root), download, image_size, loading, resolve_workers(workers),
                                       progress))


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units; a constant channel gets std 1 (not a division by 0)."""
    xf = x.float().div_(255)
    std = xf.std(dim=(0, 2, 3))
    return tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(torch.where(std > 1e-6, std, 1.0).tolist())


@register_dataset("digits")
def _digits(opts: DataOptions) -> ImageData:
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
def _cifar10(opts: DataOptions) -> ImageData:
    """CIFAR-10 through torchvision (50k train / 10k test, 32 x 32)."""
    from torchvision.datasets import CIFAR10

    train, test = _torchvision("CIFAR-10", opts.root, opts.download, "cifar-10-batches-py", 163,
                               lambda r, tr, dl: CIFAR10(r, train=tr, download=dl))
    (x_tr, y_tr), (x_te, y_te) = _hwc_to_tensors(train), _hwc_to_tensors(test)
    return ImageData("cifar10", x_tr, y_tr, x_te, y_te, DATASET_INFO["cifar10"].num_classes,
                     (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), crop_padding=4, flip=True)


@register_dataset("cifar100")
def _cifar100(opts: DataOptions) -> ImageData:
    """CIFAR-100 through torchvision (50k train / 10k test, 32 x 32, 100 classes)."""
    from torchvision.datasets import CIFAR100

    train, test = _torchvision("CIFAR-100", opts.root, opts.download, "cifar-100-python", 161,
                               lambda r, tr, dl: CIFAR100(r, train=tr, download=dl))
    (x_tr, y_tr), (x_te, y_te) = _hwc_to_tensors(train), _hwc_to_tensors(test)
    return ImageData("cifar100", x_tr, y_tr, x_te, y_te, DATASET_INFO["cifar100"].num_classes,
                     (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), crop_padding=4, flip=True)


@register_dataset("svhn")
def _svhn(opts: DataOptions) -> ImageData:
    """SVHN through torchvision (73k train / 26k test, 32 x 32; digits, so no flips)."""
    from torchvision.datasets import SVHN

    train, test = _torchvision("SVHN", opts.root, opts.download, "train_32x32.mat", 182,
                               lambda r, tr, dl: SVHN(r, split="train" if tr else "test", download=dl))
    x_tr, y_tr = torch.from_numpy(train.data), torch.from_numpy(train.labels.astype(np.int64))
    x_te, y_te = torch.from_numpy(test.data), torch.from_numpy(test.labels.astype(np.int64))
    return ImageData("svhn", x_tr, y_tr, x_te, y_te, DATASET_INFO["svhn"].num_classes,
                     (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), crop_padding=4, flip=False)


FOLDER_SIZE = 32  # default side of a `folder` data set's images (the CIFAR pipeline)
IMAGENET_SIZE = 224


class FolderImages(torch.utils.data.Dataset):
    """Images listed as (path, label), decoded with PIL (RGB), passed through ``transform``, as uint8 CHW.

    With ``seeded``, image i of an epoch is transformed under the torch seed derived from
    (``epoch_seed``, i): its augmentation is reproducible whatever process decodes it.
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, seeded: bool = False):
        self.samples, self.transform, self.seeded = samples, transform, seeded
        self.epoch_seed = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.v2.functional import pil_to_tensor

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{path}: unreadable image ({e})") from None
        if self.seeded:
            with torch.random.fork_rng(devices=[]):  # leaves the process's own RNG untouched
                torch.manual_seed(derived_seed(self.epoch_seed, i))
                im = self.transform(im)
        else:
            im = self.transform(im)
        return pil_to_tensor(im), label


def _ignore_sigint(worker_id: int) -> None:
    """In a DataLoader worker: leave Ctrl-C (sent to the whole terminal process group) to the main
    process, which checkpoints and then ends the workers. SIGTERM stays: the DataLoader itself
    ends its workers with it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _batches(loader: torch.utils.data.DataLoader) -> Iterator:
    """Iterate ``loader``; a DataError raised in a worker is re-raised as its own one-line message."""
    try:
        yield from loader
    except DataError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        last = lines[-1] if lines else str(e)
        raise DataError(last.split("DataError: ", 1)[-1]) from None


def image_transforms(size: int, train: bool) -> Callable:
    """The augmentation of an image folder at side ``size`` (PIL in, PIL out).

    At most SMALL_IMAGE_MAX px (the CIFAR pipeline): resize to size x size; for training, random
    crop after zero padding by size/8 and horizontal flip. Larger (DARTS's ImageNet pipeline):
    RandomResizedCrop, flip and colour jitter (0.4, 0.4, 0.4, 0.2) for training; resize the short
    side to size * 256/224 and centre-crop for testing.
    """
    from torchvision.transforms import v2

    if size <= SMALL_IMAGE_MAX:
        steps = [v2.Resize((size, size))]
        if train:
            steps += [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()]
    elif train:
        steps = [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(),
                 v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)]
    else:
        steps = [v2.Resize(round(size * 256 / 224)), v2.CenterCrop(size)]
    return v2.Compose(steps)


@dataclass
class StreamData(_Data):
    """An image-folder data set kept on disk and decoded per batch (see :class:`StreamLoader`)."""

    name: str
    train_samples: list[tuple[str, int]]
    test_samples: list[tuple[str, int]]
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] = field(default_factory=list)

    @property
    def stem(self) -> str:  # type: ignore[override]
        return "cifar" if self.image_size <= SMALL_IMAGE_MAX else "imagenet"

    @property
    def train_labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.train_samples], dtype=torch.int64)

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def input_size(self) -> int:
        return self.image_size

    def loader(self, split: str, batch_size: int, device: torch.device | str, *,
               indices: torch.Tensor | None = None, augment: bool = False, shuffle: bool = False,
               drop_last: bool = False, generator: torch.Generator | None = None, cutout: int = 0,
               workers: int = 0, rank: int = 0, world: int = 1) -> "StreamLoader":
        samples = self.train_samples if split == "train" else self.test_samples
        images = FolderImages(samples, image_transforms(self.image_size, augment), seeded=augment)
        return StreamLoader(images, batch_size, self.mean, self.std, device, indices=indices, shuffle=shuffle,
                            drop_last=drop_last, generator=generator, cutout=cutout if augment else 0,
                            workers=workers, rank=rank, world=world)


def _scan_folder(opts: DataOptions, name: str, test_dirs: tuple[str, ...]) -> tuple[Any, Any]:
    """(train, test) ImageFolder scans of ``opts.root``, with the classes checked to agree."""
    from torchvision.datasets import ImageFolder

    root = opts.root
    layout = f"a train/ folder and a {' or '.join(d + '/' for d in test_dirs)} folder, one subfolder per class"
    if not root.is_dir():
        raise DataError(f"--data {root}: no such folder (the {name} data set needs {layout})")
    test_dir = next((root / d for d in test_dirs if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"--data {root}: the {name} data set needs {layout}")
    splits = []
    for d in (root / "train", test_dir):
        try:
            splits.append(ImageFolder(str(d), loader=str))  # scan only; images are decoded later
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"{d}: no images in class subfolders ({str(e).splitlines()[0]})") from None
    if splits[0].classes != splits[1].classes:
        only_train = sorted(set(splits[0].classes) - set(splits[1].classes))
        only_test = sorted(set(splits[1].classes) - set(splits[0].classes))
        raise DataError(f"--data {root}: train and {test_dir.name} classes differ "
                        f"(only in train: {only_train or '-'}; only in {test_dir.name}: {only_test or '-'})")
    return splits[0], splits[1]


def _decode_all(samples: list[tuple[str, int]], size: int, workers: int, desc: str, progress: bool
                ) -> torch.Tensor:
    """Every image of ``samples`` resized to size x size, as one uint8 (N, 3, size, size) tensor."""
    from tqdm.auto import tqdm

    images = FolderImages(samples, image_transforms(size, train=False))
    loader = torch.utils.data.DataLoader(images, batch_size=256, num_workers=workers)
    out = torch.empty(len(samples), 3, size, size, dtype=torch.uint8)
    k = 0
    for x, _ in tqdm(_batches(loader), total=len(loader), desc=desc, disable=not progress, leave=False):
        out[k:k + len(x)] = x
        k += len(x)
    return out


def _image_folder(opts: DataOptions, name: str, default_size: int, test_dirs: tuple[str, ...]) -> _Data:
    """An ImageFolder data set, held in memory or streamed (``opts.loading``; see load_dataset)."""
    train, test = _scan_folder(opts, name, test_dirs)
    size = opts.image_size or default_size
    n = len(train.samples) + len(test.samples)
    fits = n * 3 * size * size <= MEMORY_BUDGET_BYTES
    if opts.loading == "memory" and size > SMALL_IMAGE_MAX:
        raise ConfigError(f"--loading=memory: {size} px images use RandomResizedCrop on the full image, so "
                          f"they are streamed; use --loading stream (or --image-size <= {SMALL_IMAGE_MAX})")
    in_memory = opts.loading == "memory" or (opts.loading == "auto" and size <= SMALL_IMAGE_MAX and fits)
    if not in_memory:
        if name == "imagenet":
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:  # estimated from up to STATS_SAMPLE training images, evenly spaced over the (sorted) list
            step = max(1, len(train.samples) // STATS_SAMPLE)
            mean, std = _channel_stats(_decode_all(train.samples[::step], size, opts.workers,
                                                   f"{name} channel statistics", opts.progress))
        return StreamData(name, train.samples, test.samples, len(train.classes), size, mean, std, train.classes)
    x_tr = _decode_all(train.samples, size, opts.workers, f"decoding {name} train", opts.progress)
    x_te = _decode_all(test.samples, size, opts.workers, f"decoding {name} test", opts.progress)
    mean, std = _channel_stats(x_tr)
    return ImageData(name, x_tr, torch.tensor(train.targets), x_te, torch.tensor(test.targets),
                     len(train.classes), mean, std, crop_padding=size // 8, flip=True)


@register_dataset("npz")
def _npz(opts: DataOptions) -> ImageData:
    """Arrays in one ``.npz`` file (``--data FILE``): uint8 ``x_train``, ``x_test`` (N, H, W, C) or (N, C, H, W)
    and integer ``y_train``, ``y_test``; read with ``allow_pickle=False``. CIFAR-style augmentation
    (crop after padding by size/8, flips) for images of at least 16 px."""
    path = Path(opts.root)
    if not path.is_file():
        raise DataError(f"--data {path}: no such .npz file (--dataset npz reads one file of arrays)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {', '.join(missing)}; need x_train, y_train, x_test, "
                                f"y_test (has {', '.join(f.files)})")
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    xs = []
    for key in ("x_train", "x_test"):
        x = arrays[key]
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(f"{path}: {key} must be uint8 images (N, H, W, C) or (N, C, H, W), got {x.dtype} {x.shape}")
        x = torch.from_numpy(np.ascontiguousarray(x))
        xs.append(x if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3) else x.permute(0, 3, 1, 2).contiguous())
    ys = [torch.from_numpy(arrays[k].astype(np.int64)).reshape(-1) for k in ("y_train", "y_test")]
    if xs[0].shape[1:] != xs[1].shape[1:] or xs[0].shape[-1] != xs[0].shape[-2]:
        raise DataError(f"{path}: train and test images must be square and of one shape, got "
                        f"{tuple(xs[0].shape[1:])} and {tuple(xs[1].shape[1:])}")
    for x, y, key in ((xs[0], ys[0], "train"), (xs[1], ys[1], "test")):
        if len(x) != len(y):
            raise DataError(f"{path}: {len(x)} x_{key} images but {len(y)} y_{key} labels")
    num_classes = int(max(ys[0].max(), ys[1].max())) + 1
    size = xs[0].shape[-1]
    mean, std = _channel_stats(xs[0])
    return ImageData(path.stem, xs[0], ys[0], xs[1], ys[1], num_classes, mean, std,
                     crop_padding=size // 8 if size >= 16 else 0, flip=size >= 16)


@register_dataset("folder")
def _folder(opts: DataOptions) -> _Data:
    """A user's images: ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``), ImageFolder layout.

    At the default 32 px (any size up to 64) and up to 2 GiB decoded, held in memory as uint8 and
    augmented like CIFAR; larger images or folders are streamed (see :func:`image_transforms`).
    """
    return _image_folder(opts, "folder", FOLDER_SIZE, ("val", "test"))


@register_dataset("imagenet")
def _imagenet(opts: DataOptions) -> _Data:
    """ILSVRC-2012 as the standard ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` folders.

    Streamed at 224 px with DARTS's ImageNet augmentation. Not downloadable (licence): the
    validation images must be sorted into class folders, as torchvision's reference scripts expect.
    """
    return _image_folder(opts, "imagenet", IMAGENET_SIZE, ("val",))


def subset_split(labels: torch.Tensor, fraction: float, valid_fraction: float = 0.025, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced disjoint (search-train, search-valid) samples of a training set (PC-DARTS's ImageNet search).

    From every class c with n_c images: round(fraction * n_c) for search-train and
    round(valid_fraction * n_c) further ones for search-valid, drawn by a permutation seeded
    with ``seed``. Index tensors are sorted.
    """
    if not 0.0 < fraction < 1.0 or not 0.0 < valid_fraction < 1.0 or fraction + valid_fraction > 1.0:
        raise ConfigError(f"--subset={fraction}, --subset-valid={valid_fraction}: each must be in (0, 1) "
                          f"and their sum at most 1")
    g = torch.Generator().manual_seed(seed)
    train, valid = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k, v = round(fraction * len(idx)), round(valid_fraction * len(idx))
        train.append(idx[:k])
        valid.append(idx[k:k + v])
    train_idx, valid_idx = torch.cat(train).sort().values, torch.cat(valid).sort().values
    if len(train_idx) == 0 or len(valid_idx) == 0:
        raise ConfigError(f"--subset={fraction}, --subset-valid={valid_fraction} leave an empty split of "
                          f"{len(labels)} images")
    return train_idx, valid_idx


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


def derived_seed(seed: int, i: int) -> int:
    """A seed for item ``i`` (an image, a batch) of the stream seeded by ``seed``."""
    return (seed * 0x9E3779B1 + i) % (1 << 63)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """The [lo, hi) slice of a global batch of ``n`` samples that process ``rank`` of ``world`` takes.

    Contiguous and as even as possible (sizes differ by at most one). Every process draws the
    random augmentation of the whole global batch and keeps its slice, so the samples, their
    augmentation and the global batches are the same for any world size.
    """
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class _EpochLoader:
    """Common protocol of the loaders: one epoch is ``batches(epoch_seed, start)``.

    ``len()`` is the number of global batches. Iterating draws a fresh epoch seed from
    ``generator`` (the loader's only RNG state); the order, every augmentation, and so the epoch's
    batches, derive from that seed, so a run can restart an epoch at any batch ``start``.
    """

    batch_size: int
    drop_last: bool
    generator: torch.Generator
    rank: int
    world: int

    def _init_shard(self, batch_size: int, rank: int, world: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be a positive integer")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def _count(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def draw_epoch_seed(self) -> int:
        return int(torch.randint(0, 1 << 62, (), generator=self.generator))

    def batches(self, epoch_seed: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(self.draw_epoch_seed())

    def _global_batches(self, order: torch.Tensor, start: int) -> Iterator[tuple[int, int, int, torch.Tensor]]:
        """(batch index, global size, lo, this rank's indices) for each global batch from ``start``;
        a rank whose share of a (last, small) batch is empty skips it."""
        for b in range(start, self._count(len(order))):
            glob = order[b * self.batch_size:(b + 1) * self.batch_size]
            lo, hi = shard_bounds(len(glob), self.rank, self.world)
            if hi > lo:
                yield b, len(glob), lo, glob[lo:hi]


class DeviceLoader(_EpochLoader):
    """Mini-batches from uint8 images held on ``device``, augmented and normalised there.

    Global batch b of an epoch is augmented with a generator seeded from (epoch seed, b).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], device: torch.device | str, shuffle: bool = False,
                 crop_padding: int = 0, flip: bool = False, drop_last: bool = False,
                 generator: torch.Generator | None = None, cutout: int = 0, rank: int = 0, world: int = 1):
        self._init_shard(batch_size, rank, world)
        self.device = torch.device(device)
        self.images = images.to(self.device)  # uint8: 4x less memory than float
        self.labels = labels.to(self.device)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.crop_padding, self.flip, self.cutout = crop_padding, flip, cutout
        self.generator = generator if generator is not None else torch.Generator()
        c = images.shape[1]
        self.mean = torch.tensor(mean, device=self.device).view(1, c, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, c, 1, 1) * 255

    def __len__(self) -> int:
        return self._count(len(self.labels))

    def batches(self, epoch_seed: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed)) if self.shuffle \
            else torch.arange(n)
        random = self.crop_padding or self.flip or self.cutout
        for b, size, lo, idx in self._global_batches(order, start):
            g = torch.Generator().manual_seed(derived_seed(epoch_seed, b)) if random else None
            keep = slice(lo, lo + len(idx))
            idx = idx.to(self.device)
            x = self.images[idx]
            if self.crop_padding or self.flip:
                x = self._augment(x, g, size, keep)
            x = (x.float() - self.mean) / self.std
            if self.cutout:
                x = cutout(x, self.cutout, g, size, keep)
            yield x, self.labels[idx]

    def _augment(self, x: torch.Tensor, g: torch.Generator, size: int, keep: slice) -> torch.Tensor:
        """Random crop of the zero-padded batch (one offset per image) and random flip, in uint8;
        the draws are made for the whole global batch of ``size`` and sliced to ``keep``."""
        B, _, H, W = x.shape
        p = self.crop_padding
        if p:
            x = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (size,), generator=g)[keep].to(self.device)
            dx = torch.randint(0, 2 * p + 1, (size,), generator=g)[keep].to(self.device)
            rows = (dy[:, None] + torch.arange(H, device=self.device))[:, None, :, None]  # (B, 1, H, 1)
            cols = (dx[:, None] + torch.arange(W, device=self.device))[:, None, None, :]  # (B, 1, 1, W)
            x = x[torch.arange(B, device=self.device)[:, None, None, None],
                  torch.arange(x.shape[1], device=self.device)[None, :, None, None], rows, cols]
        if self.flip:
            mask = (torch.rand(size, generator=g)[keep] < 0.5).to(self.device)
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        return x


def cutout(x: torch.Tensor, size: int, generator: torch.Generator, batch: int | None = None,
           keep: slice = slice(None)) -> torch.Tensor:
    """Zero one size x size square per image (centre uniform over the image, clipped at the
    border), after normalisation, as DARTS's Cutout does. The centres are drawn for a global
    batch of ``batch`` images (default: x's) and sliced to ``keep``."""
    B, _, H, W = x.shape
    n = B if batch is None else batch
    cy = torch.randint(0, H, (n,), generator=generator)[keep].to(x.device)
    cx = torch.randint(0, W, (n,), generator=generator)[keep].to(x.device)
    half = size // 2
    rows = torch.arange(H, device=x.device)[None, :]
    cols = torch.arange(W, device=x.device)[None, :]
    in_rows = (rows >= (cy[:, None] - half)) & (rows < (cy[:, None] - half + size))   # (B, H)
    in_cols = (cols >= (cx[:, None] - half)) & (cols < (cx[:, None] - half + size))   # (B, W)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return x.masked_fill(hole, 0.0)


class StreamLoader(_EpochLoader):
    """Mini-batches of images decoded from files by DataLoader workers, normalised on ``device``.

    The epoch seed fixes the order (a permutation of ``indices`` if ``shuffle``) and every image's
    augmentation (seeded from (epoch seed, image index)), so batches are the same for any number
    of ``workers`` and any world size. With ``world`` > 1 the batch sampler gives each rank its
    share of every global batch (the role of a DistributedSampler, but global batches stay those of
    a single process). Workers return uint8 batches (pinned if the device is not the CPU); the float
    conversion, normalisation and cutout run on the device.
    """

    def __init__(self, images: FolderImages, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device | str, indices: torch.Tensor | None = None, shuffle: bool = False,
                 drop_last: bool = False, generator: torch.Generator | None = None, cutout: int = 0,
                 workers: int = 0, rank: int = 0, world: int = 1):
        self._init_shard(batch_size, rank, world)
        self.images, self.device = images, torch.device(device)
        self.indices = indices if indices is not None else torch.arange(len(images))
        self.shuffle, self.drop_last = shuffle, drop_last
        self.generator = generator if generator is not None else torch.Generator()
        self.cutout, self.workers = cutout, workers
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        return self._count(len(self.indices))

    def batches(self, epoch_seed: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.indices
        if self.shuffle:
            order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(epoch_seed))]
        plan = list(self._global_batches(order, start))
        if not plan:
            return
        self.images.epoch_seed = epoch_seed  # read by the workers, which start with this iteration
        pin = self.device.type != "cpu"
        loader = torch.utils.data.DataLoader(self.images, batch_sampler=[idx.tolist() for *_, idx in plan],
                                             num_workers=self.workers, pin_memory=pin,
                                             worker_init_fn=_ignore_sigint if self.workers else None)
        for (b, size, lo, _), (x, y) in zip(plan, _batches(loader)):
            x, y = x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)
            x = (x.float() - self.mean) / self.std
            if self.cutout:
                g = torch.Generator().manual_seed(derived_seed(epoch_seed, b))
                x = cutout(x, self.cutout, g, size, slice(lo, lo + len(y)))
            yield x, y
