"""Data sets and their loaders, in three modules:

- :mod:`.registry`: the one table of data sets (names, classes, shape, statistics, augmentation),
  pure data, so the config and ``msrdarts info`` use it without importing torch;
- :mod:`.readers`: reading each data set from its files (one reader per table name), into
  :class:`ImageData` (decoded, in memory) or :class:`StreamData` (image files, decoded per batch);
- :mod:`.loaders`: search splits, and the seeded, resumable, shardable epoch loaders
  (:class:`DeviceLoader` for images in memory, ``StreamLoader`` for files).

The names below are loaded on first use (PEP 562), so importing :mod:`msrdarts.data.registry`
does not import torch through this package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "FOLDER_SIZE": "registry", "DatasetInfo": "registry", "dataset_info": "registry", "list_datasets": "registry",
    "ImageData": "readers", "StreamData": "readers", "load_dataset": "readers",
    "DeviceLoader": "loaders", "StreamLoader": "loaders", "derived_seed": "loaders", "resolve_workers": "loaders",
    "search_split": "loaders", "shard_bounds": "loaders", "subset_split": "loaders",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .loaders import (DeviceLoader, StreamLoader, derived_seed, resolve_workers, search_split, shard_bounds,
                          subset_split)
    from .readers import ImageData, StreamData, load_dataset
    from .registry import FOLDER_SIZE, DatasetInfo, dataset_info, list_datasets


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
