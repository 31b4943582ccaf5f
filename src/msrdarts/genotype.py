"""The discrete architecture: a Genotype, its JSON form, and a safe parser for DARTS strings.

A cell has ``steps`` intermediate nodes (2 .. steps+1); each keeps two incoming edges, written as
``(op, input_node)`` pairs in node order, so pairs 2k and 2k+1 feed node k+2 and their inputs
must be < k+2. JSON uses the DARTS field names::

    {"normal": [["sep_conv_3x3", 1], ...], "normal_concat": [2, 3, 4, 5],
     "reduce": [...], "reduce_concat": [2, 3, 4, 5]}

DARTS-style strings (``Genotype(normal=[('sep_conv_3x3', 0), ...], normal_concat=range(2, 6),
...)``) are parsed with :mod:`ast` as data: only literals, lists/tuples and ``range(a, b)`` are
accepted, nothing is evaluated.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import GenotypeError

Pairs = tuple[tuple[str, int], ...]
_FIELDS = ("normal", "normal_concat", "reduce", "reduce_concat")
#: The two cell types of a DARTS network.
CELL_TYPES = ("normal", "reduce")


@dataclass(frozen=True)
class Genotype:
    normal: Pairs
    normal_concat: tuple[int, ...]
    reduce: Pairs
    reduce_concat: tuple[int, ...]

    @property
    def steps(self) -> int:
        return len(self.normal) // 2

    def ops(self) -> set[str]:
        return {op for op, _ in self.normal + self.reduce}

    def to_dict(self) -> dict:
        return {
            "normal": [[op, i] for op, i in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[op, i] for op, i in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, data: object, primitives: Iterable[str] | None = None, source: str = "genotype") -> "Genotype":
        """Build and validate from the JSON form; errors name ``source`` and the field."""
        if not isinstance(data, dict):
            raise GenotypeError(f"{source}: expected an object with fields {', '.join(_FIELDS)}")
        missing = [f for f in _FIELDS if f not in data]
        extra = [f for f in data if f not in _FIELDS]
        if missing or extra:
            what = (f"missing field(s) {', '.join(missing)}" if missing else "") + \
                   ("; " if missing and extra else "") + (f"unknown field(s) {', '.join(extra)}" if extra else "")
            raise GenotypeError(f"{source}: {what}")
        geno = cls(
            normal=_pairs(data["normal"], f"{source}: normal"),
            normal_concat=_ints(data["normal_concat"], f"{source}: normal_concat"),
            reduce=_pairs(data["reduce"], f"{source}: reduce"),
            reduce_concat=_ints(data["reduce_concat"], f"{source}: reduce_concat"),
        )
        geno.validate(primitives, source)
        return geno

    def validate(self, primitives: Iterable[str] | None = None, source: str = "genotype") -> None:
        """Check the cell structure (and, if given, that every op is one of ``primitives``)."""
        allowed = None if primitives is None else list(primitives)
        if len(self.normal) != len(self.reduce):
            raise GenotypeError(f"{source}: normal has {len(self.normal)} pairs but reduce has {len(self.reduce)}")
        for name in CELL_TYPES:
            _check_cell(getattr(self, name), getattr(self, name + "_concat"), name, allowed, source)

    def __str__(self) -> str:
        def fmt(pairs: Pairs) -> str:
            return "[" + ", ".join(f"({op!r}, {i})" for op, i in pairs) + "]"

        def rng(c: tuple[int, ...]) -> str:
            return f"range({c[0]}, {c[-1] + 1})" if list(c) == list(range(c[0], c[-1] + 1)) else str(list(c))

        return (f"Genotype(normal={fmt(self.normal)}, normal_concat={rng(self.normal_concat)}, "
                f"reduce={fmt(self.reduce)}, reduce_concat={rng(self.reduce_concat)})")

    def to_json(self) -> str:
        """The JSON form, one field per line (each cell's pairs on one line)."""
        return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in self.to_dict().items()) + "\n}\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON form atomically."""
        from ._io import atomic_write_bytes

        atomic_write_bytes(path, self.to_json().encode())


