"""PyTorch's CPU batch norm (training: forward + backward) in NCHW against channels_last, at the
evaluation network's three stage shapes (DARTS_V2, L = 20, C = 36, batch 96: 36 channels at 32x32,
72 at 16x16, 144 at 8x8).

    python bench/batchnorm.py

Median ms of 7 forward + backward calls after 2 warm-ups, the two layouts one after the other in
one process, 2 threads. One JSON line per shape.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F


def step(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> None:
    x = x.detach().requires_grad_()
    F.batch_norm(x, None, None, w, b, True, 0.1, 1e-5).backward(g)


def median_ms(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    for _ in range(2):
        step(x, g, w, b)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        step(x, g, w, b)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    for C, H in [(36, 32), (72, 16), (144, 8)]:
        w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
        x, g = torch.randn(96, C, H, H), torch.randn(96, C, H, H)
        nchw = median_ms(x, g, w, b)
        cl = median_ms(x.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last),
                       w, b)
        print(json.dumps({"batch": 96, "channels": C, "hw": H, "ms_nchw": round(nchw, 2), "ms_channels_last": round(cl, 2),
                          "channels_last_vs_nchw": round(cl / nchw, 3)}), flush=True)


if __name__ == "__main__":
    main()
