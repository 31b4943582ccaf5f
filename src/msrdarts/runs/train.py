"""``run_train``: train a genotype's evaluation network from scratch (DARTS protocol, SPEC section 5).

What a training adds to the shared loop (:mod:`msrdarts.runs.loop`): the evaluation network of
the genotype (auxiliary head, drop path ramped linearly from 0), its learning-rate schedule
(warm-up, cosine or step), test evaluation after each epoch, ``best.pt`` and ``results.json``.
The run folder is described in :mod:`msrdarts.runs.folder`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .._io import write_json
from ..config import TrainConfig
from ..data import resolve_workers
from ..device import resolve_device, sgd
from ..errors import CheckpointError, ConfigError, first_line
from ..genotype import genotype_from_dict
from ..nn.metrics import count_mult_adds, count_parameters
from ..nn.network import Network, cell_specs
from ..nn.ops import list_ops
from ..zoo import load_genotype
from . import folder as F
from .checkpoint import load_checkpoint, save_checkpoint
from .epoch import evaluate
from .loop import EpochRun, load_run_data

CHECKPOINT_FORMAT = "msrdarts-train-v1"


@dataclass
class TrainResult:
    results: dict[str, Any]
    history: list[dict]
    out: Path


def auxiliary_criterion(weight: float, label_smoothing: float = 0.0
                        ) -> Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Cross entropy of the logits plus ``weight`` times that of the auxiliary logits (DARTS)."""

    def criterion(output: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, aux = output
        loss = nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if aux is not None and weight > 0:
            loss = loss + weight * nn.functional.cross_entropy(aux, y, label_smoothing=label_smoothing)
        return loss, logits

    return criterion


def lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """Learning rate of epoch e as a multiple of --lr: linear warm-up, then cosine to --lr-min or x0.97 steps."""

    def factor(epoch: int) -> float:
        if epoch < cfg.warmup_epochs:
            return (epoch + 1) / cfg.warmup_epochs
        e, n = epoch - cfg.warmup_epochs, cfg.epochs - cfg.warmup_epochs
        if cfg.schedule == "step":
            return 0.97 ** e
        floor = cfg.lr_min / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * e / n))

    return factor


def run_train(cfg: TrainConfig, out: str | Path, resume: bool = False,
              on_epoch_end: Callable[[int, dict], None] | None = None, log: Callable[[str], None] = print,
              origin: dict[str, Any] | None = None) -> TrainResult:
    """Train (or resume training) ``cfg.genotype`` from scratch into the folder ``out``.

    Under torchrun every process calls this; rank 0 alone writes files and logs.
    """
    return TrainRun.start(cfg, out, resume, on_epoch_end, log, origin)


