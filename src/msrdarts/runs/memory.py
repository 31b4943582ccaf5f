"""What a search step holds in memory, and ``--recompute-depthwise auto``.

A training step's memory is mostly what autograd keeps from the forward for the backward, and that
grows with the batch. :func:`activation_bytes` measures it on the run's own network, device and
autocast from two small forwards (a saved-tensors hook, :func:`saved_tensor_storages`), with the
network's state put back afterwards; :func:`auto_recompute_depthwise` turns
``--recompute-depthwise auto`` into on or off from that figure, the run's batch per process and
the memory the device has free. ``--recompute-depthwise`` halves what the fused step keeps for
1.13-1.2x its time (BENCHMARKS.md, "Search step"), so ``auto`` takes it only where the plain step
would not fit (in float32 the ImageNet preset's batch of 1,024 on one 80 GB device, for one;
under bf16 autocast that batch is estimated to fit: BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..device import Accel

#: The plain fused step's peak over what autograd keeps (parameters, gradients and momentum aside):
#: transients and allocator slack, with a margin. The CPU's resident peak was 1.23-1.31x the kept
#: bytes at the CIFAR-10 configuration (BENCHMARKS.md, memory timeline); a GPU's caching allocator
#: has not been measured.
PEAK_OVER_KEPT = 1.5
#: Bytes per parameter besides the activations: the weight, its gradient, SGD's momentum and the
#: normalised copy the step computes.
BYTES_PER_PARAMETER_FACTOR = 4


@contextlib.contextmanager
def saved_tensor_storages() -> Iterator[dict[int, int]]:
    """Within the block, record the storage of every tensor autograd saves for a backward: yields
    a dict (storage address -> bytes), each storage once however many nodes save it."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


def saved_bytes(model: nn.Module, x: torch.Tensor, autocast: Any = None) -> int:
    """Bytes of the distinct tensors autograd keeps from one eager forward of ``model`` on ``x``
    (under ``autocast``, a context manager, if given)."""
    with saved_tensor_storages() as storages, autocast if autocast is not None else contextlib.nullcontext():
        out = model(x)
    del out
    return sum(storages.values())


def activation_bytes(model: nn.Module, image_shape: tuple[int, int, int], accel: Accel,
                     batches: tuple[int, int] = (2, 4)) -> tuple[float, float]:
    """(per image, fixed) bytes autograd keeps from one training forward of ``model``, fitted to
    :func:`saved_bytes` at two small ``batches`` of random images of ``image_shape`` (C, H, W), on
    ``accel``'s device, in its layout and under its autocast (eagerly: a compiled step keeps about
    as much). Architecture parameters (a DARTS supernet's alphas) take gradients during the
    measurement, as in the architecture step, which keeps more than the weight step.

    The forwards run in training mode, so they would move the BatchNorm statistics and the power
    iterations: every buffer, every module's mode, the parameters' ``requires_grad`` and the random
    number generators are put back as they were."""
    device = accel.device
    modes = [(m, m.training) for m in model.modules()]
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    arch = list(model.arch_parameters()) if hasattr(model, "arch_parameters") else []
    wanted = [p.requires_grad for p in arch]
    kept = []
    rng = {} if device.type == "cpu" else {"devices": [device], "device_type": device.type}
    try:
        with torch.random.fork_rng(**rng):
            model.train()
            for p in arch:
                p.requires_grad_(True)
            for n in batches:
                x = accel.input(torch.randn(n, *image_shape, device=device))
                kept.append(saved_bytes(model, x, accel.autocast()))
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        for m, training in modes:
            m.training = training
        for p, w in zip(arch, wanted):
            p.requires_grad_(w)
    (n0, n1), (k0, k1) = batches, kept
    per_image = (k1 - k0) / (n1 - n0)
    return per_image, k0 - per_image * n0


def _cgroup_free() -> int | None:
    """What the process's cgroup (v2) still allows: memory.max minus memory.current (containers,
    Kubernetes, Slurm's --mem); None where there is no limit or no cgroup v2."""
    try:
        root = Path("/sys/fs/cgroup")
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text()))
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device, local_world: int = 1) -> int | None:
    """Memory free for one process's run on ``device``: the accelerator's free memory
    (``mem_get_info``); on the CPU the kernel's MemAvailable (Linux), or what the cgroup still allows
    if that is less, shared by the ``local_world`` processes of this machine (torchrun's
    LOCAL_WORLD_SIZE). None where neither can be read."""
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError, IndexError):
            return None
        cgroup = _cgroup_free()
        return min(free, cgroup if cgroup is not None else free) // max(1, local_world)
    mod = getattr(torch, device.type, None)
    if mod is None or not hasattr(mod, "mem_get_info"):
        return None
    return int(mod.mem_get_info(device)[0])


def plain_step_bytes(per_image: float, fixed: float, batch: int, parameters: int, parameter_bytes: int) -> float:
    """The plain fused step's estimated peak: what autograd keeps at ``batch`` images, with
    :data:`PEAK_OVER_KEPT` for transients, plus :data:`BYTES_PER_PARAMETER_FACTOR` copies of the
    ``parameters`` (of ``parameter_bytes`` each)."""
    return PEAK_OVER_KEPT * max(0.0, fixed + per_image * batch) + BYTES_PER_PARAMETER_FACTOR * parameters * parameter_bytes


def auto_recompute_depthwise(net: nn.Module, batch: int, image_shape: tuple[int, int, int], accel: Accel,
                             log: Callable[[str], None] = print) -> bool:
    """What ``--recompute-depthwise auto`` means for this run: on where the plain fused step's
    estimated peak (:func:`plain_step_bytes` at ``batch`` images per process) exceeds the memory
    ``accel``'s device has free (on the CPU, shared by torchrun's local processes); off where the
    network (a SuperNet) has no fused forward or the free memory cannot be read. Measures the plain
    step (``net`` is left plain: the caller sets the answer) and says what it chose, and why, in one
    line."""
    if getattr(net, "impl", None) != "fused":
        return False
    device = accel.device
    net.set_recompute_depthwise(False)
    per_image, fixed = activation_bytes(net, image_shape, accel)
    params = list(net.parameters())
    need = plain_step_bytes(per_image, fixed, batch, sum(p.numel() for p in params),
                            params[0].element_size() if params else 4)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
    free = available_bytes(device, local)
    on = free is not None and need > free
    free_text = "unknown" if free is None else f"{free / 1e9:.1f} GB"
    log(f"--recompute-depthwise auto: {'on' if on else 'off'} (the plain fused step needs about "
        f"{need / 1e9:.1f} GB at {batch} images per process, {free_text} free on {device}"
        + (f" for each of {local} processes" if local > 1 else "") + ")")
    return on
