"""CPU batch norm in training (forward + backward): PyTorch's kernel in NCHW and in channels_last,
and msrdarts's channels_last path (:func:`msrdarts.nn.batchnorm.batch_norm_channels_last`), at the
evaluation network's stage shapes (DARTS_V2, L = 20, C = 36, batch 96: 36 channels at 32x32, 72 at
16x16, 144 at 8x8; the CIFAR stem's 108 at 32x32) and a few around them, to place the fast path's
threshold (:func:`msrdarts.nn.batchnorm.use_fast_batch_norm`).

    python bench/batchnorm.py

Median ms of 7 forward + backward calls after 2 warm-ups, the three one after the other in one
process, 2 threads. One JSON line per shape; ``fast_vs_channels_last`` below 1 means the fast path
wins there.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from msrdarts.bench import median_ms
from msrdarts.nn.batchnorm import batch_norm_channels_last


def step(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, b: torch.Tensor, fast: bool) -> None:
    x = x.detach().requires_grad_()
    rm, rv = torch.zeros(x.shape[1]), torch.ones(x.shape[1])
    if fast:
        batch_norm_channels_last(x, w, b, rm, rv, 0.1, 1e-5).backward(g)
    else:
        F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5).backward(g)


def timed(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, b: torch.Tensor, fast: bool = False) -> float:
    return median_ms(lambda: step(x, g, w, b, fast))


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    for C, H in [(16, 32), (20, 32), (24, 32), (32, 32), (36, 32), (40, 32), (44, 32), (48, 32), (72, 32), (108, 32),
                 (36, 16), (48, 16), (72, 16), (144, 16), (36, 8), (144, 8)]:
        w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
        x, g = torch.randn(96, C, H, H), torch.randn(96, C, H, H)
        nchw = timed(x, g, w, b)
        x, g = x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
        cl = timed(x, g, w, b)
        fast = timed(x, g, w, b, fast=True)
        print(json.dumps({"cpu_capability": torch.backends.cpu.get_cpu_capability(), "batch": 96, "channels": C,
                          "hw": H, "ms_nchw": round(nchw, 2), "ms_channels_last": round(cl, 2), "ms_fast": round(fast, 2), "channels_last_vs_nchw": round(cl / nchw, 3),
                          "fast_vs_channels_last": round(fast / cl, 3), "fast_vs_nchw": round(fast / nchw, 3)}),
              flush=True)


if __name__ == "__main__":
    main()
