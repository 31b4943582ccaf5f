"""``run_train``: train a genotype's evaluation network from scratch (DARTS protocol, SPEC section 5).

Run folder::

    config.json      every setting used (plus the device and torch version it ran with)
    history.jsonl    one line per epoch: train loss/top-1, test loss/top-1/top-5, lr, drop path, time
    checkpoint.pt    the last completed epoch, or step with --checkpoint-every (weights, optimiser,
                     scheduler, RNG states of every process, data-order position, history)
    checkpoint.prev.pt  the checkpoint before it (a fallback should the newest be unreadable)
    best.pt          the weights of the epoch with the best test top-1 (chosen on the test set: optimistic)
    results.json     final test_top1_error / test_top5_error (%), params_m, mult_adds_m, device_hours
    genotype.json    the genotype trained
    plots/           pictures: the cells and the training curves (SVG and PNG)
    tensorboard/     TensorBoard event files (when the tensorboard package is installed)
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ._io import write_json, write_jsonl
from ._run import StopRequests, diverged, silent, step_hook
from .checkpoint import (describe_position, load_checkpoint, make_run_folder, open_run, reduced_position,
                         resume_run, rng_state, save_checkpoint)
from .distributed import Dist
from .config import TrainConfig
from .data import resolve_workers
from .engine import EpochState, NonFiniteLoss, evaluate, train_one_epoch
from .errors import CheckpointError, ConfigError
from .genotype import Genotype, load_genotype
from .metrics import count_mult_adds, count_parameters
from .network import Network
from .ops import list_ops
from .device import resolve_device
from .dashboard import TensorBoardLog
from .visualize import plot_run_quietly

CHECKPOINT_FORMAT = "msrdarts-train-v1"
RUN_FILES = ("config.json", "history.jsonl", "checkpoint.pt", "checkpoint.prev.pt", "best.pt", "results.json", "genotype.json",
             "plots", "tensorboard")


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
              on_epoch_end: Callable[[int, dict], None] | None = None, log: Callable[[str], None] = print
              ) -> TrainResult:
    """Train (or resume training) ``cfg.genotype`` from scratch into the folder ``out``.

    Under torchrun every process calls this; rank 0 alone writes files and logs.
    """
    cfg.validate()
    dist, device = Dist.start(resolve_device(cfg.device))   # the process group outlives the run
    return _train(cfg, Path(out), resume, on_epoch_end, log if dist.main else silent, dist, device)


def _train(cfg: TrainConfig, out: Path, resume: bool, on_epoch_end: Callable[[int, dict], None] | None,
           log: Callable[[str], None], dist: Dist, device: torch.device) -> TrainResult:
    dist.per_rank_batch(cfg.batch_size)
    ckpt = open_run(out, resume, RUN_FILES, CHECKPOINT_FORMAT, cfg, log)
    if ckpt is None:
        genotype = load_genotype(cfg.genotype, primitives=list_ops())
    else:  # the architecture the run trained, whatever --genotype points at now
        genotype = Genotype.from_dict(ckpt["genotype"], list_ops(), source=f"{out}/checkpoint.pt: genotype")
        try:
            now = load_genotype(cfg.genotype, primitives=list_ops())
        except ConfigError:
            now = genotype  # the file may have moved; the checkpoint is the record
        if now != genotype:
            raise CheckpointError(f"--resume: {cfg.genotype} no longer holds the genotype this run trained "
                                  f"({out}/genotype.json does)")
    dist.barrier()   # every rank has looked at the folder before rank 0 writes to it

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with dist.main_first():   # rank 0 downloads (if asked) before the others read
        data = cfg.load_data(progress=cfg.progress and dist.main)
    net = Network(genotype, data.num_classes, cfg.layers, cfg.channels, stem=data.stem,
                  in_channels=data.in_channels, input_size=data.input_size,
                  auxiliary=cfg.auxiliary_weight > 0)   # identical on every rank (same seed)
    if dist.active:   # drop path draws its own masks on each rank
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)
    accel = cfg.accel(device)
    net = accel.prepare_model(net)
    params_m = count_parameters(net) / 1e6
    mult_adds_m = count_mult_adds(net, data.in_channels, data.input_size) / 1e6
    model = dist.wrap(net, sync_bn=cfg.sync_bn)
    net = getattr(model, "module", net)   # SyncBatchNorm conversion makes a new module tree
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    workers = resolve_workers(cfg.workers)
    shard = {"rank": dist.rank, "world": dist.world}
    train_loader = data.loader("train", cfg.batch_size, device, augment=True, shuffle=True, cutout=cfg.cutout,
                               drop_last=len(data.train_labels) > cfg.batch_size, generator=loader_gen,
                               workers=workers, **shard)
    test_loader = data.loader("test", cfg.batch_size, device, workers=workers, **shard)
    optimizer = torch.optim.SGD(model.parameters(), cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    criterion = auxiliary_criterion(cfg.auxiliary_weight, cfg.label_smoothing)

    history, best, start_epoch, resume_state, last_saved = resume_run(
        ckpt, out, device, net, optimizer, scheduler, loader_gen, cfg, dist, log)
    train_seconds = ckpt["train_seconds"] if ckpt is not None else 0.0
    run_config = make_run_folder(out, device, cfg, dist.world) if dist.main else {}
    log(f"training {cfg.genotype}: {params_m:.3f}M parameters, {mult_adds_m:.1f}M mult-adds"
        + (f"; {dist.world} processes, {cfg.batch_size // dist.world} images each per step" if dist.active else ""))

    def save(epoch_done: int, state: EpochState | None, seconds: float) -> None:
        """Checkpoint after ``epoch_done`` epochs (plus ``state``'s steps of the next one)."""
        nonlocal last_saved
        position = reduced_position(state, dist)
        rngs = dist.gather(rng_state(device, {"loader": loader_gen}))
        if dist.main:
            save_checkpoint(out / "checkpoint.pt", {
                "format": CHECKPOINT_FORMAT, "epoch": epoch_done, "position": position, "config": cfg.to_dict(),
                "genotype": genotype.to_dict(), "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rngs[0], "rng_ranks": rngs, "history": history,
                "best": best, "train_seconds": seconds,
            }, keep_previous=True)
            write_json(out / "config.json", run_config)
            write_jsonl(out / "history.jsonl", history)
            genotype.save(out / "genotype.json")
        last_saved = describe_position(epoch_done, state)

    forward = accel.forward_fn(model, log)
    eval_forward = None if dist.active else forward   # ranks evaluate the unwrapped network
    hint = f"msrdarts train --out {out} --resume"
    tb = TensorBoardLog(out, cfg.tensorboard and dist.main, log, resume_epoch=start_epoch)
    with StopRequests() as stops, contextlib.closing(tb):
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            state, resume_state = resume_state, None
            if state is None:
                state = EpochState(train_loader.draw_epoch_seed())
            lr = optimizer.param_groups[0]["lr"]
            drop = cfg.drop_path * epoch / cfg.epochs   # DARTS: linear ramp from 0
            net.set_drop_path(drop)
            tag = f"epoch {epoch + 1}/{cfg.epochs}"
            done_before = train_seconds
            on_step = step_hook(dist, stops, cfg.checkpoint_every, len(train_loader),
                                lambda st, e=epoch: save(e, st, done_before + st.time_s), hint)
            try:
                tr = train_one_epoch(model, train_loader, optimizer, device, cfg.grad_clip, desc=tag,
                                     progress=cfg.progress and dist.main, criterion=criterion, accel=accel,
                                     forward=forward, state=state, on_step=on_step, reduce=dist.sum)
            except NonFiniteLoss as e:
                raise diverged(e, last_saved, out, "train", cfg.lr) from None
            dist.sync_buffers(net)   # rank 0's BN statistics everywhere
            te = evaluate(net, test_loader, device, desc=f"{tag} test", progress=cfg.progress and dist.main,
                          accel=accel, forward=eval_forward, reduce=dist.sum)
            scheduler.step()
            elapsed = time.perf_counter() - t0
            train_seconds += elapsed
            record = {"epoch": epoch + 1, "lr": lr, "drop_path": drop, "train_loss": tr["loss"],
                      "train_acc": tr["acc"], "test_loss": te["loss"], "test_acc": te["acc"],
                      "test_acc5": te["acc5"], "train_images_per_s": tr["images_per_s"], "epoch_time_s": elapsed}
            history.append(record)
            if best is None or te["acc"] > best["test_acc"]:
                best = {"epoch": epoch + 1, "test_acc": te["acc"]}
                if dist.main:
                    save_checkpoint(out / "best.pt", {"format": CHECKPOINT_FORMAT + "-weights", "epoch": epoch + 1,
                                                      "config": cfg.to_dict(), "genotype": genotype.to_dict(),
                                                      "model": net.state_dict()})
            save(epoch + 1, None, train_seconds)
            tb.epoch(record)
            log(f"{tag}: train loss {tr['loss']:.4f} acc {tr['acc']:.2f}% | test loss {te['loss']:.4f} "
                f"top-1 {te['acc']:.2f}% top-5 {te['acc5']:.2f}% | lr {lr:.5f} | {elapsed:.1f}s | "
                f"{tr['images_per_s']:.0f} img/s")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)

    last = history[-1]
    results = {  # final-epoch figures, as the papers report them
        "test_top1_error": round(100.0 - last["test_acc"], 4), "test_top5_error": round(100.0 - last["test_acc5"], 4),
        "test_loss": round(last["test_loss"], 6),
        "params_m": round(params_m, 4), "mult_adds_m": round(mult_adds_m, 2), "input_size": data.input_size,
        # wall time of training and per-epoch testing, times the number of devices
        "device_hours": round(train_seconds * dist.world / 3600.0, 5), "devices": dist.world, "device": str(device),
        "epochs": cfg.epochs, "dataset": cfg.dataset, "genotype": genotype.to_dict(),
        # best.pt is chosen on test accuracy: an optimistic figure, for inspection only
        "best_pt_epoch": best["epoch"],
    }
    if dist.main:
        write_json(out / "results.json", results)
        if cfg.plots:
            plot_run_quietly(out, log)
    dist.barrier()   # rank 0's files are complete before any rank returns (a next step may read them)
    log(f"test top-1 error {results['test_top1_error']:.2f}% (top-5 {results['test_top5_error']:.2f}%), "
        f"{results['params_m']}M parameters; results in {out}/results.json")
    return TrainResult(results, history, out)


