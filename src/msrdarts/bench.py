"""Micro-benchmarks behind ``msrdarts bench`` (results are recorded in BENCHMARKS.md)."""

from __future__ import annotations

import statistics
import time

import torch

from .search import resolve_device
from .supernet import SuperNet


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def time_search_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, warmup: int) -> list[float]:
    """Wall time (s) of ``steps`` full training steps (forward, backward, clip, SGD) after ``warmup``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    times = []
    for i in range(warmup + steps):
        _sync(x.device)
        t0 = time.perf_counter()
        loss = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        _sync(x.device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def bench_search_step(layers: int = 8, channels: int = 16, batch_size: int = 64, input_size: int = 32,
                      in_channels: int = 3, steps: int = 10, warmup: int = 2, device: str = "cpu",
                      threads: int | None = None, seed: int = 0) -> dict:
    """Median step time of the supernet with and without spectral normalisation, interleaved.

    The two models are timed in alternating rounds so that machine noise hits both alike.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    x = torch.randn(batch_size, in_channels, input_size, input_size, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    models = {sn: SuperNet(10, layers, channels, input_size, in_channels=in_channels, spectral_norm=sn).to(dev)
              for sn in (True, False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    rounds = max(1, steps // 2)
    for r in range(rounds):
        for sn in (True, False):
            times[sn] += time_search_step(models[sn], x, y, steps=-(-steps // rounds), warmup=warmup if r == 0 else 0)
    ms, ms_no_sn = 1000 * statistics.median(times[True]), 1000 * statistics.median(times[False])
    return {
        "layers": layers, "channels": channels, "batch_size": batch_size, "input_size": input_size,
        "device": str(dev), "threads": torch.get_num_threads(), "steps": len(times[True]),
        "ms_per_step": round(ms, 2), "ms_per_step_no_sn": round(ms_no_sn, 2),
        "sn_overhead": round(ms / ms_no_sn, 3), "images_per_s": round(batch_size / (ms / 1000), 2),
        "torch": torch.__version__,
    }
