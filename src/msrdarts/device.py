"""Where a run executes and how fast: the device, mixed precision, memory format, torch.compile.

Library code names no device type; these settings choose per device. ``auto`` means: on an
accelerator, bf16 autocast, channels_last and ``torch.compile``; on the CPU, none of them (bf16
convolutions are slower there, and compiling a supernet takes longer than it saves on a short
run), except channels_last for the evaluation network's fast path (PyTorch's CPU depthwise
convs with stride 1 are faster in it: bench/depthwise.py, BENCHMARKS.md). Spectral norms and stable ranks are always computed in float32 or wider (see
:mod:`msrdarts.nn.spectral` and :mod:`msrdarts.nn.fused`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .config import AMP_MODES, SWITCHES, check_choice
from .errors import ConfigError, first_line



def resolve_device(name: str) -> torch.device:
    """'auto' picks the accelerator torch reports (if any), else the CPU; others must exist."""
    accel = torch.accelerator.current_accelerator(check_available=True)
    if name == "auto":
        return accel if accel is not None else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device={name!r}: not a device name (cpu, cuda, cuda:0, mps, ...)") from None
    if device.type != "cpu" and (accel is None or accel.type != device.type):
        raise ConfigError(f"--device={name!r}: not available on this machine "
                          f"(available: cpu{', ' + accel.type if accel is not None else ''})")
    if device.type != "cpu" and device.index is not None and device.index >= torch.accelerator.device_count():
        raise ConfigError(f"--device={name!r}: this machine has {torch.accelerator.device_count()} "
                          f"{device.type} device(s)")
    return device


def sgd(params: Any, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """The runs' weight optimiser: SGD with momentum, as one fused kernel where torch has one for
    the parameters' device (the CPU and CUDA). The same update as the per-parameter loop torch
    defaults to on the CPU, and several times faster for a supernet's hundreds of small tensors."""
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") for p in params) or None   # None: torch's default
    return torch.optim.SGD(params, lr, momentum=momentum, weight_decay=weight_decay, fused=fused)


@dataclass(frozen=True)
class Accel:
    """The resolved speed settings of a run."""

    device: torch.device
    amp: bool              # bf16 autocast for forward and backward
    channels_last: bool
    compile: bool

    @classmethod
    def resolve(cls, device: torch.device, amp: str = "auto", channels_last: str = "auto",
                compile: str = "auto", cpu_channels_last: bool = False) -> "Accel":
        """``cpu_channels_last``: what ``channels_last="auto"`` means on the CPU (the evaluation
        network's fast path runs channels_last there; the supernets do not)."""
        for name, value, allowed in (("amp", amp, AMP_MODES), ("channels_last", channels_last, SWITCHES),
                                     ("compile", compile, SWITCHES)):
            check_choice(name, value, allowed)
        accel = device.type != "cpu"
        return cls(device, amp == "bf16" or (amp == "auto" and accel),
                   channels_last == "on" or (channels_last == "auto" and (accel or cpu_channels_last)),
                   compile == "on" or (compile == "auto" and accel))

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device (channels_last if set); returns it (the uncompiled handle)."""
        return model.to(self.device, memory_format=torch.channels_last) if self.channels_last \
            else model.to(self.device)

    def forward_fn(self, model: nn.Module, log: Callable[[str], None] = print) -> Callable[[torch.Tensor], Any]:
        """``model``'s forward, compiled if set; falls back to eager (with one message) if compiling fails."""
        if not self.compile:
            return model
        if not hasattr(torch, "compile"):
            log("torch.compile is not available in this PyTorch; running eagerly")
            return model
        return _CompileOrEager(model, torch.compile(model), log)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


class _CompileOrEager:
    """Calls the compiled module; if compilation raises, says so once and continues eagerly."""

    def __init__(self, model: nn.Module, compiled: Callable, log: Callable[[str], None]):
        self.model, self.compiled, self.log = model, compiled, log

    def __call__(self, x: torch.Tensor) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(x)
            except Exception as e:  # dynamo/inductor failures surface at the first call
                self.log(f"torch.compile failed ({type(e).__name__}: {first_line(e, 160)}); "
                         f"running eagerly (pass --compile off to skip compiling)")
                self.compiled = None
        return self.model(x)