def _check_cell(pairs: Pairs, concat: tuple[int, ...], name: str, allowed: list[str] | None, source: str) -> None:
    """One cell's structure: two (op, input) pairs per node, inputs from earlier nodes, a concat of
    distinct nodes (and, if ``allowed`` is given, only those ops)."""
    if len(pairs) == 0 or len(pairs) % 2:
        raise GenotypeError(f"{source}: {name} must hold two (op, input) pairs per node, got {len(pairs)}")
    for k, (op, inp) in enumerate(pairs):
        node = 2 + k // 2
        if allowed is not None and op not in allowed:
            raise GenotypeError(f"{source}: {name}[{k}] has op {op!r}; allowed ops: {', '.join(allowed)}")
        if not 0 <= inp < node:
            raise GenotypeError(f"{source}: {name}[{k}] feeds node {node} from node {inp}; "
                                f"inputs must be in 0..{node - 1}")
    n_nodes = 2 + len(pairs) // 2
    if not concat or len(set(concat)) != len(concat) or not all(0 <= c < n_nodes for c in concat):
        raise GenotypeError(f"{source}: {name}_concat {list(concat)} must list distinct nodes in 0..{n_nodes - 1}")


@dataclass(frozen=True)
class Cell:
    """One cell of a per-cell architecture: its type ('normal' or 'reduce'), pairs and concat."""

    type: str
    pairs: Pairs
    concat: tuple[int, ...]


@dataclass(frozen=True)
class CellGenotypes:
    """A per-cell architecture (SPEC section 4a): one cell genotype per cell of the network, in depth
    order, each tagged normal or reduce. The evaluation network has exactly these cells.

    JSON form (``genotype-cells.json``)::

        {"cells": [{"type": "normal", "pairs": [["sep_conv_3x3", 1], ...], "concat": [2, 3, 4, 5]},
                   ...]}
    """

    cells: tuple[Cell, ...]

    @property
    def layers(self) -> int:
        return len(self.cells)

    @property
    def steps(self) -> int:
        return len(self.cells[0].pairs) // 2

    def reduction_layers(self) -> tuple[int, ...]:
        return tuple(k for k, c in enumerate(self.cells) if c.type == "reduce")

    def ops(self) -> set[str]:
        return {op for c in self.cells for op, _ in c.pairs}

    def to_dict(self) -> dict:
        return {"cells": [{"type": c.type, "pairs": [[op, i] for op, i in c.pairs], "concat": list(c.concat)}
                          for c in self.cells]}

    @classmethod
    def from_dict(cls, data: object, primitives: Iterable[str] | None = None,
                  source: str = "genotype") -> "CellGenotypes":
        if not isinstance(data, dict) or not isinstance(data.get("cells"), list) or set(data) != {"cells"}:
            raise GenotypeError(f"{source}: a per-cell genotype is an object with one field, cells (a list)")
        cells = []
        for k, c in enumerate(data["cells"]):
            where = f"{source}: cells[{k}]"
            if not isinstance(c, dict):
                raise GenotypeError(f"{where}: expected an object with fields type, pairs, concat")
            missing = [f for f in ("type", "pairs", "concat") if f not in c]
            if missing:
                raise GenotypeError(f"{where}: missing field(s) {', '.join(missing)}")
            extra = sorted(set(c) - {"type", "pairs", "concat"})
            if extra:
                raise GenotypeError(f"{where}: unknown field(s) {', '.join(extra)}")
            if c["type"] not in CELL_TYPES:
                raise GenotypeError(f"{where}: type {c['type']!r}; allowed: {', '.join(CELL_TYPES)}")
            cells.append(Cell(c["type"], _pairs(c["pairs"], f"{where}: pairs"), _ints(c["concat"], f"{where}: concat")))
        geno = cls(tuple(cells))
        geno.validate(primitives, source)
        return geno

    def validate(self, primitives: Iterable[str] | None = None, source: str = "genotype") -> None:
        allowed = None if primitives is None else list(primitives)
        if not self.cells:
            raise GenotypeError(f"{source}: cells is empty")
        for k, c in enumerate(self.cells):
            _check_cell(c.pairs, c.concat, f"cells[{k}]", allowed, source)
        if len({len(c.pairs) for c in self.cells}) != 1:
            raise GenotypeError(f"{source}: every cell must have the same number of nodes")

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def to_json(self) -> str:
        """The JSON form, one cell per line."""
        rows = ",\n".join("    " + json.dumps(c) for c in self.to_dict()["cells"])
        return '{\n  "cells": [\n' + rows + "\n  ]\n}\n"

    def save(self, path: str | os.PathLike) -> None:
        from ._io import atomic_write_bytes

        atomic_write_bytes(path, self.to_json().encode())


