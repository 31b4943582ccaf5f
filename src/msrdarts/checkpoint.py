"""Checkpoints that load without executing code, and RNG state as plain data.

Checkpoints are dicts of tensors, numbers, strings, lists and dicts only, so they load with
``torch.load(weights_only=True)``; the model is rebuilt from the stored config, never unpickled.
Checkpoints are written atomically (see :mod:`msrdarts._io`).
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import atomic_write_bytes
from .errors import CheckpointError, ConfigError

#: Settings that may differ on --resume without changing what a run computes.
RESUMABLE_CHANGES = ("data", "download", "device", "progress", "workers")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Serialise ``state`` (plain data and tensors only) and write it atomically."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted, or holding objects that are not plain data
        raise CheckpointError(f"{path}: not a readable msrdarts checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
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


def set_rng_state(state: dict[str, Any], device: torch.device, extra: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    for k, g in (extra or {}).items():
        g.set_state(state["generators"][k])
    if device.type != "cpu" and "device" in state:
        getattr(torch, device.type).set_rng_state(state["device"], device)


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def check_run_folder(out: Path, resume: bool, run_files: tuple[str, ...]) -> None:
    """Refuse to start over an existing run, or to resume where there is none."""
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise CheckpointError(f"--resume: {out}/checkpoint.pt not found; nothing to resume")
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    present = [f for f in run_files if (out / f).exists()]
    if present:
        raise CheckpointError(f"--out {out} already holds a run ({', '.join(present)}); "
                              f"pass --resume to continue it or choose another --out")


def config_mismatch(saved: Any, cfg: Any) -> list[str]:
    """The settings (dataclass fields) in which ``cfg`` differs from ``saved``, resumable ones aside."""
    return [f"{f.name}: run has {getattr(saved, f.name)!r}, now {getattr(cfg, f.name)!r}"
            for f in fields(cfg)
            if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(cfg, f.name)]


def open_run(out: Path, resume: bool, run_files: tuple[str, ...], fmt: str, cfg: Any) -> dict[str, Any] | None:
    """Check the run folder; on ``resume`` load its checkpoint and refuse changed settings.

    Returns the checkpoint (None for a new run). ``cfg`` is the run's config dataclass.
    """
    check_run_folder(out, resume, run_files)
    if not resume:
        return None
    path = out / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != fmt:
        raise CheckpointError(f"{path}: format {ckpt.get('format')!r}, expected {fmt}")
    diff = config_mismatch(type(cfg).from_dict(ckpt["config"], source=str(path)), cfg)
    if diff:
        raise CheckpointError(f"--resume with changed settings ({'; '.join(diff)})")
    return ckpt


def restore_state(ckpt: dict[str, Any], path: Path, device: torch.device, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer, scheduler: Any, generators: dict[str, torch.Generator]) -> None:
    """Load weights, optimiser, scheduler and every RNG state of a checkpoint; errors name the file."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} does not match this network ({str(e).splitlines()[0][:200]})") from None
    set_rng_state(ckpt["rng"], device, generators)


def make_run_folder(out: Path, device: torch.device, cfg: Any) -> dict[str, Any]:
    """Create ``out``; return what config.json records: the settings plus the runtime they resolved to."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the run folder ({e.strerror})") from None
    return {**cfg.to_dict(), "runtime": {"device": str(device), "torch": torch.__version__}}
