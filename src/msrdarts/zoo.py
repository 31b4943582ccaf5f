"""Published genotypes by name (SPEC sections 5 and 6): a registry of data, looked up by name."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .errors import ConfigError, GenotypeError
from .genotype import CellGenotypes, Genotype, genotype_from_dict, pairs, parse_genotype, read_genotype_file

_CONCAT = (2, 3, 4, 5)
_ZOO: dict[str, Genotype] = {}


def register_genotype(name: str, genotype: Genotype) -> Genotype:
    if name in _ZOO:
        raise ValueError(f"genotype {name!r} is already registered")
    genotype.validate(source=name)
    _ZOO[name] = genotype
    return genotype


def list_genotypes() -> list[str]:
    return list(_ZOO)


def get_genotype(name: str) -> Genotype:
    try:
        return _ZOO[name]
    except KeyError:
        raise ConfigError(f"unknown genotype {name!r}; zoo: {', '.join(_ZOO)}") from None


def _g(normal: list[tuple[str, int]], reduce: list[tuple[str, int]]) -> Genotype:
    return Genotype(pairs(normal), _CONCAT, pairs(reduce), _CONCAT)


register_genotype("MSR_DARTS", _g(
    [("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 2), ("dil_conv_5x5", 1),
     ("dil_conv_3x3", 3), ("dil_conv_3x3", 0), ("sep_conv_5x5", 1), ("dil_conv_5x5", 2)],
    [("sep_conv_3x3", 0), ("dil_conv_3x3", 1), ("dil_conv_3x3", 1), ("sep_conv_5x5", 0),
     ("sep_conv_3x3", 0), ("dil_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 1)],
))
register_genotype("DARTS_V1", _g(
    [("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
     ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
     ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
))
register_genotype("DARTS_V2", _g(
    [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
     ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
     ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
))
register_genotype("PC_DARTS", _g(
    [("sep_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 0), ("dil_conv_3x3", 1),
     ("sep_conv_5x5", 0), ("sep_conv_3x3", 1), ("avg_pool_3x3", 0), ("dil_conv_3x3", 1)],
    [("sep_conv_5x5", 1), ("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_5x5", 2),
     ("sep_conv_3x3", 0), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2)],
))
register_genotype("P_DARTS", _g(
    [("skip_connect", 0), ("dil_conv_3x3", 1), ("skip_connect", 0), ("sep_conv_3x3", 1),
     ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 0), ("dil_conv_5x5", 4)],
    [("avg_pool_3x3", 0), ("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
     ("max_pool_3x3", 0), ("dil_conv_3x3", 1), ("dil_conv_3x3", 1), ("dil_conv_5x5", 3)],
))

# PC-DARTS searched on ImageNet (its authors' genotypes.py, PC_DARTS_image): 24.2 % top-1, 5.3M
# parameters, 597M mult-adds in the mobile setting (SPEC section 5).
register_genotype("PC_DARTS_IMAGENET", _g(
    [("skip_connect", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 0), ("skip_connect", 1),
     ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("sep_conv_3x3", 1), ("dil_conv_5x5", 4)],
    [("sep_conv_3x3", 0), ("skip_connect", 1), ("dil_conv_5x5", 2), ("max_pool_3x3", 1),
     ("sep_conv_3x3", 2), ("sep_conv_3x3", 1), ("sep_conv_5x5", 0), ("sep_conv_3x3", 3)],
))


def load_genotype(spec: str | os.PathLike, primitives: Iterable[str] | None = None) -> Genotype | CellGenotypes:
    """A genotype from a zoo name, a DARTS ``Genotype(...)`` string, its JSON form, or a file holding
    either JSON form (mean or per-cell) or such a string."""
    text = str(spec)
    if text in _ZOO:
        geno = _ZOO[text]
        geno.validate(primitives, text)
        return geno
    if text.lstrip().startswith("Genotype("):
        return parse_genotype(text, primitives)
    if text.lstrip().startswith("{"):   # the JSON form itself (str() of a per-cell genotype)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenotypeError(f"genotype JSON string: invalid at column {e.colno}: {e.msg}") from None
        return genotype_from_dict(data, primitives, "genotype JSON string")
    try:
        is_file = Path(text).is_file()
    except OSError:   # a name too long for a path
        is_file = False
    if not is_file:
        raise GenotypeError(f"genotype {text[:80]!r}{'...' if len(text) > 80 else ''} is neither a file, a Genotype(...) "
                            f"string nor a zoo name "
                            f"({', '.join(_ZOO)})")
    return read_genotype_file(text, primitives)
