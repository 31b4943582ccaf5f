"""One epoch of training and one evaluation pass, shared by search and train.

Metrics accumulate on the device (no host sync per step); the progress bar reads them every
``log_every`` steps.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import NonFiniteLoss


Criterion = Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _logits(output: Any) -> torch.Tensor:
    """Networks return logits, or (logits, auxiliary logits) like the evaluation network."""
    return output[0] if isinstance(output, tuple) else output


def cross_entropy(output: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _logits(output)
    return nn.functional.cross_entropy(logits, y), logits


@dataclass
class EpochState:
    """Where an epoch stands: the next global batch and the running sums so far (this rank's).

    Plain numbers in :meth:`to_dict`, so a checkpoint can restart the epoch at ``step`` with the
    same epoch seed and finish with the same figures.
    """

    epoch_seed: int
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EpochState":
        return cls(**{k: d[k] for k in ("epoch_seed", "step", "loss_sum", "correct", "seen", "time_s")})


def train_one_epoch(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, device: torch.device,
                    grad_clip: float = 0.0, desc: str = "train", progress: bool = True,
                    log_every: int = 10, after_step: Callable[[int], None] | None = None,
                    criterion: Criterion = cross_entropy, accel: Any = None,
                    forward: Callable[[torch.Tensor], Any] | None = None, state: EpochState | None = None,
                    on_step: Callable[["EpochState", Callable[[], None]], None] | None = None,
                    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    before_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> dict[str, float]:
    """Train ``model`` for one pass over ``loader``; returns mean loss, accuracy (%) and images/s.

    ``criterion(output, y)`` returns (loss, logits); ``after_step(step)`` runs after every
    optimiser step (step counts from 0 within the epoch). ``accel`` (a :class:`msrdarts.device.Accel`)
    sets autocast and the input memory format; ``forward`` replaces ``model(x)`` (a compiled model).

    ``state`` restarts an epoch (``loader.batches(state.epoch_seed, state.step)``, running sums
    carried on); by default a fresh epoch. ``on_step(state, check)`` runs at every step boundary
    with ``state`` up to date (sums as plain numbers only after ``check()``, which also raises
    :class:`NonFiniteLoss` if any loss or gradient norm so far was not finite): the caller's place
    to checkpoint or stop. Finiteness is also checked every ``log_every`` steps and at the end.
    ``reduce`` sums the final totals over processes. ``before_step(step, x, y)`` runs before each
    weight step on its batch (the DARTS architecture step).
    """
    forward = forward or model
    autocast = accel.autocast if accel is not None else contextlib.nullcontext
    model.train()
    resumable = hasattr(loader, "batches")   # an msrdarts loader; any other iterable runs as is
    state = state if state is not None else EpochState(loader.draw_epoch_seed() if resumable else 0)
    loss_sum = torch.full((), state.loss_sum, device=device, dtype=torch.float64)
    correct = torch.full((), state.correct, device=device, dtype=torch.int64)
    bad = torch.zeros((), device=device, dtype=torch.bool)
    seen0, time0 = state.seen, state.time_s
    start = time.perf_counter()
    total = len(loader) if hasattr(loader, "__len__") else None

    def check() -> None:
        """Sync the running sums into ``state``; raise if anything was not finite."""
        if bool(bad):
            raise NonFiniteLoss(f"non-finite loss or gradient at step {state.step} of {desc}")
        state.loss_sum, state.correct = float(loss_sum), int(correct)
        state.time_s = time0 + time.perf_counter() - start

    # Listed once: a supernet with spectral norms has ~5,000 modules, and walking them for
    # model.parameters() took 14 ms a step at the quick preset (5% of the step).
    params = list(model.parameters())
    batches = loader.batches(state.epoch_seed, state.step) if resumable else loader
    bar = tqdm(batches, desc=desc, disable=not progress, leave=False,
               dynamic_ncols=True, total=total, initial=state.step)
    for x, y in bar:
        if accel is not None:
            x = accel.input(x)
        if before_step is not None:
            before_step(state.step, x, y)
        with autocast():
            loss, logits = criterion(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        bad |= ~torch.isfinite(loss.detach())
        if grad_clip > 0:
            bad |= ~torch.isfinite(nn.utils.clip_grad_norm_(params, grad_clip))
        optimizer.step()
        if after_step is not None:
            after_step(state.step)
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        state.seen += len(y)
        state.step += 1
        if state.step % log_every == 0:
            check()
            if progress:
                bar.set_postfix(loss=f"{state.loss_sum / state.seen:.3f}",
                                acc=f"{100.0 * state.correct / state.seen:.1f}",
                                img_s=f"{(state.seen - seen0) / max(time.perf_counter() - start, 1e-9):.0f}")
        if on_step is not None:
            on_step(state, check)
    check()
    totals = torch.tensor([state.loss_sum, state.correct, state.seen, state.seen - seen0], dtype=torch.float64)
    if reduce is not None:
        totals = reduce(totals)
    loss_total, correct_total, seen, seen_now = totals.tolist()
    if seen == 0:
        raise ValueError("the training loader yielded no batch")
    elapsed = time.perf_counter() - start
    return {"loss": loss_total / seen, "acc": 100.0 * correct_total / seen,
            "images_per_s": seen_now / max(elapsed, 1e-9), "time_s": state.time_s}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, desc: str = "valid",
             progress: bool = True, accel: Any = None,
             forward: Callable[[torch.Tensor], Any] | None = None,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Mean loss, top-1 accuracy ``acc`` and top-5 accuracy ``acc5`` (%) of ``model`` over ``loader``.

    Eval mode: BN running statistics, no drop path, no auxiliary head. ``reduce`` sums the totals
    over processes (each holding its share of the data set, every sample exactly once).
    """
    model.eval()
    forward = forward or model
    autocast = accel.autocast if accel is not None else contextlib.nullcontext
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    correct5 = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        if accel is not None:
            x = accel.input(x)
        with autocast():
            logits = _logits(forward(x)).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct += (top[:, 0] == y).sum()
        correct5 += (top == y[:, None]).any(dim=1).sum()
        seen += len(y)
    totals = torch.stack([loss_sum.double().cpu(), correct.double().cpu(), correct5.double().cpu(),
                          torch.tensor(float(seen), dtype=torch.float64)])
    if reduce is not None:
        totals = reduce(totals)
    loss_total, correct_total, correct5_total, seen = totals.tolist()
    if seen == 0:
        raise ValueError("the evaluation loader yielded no batch")
    return {"loss": loss_total / seen, "acc": 100.0 * correct_total / seen, "acc5": 100.0 * correct5_total / seen}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int, accel: Any = None) -> None:
    """Recompute every BatchNorm's running statistics as the plain mean over ``batches`` batches.

    Running averages lag behind weights that change quickly (few steps per epoch, large lr); this
    "precise BN" pass makes eval-mode metrics reflect the current weights. Costs ``batches``
    forward passes. Only the BatchNorms run in training mode; everything else (spectral-norm
    power iterations included) stays in eval mode and does not change.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if batches <= 0 or not bns:
        return
    was_training = model.training
    model.eval()
    momenta = {bn: bn.momentum for bn in bns}
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
        bn.train()
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            if accel is not None:
                x = accel.input(x)
            with accel.autocast() if accel is not None else contextlib.nullcontext():
                model(x)
    finally:
        for bn in bns:
            bn.momentum = momenta[bn]
        model.train(was_training)
