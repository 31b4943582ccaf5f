"""msrdarts: neural architecture search with MSR-DARTS (Minimum Stable Rank DARTS)."""

from .errors import CheckpointError, ConfigError, DataError, MsrdartsError
from .genotype import Genotype, load_genotype, parse_genotype

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Genotype",
    "MsrdartsError",
    "load_genotype",
    "parse_genotype",
]
