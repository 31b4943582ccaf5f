"""What keeps a long run safe, shared by search and train: stop requests, step checkpoints, divergence.

* SIGINT (Ctrl-C) and SIGTERM (a cluster preempting the job) only set a flag; at the next step
  boundary the run saves a checkpoint and raises :class:`RunInterrupted`, which the CLI turns into
  a resume hint and exit status 128 + signal. A second Ctrl-C interrupts at once.
* ``--checkpoint-every N`` saves a mid-epoch checkpoint every N steps (see
  :class:`msrdarts.runs.epoch.EpochState` for what restarts the epoch exactly).
* A non-finite loss or gradient norm stops the run with :class:`Diverged` before any checkpoint
  could hold the broken weights; the last good one is kept.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Callable

from ..distributed import Dist
from .epoch import EpochState
from ..errors import Diverged, RunInterrupted
from .folder import CHECKPOINT

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Under torchrun, the ranks agree on a stop request every this many steps (all at the same step).
STOP_CHECK_EVERY = 10


def silent(message: str) -> None:
    """The log of the processes other than rank 0."""


class StopRequests:
    """Within ``with``: SIGINT and SIGTERM set :attr:`signum` instead of killing the process.

    Handlers are installed only in the main thread (Python allows no other); elsewhere the
    signals keep their default behaviour.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt   # a second Ctrl-C: stop now, without a checkpoint
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def step_hook(dist: Dist, stops: StopRequests, every: int, steps_per_epoch: int,
              save: Callable[[EpochState], None], resume_hint: str) -> Callable[[EpochState, Callable[[], None]], None]:
    """The ``on_step`` of :func:`msrdarts.runs.epoch.train_one_epoch` for a run: a checkpoint every
    ``every`` steps (not at the epoch's end, which the run saves anyway), and a checkpoint then
    :class:`RunInterrupted` once a stop was requested (on any rank: all ranks stop at the same step,
    within STOP_CHECK_EVERY steps of the request)."""

    def on_step(state: EpochState, check: Callable[[], None]) -> None:
        due = every > 0 and state.step % every == 0 and state.step < steps_per_epoch
        if not dist.active:
            stop = stops.signum is not None
        else:   # a collective and a host sync: every STOP_CHECK_EVERY steps, not every step
            stop = (due or state.step % STOP_CHECK_EVERY == 0) and dist.any(stops.signum is not None)
        if stop or due:
            check()
            save(state)
        if stop:
            signum = stops.signum or signal.SIGTERM
            raise RunInterrupted(f"stopped by {signal.Signals(signum).name} after step {state.step}/{steps_per_epoch} "
                                 f"of the epoch; checkpoint saved. Continue with: {resume_hint}", 128 + signum)

    return on_step


def diverged(error: Exception, last_saved: str | None, out: Any, command: str, lr: float) -> Diverged:
    """The message for a run that produced a non-finite loss or gradient."""
    if last_saved is None:
        return Diverged(f"{error}: stopped before any checkpoint; start again with a lower learning rate "
                        f"(for example --lr {lr / 2:g})")
    return Diverged(f"{error}: stopped. {Path(out) / CHECKPOINT} ({last_saved}) is the last good state and is kept; "
                    f"resume with a lower learning rate: msrdarts {command} --out {out} --resume --lr {lr / 2:g}")
