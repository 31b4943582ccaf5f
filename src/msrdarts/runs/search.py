"""``run_search``: train the supernet weights and read the architecture off them (SPEC sections 2-5).

What a search adds to the shared loop (:mod:`msrdarts.runs.loop`): the search-train /
search-valid split, the supernet adapted by the chosen method (:mod:`msrdarts.methods`), the
periodic spectral-norm refresh, BN recalibration and search-valid evaluation after each epoch,
and the genotype the method derives. The run folder is described in :mod:`msrdarts.runs.folder`;
the checkpoint is the source of truth: history.jsonl and genotype.json are rewritten from it, so a
run killed between two writes resumes consistently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..config import SearchConfig
from ..data import StreamData, derived_seed, search_split, subset_split
from ..device import sgd
from ..errors import CheckpointError, first_line
from ..genotype import CellGenotypes, Genotype, edge_index, genotype_from_dict
from ..methods import Method, SearchContext, get_method
from ..nn.supernet import SuperNet
from . import folder as F
from .epoch import evaluate, recalibrate_bn
from .loop import EpochRun
from .memory import auto_recompute_depthwise

CHECKPOINT_FORMAT = "msrdarts-search-v1"


@dataclass
class SearchResult:
    genotype: Genotype
    best_epoch: int
    best_valid_acc: float
    history: list[dict]
    out: Path
    cells: CellGenotypes | None = None   # one genotype per cell, at the same epoch (MSR-DARTS)


def build_supernet(cfg: SearchConfig, data: Any) -> SuperNet:
    """The supernet of ``cfg`` for ``data``, with the method's own options (not yet adapted by it)."""
    return SuperNet(data.num_classes, cfg.layers, cfg.channels, data.input_size, stem=data.stem,
                    primitives=cfg.ops, in_channels=data.in_channels, spectral_norm=cfg.spectral_norm,
                    sn_iterations=cfg.sn_iterations, impl=cfg.impl, compile_kernels=cfg.compile != "off",
                    checkpoint_cells=cfg.checkpoint_cells, recompute_depthwise=cfg.recompute_depthwise == "on",
                    **get_method(cfg.method).supernet_options(cfg))