class TrainRun(EpochRun):
    kind = "train"
    checkpoint_format = CHECKPOINT_FORMAT
    files = F.TRAIN_FILES

    def opened(self, ckpt: dict[str, Any] | None) -> None:
        cfg, out = self.cfg, self.out
        if ckpt is None:
            self.genotype = load_genotype(cfg.genotype, primitives=list_ops())
            cell_specs(self.genotype, cfg.layers)   # a per-cell genotype must fit --layers: say so before any work
            return
        # the architecture the run trained, whatever --genotype points at now
        self.genotype = genotype_from_dict(ckpt["genotype"], list_ops(), source=f"{out / F.CHECKPOINT}: genotype")
        try:
            now = load_genotype(cfg.genotype, primitives=list_ops())
        except ConfigError:
            now = self.genotype  # the file may have moved; the checkpoint is the record
        if now != self.genotype:
            raise CheckpointError(f"--resume: {cfg.genotype} no longer holds the genotype this run trained "
                                  f"({out / F.GENOTYPE} does)")

    def build(self, data: Any) -> tuple[nn.Module, nn.Module]:
        cfg, dist = self.cfg, self.dist
        net = Network(self.genotype, data.num_classes, cfg.layers, cfg.channels, stem=data.stem,
                      in_channels=data.in_channels, input_size=data.input_size,
                      auxiliary=cfg.auxiliary_weight > 0, impl=cfg.impl)   # identical on every rank (same seed)
        if dist.active:   # drop path draws its own masks on each rank
            torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)
        net = self.accel.prepare_model(net)
        self.params_m = count_parameters(net) / 1e6
        self.mult_adds_m = count_mult_adds(net, data.in_channels, data.input_size) / 1e6
        model = dist.wrap(net, sync_bn=cfg.sync_bn)
        return getattr(model, "module", net), model   # SyncBatchNorm conversion makes a new module tree

    def cpu_channels_last(self) -> bool:
        return self.cfg.impl != "reference"

    def setup(self, data: Any, loader_gen: torch.Generator, workers: int) -> None:
        cfg, device = self.cfg, self.device
        self.train_loader = data.loader("train", cfg.batch_size, device, augment=True, shuffle=True, cutout=cfg.cutout,
                                        drop_last=len(data.train_labels) > cfg.batch_size, generator=loader_gen,
                                        workers=workers, **self.shard)
        self.test_loader = data.loader("test", cfg.batch_size, device, workers=workers, **self.shard)
        self.optimizer = sgd(self.model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(cfg))
        self.criterion = auxiliary_criterion(cfg.auxiliary_weight, cfg.label_smoothing)

    def restored(self, ckpt: dict[str, Any] | None) -> None:
        cfg, dist = self.cfg, self.dist
        layout = "channels_last" if self.accel.channels_last else "NCHW"
        self.log(f"training {cfg.genotype}: {self.params_m:.3f}M parameters, {self.mult_adds_m:.1f}M mult-adds, "
                 f"{self.net.impl} network in {layout}" + dist.describe(cfg.batch_size))

    def begin_epoch(self, epoch: int, fresh: bool) -> None:
        self.drop = self.cfg.drop_path * epoch / self.cfg.epochs   # DARTS: linear ramp from 0
        self.net.set_drop_path(self.drop)

    def train_hooks(self, state: Any) -> dict[str, Any]:
        return {"criterion": self.criterion}

    def evaluate(self, tag: str) -> dict[str, float]:
        self.dist.sync_buffers(self.net)   # rank 0's BN statistics everywhere
        return evaluate(self.net, self.test_loader, self.device, desc=f"{tag} test", progress=self.bars,
                        accel=self.accel, forward=self.eval_forward, reduce=self.dist.sum)

    def record(self, epoch: int, lr: float, tr: dict[str, float], ev: dict[str, float], t0: float) -> dict:
        return {"epoch": epoch + 1, "lr": lr, "drop_path": self.drop, "train_loss": tr["loss"],
                "train_acc": tr["acc"], "test_loss": ev["loss"], "test_acc": ev["acc"],
                "test_acc5": ev["acc5"], "train_images_per_s": tr["images_per_s"],
                "epoch_time_s": time.perf_counter() - t0}

    def new_best(self, record: dict) -> None:
        if self.dist.main:
            save_checkpoint(self.out / F.BEST_WEIGHTS, {
                "format": CHECKPOINT_FORMAT + "-weights", "epoch": record["epoch"], "config": self.cfg.to_dict(),
                "genotype": self.genotype.to_dict(), "model": self.net.state_dict()})

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"genotype": self.genotype.to_dict()}

    def write_files(self) -> None:
        self.genotype.save(self.out / F.GENOTYPE)

    def epoch_line(self, tag: str, tr: dict[str, float], ev: dict[str, float], lr: float, record: dict) -> str:
        return (f"{tag}: train loss {tr['loss']:.4f} acc {tr['acc']:.2f}% | test loss {ev['loss']:.4f} "
                f"top-1 {ev['acc']:.2f}% top-5 {ev['acc5']:.2f}% | lr {lr:.5f} | {record['epoch_time_s']:.1f}s | "
                f"{tr['images_per_s']:.0f} img/s")

    def finish(self) -> TrainResult:
        last, data, dist = self.history[-1], self.data, self.dist
        results = {  # final-epoch figures, as the papers report them
            "test_top1_error": round(100.0 - last["test_acc"], 4),
            "test_top5_error": round(100.0 - last["test_acc5"], 4),
            "test_loss": round(last["test_loss"], 6),
            "params_m": round(self.params_m, 4), "mult_adds_m": round(self.mult_adds_m, 2),
            "input_size": data.input_size,
            # wall time of training and per-epoch testing, times the number of devices
            "device_hours": round(self.seconds * dist.world / 3600.0, 5), "devices": dist.world,
            "device": str(self.device), "epochs": self.cfg.epochs, "dataset": self.cfg.dataset,
            "genotype": self.genotype.to_dict(),
            # best.pt is chosen on test accuracy: an optimistic figure, for inspection only
            "best_pt_epoch": self.best["epoch"],
        }
        if dist.main:
            write_json(self.out / F.RESULTS, results)
        return TrainResult(results, self.history, self.out)

    def summary(self, result: TrainResult) -> None:
        r = result.results
        self.log(f"test top-1 error {r['test_top1_error']:.2f}% (top-5 {r['test_top5_error']:.2f}%), "
                 f"{r['params_m']}M parameters; results in {self.out / F.RESULTS}")


def evaluate_checkpoint(path: str | Path, data_root: str | None = None, device: str = "auto",
                        progress: bool = True) -> dict[str, Any]:
    """Rebuild the network stored in a train checkpoint (best.pt or checkpoint.pt) and test it."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    if not str(ckpt.get("format", "")).startswith(CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path}: not a training checkpoint (format {ckpt.get('format')!r})")
    cfg = TrainConfig.from_dict(ckpt["config"], source=str(path))
    genotype = genotype_from_dict(ckpt["genotype"], list_ops(), source=f"{path}: genotype")
    dev = resolve_device(device)
    data = load_run_data(cfg, root=data_root, download=False, progress=progress)
    model = Network(genotype, data.num_classes, cfg.layers, cfg.channels, stem=data.stem,
                    in_channels=data.in_channels, input_size=data.input_size, auxiliary=cfg.auxiliary_weight > 0)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the stored architecture "
                              f"({first_line(e)})") from None
    model.to(dev)
    te = evaluate(model, data.loader("test", cfg.batch_size, dev, workers=resolve_workers(cfg.workers)), dev,
                  desc="test", progress=progress)
    return {"checkpoint": str(path), "epoch": ckpt["epoch"], "test_top1_error": round(100.0 - te["acc"], 4),
            "test_top5_error": round(100.0 - te["acc5"], 4), "params_m": round(count_parameters(model) / 1e6, 4),
            "mult_adds_m": round(count_mult_adds(model, data.in_channels, data.input_size) / 1e6, 2)}
