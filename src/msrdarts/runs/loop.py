"""The one run loop that searches and trainings share: folder checks, seeding, data, resume,
checkpoints, stop requests, the epoch loop, logging and shutdown.

:class:`EpochRun` is a template: :meth:`EpochRun.run` is the whole run, and a subclass
(:class:`msrdarts.runs.search.SearchRun`, :class:`msrdarts.runs.train.TrainRun`) fills in only
what differs: the network, its optimiser, what happens around each training epoch, what an
epoch records and which files it writes. A fix to resume, signals or torchrun is made here,
once.

Under torchrun every process runs the loop; rank 0 alone writes files and logs
(:mod:`msrdarts.distributed`).
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from ..data import load_dataset, resolve_workers
from ..device import Accel, resolve_device
from ..distributed import Dist
from ..errors import CheckpointError, MsrdartsError, NonFiniteLoss, WriteError
from ..views.plots import plot_run_quietly
from ..views.tensorboard import TensorBoardLog
from . import folder as F
from .checkpoint import (describe_position, open_run, reduced_position, resume_run, rng_state, save_checkpoint)
from .epoch import EpochState, train_one_epoch
from .signals import StopRequests, diverged, silent, step_hook


def show_progress(setting: str, stream: Any = None) -> bool:
    """Progress bars for ``--progress`` on / off / auto (auto: only when stderr is a terminal or in a
    notebook, so a log file or pipe gets one line per epoch instead of thousands of bar refreshes)."""
    if setting == "auto":
        if stream is None and "ipykernel" in sys.modules:   # a notebook: tqdm.auto draws widgets there
            return True
        stream = sys.stderr if stream is None else stream
        return bool(getattr(stream, "isatty", lambda: False)())
    return setting == "on"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_run_data(cfg: Any, root: str | None = None, download: bool | None = None, progress: bool = False) -> Any:
    """The data set of a run config (:func:`msrdarts.data.load_dataset`); arguments override its settings."""
    return load_dataset(cfg.dataset, root or cfg.data, cfg.download if download is None else download,
                        image_size=cfg.image_size, loading=cfg.loading, workers=resolve_workers(cfg.workers),
                        progress=progress)


class EpochRun:
    """One search or training run into the folder ``out`` (see the module docstring)."""

    kind: ClassVar[str] = ""          # "search" or "train": names the command and the run files
    checkpoint_format: ClassVar[str] = ""
    files: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: Any, out: Path, resume: bool, dist: Dist, device: torch.device,
                 log: Callable[[str], None], on_epoch_end: Callable[[int, dict], None] | None = None,
                 origin: dict[str, Any] | None = None):
        self.cfg, self.out, self.resume, self.dist, self.device = cfg, Path(out), resume, dist, device
        self.log = log if dist.main else silent
        self.on_epoch_end, self.origin = on_epoch_end, origin
        self.bars = show_progress(cfg.progress) and dist.main
        self.history: list[dict] = []
        self.best: dict | None = None
        self.seconds = 0.0   # wall time of the completed training epochs (and their evaluations)

    @classmethod
    def start(cls, cfg: Any, out: str | Path, resume: bool = False,
              on_epoch_end: Callable[[int, dict], None] | None = None, log: Callable[[str], None] = print,
              origin: dict[str, Any] | None = None) -> Any:
        """Check ``cfg``, join the process group (torchrun) or not, and run into ``out``."""
        cls.check(cfg)
        dist, device = Dist.start(resolve_device(cfg.device))   # the process group outlives the run
        return cls(cfg, Path(out), resume, dist, device, log, on_epoch_end, origin).run()

    @classmethod
    def check(cls, cfg: Any) -> None:
        """Raise ConfigError for settings this run cannot start with."""
        cfg.validate()

    # ------------------------------------------------------------------ what a run fills in

    def opened(self, ckpt: dict[str, Any] | None) -> None:
        """After the folder checks, before any rank builds anything (``ckpt``: None for a new run)."""

    def prepare(self, data: Any) -> None:
        """After the data set is loaded, before the network is built."""

    def build(self, data: Any) -> tuple[nn.Module, nn.Module]:
        """(the network, what the training steps call: the network wrapped for DDP)."""
        raise NotImplementedError

    def setup(self, data: Any, loader_gen: torch.Generator, workers: int) -> None:
        """Set :attr:`train_loader`, :attr:`optimizer`, :attr:`scheduler` and anything else."""
        raise NotImplementedError

    def restored(self, ckpt: dict[str, Any] | None) -> None:
        """After weights, optimiser, scheduler and RNG states were restored (or a new run began)."""

    def begin_epoch(self, epoch: int, fresh: bool) -> None:
        """Before an epoch's training (``fresh``: not resumed from a mid-epoch checkpoint)."""

    def train_hooks(self, state: EpochState) -> dict[str, Any]:
        """Extra keyword arguments of :func:`msrdarts.runs.epoch.train_one_epoch` for this epoch."""
        return {}

    def evaluate(self, tag: str) -> dict[str, float]:
        """The end-of-epoch evaluation (before the scheduler steps)."""
        raise NotImplementedError

    def record(self, epoch: int, lr: float, tr: dict[str, float], ev: dict[str, float], t0: float) -> dict:
        """The epoch's line of history.jsonl."""
        raise NotImplementedError

    def resume_folder(self) -> Path:
        """The folder ``--resume`` continues this run in (a staged search: its parent)."""
        return self.out

    def new_best(self, record: dict) -> None:
        """Called when ``record`` is the best epoch so far (after :attr:`best` is set)."""

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint of this kind holds beyond the common fields."""
        return {}

    def write_files(self) -> None:
        """The run folder's files derived from the checkpointed state, beyond config and history."""

    def epoch_line(self, tag: str, tr: dict[str, float], ev: dict[str, float], lr: float, record: dict) -> str:
        raise NotImplementedError

    def finish(self) -> Any:
        """After the last epoch: the result (rank 0 writes its final files here)."""
        raise NotImplementedError

    def summary(self, result: Any) -> None:
        """The last lines of the log (every rank's files are complete)."""

    def cpu_channels_last(self) -> bool:
        """What ``--channels-last auto`` means on the CPU for this run's network."""
        return False

    # ------------------------------------------------------------------ the loop

    def run(self) -> Any:
        cfg, dist, out, log, device = self.cfg, self.dist, self.out, self.log, self.device
        dist.per_rank_batch(cfg.batch_size)
        F.check_run_folder(out, self.resume, self.files)
        ckpt = open_run(out, self.resume, self.checkpoint_format, cfg, log) if self.resume else None
        self.opened(ckpt)
        dist.barrier()   # every rank has looked at the folder before rank 0 writes to it

        seed_everything(cfg.seed)
        with dist.main_first():   # rank 0 downloads (if asked) before the others read
            data = load_run_data(cfg, progress=self.bars)
        self.data = data
        self.prepare(data)
        self.accel = Accel.resolve(device, cfg.amp, cfg.channels_last, cfg.compile, self.cpu_channels_last())
        self.net, self.model = self.build(data)   # identical on every rank (same seed)
        loader_gen = torch.Generator().manual_seed(cfg.seed)
        self.shard = {"rank": dist.rank, "world": dist.world}
        self.setup(data, loader_gen, resolve_workers(cfg.workers))

        self.history, self.best, start_epoch, resume_state, last_saved = resume_run(
            ckpt, out, device, self.net, self.optimizer, self.scheduler, loader_gen, cfg, dist, log)
        self.seconds = float(ckpt.get("train_seconds", 0.0)) if ckpt is not None else 0.0
        self.restored(ckpt)
        runtime = {"device": str(device), "devices": dist.world, "torch": torch.__version__}
        origin = self.origin
        if ckpt is not None and dist.main and (out / F.CONFIG).is_file():   # where the run's settings came from
            try:
                saved = F.read_json(out / F.CONFIG)
                origin = saved.get("origin", origin) if isinstance(saved, dict) else origin
            except MsrdartsError:
                pass   # the checkpoint is the record; a damaged config.json is rewritten from it
        self.run_config = F.make_run_folder(out, cfg.to_dict(), runtime, origin) if dist.main else {}
        if ckpt is not None and dist.main:
            self._write_files()

        def save(epoch_done: int, state: EpochState | None, seconds: float) -> None:
            """Checkpoint after ``epoch_done`` epochs (plus ``state``'s steps of the next one)."""
            nonlocal last_saved
            position = reduced_position(state, dist)
            rngs = dist.gather(rng_state(device, {"loader": loader_gen}))
            if dist.main:
                try:
                    self._save(epoch_done, position, rngs, seconds)
                except WriteError as e:   # a full disk: the last checkpoint is untouched
                    then = (f"the last saved state ({last_saved}) is kept in {out / F.CHECKPOINT}; free some space, "
                            f"then: msrdarts {self.kind} --out {self.resume_folder()} --resume") if last_saved else \
                        "nothing was saved yet; free some space and run the same command again"
                    raise CheckpointError(f"{out}: could not save the run ({e}); {then}") from None
            last_saved = describe_position(epoch_done, state)

        self.forward = self.accel.forward_fn(self.model, log)
        self.eval_forward = None if dist.active else self.forward   # ranks evaluate the unwrapped network
        hint = f"msrdarts {self.kind} --out {self.resume_folder()} --resume"
        tb = TensorBoardLog(out, cfg.tensorboard and dist.main, log, resume_epoch=start_epoch)
        key = F.BEST_KEY[self.kind]
        with StopRequests() as stops, contextlib.closing(tb):
            for epoch in range(start_epoch, cfg.epochs):
                t0 = time.perf_counter()
                state, resume_state = resume_state, None
                self.begin_epoch(epoch, fresh=state is None)
                if state is None:
                    state = EpochState(self.train_loader.draw_epoch_seed())
                lr = self.optimizer.param_groups[0]["lr"]
                tag = f"epoch {epoch + 1}/{cfg.epochs}"
                done_before = self.seconds
                on_step = step_hook(dist, stops, cfg.checkpoint_every, len(self.train_loader),
                                    lambda st, e=epoch: save(e, st, done_before + st.time_s), hint)
                try:
                    tr = train_one_epoch(self.model, self.train_loader, self.optimizer, device, cfg.grad_clip,
                                         desc=tag, progress=self.bars, accel=self.accel, forward=self.forward,
                                         state=state, on_step=on_step, reduce=dist.sum, **self.train_hooks(state))
                except NonFiniteLoss as e:
                    raise diverged(e, last_saved, self.resume_folder(), self.kind, cfg.lr) from None
                ev = self.evaluate(tag)
                self.scheduler.step()
                record = self.record(epoch, lr, tr, ev, t0)
                self.seconds += record["epoch_time_s"]
                self.history.append(record)
                if F.eligible(record, key) and F.improves(record[key], self.best, key):
                    self.best = {"epoch": epoch + 1, key: record[key], **self.best_extra(record)}
                    self.new_best(record)
                save(epoch + 1, None, self.seconds)
                tb.epoch(record)
                log(self.epoch_line(tag, tr, ev, lr, record))
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch + 1, record)

        result = self.finish()
        if dist.main and cfg.plots:
            plot_run_quietly(out, log)
        dist.barrier()   # rank 0's files are complete before any rank returns (a next step may read them)
        self.summary(result)
        return result

    def _save(self, epoch_done: int, position: dict | None, rngs: list, seconds: float) -> None:
        """Write the checkpoint (keeping the previous one), then the files derived from it."""
        save_checkpoint(self.out / F.CHECKPOINT, {
            "format": self.checkpoint_format, "epoch": epoch_done, "position": position,
            "config": self.cfg.to_dict(), "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rngs[0], "rng_ranks": rngs,
            "history": self.history, "best": self.best, "train_seconds": seconds, **self.checkpoint_extra(),
        }, keep_previous=True)
        self._write_files()   # files a crash before epoch 1 never leaves

    def best_extra(self, record: dict) -> dict[str, Any]:
        """What the best-epoch record keeps besides its epoch and accuracy."""
        return {}

    def _write_files(self) -> None:
        F.write_config(self.out, self.run_config)
        F.write_history(self.out, self.history)
        self.write_files()