def arch_batches(loader: Any, epoch_seed: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """DARTS's search-valid batches for the architecture steps of one epoch, from batch ``start``:
    passes over ``loader`` with seeds derived from the epoch's, as many as the epoch needs."""
    n = len(loader)
    p, k = divmod(start, n)
    while True:
        yield from loader.batches(derived_seed(epoch_seed, (1 << 40) + p), k)
        p, k = p + 1, 0


def run_search(cfg: SearchConfig, out: str | Path, resume: bool = False,
               on_epoch_end: Callable[[int, dict], None] | None = None, log: Callable[[str], None] = print,
               origin: dict[str, Any] | None = None) -> SearchResult:
    """Run (or resume) a search with ``cfg.method`` into the folder ``out``.

    ``on_epoch_end(epoch, record)`` is called after each epoch's files are written. Under torchrun
    every process calls this; rank 0 alone writes files and logs (see :mod:`msrdarts.distributed`).
    ``origin`` (where each setting came from) is recorded in config.json. A method with stages
    (P-DARTS) runs each stage as a search of its own in ``out/stage-K`` (:func:`run_stages`).
    """
    if get_method(cfg.method).stages(cfg) > 1:
        return run_stages(cfg, out, resume, on_epoch_end, log, origin)
    return SearchRun.start(cfg, out, resume, on_epoch_end, log, origin)


def stage_folder(out: Path, stage: int) -> Path:
    return out / f"stage-{stage + 1}"


def run_stages(cfg: SearchConfig, out: str | Path, resume: bool = False,
               on_epoch_end: Callable[[int, dict], None] | None = None, log: Callable[[str], None] = print,
               origin: dict[str, Any] | None = None) -> SearchResult:
    """A search in stages: stage s is a search run in ``out/stage-{s+1}`` with the config
    ``Method.stage_config(cfg, s, last record of stage s)``. Each stage resumes like any run; a
    finished stage is not run again. ``out`` itself holds config.json, the stages' histories in one
    history.jsonl (``stage`` and ``stage_epoch`` in every record, epochs counted over all stages)
    and genotype.json: the last stage's last epoch, as P-DARTS reads it."""
    from ..distributed import Dist
    from ..device import resolve_device

    out = Path(out)
    SearchRun.check(cfg)
    method = get_method(cfg.method)
    n = method.stages(cfg)
    dist, _ = Dist.start(resolve_device(cfg.device))
    if resume:
        if not (out / F.CONFIG).is_file():
            raise CheckpointError(f"--resume: {out / F.CONFIG} not found; nothing to resume")
        from .checkpoint import config_mismatch
        diff = config_mismatch(SearchConfig.from_dict(F.read_json(out / F.CONFIG), source=str(out / F.CONFIG)), cfg)
        if diff:
            raise CheckpointError(f"--resume with changed settings ({'; '.join(diff)})")
    else:
        F.check_run_folder(out, False, (*F.SEARCH_FILES, *(stage_folder(Path(), s).name for s in range(n))))
    dist.barrier()   # every process has checked the folder before the first write
    say = log if dist.main else (lambda message: None)   # rank 0 alone logs
    if dist.main and not resume:
        F.write_config(out, F.make_run_folder(out, cfg.to_dict(), {"stages": n}, origin))
    history: list[dict] = []
    previous = None
    for s in range(n):
        scfg = method.stage_config(cfg, s, previous)
        folder = stage_folder(out, s)
        done = F.read_history(folder) if (folder / F.HISTORY).is_file() else []
        offset = len(history)

        def in_stage(record: dict, s: int = s, offset: int = offset) -> dict:
            return {**record, "epoch": offset + record["epoch"], "stage": s + 1, "stage_epoch": record["epoch"]}

        def stage_epoch_end(epoch: int, record: dict, offset: int = offset, in_stage=in_stage) -> None:
            if on_epoch_end is not None:
                on_epoch_end(offset + epoch, in_stage(record))

        if len(done) < scfg.epochs or not (folder / F.GENOTYPE).is_file():
            say(f"stage {s + 1}/{n}: {scfg.layers} cells" + (
                f", {len(scfg.edge_ops[0][0])} candidate ops per edge" if scfg.edge_ops else "") + f" -> {folder}")
            done = SearchRun.start(scfg, folder, (folder / F.CHECKPOINT).is_file(), stage_epoch_end, log,
                                   origin).history
        history += [in_stage(r) for r in done]
        previous = done[-1]
    final = history[-1]
    genotype = Genotype.from_dict(final["genotype"])
    if dist.main:
        F.write_history(out, history)
        genotype.save(out / F.GENOTYPE)
        if cfg.plots:
            from ..views.plots import plot_run_quietly
            plot_run_quietly(out, log)
        log(f"genotype (stage {n}, last epoch): {genotype}")
        log(f"results in {out}/ (every stage in stage-K/); a page with all of it: msrdarts report {out} "
            f"--out report.html")
    dist.barrier()   # the run's files are written before any process returns
    return SearchResult(genotype, final["epoch"], final["valid_acc"], history, out)


def sn_refresh_due(cfg: SearchConfig, step: int) -> str | None:
    """The search's fixed spectral-norm refresh schedule: after weight step ``step`` (counted from 0
    over the run's epochs, so a resumed run keeps it) "all" convs' refresh after every
    ``sn_refresh_depthwise_every`` steps, else the "pointwise" (1x1) convs' after every
    ``sn_refresh_every`` steps, else None (the drift trigger aside: :func:`refresh_spectral_norms_due`).
    Nothing after the first step: the network converged its vectors when it was built."""
    if not cfg.spectral_norm:
        return None
    if (step + 1) % cfg.sn_refresh_depthwise_every == 0:
        return "all"
    return "pointwise" if (step + 1) % cfg.sn_refresh_every == 0 else None


def refresh_spectral_norms_due(net: SuperNet, cfg: SearchConfig, step: int) -> list[str]:
    """Run the refresh :func:`sn_refresh_due` names, and refresh each bundle of depthwise convs
    (one map size and stride) some of whose weights have drifted by more than ``sn_refresh_drift``
    since its last refresh (the default trigger of the depthwise refreshes: a bundle whose weights
    barely moved keeps its vectors). Returns the names of the bundles refreshed
    (:meth:`msrdarts.nn.supernet.SuperNet.spectral_bundle_names`: "1x1" for the pointwise convs)."""
    due = sn_refresh_due(cfg, step)
    if due == "all":
        net.refresh_spectral_norms()
        return net.spectral_bundle_names()
    names = net.spectral_bundle_names() if cfg.spectral_norm else []
    drifted = net.spectral_drifted(cfg.sn_refresh_drift) if cfg.spectral_norm and cfg.sn_refresh_drift else []
    if due == "pointwise":
        drifted = sorted(set(drifted) | {names.index("1x1")}) if "1x1" in names else drifted
    if drifted:
        net.refresh_spectral_norms(bundles=drifted)
    return [names[k] for k in drifted]


class SearchRun(EpochRun):
    kind = "search"
    checkpoint_format = CHECKPOINT_FORMAT
    files = F.SEARCH_FILES

    @classmethod
    def check(cls, cfg: SearchConfig) -> None:
        cfg.validate()
        get_method(cfg.method).validate(cfg)

    def prepare(self, data: Any) -> None:
        cfg, dist = self.cfg, self.dist
        if cfg.subset:  # class-balanced samples (ImageNet-scale search)
            self.train_idx, self.valid_idx = subset_split(data.train_labels, cfg.subset, cfg.subset_valid,
                                                          cfg.split_seed)
        else:
            self.train_idx, self.valid_idx = search_split(len(data.train_labels), cfg.train_portion, cfg.split_seed)
        self.log(f"{cfg.dataset}: {len(self.train_idx)} search-train / {len(self.valid_idx)} search-valid images, "
                 f"{data.input_size} px, {'streamed' if isinstance(data, StreamData) else 'in memory'}"
                 + dist.describe(cfg.batch_size))

    def build(self, data: Any) -> tuple[nn.Module, nn.Module]:
        self.method: Method = get_method(self.cfg.method)(self.cfg)
        net = build_supernet(self.cfg, data)
        self.method.adapt(net)
        net = self.accel.prepare_model(net)
        if self.cfg.recompute_depthwise == "auto" and not self.cfg.checkpoint_cells:  # checkpointed cells keep less
            resumed = getattr(self, "resumed_recompute", None)
            if resumed is not None:    # a resumed run keeps the step it ran with
                net.set_recompute_depthwise(resumed)
                self.log(f"--recompute-depthwise auto: {'on' if resumed else 'off'}, as the run "
                         f"was checkpointed with")
            else:
                on = auto_recompute_depthwise(net, self.dist.per_rank_batch(self.cfg.batch_size),
                                              (data.in_channels, data.input_size, data.input_size), self.accel, self.log)
                net.set_recompute_depthwise(self.dist.any(on))     # every rank runs the same step
        return net, self.dist.wrap(net)

    def opened(self, ckpt: dict[str, Any] | None) -> None:
        # what --recompute-depthwise auto chose when the run was checkpointed (None: choose now)
        self.resumed_recompute = None if ckpt is None else ckpt.get("recompute_depthwise")

    def setup(self, data: Any, loader_gen: torch.Generator, workers: int) -> None:
        cfg, device, net = self.cfg, self.device, self.net
        train_idx, valid_idx = self.train_idx, self.valid_idx
        self.train_loader = data.loader("train", cfg.batch_size, device, indices=train_idx, augment=True,
                                        shuffle=True, drop_last=len(train_idx) > cfg.batch_size,
                                        generator=loader_gen, workers=workers, **self.shard)
        self.valid_loader = data.loader("train", cfg.batch_size, device, indices=valid_idx, workers=workers,
                                        **self.shard)
        # Fixed, unaugmented search-train batches for BN recalibration (touches no RNG), the same on every rank.
        self.bn_loader = data.loader("train", cfg.batch_size, device, indices=train_idx, workers=workers)
        self.optimizer = sgd(net.weight_parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, cfg.epochs, eta_min=cfg.lr_min)
        arch_loader = None

        def valid_batches(epoch_seed: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            """Search-valid batches, augmented and shuffled as DARTS's, for a method's own steps."""
            nonlocal arch_loader
            if arch_loader is None:
                arch_loader = data.loader("train", cfg.batch_size, device, indices=valid_idx, augment=True,
                                          shuffle=True, drop_last=len(valid_idx) > cfg.batch_size, workers=workers,
                                          **self.shard)
            return arch_batches(arch_loader, epoch_seed, start)

        dist = self.dist
        self.method.setup(net, self.optimizer, SearchContext(
            accel=self.accel, average=(lambda g: dist.sum(g) / dist.world) if dist.active else None,
            valid_batches=valid_batches))
        self.edges = [list(e) for e in edge_index(net.steps)]

    def restored(self, ckpt: dict[str, Any] | None) -> None:
        self.sn_refreshes = 0      # the epoch's depthwise spectral-norm refreshes so far (its record's sn_refreshes)
        self.sn_refreshes_by_map: dict[str, int] = {}   # and per bundle of convs (its record's sn_refreshes_by_map)
        if ckpt is not None:
            self.method.load_state_dict(ckpt.get("arch_optimizer"))
            sn = ckpt.get("spectral_norm")
            if sn is not None and self.cfg.spectral_norm:
                try:
                    self.net.load_drift_reference(sn["drift_reference"])
                except (KeyError, ValueError, TypeError, AttributeError) as e:
                    raise CheckpointError(f"{self.out / F.CHECKPOINT}: its spectral-norm state does not match this "
                                          f"network ({first_line(e)})") from None
                self.sn_refreshes = int(sn.get("refreshes_this_epoch", 0))
                self.sn_refreshes_by_map = {str(k): int(v) for k, v in sn.get("refreshes_by_map_this_epoch", {}).items()}
            # (a checkpoint written before the drift trigger holds no reference: the first step's
            # drift is measured from the network's build and refreshes at once, which only costs time)

    def begin_epoch(self, epoch: int, fresh: bool) -> None:
        self.method.new_epoch(epoch, fresh)
        self.epoch = epoch
        if fresh:
            self.sn_refreshes, self.sn_refreshes_by_map = 0, {}

    def train_hooks(self, state: Any) -> dict[str, Any]:
        cfg, net, first = self.cfg, self.net, self.epoch * len(self.train_loader)   # the run's steps so far

        def after_step(step: int) -> None:
            depthwise = [name for name in refresh_spectral_norms_due(net, cfg, first + step) if name != "1x1"]
            if depthwise:
                self.sn_refreshes += 1
            for name in depthwise:
                self.sn_refreshes_by_map[name] = self.sn_refreshes_by_map.get(name, 0) + 1

        return {"after_step": after_step, "before_step": self.method.step_hook(state.epoch_seed, state.step)}

    def evaluate(self, tag: str) -> dict[str, float]:
        dist, net = self.dist, self.net
        dist.sync_buffers(net)   # rank 0's power-iteration vectors everywhere
        recalibrate_bn(net, self.bn_loader, self.cfg.bn_recalibration, accel=self.accel)
        dist.sync_buffers(net)   # bitwise-identical BN statistics on every rank
        return evaluate(net, self.valid_loader, self.device, desc=f"{tag} valid", progress=self.bars,
                        accel=self.accel, forward=self.eval_forward, reduce=dist.sum)

    def record(self, epoch: int, lr: float, tr: dict[str, float], ev: dict[str, float], t0: float) -> dict:
        d = self.method.derive(self.net)
        self.dist.agree("genotype", str(d.genotype) + str(d.cells))
        # the method's score per (edge, op): MSR-DARTS stable ranks (lower wins), DARTS softmax(alpha)
        scores = {"ops": list(self.net.primitives), "edges": self.edges,
                  "normal": d.scores[0].tolist(), "reduce": d.scores[1].tolist(),
                  "lower_wins": self.method.lower_wins}
        if self.method.name == "msr":
            scores["select"] = self.cfg.select
        record = {
            "epoch": epoch + 1, "lr": lr,
            "train_loss": tr["loss"], "train_acc": tr["acc"], "valid_loss": ev["loss"], "valid_acc": ev["acc"],
            "train_images_per_s": tr["images_per_s"], "epoch_time_s": time.perf_counter() - t0,
            "genotype": d.genotype.to_dict(), "score_key": self.method.score_key, self.method.score_key: scores,
        }
        if self.cfg.spectral_norm:
            # steps that refreshed depthwise convs (drift-triggered or scheduled), and how often each bundle
            record["sn_refreshes"] = self.sn_refreshes
            record["sn_refreshes_by_map"] = dict(self.sn_refreshes_by_map)
            record["train_steps"] = len(self.train_loader)
        if d.cells is not None:   # every cell's own table and genotype (SPEC section 4a)
            scores["cells"] = d.cell_scores.tolist()
            scores["cell_types"] = [c.type for c in d.cells.cells]
            record["genotype_cells"] = d.cells.to_dict()
        if d.ablations:
            record["ablations"] = {name: g.to_dict() for name, g in d.ablations.items()}
        record.update(d.extra)
        if "arch_start" in self.method.owns and epoch < self.cfg.arch_start:   # weights only so far: its genotype is read off untrained alphas
            record["warmup"] = True
        return record

    def resume_folder(self) -> Path:
        return self.out.parent if get_method(self.cfg.method).stages(self.cfg) > 1 else self.out

    def best_extra(self, record: dict) -> dict[str, Any]:
        return {k: record[k] for k in ("genotype", "genotype_cells", "ablations") if k in record}

    def checkpoint_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"arch_optimizer": self.method.state_dict(),
                                 "recompute_depthwise": self.net.recompute_depthwise}
        if self.cfg.spectral_norm:   # what the drift trigger compares against, so a resumed run refreshes alike
            extra["spectral_norm"] = {"drift_reference": self.net.drift_reference(),
                                      "refreshes_this_epoch": self.sn_refreshes,
                                      "refreshes_by_map_this_epoch": dict(self.sn_refreshes_by_map)}
        return extra

    def write_files(self) -> None:
        if self.best is not None:
            Genotype.from_dict(self.best["genotype"]).save(self.out / F.GENOTYPE)
            if "genotype_cells" in self.best:
                CellGenotypes.from_dict(self.best["genotype_cells"]).save(self.out / F.GENOTYPE_CELLS)
            for name, g in self.best.get("ablations", {}).items():
                genotype_from_dict(g).save(self.out / F.ablation_file(name))

    def epoch_line(self, tag: str, tr: dict[str, float], ev: dict[str, float], lr: float, record: dict) -> str:
        return (f"{tag}: train loss {tr['loss']:.4f} acc {tr['acc']:.2f}% | valid loss {ev['loss']:.4f} "
                f"acc {ev['acc']:.2f}% | lr {lr:.5f} | {record['epoch_time_s']:.1f}s | "
                f"{tr['images_per_s']:.0f} img/s")

    def finish(self) -> SearchResult:
        if self.best is None:
            raise CheckpointError(f"{self.out}: no completed epoch to derive a genotype from")
        cells = self.best.get("genotype_cells")
        return SearchResult(Genotype.from_dict(self.best["genotype"]), self.best["epoch"], self.best["valid_acc"],
                            self.history, self.out, None if cells is None else CellGenotypes.from_dict(cells))

    def summary(self, result: SearchResult) -> None:
        log, out = self.log, self.out
        log(f"genotype (epoch {result.best_epoch}, valid acc {result.best_valid_acc:.2f}%): {result.genotype}")
        if result.cells is not None:
            log(f"one genotype per cell ({result.cells.layers} cells) in {self.out / F.GENOTYPE_CELLS}")
        if self.dist.active:
            log(f"all {self.dist.world} processes derived this genotype")
        log(f"results in {out}/ ({F.GENOTYPE}, {F.HISTORY}, {F.CHECKPOINT}{', plots/' if self.cfg.plots else ''}); "
            f"a page with all of it: msrdarts report {out} --out report.html")
