"""Many processes, one run: torch.distributed as torchrun starts it, on one machine or many.

``torchrun --nproc_per_node=N -m msrdarts search|train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
:meth:`Dist.start` then joins the process group (NCCL on CUDA devices, else the device's default
backend, gloo on the CPU) and gives each process its device. Without those variables everything
here is a no-op and a run is a plain single process.

Conventions (the README's "Multi-GPU and multi-node runs"):

* ``--batch-size`` is the global batch; each rank takes ``batch_size / world`` samples of every
  global batch (:func:`msrdarts.data.shard_bounds`), so batches, augmentation and gradients
  (averaged by DistributedDataParallel) are those of a single process up to rounding.
* Weights stay identical on every rank (DDP); buffers (BN statistics, power-iteration vectors)
  are broadcast from rank 0 before anything reads them, so stable ranks and the derived genotype
  are computed from identical state, and :meth:`Dist.agree` checks that every rank derived the
  same genotype.
* Rank 0 alone writes files, logs and shows progress; metrics are sums reduced over ranks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError


def shutdown() -> None:
    """Leave the process group, if this process joined one (the CLI calls this on exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def cpu_threads_per_rank(local_world: int, cores: int, threads: int) -> int:
    """Threads of one CPU rank: its share of the machine's cores, at most ``threads`` (what the
    process was given), at least 1."""
    return max(1, min(threads, cores // max(1, local_world)))


@dataclass
class Dist:
    """This process's place in the run (rank 0 of 1 when not started by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None   # where collectives' tensors live

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def start(cls, device: torch.device) -> tuple["Dist", torch.device]:
        """Join the process group torchrun describes (if any); returns it and this rank's device."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device), device
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type != "cpu":
            if torch.accelerator.device_count() <= local_rank:
                raise ConfigError(f"rank {rank}: LOCAL_RANK {local_rank} but this machine has "
                                  f"{torch.accelerator.device_count()} {device.type} device(s)")
            device = torch.device(device.type, local_rank)
            torch.accelerator.set_device_index(local_rank)
        else:   # CPU processes on one machine share its cores (an inherited OMP_NUM_THREADS would oversubscribe)
            torch.set_num_threads(cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                                                       len(os.sched_getaffinity(0)), torch.get_num_threads()))
        if not dist.is_initialized():   # joined once per process; later runs in it reuse the group
            dist.init_process_group(backend=dist.get_default_backend_for_device(device))
        return cls(rank, world, local_rank, device), device

    def describe(self, batch_size: int) -> str:
        """The log's note on the process group ('' for one process)."""
        if not self.active:
            return ""
        cpu = self.device is not None and self.device.type == "cpu"
        return (f"; {self.world} processes, {batch_size // self.world} images each per step"
                + (f", {torch.get_num_threads()} CPU threads each (the cores shared by this machine's ranks)"
                   if cpu else ""))

    # --- collectives (all no-ops for a single process) -------------------------------------------
    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (a download, say); the others once it is done."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks (a new tensor on the values' device)."""
        if not self.active:
            return values
        t = values.detach().to(self.device, torch.float64).clone()
        dist.all_reduce(t)
        return t.to(values.device, values.dtype)

    def any(self, flag: bool | torch.Tensor) -> bool:
        """True if ``flag`` is true on any rank."""
        if not self.active:
            return bool(flag)
        t = torch.as_tensor(flag, dtype=torch.float32).to(self.device).reshape(1)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (plain data), in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def agree(self, what: str, value: str) -> None:
        """Raise if the ranks hold different ``value`` s (an architecture decision must be global)."""
        values = self.gather(value)
        if any(v != values[0] for v in values):
            raise RuntimeError(f"ranks disagree on the {what}: " + "; ".join(
                f"rank {r}: {v}" for r, v in enumerate(values)))

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BN statistics, power-iteration vectors, mixing weights) to all."""
        if self.active:
            broadcast_from_main(list(model.buffers()), self.device)

    def wrap(self, model: nn.Module, sync_bn: bool = False) -> nn.Module:
        """``model`` with its gradients averaged over the processes (a no-op for one process):
        DistributedDataParallel on accelerators (its bucketed all-reduces overlap the backward),
        :class:`AveragedGradients` on the CPU. ``sync_bn`` first converts the BatchNorms to
        SyncBatchNorm (statistics over the global batch; accelerators only)."""
        if not self.active:
            return model
        if sync_bn:
            if self.device is None or self.device.type == "cpu":
                raise ConfigError("--sync-bn: SyncBatchNorm runs on accelerators only (GPU/XPU), not on the CPU")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if self.device is None or self.device.type == "cpu":
            return AveragedGradients(model, self.device)
        return nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index])

    def per_rank_batch(self, batch_size: int, flag: str = "--batch-size") -> int:
        """The per-rank share of a global batch; it must divide evenly."""
        if batch_size % self.world:
            raise ConfigError(f"{flag}={batch_size} is the global batch; it must be divisible by the world size "
                              f"{self.world} (each rank takes {flag} / world samples)")
        return batch_size // self.world


@torch.no_grad()
def broadcast_from_main(tensors: list[torch.Tensor], device: torch.device | None) -> None:
    """Copy rank 0's values of ``tensors`` into every rank's, one broadcast per dtype."""
    tensors = [t for t in tensors if t.numel()]
    for dtype in sorted({t.dtype for t in tensors}, key=str):   # the same order on every rank
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in group]).to(device)
        dist.broadcast(flat, 0)
        torch._foreach_copy_([t.detach() for t in group],
                             [f.view_as(t) for f, t in zip(flat.to(group[0].device).split([t.numel() for t in group]),
                                                           group)])


class AveragedGradients(nn.Module):
    """Data parallelism for CPU processes: ``module`` (its parameters and buffers first copied
    from rank 0), whose parameters' gradients are averaged over the processes by one all-reduce of
    all of them, flattened, when each backward through its output ends.

    What DistributedDataParallel does on the CPU, without its per-parameter bookkeeping: a
    supernet has hundreds of parameter tensors and thousands of buffers, and at the quick preset DDP's
    hooks, buckets and buffer broadcasts made a 2-process run slower per image than one process
    (bench/torchrun_cpu.sh, BENCHMARKS.md). On
    the CPU there is no device to overlap the reduction with, so nothing is lost by reducing once at
    the end. Buffers are not broadcast at each forward (DDP's default): the runs copy rank 0's
    before they read them (:meth:`Dist.sync_buffers`). ``.module`` is the wrapped network, as DDP's.
    """

    def __init__(self, module: nn.Module, device: torch.device | None = None):
        super().__init__()
        self.module = module
        # Listed once: walking a supernet's ~5,000 modules costs about as much as the all-reduce.
        self._params = [p for p in module.parameters() if p.requires_grad]
        broadcast_from_main([*module.parameters(), *module.buffers()], device)   # one start, as DDP's
        self._queued = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        if torch.is_grad_enabled():
            self._queued = False
            for t in out if isinstance(out, (tuple, list)) else [out]:   # logits, or (logits, auxiliary)
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._queue)
        return out

    def _queue(self, grad: torch.Tensor) -> torch.Tensor:
        """At the first output gradient of a backward: average the gradients when it ends."""
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)
        return grad

    @torch.no_grad()
    def _average(self) -> None:
        self._queued = False
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(dist.get_world_size())
        torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])
