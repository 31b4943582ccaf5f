"""msrdarts: neural architecture search with MSR-DARTS (Minimum Stable Rank DARTS).

The public Python API (see :mod:`msrdarts.api` and the README): ``search``, ``train``,
``search_config``, ``train_config``, ``presets``, ``load_genotype``, ``parse_genotype``,
``Genotype``, ``stable_rank`` and ``spectral_norm`` of any conv, and the exceptions users see.
"""

from .api import presets, search, search_config, spectral_norm, stable_rank, train, train_config
from .errors import CheckpointError, ConfigError, DataError, MsrdartsError
from .genotype import Genotype, parse_genotype
from .zoo import load_genotype

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Genotype",
    "MsrdartsError",
    "load_genotype",
    "parse_genotype",
    "presets",
    "search",
    "search_config",
    "spectral_norm",
    "stable_rank",
    "train",
    "train_config",
]
