"""Reading data sets from their files: the loaded data set objects and one reader per table name.

Small data sets (digits, CIFAR, SVHN, npz arrays, small image folders) are decoded once into
uint8 NCHW tensors (:class:`ImageData`, batched by a :class:`~msrdarts.data.loaders.DeviceLoader`).
Large ones (ImageNet, big or high-resolution folders) stay on disk (:class:`StreamData`): a
:class:`~msrdarts.data.loaders.StreamLoader` decodes them with :class:`FolderImages`, whose
augmentation (:func:`image_transforms`) is seeded per image. Each reader attaches itself to its
name in :mod:`msrdarts.data.registry`, whose table holds the facts (classes, shape, statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ConfigError, DataError, first_line
from .loaders import DeviceLoader, StreamLoader, derived_seed, resolve_workers, worker_batches
from .registry import DatasetSpec, dataset_spec, reader, reader_of

#: ``--loading auto`` keeps a data set in memory if its decoded uint8 images take at most this.
MEMORY_BUDGET_BYTES = 2 << 30
#: Images of at most this side use the CIFAR pipeline (stem, pad-and-crop); larger ones the
#: ImageNet pipeline (stem with three stride-2 convs, RandomResizedCrop, colour jitter).
SMALL_IMAGE_MAX = 64
STATS_SAMPLE = 1000  # training images a streamed folder's channel mean and std are estimated from


@dataclass(frozen=True)
class DataOptions:
    """How to find and hold a data set (the data fields of a run config)."""

    root: Path = Path("data")
    download: bool = False
    image_size: int = 0          # side in pixels; 0: the data set's own (folder 32, imagenet 224)
    loading: str = "auto"        # "auto", "memory" or "stream" (config.LOADING_MODES)
    workers: int = 0             # decoding processes for streamed data (0: in the main process)
    progress: bool = False


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
               workers: int = 0, rank: int = 0, world: int = 1) -> DeviceLoader | StreamLoader:
        """Batches of split ``'train'`` or ``'test'`` (restricted to ``indices``), normalised, on ``device``.

        ``augment`` applies the data set's training augmentation, and ``cutout`` (only with it);
        ``shuffle`` a fresh order per epoch. ``workers`` decode streamed images (ignored in memory).
        With ``world`` > 1, process ``rank`` gets its share of every global batch of ``batch_size``
        (see :func:`~msrdarts.data.loaders.shard_bounds`).
        """
        return self._loader(split == "train", augment, workers, dict(
            batch_size=batch_size, mean=self.mean, std=self.std, device=device, indices=indices, shuffle=shuffle,
            drop_last=drop_last, generator=generator, cutout=cutout if augment else 0, rank=rank, world=world))

    def _loader(self, train: bool, augment: bool, workers: int, common: dict[str, Any]) -> DeviceLoader | StreamLoader:
        """The loader of the train (or test) split; ``common`` holds the keywords both loaders take."""
        raise NotImplementedError


def _device_key(device: torch.device | str) -> torch.device:
    """``device`` with its index filled in (``cuda`` is the current one), so equal devices compare equal."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        device = torch.empty(0, device=device).device
    return device