def evaluate_checkpoint(path: str | Path, data_root: str | None = None, device: str = "auto",
                        progress: bool = True) -> dict[str, Any]:
    """Rebuild the network stored in a train checkpoint (best.pt or checkpoint.pt) and test it."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    if not str(ckpt.get("format", "")).startswith(CHECKPOINT_FORMAT):
        raise CheckpointError(f"{path}: not a training checkpoint (format {ckpt.get('format')!r})")
    cfg = TrainConfig.from_dict(ckpt["config"], source=str(path))
    genotype = Genotype.from_dict(ckpt["genotype"], list_ops(), source=f"{path}: genotype")
    dev = resolve_device(device)
    data = cfg.load_data(root=data_root, download=False, progress=progress)
    model = Network(genotype, data.num_classes, cfg.layers, cfg.channels, stem=data.stem,
                    in_channels=data.in_channels, input_size=data.input_size, auxiliary=cfg.auxiliary_weight > 0)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match the stored architecture "
                              f"({str(e).splitlines()[0][:200]})") from None
    model.to(dev)
    te = evaluate(model, data.loader("test", cfg.batch_size, dev, workers=resolve_workers(cfg.workers)), dev,
                  desc="test", progress=progress)
    return {"checkpoint": str(path), "epoch": ckpt["epoch"], "test_top1_error": round(100.0 - te["acc"], 4),
            "test_top5_error": round(100.0 - te["acc5"], 4), "params_m": round(count_parameters(model) / 1e6, 4),
            "mult_adds_m": round(count_mult_adds(model, data.in_channels, data.input_size) / 1e6, 2)}
