"""Checkpoints that load without executing code, and RNG state as plain data.

Checkpoints are dicts of tensors, numbers, strings, lists and dicts only, so they load with
``torch.load(weights_only=True)``; the model is rebuilt from the stored config, never unpickled.
Checkpoints are written atomically (see :mod:`msrdarts._io`).
"""

from __future__ import annotations

import io
import os
import random
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .._io import atomic_write_bytes
from ..errors import CheckpointError, first_line
from .folder import CHECKPOINT, CHECKPOINT_PREV
from ..nn.spectral import drop_regridded_vectors, fill_missing_matrix_vectors, refresh_regridded

_LEGACY_MIX = re.compile(r"cells\.\d+\.mix")
#: Settings that may differ on --resume without changing what a run computes (``recompute_depthwise``
#: and ``checkpoint_cells`` trade memory for time: the same function and gradients, to rounding).
RESUMABLE_CHANGES = ("data", "download", "device", "progress", "workers", "checkpoint_every", "lr", "tensorboard",
                     "plots", "recompute_depthwise", "checkpoint_cells")


def previous_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` keeps the checkpoint it replaced (``checkpoint.prev.pt``)."""
    path = Path(path)
    return path.with_name(CHECKPOINT_PREV if path.name == CHECKPOINT else f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], keep_previous: bool = False) -> None:
    """Serialise ``state`` (plain data and tensors only) and write it atomically.

    The new file is complete and fsynced before it replaces the old one, so ``path`` always holds a
    whole checkpoint. With ``keep_previous`` the replaced one stays as :func:`previous_path`, a
    fallback should the newest turn out unreadable.
    """
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue(), keep=previous_path(path) if keep_previous else None)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted, or holding objects that are not plain data
        raise CheckpointError(f"{path}: not a readable msrdarts checkpoint ({type(e).__name__}: "
                              f"{first_line(e)})") from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path}: not an msrdarts checkpoint (no 'format' field)")
    return state


def rng_state(device: torch.device, extra: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, numpy, torch (CPU and ``device``) and named generator states, as plain data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (extra or {}).items()},
    }
    if device.type != "cpu":
        state["device"] = getattr(torch, device.type).get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device, extra: dict[str, torch.Generator] | None = None,
                  torch_state: bool = True) -> None:
    """Restore what :func:`rng_state` saved (``torch_state=False``: only the named generators)."""
    for k, g in (extra or {}).items():
        g.set_state(state["generators"][k])
    if not torch_state:
        return
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type != "cpu" and "device" in state:
        getattr(torch, device.type).set_rng_state(state["device"], device)


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_resume_checkpoint(path: Path, log: Callable[[str], None] = print) -> tuple[dict[str, Any], Path]:
    """The checkpoint to resume from: ``path``, or the previous one kept beside it if ``path`` is
    unreadable (a disk fault; a kill mid-write never leaves a torn ``path``). Errors name both."""
    try:
        return load_checkpoint(path), path
    except CheckpointError as first:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        try:
            state = load_checkpoint(prev)
        except CheckpointError as second:
            raise CheckpointError(f"{first}; the previous one is unusable too ({second})") from None
        log(f"warning: {first}; resuming from the previous checkpoint {prev} instead")
        return state, prev


def config_mismatch(saved: Any, cfg: Any) -> list[str]:
    """The settings (dataclass fields) in which ``cfg`` differs from ``saved``, resumable ones aside."""
    return [f"{f.name}: run has {getattr(saved, f.name)!r}, now {getattr(cfg, f.name)!r}"
            for f in fields(cfg)
            if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(cfg, f.name)]


def open_run(out: Path, resume: bool, fmt: str, cfg: Any, log: Callable[[str], None] = print
             ) -> dict[str, Any] | None:
    """On ``resume``, load the run's checkpoint (or the previous one) and refuse changed settings;
    None for a new run. ``cfg`` is the run's config dataclass."""
    if not resume:
        return None
    ckpt, path = load_resume_checkpoint(out / CHECKPOINT, log)
    if ckpt.get("format") != fmt:
        raise CheckpointError(f"{path}: format {ckpt.get('format')!r}, expected {fmt}")
    diff = config_mismatch(type(cfg).from_dict(ckpt["config"], source=str(path)), cfg)
    if diff:
        raise CheckpointError(f"--resume with changed settings ({'; '.join(diff)})")
    return ckpt


def restore_state(ckpt: dict[str, Any], path: Path, device: torch.device, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, scheduler: Any, generators: dict[str, torch.Generator],
                  lr: float | None = None, rank: int = 0, log: Callable[[str], None] = print) -> None:
    """Load weights, optimiser, scheduler and every RNG state of a checkpoint; errors name the file.

    ``lr`` (the run's --lr now) rescales the whole schedule if it differs from the checkpoint's,
    the way to continue a run that diverged. ``rank`` picks that process's RNG states.
    """
    try:
        state, regridded = drop_regridded_vectors(model, ckpt["model"])
        loaded = model.load_state_dict(state, strict=False)
        regrid_keys = {k for k in loaded.missing_keys if k.rsplit(".", 1)[0] in regridded}
        legacy = fill_missing_matrix_vectors(model, [k for k in loaded.missing_keys if k not in regrid_keys])
        if regridded:
            refresh_regridded(model, regridded)
            log(f"{path}: written before dilated convs' spectral norms ran on their smaller polyphase map; "
                f"{len(regridded)} convs' power-iteration vectors were recomputed for the loaded weights")
        missing = [k for k in loaded.missing_keys if k not in legacy and k not in regrid_keys]
        # Before methods adapted the supernet, every search cell had an all-ones "mix" buffer.
        unexpected = [k for k in loaded.unexpected_keys if not _LEGACY_MIX.fullmatch(k)]
        if missing or unexpected:
            raise CheckpointError(f"{path} does not match this network (missing {len(missing)} entries, e.g. "
                                  f"{missing[:1]}; unexpected {len(unexpected)}, e.g. {unexpected[:1]})")
        matrix = [k for k in legacy if not k.endswith(".basis")]
        if matrix:
            log(f"{path}: written before 1x1 convs had power-iteration vectors; their {len(matrix) // 2} "
                f"vectors were set to the exact ones of the loaded weights")
        if len(matrix) < len(legacy):
            log(f"{path}: written before block power iteration; {len(legacy) - len(matrix)} convs start their "
                f"tracked subspace afresh (the next refresh sets it)")
        kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, flags in zip(optimizer.param_groups, kernels):   # how to step is this code's choice,
            group.update(flags)                                      # not the checkpoint's (same state)
        scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} does not match this network ({first_line(e)})") from None
    saved_lr = ckpt["config"].get("lr")
    if lr is not None and saved_lr and lr != saved_lr:
        scale = lr / saved_lr
        for group in optimizer.param_groups:
            group["lr"] *= scale
            group["initial_lr"] = group.get("initial_lr", saved_lr) * scale
        scheduler.base_lrs = [b * scale for b in scheduler.base_lrs]
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        log(f"--lr {lr:g} (the run had {saved_lr:g}): the learning-rate schedule is scaled by {scale:g} from here on")
    ranks = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if rank >= len(ranks):
        log(f"warning: {path} holds RNG states for {len(ranks)} process(es); rank {rank} starts a fresh stream")
        torch.manual_seed(int(ckpt["config"].get("seed", 0)) + 1_000_003 * rank)
        set_rng_state(ckpt["rng"], device, generators, torch_state=False)
        return
    set_rng_state(ranks[rank], device, generators)


def reduced_position(state: Any, dist: Any) -> dict[str, Any] | None:
    """A mid-epoch position (an :class:`msrdarts.runs.epoch.EpochState`) for the checkpoint, its running
    sums summed over processes; None at an epoch's end."""
    if state is None:
        return None
    totals = dist.sum(torch.tensor([state.loss_sum, state.correct, state.seen], dtype=torch.float64)).tolist()
    return {**state.to_dict(), "loss_sum": totals[0], "correct": int(totals[1]), "seen": int(totals[2])}


def resume_position(ckpt: dict[str, Any], dist: Any) -> Any:
    """The EpochState a checkpoint saved mid-epoch (None if it was saved at an epoch's end). The
    running sums are global; rank 0 carries them, the other ranks start theirs at zero."""
    from .epoch import EpochState

    position = ckpt.get("position")
    if position is None:
        return None
    state = EpochState.from_dict(position)
    if not dist.main:
        state.loss_sum, state.correct, state.seen = 0.0, 0, 0
    return state


def describe_position(epochs_done: int, state: Any) -> str:
    return f"epoch {epochs_done}" if state is None else f"epoch {epochs_done} + {state.step} steps"


def resume_run(ckpt: dict[str, Any] | None, out: Path, device: torch.device, net: torch.nn.Module,
               optimizer: torch.optim.Optimizer, scheduler: Any, loader_gen: torch.Generator, cfg: Any, dist: Any,
               log: Callable[[str], None]) -> tuple[list[dict], dict | None, int, Any, str | None]:
    """Restore a run from ``ckpt`` (None: a new run); returns (history, best, completed epochs,
    the mid-epoch EpochState or None, a description of where the checkpoint stands or None)."""
    if ckpt is None:
        return [], None, 0, None, None
    restore_state(ckpt, out / CHECKPOINT, device, net, optimizer, scheduler, {"loader": loader_gen},
                  lr=cfg.lr, rank=dist.rank, log=log)
    state = resume_position(ckpt, dist)
    where = describe_position(ckpt["epoch"], state)
    log(f"resuming {out} after {where} of {cfg.epochs} epochs")
    return ckpt["history"], ckpt["best"], ckpt["epoch"], state, where