@dataclass
class ImageData(_Data):
    """A decoded data set: uint8 images (N, C, H, W), int64 labels, and how to augment them.

    Its loaders share one copy of each split per device, made by the first loader on that device
    (a search builds four loaders over the training images).
    """

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
    _on_device: dict[tuple[torch.device, bool], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @property
    def train_labels(self) -> torch.Tensor:
        return self.y_train

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def input_size(self) -> int:
        return self.x_train.shape[-1]

    def on_device(self, device: torch.device | str, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the train (or test) split on ``device``, copied there once and reused."""
        key = (_device_key(device), train)
        if key not in self._on_device:
            x, y = (self.x_train, self.y_train) if train else (self.x_test, self.y_test)
            self._on_device[key] = (x.to(key[0]), y.to(key[0]))
        return self._on_device[key]

    def _loader(self, train: bool, augment: bool, workers: int, common: dict[str, Any]) -> DeviceLoader:
        x, y = self.on_device(common["device"], train)
        return DeviceLoader(x, y, crop_padding=self.crop_padding if augment else 0, flip=self.flip and augment,
                            **common)


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

    def _loader(self, train: bool, augment: bool, workers: int, common: dict[str, Any]) -> StreamLoader:
        samples = self.train_samples if train else self.test_samples
        images = FolderImages(samples, image_transforms(self.image_size, augment), seeded=augment)
        return StreamLoader(images, workers=workers, **common)


def load_dataset(name: str, root: str | Path = "data", download: bool = False, *, image_size: int = 0,
                 loading: str = "auto", workers: int = 0, progress: bool = False) -> _Data:
    """Data set ``name`` (files under ``root``; torchvision downloads only if ``download``).

    ``image_size`` and ``loading`` apply to image folders (``folder``, ``imagenet``); the
    fixed-size data sets accept only their own size and are always held in memory. ``loading``
    is one of config.LOADING_MODES, which the run config checks.
    """
    spec = dataset_spec(name)
    if image_size < 0:
        raise ConfigError(f"--image-size={image_size}: must be >= 0 (0: the data set's own size)")
    if not spec.resizable and spec.size is not None:
        if image_size not in (0, spec.size):
            raise ConfigError(f"--image-size={image_size}: {name} images are {spec.size} px; "
                              f"--image-size applies to folder and imagenet")
        if loading == "stream":
            raise ConfigError(f"--loading=stream: {name} is always held in memory; streaming applies to "
                              f"folder and imagenet")
    opts = DataOptions(Path(root), download, image_size, loading, resolve_workers(workers), progress)
    return reader_of(name)(opts, spec)


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units; a constant channel gets std 1 (not a division by 0)."""
    xf = x.float().div_(255)
    std = xf.std(dim=(0, 2, 3))
    return tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(torch.where(std > 1e-6, std, 1.0).tolist())


def _fixed(spec: DatasetSpec, x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor
           ) -> ImageData:
    """A data set with the table's classes, statistics (or those of ``x_tr``) and augmentation."""
    mean, std = (spec.mean, spec.std) if spec.mean is not None else _channel_stats(x_tr)
    return ImageData(spec.name, x_tr, y_tr, x_te, y_te, spec.num_classes, mean, std,
                     crop_padding=spec.crop_padding, flip=spec.flip)


@reader("digits")
def _digits(opts: DataOptions, spec: DatasetSpec) -> ImageData:
    """The digits shipped with scikit-learn, rescaled to 0..255; the split is independent of the run's seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)  # 0..16 -> 0..255
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    return _fixed(spec, x[tr], y[tr], x[te], y[te])


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


@reader("cifar10")
def _cifar10(opts: DataOptions, spec: DatasetSpec) -> ImageData:
    from torchvision.datasets import CIFAR10

    train, test = _torchvision("CIFAR-10", opts.root, opts.download, "cifar-10-batches-py", 163,
                               lambda r, tr, dl: CIFAR10(r, train=tr, download=dl))
    return _fixed(spec, *_hwc_to_tensors(train), *_hwc_to_tensors(test))


@reader("cifar100")
def _cifar100(opts: DataOptions, spec: DatasetSpec) -> ImageData:
    from torchvision.datasets import CIFAR100

    train, test = _torchvision("CIFAR-100", opts.root, opts.download, "cifar-100-python", 161,
                               lambda r, tr, dl: CIFAR100(r, train=tr, download=dl))
    return _fixed(spec, *_hwc_to_tensors(train), *_hwc_to_tensors(test))


@reader("svhn")
def _svhn(opts: DataOptions, spec: DatasetSpec) -> ImageData:
    from torchvision.datasets import SVHN

    train, test = _torchvision("SVHN", opts.root, opts.download, "train_32x32.mat", 182,
                               lambda r, tr, dl: SVHN(r, split="train" if tr else "test", download=dl))
    return _fixed(spec, torch.from_numpy(train.data), torch.from_numpy(train.labels.astype(np.int64)),
                  torch.from_numpy(test.data), torch.from_numpy(test.labels.astype(np.int64)))


@reader("npz")
def _npz(opts: DataOptions, spec: DatasetSpec) -> ImageData:
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
            classes = f["classes"] if "classes" in f.files else None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    xs = []
    for key in ("x_train", "x_test"):
        x = arrays[key]
        if x.dtype != np.uint8 or x.ndim != 4:
            raise DataError(f"{path}: {key} must be uint8 images (N, H, W, C) or (N, C, H, W), got {x.dtype} {x.shape}")
        x = torch.from_numpy(np.ascontiguousarray(x))
        xs.append(x if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3) else x.permute(0, 3, 1, 2).contiguous())
    for key in ("y_train", "y_test"):
        if not np.issubdtype(arrays[key].dtype, np.integer):
            raise DataError(f"{path}: {key} must hold integer class labels, got {arrays[key].dtype}")
    ys = [torch.from_numpy(arrays[k].astype(np.int64)).reshape(-1) for k in ("y_train", "y_test")]
    if xs[0].shape[1:] != xs[1].shape[1:] or xs[0].shape[-1] != xs[0].shape[-2]:
        raise DataError(f"{path}: train and test images must be square and of one shape, got "
                        f"{tuple(xs[0].shape[1:])} and {tuple(xs[1].shape[1:])}")
    for x, y, key in ((xs[0], ys[0], "train"), (xs[1], ys[1], "test")):
        if len(x) != len(y):
            raise DataError(f"{path}: {len(x)} x_{key} images but {len(y)} y_{key} labels")
    # the class count: the file's class names if it has them, else the largest label + 1
    num_classes = len(classes) if classes is not None else int(max(ys[0].max(), ys[1].max())) + 1
    for y, key in ((ys[0], "y_train"), (ys[1], "y_test")):
        bad = torch.unique(y[(y < 0) | (y >= num_classes)])
        if len(bad):
            shown = ", ".join(str(int(v)) for v in bad[:5]) + (", ..." if len(bad) > 5 else "")
            raise DataError(f"{path}: {key} holds label(s) {shown} outside 0..{num_classes - 1} "
                            f"({int(((y < 0) | (y >= num_classes)).sum())} of {len(y)} labels; "
                            + (f"{len(classes)} classes named in 'classes')" if classes is not None else
                               "labels must be 0..classes-1)"))
    size = xs[0].shape[-1]
    mean, std = _channel_stats(xs[0])
    return ImageData(path.stem, xs[0], ys[0], xs[1], ys[1], num_classes, mean, std,
                     crop_padding=size // 8 if size >= 16 else 0, flip=size >= 16)


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


def _scan_folder(root: Path, name: str, test_dirs: tuple[str, ...]) -> tuple[Any, Any]:
    """(train, test) ImageFolder scans of ``root``, with the classes checked to agree."""
    from torchvision.datasets import ImageFolder

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
            raise DataError(f"{d}: no images in class subfolders ({first_line(e)})") from None
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
    for x, _ in tqdm(worker_batches(loader), total=len(loader), desc=desc, disable=not progress, leave=False):
        out[k:k + len(x)] = x
        k += len(x)
    return out


@reader("folder")
@reader("imagenet")
def _image_folder(opts: DataOptions, spec: DatasetSpec) -> _Data:
    """An ImageFolder data set (``train/<class>/*`` and one of ``spec.test_dirs``), at ``opts.image_size``
    or the table's side, held in memory or streamed.

    ``--loading auto`` holds it in memory, augmented like CIFAR, if its images are at most
    SMALL_IMAGE_MAX px and take at most MEMORY_BUDGET_BYTES decoded; otherwise it is streamed (see
    :func:`image_transforms`), normalised with the table's statistics if it has them (ImageNet's)
    or with those of up to STATS_SAMPLE training images. ImageNet is not downloadable (licence):
    its validation images must be sorted into class folders, as torchvision's reference scripts expect.
    """
    name = spec.name
    train, test = _scan_folder(opts.root, name, spec.test_dirs)
    size = opts.image_size or spec.size
    n = len(train.samples) + len(test.samples)
    fits = n * 3 * size * size <= MEMORY_BUDGET_BYTES
    if opts.loading == "memory" and size > SMALL_IMAGE_MAX:
        raise ConfigError(f"--loading=memory: {size} px images use RandomResizedCrop on the full image, so "
                          f"they are streamed; use --loading stream (or --image-size <= {SMALL_IMAGE_MAX})")
    in_memory = opts.loading == "memory" or (opts.loading == "auto" and size <= SMALL_IMAGE_MAX and fits)
    if not in_memory:
        if spec.mean is not None:
            mean, std = spec.mean, spec.std
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
