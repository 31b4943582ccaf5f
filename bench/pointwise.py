"""The fused forward's m pointwise (1x1) convs in NCHW: an einsum batched over m (its output in
(m, C_out, B, H*W) order, copied back to NCHW) against a broadcast matmul (output already NCHW),
forward and backward, at the shapes of the CIFAR-10 search (batch 64) and the quick preset (whose
reduction stages have 4x4 and 2x2 maps). The fused forward takes the matmul on maps of 64 pixels
and up (``msrdarts.nn.fused._pointwise``).

    python bench/pointwise.py

The two are timed in alternating rounds in one process; median ms of forward + backward. One
JSON line per shape (B, m, C, H*W).
"""

from __future__ import annotations

import json
import statistics
import time

import torch


def einsum_then_copy(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("mdc,bmcl->bmdl", w, x).contiguous()


def broadcast_matmul(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.matmul(w, x)


def main() -> None:
    torch.manual_seed(0)
    ways = {"einsum_then_copy": einsum_then_copy, "broadcast_matmul": broadcast_matmul}
    for B, m, C, L in [(64, 4, 16, 1024), (64, 3, 16, 1024), (64, 4, 32, 256), (64, 4, 64, 64), (64, 2, 16, 1024),
                       (64, 4, 8, 64), (64, 4, 16, 16), (64, 2, 16, 16), (64, 4, 32, 4), (64, 2, 32, 4)]:
        w = torch.randn(m, C, C, requires_grad=True)
        x = torch.randn(B, m, C, L, requires_grad=True)
        g = torch.randn(B, m, C, L)
        ref = torch.autograd.grad(einsum_then_copy(w, x), (w, x), g)
        got = torch.autograd.grad(broadcast_matmul(w, x), (w, x), g)
        same = all(torch.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in zip(ref, got))
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(15):
            for name, f in ways.items():
                t0 = time.perf_counter()
                torch.autograd.grad(f(w, x), (w, x), g)
                times[name].append(time.perf_counter() - t0)
        ms = {k: round(1000 * statistics.median(v), 3) for k, v in times.items()}
        print(json.dumps({"B": B, "m": m, "C": C, "HW": L, "same_gradients": same, **{f"ms_{k}": v for k, v in ms.items()},
                          "ratio": round(ms["einsum_then_copy"] / ms["broadcast_matmul"], 2)}), flush=True)


if __name__ == "__main__":
    main()
