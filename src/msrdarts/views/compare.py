"""``msrdarts compare RUN_DIR...``: search, sample and training run folders gathered into one table.

Each training run (a folder with results.json) is one row. Its method comes from where its
genotype came from:

* ``DIR/genotype.json`` of a search run: that search's method (``msr-darts``, ``darts-1st``,
  ``darts-2nd``), the search's seed,
  and the search cost in device-hours (the sum of its epoch times x its processes);
* ``DIR/genotype.json`` of ``msrdarts sample``: ``random``, the sample's index as its seed, no
  search cost;
* anything else (a zoo name, another file): the genotype's name, the training seed.

Search runs given without a training run appear with an empty test error. Per method the table
gives the mean and the sample standard deviation (n - 1) of the final test top-1 error over its
runs, and its rank against the random baseline: 1 + the number of random genotypes whose test
error is lower than the method's mean, out of (random runs + 1).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from ..genotype import CellGenotypes, Genotype, genotype_from_dict
from ..primitives import short_name
from ..runs import folder as F



@dataclass
class Row:
    method: str
    seed: int | None
    run: str                      # the training run folder (or the search run, if not trained)
    search_hours: float | None    # device-hours of the search (None: unknown, e.g. a published cell)
    train_hours: float | None
    params_m: float | None
    mult_adds_m: float | None
    test_error: float | None      # final test top-1 error, %
    genotype: str                 # compact: N: op@input ... | R: ...


def compact(genotype: Genotype | CellGenotypes) -> str:
    """``N: s3@1 s3@0, ... | R: ...``: the ops of each node's pair (comma between nodes); a per-cell
    genotype: ``0N: ... | 1N: ... | 2R: ...``, every cell in depth order."""
    def cell(pairs: Sequence[tuple[str, int]]) -> str:
        items = [f"{short_name(op)}@{i}" for op, i in pairs]
        return ", ".join(" ".join(items[k:k + 2]) for k in range(0, len(items), 2))
    if isinstance(genotype, CellGenotypes):
        return " | ".join(f"{k}{'R' if c.type == 'reduce' else 'N'}: {cell(c.pairs)}"
                          for k, c in enumerate(genotype.cells))
    return f"N: {cell(genotype.normal)} | R: {cell(genotype.reduce)}"


def _json(path: Path) -> Any:
    return F.read_json(path)


def method_name(config: dict[str, Any]) -> str:
    """A search run's method label: ``msr-darts`` (``msr-darts-max`` for the authors' max ablation),
    ``darts-1st`` / ``darts-2nd``, ``pc-darts`` and ``p-darts`` (``-2nd`` unrolled), each DARTS-family label
    with the space when the method searched another space than its own."""
    method = config.get("method", "msr")
    if method == "msr":
        return "msr-darts-max" if config.get("select") == "max" else "msr-darts"
    if method == "darts":
        label = "darts-1st" if config.get("order", 1) == 1 else "darts-2nd"
    elif method in ("pc-darts", "p-darts"):
        label = method if config.get("order", 1) == 1 else f"{method}-2nd"
    else:
        return method   # a user's own method: its registered name
    space = config.get("space") or "custom"
    return label if space == "darts" else f"{label} ({space} space)"


def _search_hours(folder: Path) -> float:
    config = _json(folder / F.CONFIG)
    seconds = sum(r.get("epoch_time_s", 0.0) for r in F.read_history(folder))
    return seconds * config.get("runtime", {}).get("devices", 1) / 3600.0


def _origin(genotype_spec: str, train_seed: int) -> tuple[str, int | None, float | None, Path | None]:
    """(method, seed, search hours, origin folder) of a training run's --genotype: each genotype file
    of a search counts as its own method (``msr-darts``, ``msr-darts-cells``, ``msr-darts-max``,
    ``msr-darts-cells-max``)."""
    path = Path(genotype_spec)
    folder = path.parent if path.name in F.GENOTYPE_FILES else None
    kind = F.run_kind(folder) if folder is not None else None
    if kind == "sample":
        return "random", int(_json(folder / F.SAMPLE)["index"]), 0.0, folder.resolve()
    if kind == "search":
        config = _json(folder / F.CONFIG)
        label = method_name(config) + F.GENOTYPE_FILES[path.name]
        return label, int(config.get("seed", 0)), _search_hours(folder), folder.resolve()
    if genotype_spec.lstrip().startswith(("Genotype(", "{")):   # a genotype given inline (the Python API)
        return "genotype", train_seed, None, None
    return (path.stem if path.suffix else genotype_spec), train_seed, None, None


def gather(paths: Sequence[str | Path]) -> list[Row]:
    """One row per training run among ``paths``, plus one per search run no given training used."""
    rows: list[Row] = []
    trained_from: set[Path] = set()
    searches: list[Path] = []
    for p in map(Path, paths):
        kind = F.run_kind(p)
        if kind == "train" and (p / F.RESULTS).is_file():
            res, config = _json(p / F.RESULTS), _json(p / F.CONFIG)
            method, seed, hours, origin = _origin(str(config.get("genotype", "")), int(config.get("seed", 0)))
            if origin is not None:
                trained_from.add(origin)
            rows.append(Row(method, seed, str(p), hours, res.get("device_hours"), res.get("params_m"),
                            res.get("mult_adds_m"), res.get("test_top1_error"),
                            compact(genotype_from_dict(res["genotype"], source=f"{p / F.RESULTS}: genotype"))))
        elif kind == "search":
            searches.append(p)
        elif kind == "sample":
            continue   # a sample matters through the training run of its genotype
        elif kind == "train":
            raise ConfigError(f"{p}: a training run that has not finished (no {F.RESULTS} yet)")
        else:
            raise ConfigError(f"{p}: not a run folder (no {F.RESULTS}, {F.HISTORY} or {F.SAMPLE})")
    for p in searches:
        if p.resolve() not in trained_from:
            config = _json(p / F.CONFIG)
            geno = Genotype.from_dict(_json(p / F.GENOTYPE), source=f"{p / F.GENOTYPE}")
            rows.append(Row(method_name(config), int(config.get("seed", 0)), str(p), _search_hours(p),
                            None, None, None, None, compact(geno)))
    if not rows:
        raise ConfigError("compare: no run folders given")
    return rows


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Per method (in order of first appearance): runs, test error mean and std, costs, size, rank."""
    methods = list(dict.fromkeys(r.method for r in rows))
    random_errors = [r.test_error for r in rows if r.method == "random" and r.test_error is not None]
    out = []
    for m in methods:
        mine = [r for r in rows if r.method == m]
        errors = [r.test_error for r in mine if r.test_error is not None]
        mean = _mean(errors)
        summary = {
            "method": m, "runs": len(mine), "trained": len(errors),
            "test_error_mean": mean, "test_error_std": statistics.stdev(errors) if len(errors) > 1 else None,
            "search_hours_mean": _mean([r.search_hours for r in mine if r.search_hours is not None]),
            "train_hours_mean": _mean([r.train_hours for r in mine if r.train_hours is not None]),
            "params_m_mean": _mean([r.params_m for r in mine if r.params_m is not None]),
            "mult_adds_m_mean": _mean([r.mult_adds_m for r in mine if r.mult_adds_m is not None]),
            "rank_vs_random": None,
        }
        if m != "random" and random_errors and mean is not None:
            summary["rank_vs_random"] = f"{1 + sum(e < mean for e in random_errors)}/{len(random_errors) + 1}"
        out.append(summary)
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: Sequence[Row], summary: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | runs | test error (%) | search cost (device-h) | params (M) | mult-adds (M) | rank vs random |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        err = _fmt(s["test_error_mean"]) + ("" if s["test_error_std"] is None else f" ± {_fmt(s['test_error_std'])}")
        lines.append(f"| {s['method']} | {s['trained']}/{s['runs']} | {err} | {_fmt(s['search_hours_mean'], 3)} | "
                     f"{_fmt(s['params_m_mean'])} | {_fmt(s['mult_adds_m_mean'], 1)} | {_fmt(s['rank_vs_random'])} |")
    lines += ["", "| method | seed | test error (%) | search (device-h) | train (device-h) | params (M) | "
              "mult-adds (M) | genotype | run |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {_fmt(r.seed)} | {_fmt(r.test_error)} | {_fmt(r.search_hours, 3)} | "
                     f"{_fmt(r.train_hours, 3)} | {_fmt(r.params_m)} | {_fmt(r.mult_adds_m, 1)} | {r.genotype} | "
                     f"{r.run} |")
    return "\n".join(lines) + "\n"


def csv_text(records: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def run_compare(paths: Sequence[str | Path], out: str | Path | None = None, csv_path: str | Path | None = None
                ) -> str:
    """The markdown table (also written to ``out``); ``csv_path`` gets the per-run rows and
    ``<stem>-methods.csv`` beside it the per-method summary."""
    from .._io import atomic_write_bytes

    rows = gather(paths)
    summary = summarize(rows)
    text = markdown(rows, summary)
    if out is not None:
        atomic_write_bytes(out, text.encode())
    if csv_path is not None:
        csv_path = Path(csv_path)
        atomic_write_bytes(csv_path, csv_text([asdict(r) for r in rows]).encode())
        atomic_write_bytes(csv_path.with_name(f"{csv_path.stem}-methods.csv"), csv_text(summary).encode())
    return text
