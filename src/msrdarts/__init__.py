"""msrdarts: neural architecture search with MSR-DARTS (Minimum Stable Rank DARTS).

The public Python API (see :mod:`msrdarts.api` and the README): ``search``, ``train``,
``search_config``, ``train_config``, ``presets``, ``load_genotype``, ``parse_genotype``,
``Genotype``, ``CellGenotypes``, ``stable_rank`` and ``spectral_norm`` of any conv, and the
exceptions users see. The API functions load on first use (PEP 562), so importing a pure-data
module such as ``msrdarts.runs.folder`` or ``msrdarts.config`` does not import torch.
"""

from typing import Any

from .errors import CheckpointError, ConfigError, DataError, MsrdartsError
from .genotype import CellGenotypes, Genotype, parse_genotype
from .zoo import load_genotype

__version__ = "0.1.0"

_API = ("presets", "search", "search_config", "spectral_norm", "stable_rank", "train", "train_config")

__all__ = ["CellGenotypes", "CheckpointError", "ConfigError", "DataError", "Genotype", "MsrdartsError",
           "load_genotype", "parse_genotype", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'msrdarts' has no attribute {name!r}")
