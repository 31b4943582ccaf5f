"""TensorBoard logging of search and training runs (``--tensorboard``, on by default).

Event files go to ``RUN/tensorboard/``; watch a run live with ``tensorboard --logdir RUN``. Per
epoch: losses and accuracies (``loss/train``, ``accuracy/valid``, ...), the learning rate,
throughput and epoch time; for a search also every (edge, op) score
(``stable_rank/normal/0->2/sep_conv_3x3``, or ``alpha/...`` for DARTS) and the derived genotype
as text. The ``tensorboard`` package is optional: without it nothing is written and the run
says so once. On resume, events at or after the resumed epoch are purged, so a rerun epoch is
not drawn twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..genotype import Genotype
from ..runs.folder import TENSORBOARD

_SPLITS = ("train", "valid", "test")
_RENAME = {"acc": "accuracy", "acc5": "accuracy_top5"}


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one history record by TensorBoard tag (the epoch is the step, not a scalar)."""
    tags: dict[str, float] = {}
    for key, value in record.items():
        if key == "epoch" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        split, _, metric = key.partition("_")
        if split in _SPLITS and metric in ("loss", "acc", "acc5"):
            tags[f"{_RENAME.get(metric, metric)}/{split}"] = float(value)
        elif key == "train_images_per_s":
            tags["throughput/train_images_per_s"] = float(value)
        else:
            tags[f"run/{key}"] = float(value)
    for kind in ("stable_rank", "alpha"):
        if kind in record:
            table = record[kind]
            for cell in ("normal", "reduce"):
                for (src, dst), row in zip(table["edges"], table[cell]):
                    for op, value in zip(table["ops"], row):
                        tags[f"{kind}/{cell}/{src}->{dst}/{op}"] = float(value)
    return tags


class TensorBoardLog:
    """Writes history records as TensorBoard events; a no-op when disabled or not installed."""

    def __init__(self, folder: Path, enabled: bool, log: Callable[[str], None] = print, resume_epoch: int = 0):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("TensorBoard logging is off: the tensorboard package is not installed (pip install tensorboard)")
            return
        self.writer = SummaryWriter(str(folder / TENSORBOARD), purge_step=resume_epoch + 1 if resume_epoch else None)

    def epoch(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(record["epoch"])
        for tag, value in scalar_tags(record).items():
            self.writer.add_scalar(tag, value, step)
        if "genotype" in record:
            self.writer.add_text("genotype", f"`{Genotype.from_dict(record['genotype'])}`", step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
