"""One epoch of training and one evaluation pass, shared by search and train.

Metrics accumulate on the device (no host sync per step); the progress bar reads them every
``log_every`` steps.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


Criterion = Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _logits(output: Any) -> torch.Tensor:
    """Networks return logits, or (logits, auxiliary logits) like the evaluation network."""
    return output[0] if isinstance(output, tuple) else output


def cross_entropy(output: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = _logits(output)
    return nn.functional.cross_entropy(logits, y), logits


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, device: torch.device,
                    grad_clip: float = 0.0, desc: str = "train", progress: bool = True,
                    log_every: int = 10, after_step: Callable[[int], None] | None = None,
                    criterion: Criterion = cross_entropy, accel: Any = None,
                    forward: Callable[[torch.Tensor], Any] | None = None) -> dict[str, float]:
    """Train ``model`` for one pass over ``loader``; returns mean loss, accuracy (%) and images/s.

    ``criterion(output, y)`` returns (loss, logits); ``after_step(step)`` runs after every
    optimiser step (step counts from 0 within the epoch). ``accel`` (a :class:`msrdarts.device.Accel`)
    sets autocast and the input memory format; ``forward`` replaces ``model(x)`` (a compiled model).
    """
    forward = forward or model
    autocast = accel.autocast if accel is not None else contextlib.nullcontext
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step, (x, y) in enumerate(bar):
        if accel is not None:
            x = accel.input(x)
        with autocast():
            loss, logits = criterion(forward(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if progress and step % log_every == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{100.0 * correct.item() / seen:.1f}",
                            img_s=f"{seen / max(time.perf_counter() - start, 1e-9):.0f}")
    elapsed = time.perf_counter() - start
    if seen == 0:
        raise ValueError("the training loader yielded no batch")
    return {"loss": loss_sum.item() / seen, "acc": 100.0 * correct.item() / seen,
            "images_per_s": seen / max(elapsed, 1e-9), "time_s": elapsed}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, desc: str = "valid",
             progress: bool = True, accel: Any = None,
             forward: Callable[[torch.Tensor], Any] | None = None) -> dict[str, float]:
    """Mean loss, top-1 accuracy ``acc`` and top-5 accuracy ``acc5`` (%) of ``model`` over ``loader``.

    Eval mode: BN running statistics, no drop path, no auxiliary head.
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
    if seen == 0:
        raise ValueError("the evaluation loader yielded no batch")
    return {"loss": loss_sum.item() / seen, "acc": 100.0 * correct.item() / seen,
            "acc5": 100.0 * correct5.item() / seen}


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
