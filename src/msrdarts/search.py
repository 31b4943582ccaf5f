"""``run_search``: train the supernet weights and read the architecture off them (SPEC sections 2-5).

Run folder::

    config.json      every setting used
    history.jsonl    one line per epoch: losses, accuracies, lr, that epoch's genotype and the
                     per-cell-type mean stable rank of every (edge, op)
    genotype.json    the genotype of the epoch with the lowest validation error
    checkpoint.pt    the last completed epoch, or step with --checkpoint-every (weights, optimiser,
                     scheduler, RNG states of every process, data-order position, history)
    checkpoint.prev.pt  the checkpoint before it (a fallback should the newest be unreadable)
    plots/           pictures: cells, stable-rank heatmap and trajectories, curves (SVG and PNG)
    tensorboard/     TensorBoard event files (when the tensorboard package is installed)

The checkpoint is the source of truth: history.jsonl and genotype.json are rewritten from it, so
a run killed between two writes resumes consistently.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ._io import write_json, write_jsonl
from .checkpoint import (describe_position, make_run_folder, open_run, reduced_position, resume_run, rng_state,
                         save_checkpoint)
from .config import SearchConfig
from .darts import Architect
from .dashboard import TensorBoardLog
from .data import StreamData, derived_seed, resolve_workers, search_split, subset_split
from .derive import edge_index
from ._run import StopRequests, diverged, silent, step_hook
from .device import resolve_device
from .distributed import Dist
from .engine import EpochState, NonFiniteLoss, evaluate, recalibrate_bn, train_one_epoch
from .errors import CheckpointError
from .genotype import Genotype
from .supernet import SuperNet
from .visualize import plot_run_quietly

CHECKPOINT_FORMAT = "msrdarts-search-v1"
RUN_FILES = ("config.json", "history.jsonl", "genotype.json", "checkpoint.pt", "checkpoint.prev.pt", "plots",
             "tensorboard")


@dataclass
class SearchResult:
    genotype: Genotype
    best_epoch: int
    best_valid_acc: float
    history: list[dict]
    out: Path


def build_supernet(cfg: SearchConfig, data: Any) -> SuperNet:
    net = SuperNet(data.num_classes, cfg.layers, cfg.channels, data.input_size, stem=data.stem,
                   primitives=cfg.ops, mixing="alpha" if cfg.method == "darts" else cfg.mixing,
                   in_channels=data.in_channels, spectral_norm=cfg.spectral_norm, sn_iterations=cfg.sn_iterations,
                   impl=cfg.impl, compile_kernels=cfg.compile != "off")
    for a in net.arch_parameters():   # trained by the Architect's own steps only (msrdarts.darts)
        a.requires_grad_(False)
    return net


def arch_batches(loader: Any, epoch_seed: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """DARTS's search-valid batches for the architecture steps of one epoch, from batch ``start``:
    passes over ``loader`` with seeds derived from the epoch's, as many as the epoch needs."""
    n = len(loader)
    p, k = divmod(start, n)
    while True:
        yield from loader.batches(derived_seed(epoch_seed, (1 << 40) + p), k)
        p, k = p + 1, 0


def _rank_options(cfg: SearchConfig) -> dict[str, bool]:
    return {"resolution_normalized": cfg.rank_per_pixel, "authors_quirk": cfg.authors_reduce_resolution}


def run_search(cfg: SearchConfig, out: str | Path, resume: bool = False,
               on_epoch_end: Callable[[int, dict], None] | None = None, log: Callable[[str], None] = print
               ) -> SearchResult:
    """Run (or resume) an MSR-DARTS search into the folder ``out``.

    ``on_epoch_end(epoch, record)`` is called after each epoch's files are written. Under torchrun
    every process calls this; rank 0 alone writes files and logs (see :mod:`msrdarts.distributed`).
    """
    cfg.validate()
    dist, device = Dist.start(resolve_device(cfg.device))   # the process group outlives the run
    return _search(cfg, Path(out), resume, on_epoch_end, log if dist.main else silent, dist, device)


