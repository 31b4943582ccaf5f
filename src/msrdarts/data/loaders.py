"""Search splits and the two epoch loaders: in-memory on the device, or streamed from files.

:class:`DeviceLoader` keeps uint8 images on the training device and does shuffling, random crop
(zero padding), horizontal flip, normalisation and cutout there, one batch at a time: no worker
processes, no per-image Python. :class:`StreamLoader` has DataLoader worker processes decode
and augment images from files, collates uint8 batches (pinned when the device is not the CPU),
and normalises (and cuts out) on the device.

Randomness comes from one CPU ``torch.Generator`` per loader whose state is checkpointed, so a
resumed run sees the same batches as an uninterrupted one. Everything random in an epoch derives
from its epoch seed (:func:`derived_seed`), so batches do not depend on the number of workers or
processes either.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterator

import torch

from ..errors import ConfigError, DataError

if TYPE_CHECKING:
    from .readers import FolderImages


def resolve_workers(workers: int) -> int:
    """``-1`` (auto): one worker per available core, at most 8; otherwise the number given."""
    if workers >= 0:
        return workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


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


def worker_batches(loader: torch.utils.data.DataLoader) -> Iterator:
    """Iterate ``loader``; a DataError raised in a worker is re-raised as its own one-line message."""
    try:
        yield from loader
    except DataError as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        last = lines[-1] if lines else str(e)
        raise DataError(last.split("DataError: ", 1)[-1]) from None


def _ignore_sigint(worker_id: int) -> None:
    """In a DataLoader worker: leave Ctrl-C (sent to the whole terminal process group) to the main
    process, which checkpoints and then ends the workers. SIGTERM stays: the DataLoader itself
    ends its workers with it."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _EpochLoader:
    """Common protocol and settings of the loaders: one epoch is ``batches(epoch_seed, start)``.

    ``len()`` is the number of global batches. Iterating draws a fresh epoch seed from
    ``generator`` (the loader's only RNG state); the order, every augmentation, and so the epoch's
    batches, derive from that seed, so a run can restart an epoch at any batch ``start``.
    Normalisation and cutout (after it) are done here, on the device, for both loaders.
    """

    def __init__(self, n: int, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device | str, shuffle: bool, drop_last: bool, generator: torch.Generator | None,
                 cutout: int, rank: int, world: int):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: must be a positive integer")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.device = torch.device(device)
        self.shuffle, self.drop_last, self.cutout = shuffle, drop_last, cutout
        self.generator = generator if generator is not None else torch.Generator()
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1) * 255   # uint8 units
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1) * 255

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def draw_epoch_seed(self) -> int:
        return int(torch.randint(0, 1 << 62, (), generator=self.generator))

    def batches(self, epoch_seed: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(self.draw_epoch_seed())

    def _order(self, epoch_seed: int) -> torch.Tensor:
        """The epoch's order of positions 0..n-1: a permutation seeded by the epoch seed if ``shuffle``."""
        if self.shuffle:
            return torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed))
        return torch.arange(self.n)

    def _global_batches(self, order: torch.Tensor, start: int) -> Iterator[tuple[int, int, int, torch.Tensor]]:
        """(batch index, global size, lo, this rank's positions) for each global batch from ``start``;
        a rank whose share of a (last, small) batch is empty skips it."""
        for b in range(start, len(self)):
            glob = order[b * self.batch_size:(b + 1) * self.batch_size]
            lo, hi = shard_bounds(len(glob), self.rank, self.world)
            if hi > lo:
                yield b, len(glob), lo, glob[lo:hi]

    @staticmethod
    def _batch_generator(epoch_seed: int, b: int) -> torch.Generator:
        """The generator of every random draw for global batch ``b`` of the epoch."""
        return torch.Generator().manual_seed(derived_seed(epoch_seed, b))

    def _normalise_and_cutout(self, x: torch.Tensor, g: torch.Generator, size: int, keep: slice) -> torch.Tensor:
        """uint8 images to float, normalised per channel; then cutout (if set), its centres drawn from
        ``g`` for the whole global batch of ``size`` and sliced to ``keep``."""
        x = (x.float() - self.mean) / self.std
        if self.cutout:
            x = cutout(x, self.cutout, g, size, keep)
        return x


class DeviceLoader(_EpochLoader):
    """Mini-batches from uint8 images held on ``device`` (those at ``indices``, or all), augmented and
    normalised there.

    Global batch b of an epoch is augmented with a generator seeded from (epoch seed, b): random
    crop and flip first, then cutout. ``images`` and ``labels`` are moved to ``device`` (no copy
    if they are there already); ``indices`` selects from them without copying.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], device: torch.device | str, shuffle: bool = False,
                 crop_padding: int = 0, flip: bool = False, drop_last: bool = False,
                 generator: torch.Generator | None = None, cutout: int = 0, rank: int = 0, world: int = 1,
                 indices: torch.Tensor | None = None):
        self.indices = indices.cpu() if indices is not None else None
        super().__init__(len(self.indices) if self.indices is not None else len(labels), batch_size, mean, std,
                         device, shuffle, drop_last, generator, cutout, rank, world)
        self.images = images.to(self.device)  # uint8: 4x less memory than float
        self.labels = labels.to(self.device)
        self.crop_padding, self.flip = crop_padding, flip

    def batches(self, epoch_seed: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b, size, lo, idx in self._global_batches(self._order(epoch_seed), start):
            g = self._batch_generator(epoch_seed, b)
            keep = slice(lo, lo + len(idx))
            if self.indices is not None:
                idx = self.indices[idx]
            idx = idx.to(self.device)
            x = self.images[idx]
            if self.crop_padding or self.flip:
                x = self._augment(x, g, size, keep)
            yield self._normalise_and_cutout(x, g, size, keep), self.labels[idx]

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


class StreamLoader(_EpochLoader):
    """Mini-batches of images decoded from files by DataLoader workers, normalised on ``device``.

    The epoch seed fixes the order (a permutation of ``indices`` if ``shuffle``) and every image's
    augmentation (``images`` seeds image i from (epoch seed, i)), so batches are the same for any
    number of ``workers`` and any world size. With ``world`` > 1 the batch sampler gives each rank
    its share of every global batch (the role of a DistributedSampler, but global batches stay
    those of a single process). Workers return uint8 batches (pinned if the device is not the CPU).
    """

    def __init__(self, images: FolderImages, batch_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 device: torch.device | str, indices: torch.Tensor | None = None, shuffle: bool = False,
                 drop_last: bool = False, generator: torch.Generator | None = None, cutout: int = 0,
                 workers: int = 0, rank: int = 0, world: int = 1):
        self.images = images
        self.indices = indices if indices is not None else torch.arange(len(images))
        super().__init__(len(self.indices), batch_size, mean, std, device, shuffle, drop_last, generator, cutout,
                         rank, world)
        self.workers = workers

    def batches(self, epoch_seed: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = list(self._global_batches(self.indices[self._order(epoch_seed)], start))
        if not plan:
            return
        self.images.epoch_seed = epoch_seed  # read by the workers, which start with this iteration
        pin = self.device.type != "cpu"
        loader = torch.utils.data.DataLoader(self.images, batch_sampler=[idx.tolist() for *_, idx in plan],
                                             num_workers=self.workers, pin_memory=pin,
                                             worker_init_fn=_ignore_sigint if self.workers else None)
        for (b, size, lo, _), (x, y) in zip(plan, worker_batches(loader)):
            x, y = x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)
            g = self._batch_generator(epoch_seed, b)
            yield self._normalise_and_cutout(x, g, size, slice(lo, lo + len(y))), y
