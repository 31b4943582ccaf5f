"""The run folder: its file names, reading and writing its JSON files, and whether a run may start.

The one home of these facts. Search and training runs write here; pictures, reports and
comparisons (``msrdarts.views``) read from here, so this module imports no network code.

A search run folder::

    config.json          every setting used, where each came from (``origin``) and the runtime
    history.jsonl        one line per epoch: losses, accuracies, lr, that epoch's genotype and its
                         per-(edge, op) score table (``stable_rank`` or ``alpha``)
    genotype.json        the genotype of the epoch with the best search-valid accuracy
    genotype-cells.json  one genotype per cell of the supernet, at the same epoch (MSR-DARTS)
    genotype-max.json, genotype-cells-max.json   the authors' ablation from the same weights: the op
                         and edges of highest stable rank (MSR-DARTS)
    checkpoint.pt        the last completed epoch (or step): weights, optimisers, RNG states, history
    checkpoint.prev.pt   the checkpoint before it (a fallback should the newest be unreadable)
    plots/  tensorboard/ pictures and TensorBoard event files

A training run folder has the same files plus ``results.json`` (final test errors, size, cost)
and ``best.pt`` (the weights of the best test epoch); its config names the genotype it trains.
A ``msrdarts sample`` folder holds ``genotype.json`` and ``sample.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from .._io import write_json, write_jsonl
from ..errors import CheckpointError, ConfigError, MsrdartsError, first_line

CONFIG = "config.json"
HISTORY = "history.jsonl"
GENOTYPE = "genotype.json"
GENOTYPE_CELLS = "genotype-cells.json"
GENOTYPE_MAX = "genotype-max.json"
GENOTYPE_CELLS_MAX = "genotype-cells-max.json"
#: Genotype files of a search and the label suffix a training of each gets in ``msrdarts compare``.
GENOTYPE_FILES = {GENOTYPE: "", GENOTYPE_CELLS: "-cells", GENOTYPE_MAX: "-max", GENOTYPE_CELLS_MAX: "-cells-max"}


def ablation_file(name: str) -> str:
    """The file of a method's further genotype ``name`` (``max`` -> genotype-max.json)."""
    return f"genotype-{name}.json"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_PREV = "checkpoint.prev.pt"
RESULTS = "results.json"
BEST_WEIGHTS = "best.pt"
SAMPLE = "sample.json"
PLOTS = "plots"
TENSORBOARD = "tensorboard"

#: What a run of each kind writes: a folder holding any of these already holds a run.
SEARCH_FILES = (CONFIG, HISTORY, GENOTYPE, GENOTYPE_CELLS, GENOTYPE_MAX, GENOTYPE_CELLS_MAX, CHECKPOINT, CHECKPOINT_PREV, PLOTS, TENSORBOARD)
TRAIN_FILES = (CONFIG, HISTORY, CHECKPOINT, CHECKPOINT_PREV, BEST_WEIGHTS, RESULTS, GENOTYPE, PLOTS, TENSORBOARD)
#: The accuracy that picks a run's best epoch: search-valid for a search, test for a training.
BEST_KEY = {"search": "valid_acc", "train": "test_acc"}


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file; a one-line error naming it when it is missing or unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MsrdartsError(f"{path}: unreadable run file ({first_line(e)})"
                            ) from None


def read_history(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The epochs of a run, one dict per line of ``history.jsonl``."""
    path = Path(folder) / HISTORY
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise MsrdartsError(f"{path}: unreadable run file ({first_line(e)})"
                            ) from None


def write_history(folder: Path, history: list[dict[str, Any]]) -> None:
    write_jsonl(folder / HISTORY, history)


def write_config(folder: Path, config: dict[str, Any]) -> None:
    write_json(folder / CONFIG, config)


def run_kind(folder: str | os.PathLike) -> str | None:
    """'search', 'train' or 'sample' for a run folder, None for anything else.

    A training run's config names the genotype it trains (even before ``results.json`` exists);
    a search's does not; a ``msrdarts sample`` folder has ``sample.json``.
    """
    folder = Path(folder)
    if (folder / RESULTS).is_file():
        return "train"
    if (folder / CONFIG).is_file() and (folder / HISTORY).is_file():
        return "train" if "genotype" in read_json(folder / CONFIG) else "search"
    if (folder / SAMPLE).is_file():
        return "sample"
    return None


def improves(acc: float, best: dict[str, Any] | None, key: str) -> bool:
    """The best-epoch rule: a higher accuracy wins; a tie keeps the earlier epoch."""
    return best is None or acc > best[key]


def eligible(record: dict[str, Any], key: str) -> bool:
    """Whether an epoch can be the best one: it has ``key``, and is no warm-up epoch (weights only,
    the architecture untrained: PC-DARTS's first 15)."""
    return key in record and not record.get("warmup")


def best_record(history: Sequence[dict[str, Any]], key: str = BEST_KEY["search"]) -> dict[str, Any] | None:
    """The epoch of ``history`` that :func:`improves` picks (the records that carry ``key``)."""
    best = None
    for r in history:
        if eligible(r, key) and improves(r[key], best, key):
            best = r
    return best


def check_run_folder(out: Path, resume: bool, run_files: Sequence[str]) -> None:
    """Refuse to start over an existing run, or to resume where there is none."""
    if resume:
        if not (out / CHECKPOINT).is_file():
            raise CheckpointError(f"--resume: {out / CHECKPOINT} not found; nothing to resume")
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    present = [f for f in run_files if (out / f).exists()]
    if present:
        raise CheckpointError(f"--out {out} already holds a run ({', '.join(present)}); "
                              f"pass --resume to continue it or choose another --out")


def make_run_folder(out: Path, settings: dict[str, Any], runtime: dict[str, Any],
                    origin: dict[str, Any] | None = None) -> dict[str, Any]:
    """Create ``out``; return what config.json records: the settings, where they came from
    (``origin``: preset, method defaults, flags) and the runtime they resolved to."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the run folder ({e.strerror})") from None
    record = {**settings, "runtime": runtime}
    if origin:
        record["origin"] = origin
    return record
