"""What msrdarts knows about each candidate op, as plain data: the one home of op facts.

The modules that build an op live in :mod:`msrdarts.nn.ops` (``register_op`` adds a factory
and, for a new op, its facts here). Everything that only needs to *know* something about an op
(a picture's colour, a table's short name, whether it has a conv to rank, whether the fused
search path supports it, which ops a named space holds) reads it from here, without importing
any network code.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Primitive:
    """Facts about one candidate op."""

    name: str
    short: str            # a compact label for tables (``msrdarts compare``): s3, d5, id, ...
    colour: str           # its colour in every picture
    conv: bool = False    # ends in an op conv whose stable rank can rank it (MSR-DARTS needs this)
    fusable: bool = False  # supported by the fused supernet forward (msrdarts.nn.fused)
    search_bn: bool = False  # an affine-free BN follows it in the supernet (DARTS: the pooling ops)


_PRIMITIVES: dict[str, Primitive] = {}


def register_primitive(p: Primitive) -> Primitive:
    """Add the facts of a new op; a name already known is refused."""
    if p.name in _PRIMITIVES:
        raise ValueError(f"op {p.name!r} is already registered")
    _PRIMITIVES[p.name] = p
    return p


def get_primitive(name: str) -> Primitive:
    try:
        return _PRIMITIVES[name]
    except KeyError:
        raise ConfigError(f"unknown op {name!r}; known ops: {', '.join(_PRIMITIVES)}") from None


def list_primitives() -> list[str]:
    return list(_PRIMITIVES)


for _p in (
    Primitive("none", "0", "#cccccc"),
    Primitive("max_pool_3x3", "mp", "#2ca02c", search_bn=True),
    Primitive("avg_pool_3x3", "ap", "#9467bd", search_bn=True),
    Primitive("skip_connect", "id", "#7f7f7f"),
    Primitive("sep_conv_3x3", "s3", "#1f77b4", conv=True, fusable=True),
    Primitive("sep_conv_5x5", "s5", "#17becf", conv=True, fusable=True),
    Primitive("dil_conv_3x3", "d3", "#d62728", conv=True, fusable=True),
    Primitive("dil_conv_5x5", "d5", "#ff7f0e", conv=True, fusable=True),
):
    register_primitive(_p)
del _p

#: The operation set of MSR-DARTS (SPEC section 1), in the order used for tie-breaking.
MSR_PRIMITIVES: tuple[str, ...] = ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
#: The full DARTS operation set, in the DARTS order.
DARTS_PRIMITIVES: tuple[str, ...] = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3",
                                     "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
#: Named search spaces (``--space``).
SPACES: dict[str, tuple[str, ...]] = {"msr": MSR_PRIMITIVES, "darts": DARTS_PRIMITIVES}


def space_ops(space: str) -> tuple[str, ...]:
    """The ops a genotype of ``space`` may use (``none`` never appears in a derived cell)."""
    if space not in SPACES:
        raise ConfigError(f"--space={space!r}: unknown; allowed: {', '.join(SPACES)}")
    return tuple(op for op in SPACES[space] if op != "none")


def short_name(op: str) -> str:
    return _PRIMITIVES[op].short if op in _PRIMITIVES else op


def colour(op: str) -> str:
    return _PRIMITIVES[op].colour if op in _PRIMITIVES else "#444444"


def can_fuse(ops: tuple[str, ...] | list[str]) -> bool:
    """Whether the fused supernet forward supports every op of ``ops``."""
    return all(op in _PRIMITIVES and _PRIMITIVES[op].fusable for op in ops)


def fusable_ops() -> list[str]:
    return [p.name for p in _PRIMITIVES.values() if p.fusable]


def convless(ops: tuple[str, ...] | list[str]) -> list[str]:
    """The ops of ``ops`` that have no conv to rank."""
    return [op for op in ops if not get_primitive(op).conv]