def _search(cfg: SearchConfig, out: Path, resume: bool, on_epoch_end: Callable[[int, dict], None] | None,
            log: Callable[[str], None], dist: Dist, device: torch.device) -> SearchResult:
    dist.per_rank_batch(cfg.batch_size)
    ckpt = open_run(out, resume, RUN_FILES, CHECKPOINT_FORMAT, cfg, log)
    dist.barrier()   # every rank has looked at the folder before rank 0 writes to it

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    with dist.main_first():   # rank 0 downloads (if asked) before the others read
        data = cfg.load_data(progress=cfg.progress and dist.main)
    if cfg.subset:  # class-balanced samples (ImageNet-scale search)
        train_idx, valid_idx = subset_split(data.train_labels, cfg.subset, cfg.subset_valid, cfg.split_seed)
    else:
        train_idx, valid_idx = search_split(len(data.train_labels), cfg.train_portion, cfg.split_seed)
    log(f"{cfg.dataset}: {len(train_idx)} search-train / {len(valid_idx)} search-valid images, "
        f"{data.input_size} px, {'streamed' if isinstance(data, StreamData) else 'in memory'}"
        + (f"; {dist.world} processes, {cfg.batch_size // dist.world} images each per step" if dist.active else ""))
    accel = cfg.accel(device)
    net = accel.prepare_model(build_supernet(cfg, data))   # identical on every rank (same seed)
    model = dist.wrap(net)
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    workers = resolve_workers(cfg.workers)
    shard = {"rank": dist.rank, "world": dist.world}
    train_loader = data.loader("train", cfg.batch_size, device, indices=train_idx, augment=True, shuffle=True,
                               drop_last=len(train_idx) > cfg.batch_size, generator=loader_gen, workers=workers,
                               **shard)
    valid_loader = data.loader("train", cfg.batch_size, device, indices=valid_idx, workers=workers, **shard)
    # Fixed, unaugmented search-train batches for BN recalibration (touches no RNG), the same on every rank.
    bn_loader = data.loader("train", cfg.batch_size, device, indices=train_idx, workers=workers)
    optimizer = torch.optim.SGD(net.weight_parameters(), cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs, eta_min=cfg.lr_min)
    architect, arch_loader = None, None
    if cfg.method == "darts":   # alphas: Adam on search-valid batches, augmented and shuffled as DARTS's
        architect = Architect(net, optimizer, cfg.arch_lr, cfg.arch_weight_decay, cfg.order,
                              reduce_grads=(lambda g: dist.sum(g) / dist.world) if dist.active else None)
        arch_loader = data.loader("train", cfg.batch_size, device, indices=valid_idx, augment=True, shuffle=True,
                                  drop_last=len(valid_idx) > cfg.batch_size, workers=workers, **shard)

    history, best, start_epoch, resume_state, last_saved = resume_run(
        ckpt, out, device, net, optimizer, scheduler, loader_gen, cfg, dist, log)
    if ckpt is not None and architect is not None:
        architect.optimizer.load_state_dict(ckpt["arch_optimizer"])
    run_config = make_run_folder(out, device, cfg, dist.world) if dist.main else {}
    if ckpt is not None and dist.main:
        _write_derived(out, run_config, history, best)

    def save(epoch_done: int, state: EpochState | None) -> None:
        """Checkpoint after ``epoch_done`` epochs (plus ``state``'s steps of the next one)."""
        nonlocal last_saved
        position = reduced_position(state, dist)
        rngs = dist.gather(rng_state(device, {"loader": loader_gen}))
        if dist.main:
            save_checkpoint(out / "checkpoint.pt", {
                "format": CHECKPOINT_FORMAT, "epoch": epoch_done, "position": position, "config": cfg.to_dict(),
                "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rngs[0], "rng_ranks": rngs, "history": history, "best": best,
                "arch_optimizer": architect.optimizer.state_dict() if architect is not None else None,
            }, keep_previous=True)
            _write_derived(out, run_config, history, best)  # files a crash before epoch 1 never leaves
        last_saved = describe_position(epoch_done, state)

    ranks = _rank_options(cfg)

    def refresh_sn(step: int) -> None:
        if cfg.spectral_norm and step % cfg.sn_refresh_every == 0:
            net.refresh_spectral_norms()


    forward = accel.forward_fn(model, log)
    eval_forward = None if dist.active else forward   # ranks evaluate the unwrapped network
    edges = [list(e) for e in edge_index(net.steps)]
    hint = f"msrdarts search --out {out} --resume"
    tb = TensorBoardLog(out, cfg.tensorboard and dist.main, log, resume_epoch=start_epoch)
    with StopRequests() as stops, contextlib.closing(tb):
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            state, resume_state = resume_state, None
            if state is None:   # a fresh epoch (a resumed one keeps the mixing weights it started with)
                if cfg.mixing == "srsoftmax":  # the authors' raw ranks (per-pixel ranks would soften the softmax)
                    net.refresh_mixing(authors_quirk=cfg.authors_reduce_resolution)
                state = EpochState(train_loader.draw_epoch_seed())
            lr = optimizer.param_groups[0]["lr"]
            tag = f"epoch {epoch + 1}/{cfg.epochs}"
            on_step = step_hook(dist, stops, cfg.checkpoint_every, len(train_loader),
                                lambda st, e=epoch: save(e, st), hint)
            arch_step = None if architect is None else \
                _arch_stepper(architect, arch_batches(arch_loader, state.epoch_seed, state.step), accel)
            try:
                tr = train_one_epoch(model, train_loader, optimizer, device, cfg.grad_clip, desc=tag,
                                     progress=cfg.progress and dist.main, after_step=refresh_sn, accel=accel,
                                     forward=forward, state=state, on_step=on_step, reduce=dist.sum,
                                     before_step=arch_step)
            except NonFiniteLoss as e:
                raise diverged(e, last_saved, out, "search", cfg.lr) from None
            dist.sync_buffers(net)   # rank 0's power-iteration vectors everywhere
            recalibrate_bn(net, bn_loader, cfg.bn_recalibration, accel=accel)
            dist.sync_buffers(net)   # bitwise-identical BN statistics on every rank
            va = evaluate(net, valid_loader, device, desc=f"{tag} valid", progress=cfg.progress and dist.main,
                          accel=accel, forward=eval_forward, reduce=dist.sum)
            scheduler.step()
            if architect is None:
                table = net.stable_rank_table(**ranks).cpu()
                geno = net.genotype(table=table)
            else:
                table, geno = net.alpha_table().cpu(), net.alpha_genotype()
            dist.agree("genotype", str(geno))
            record = {
                "epoch": epoch + 1, "lr": lr,
                "train_loss": tr["loss"], "train_acc": tr["acc"], "valid_loss": va["loss"], "valid_acc": va["acc"],
                "train_images_per_s": tr["images_per_s"], "epoch_time_s": time.perf_counter() - t0,
                "genotype": geno.to_dict(),
                # MSR-DARTS: mean stable rank per (edge, op), lower wins; DARTS: softmax(alpha), higher wins
                "stable_rank" if architect is None else "alpha": {
                    "ops": list(net.primitives), "edges": edges, "normal": table[0].tolist(),
                    "reduce": table[1].tolist()},
            }
            history.append(record)
            if best is None or va["acc"] > best["valid_acc"]:  # lowest validation error; ties keep the earlier
                best = {"epoch": epoch + 1, "valid_acc": va["acc"], "genotype": geno.to_dict()}
            save(epoch + 1, None)
            tb.epoch(record)
            log(f"{tag}: train loss {tr['loss']:.4f} acc {tr['acc']:.2f}% | valid loss {va['loss']:.4f} "
                f"acc {va['acc']:.2f}% | lr {lr:.5f} | {record['epoch_time_s']:.1f}s | "
                f"{tr['images_per_s']:.0f} img/s")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)

    if best is None:
        raise CheckpointError(f"{out}: no completed epoch to derive a genotype from")
    genotype = Genotype.from_dict(best["genotype"])
    if dist.main and cfg.plots:
        plot_run_quietly(out, log)
    dist.barrier()   # rank 0's files are complete before any rank returns (a next step may read them)
    log(f"genotype (epoch {best['epoch']}, valid acc {best['valid_acc']:.2f}%): {genotype}")
    if dist.active:
        log(f"all {dist.world} processes derived this genotype")
    log(f"results in {out}/ (genotype.json, history.jsonl, checkpoint.pt{', plots/' if cfg.plots else ''}); "
        f"a page with all of it: msrdarts report {out} --out report.html")
    return SearchResult(genotype, best["epoch"], best["valid_acc"], history, out)


def _arch_stepper(architect: Architect, valid_batches: Iterator, accel: Any
                  ) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
    """The ``before_step`` of a DARTS epoch: one architecture step on the next search-valid batch."""
    def step(_: int, x: torch.Tensor, y: torch.Tensor) -> None:
        xv, yv = next(valid_batches)
        with accel.autocast():
            architect.step(x, y, accel.input(xv), yv)
    return step


def _write_derived(out: Path, run_config: dict, history: list[dict], best: dict | None) -> None:
    """Rewrite the run folder's JSON files from the checkpointed state."""
    write_json(out / "config.json", run_config)
    write_jsonl(out / "history.jsonl", history)
    if best is not None:
        Genotype.from_dict(best["genotype"]).save(out / "genotype.json")


def read_history(out: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "history.jsonl").read_text().splitlines() if line.strip()]