def _pairs(value: object, where: str) -> Pairs:
    if not isinstance(value, (list, tuple)):
        raise GenotypeError(f"{where}: expected a list of [op, input] pairs")
    out = []
    for k, pair in enumerate(value):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2 or not isinstance(pair[0], str)
                or not isinstance(pair[1], int) or isinstance(pair[1], bool)):
            raise GenotypeError(f"{where}[{k}]: expected [op_name, input_node], got {pair!r}")
        out.append((pair[0], pair[1]))
    return tuple(out)


def _ints(value: object, where: str) -> tuple[int, ...]:
    if isinstance(value, range):
        value = list(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise GenotypeError(f"{where}: expected a list of node indices, got {value!r}")
    return tuple(value)


def _literal(node: ast.AST, where: str) -> object:
    """Convert an AST node of plain data (and range(a, b)) to a Python value; refuse the rest."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int)):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e, where) for e in node.elts]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range" \
            and not node.keywords and 1 <= len(node.args) <= 2:
        args = [_literal(a, where) for a in node.args]
        if all(isinstance(a, int) for a in args):
            return list(range(*args))
    raise GenotypeError(f"{where}: only literals and range(a, b) are allowed, found {ast.unparse(node)!r}")


def parse_genotype(text: str, primitives: Iterable[str] | None = None, source: str = "genotype string") -> Genotype:
    """Parse a DARTS-style ``Genotype(normal=[...], normal_concat=range(2, 6), ...)`` string safely."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise GenotypeError(f"{source}: not a valid Genotype(...) expression ({e.msg})") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "Genotype"):
        raise GenotypeError(f"{source}: expected Genotype(normal=..., normal_concat=..., reduce=..., reduce_concat=...)")
    if len(call.args) > len(_FIELDS):
        raise GenotypeError(f"{source}: Genotype takes at most {len(_FIELDS)} fields")
    data: dict[str, object] = {}
    for name, arg in zip(_FIELDS, call.args):
        data[name] = _literal(arg, f"{source}: {name}")
    for kw in call.keywords:
        if kw.arg is None or kw.arg in data:
            raise GenotypeError(f"{source}: field {kw.arg!r} given twice or unpacked")
        data[kw.arg] = _literal(kw.value, f"{source}: {kw.arg}")
    return Genotype.from_dict(data, primitives, source)


def read_genotype_file(path: str | os.PathLike, primitives: Iterable[str] | None = None
                       ) -> "Genotype | CellGenotypes":
    """A genotype from a JSON file (either form) or a file holding a DARTS ``Genotype(...)`` string."""
    path = Path(path)
    try:
        content = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise GenotypeError(f"{path}: cannot read genotype file ({e})") from None
    if content.lstrip().startswith("Genotype("):
        return parse_genotype(content, primitives, source=str(path))
    try:
        data = json.loads(content)
    except json.JSONDecodeError as e:
        raise GenotypeError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return genotype_from_dict(data, primitives, source=str(path))


def genotype_from_dict(data: object, primitives: Iterable[str] | None = None, source: str = "genotype"
                       ) -> "Genotype | CellGenotypes":
    """Either form from its JSON: a per-cell genotype (a ``cells`` list) or a mean one."""
    if isinstance(data, dict) and "cells" in data:
        return CellGenotypes.from_dict(data, primitives, source)
    return Genotype.from_dict(data, primitives, source)


def pairs(items: Sequence[tuple[str, int]]) -> Pairs:
    """Normalise a sequence of (op, input) pairs to the tuple form stored in a Genotype."""
    return tuple((str(op), int(i)) for op, i in items)


def num_edges(steps: int) -> int:
    return sum(2 + i for i in range(steps))


def edge_index(steps: int) -> list[tuple[int, int]]:
    """(source, target) of every edge, in cell order."""
    return [(src, 2 + i) for i in range(steps) for src in range(2 + i)]
