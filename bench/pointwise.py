"""The fused forward's m pointwise (1x1) convs in NCHW: an einsum batched over m (its output in
(m, C_out, B, H*W) order, copied back to NCHW) against a broadcast matmul (output already NCHW),
forward and backward, at the shapes of the CIFAR-10 search (batch 64) and the quick preset (whose
reduction stages have 4x4 and 2x2 maps). The fused forward takes the matmul on maps of 64 pixels
and up (``msrdarts.nn.fused._pointwise``).

    python bench/pointwise.py

The two are timed in alternating rounds in one process; median ms of forward + backward. One
JSON line per shape (B, m, C, H*W). Then the quick preset's whole fused search step (L = 5, C = 8,
batch 64, 8x8 grey) with the pointwise convs as shipped (matmul from 64 pixels), as the matmul on
every map, and as the einsum on every map, in alternating rounds: one JSON line, median ms.
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


def quick_step() -> None:
    import msrdarts.bench as b
    import msrdarts.nn.fused as fused

    shipped = fused._pointwise

    def everywhere(use_matmul: bool):
        def pointwise(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            B, _, H, W = x.shape
            m, c_out, c_in = w.shape
            if use_matmul:
                return fused._Pointwise.apply(x, w)
            return torch.einsum("mdc,bmcl->bmdl", w, x.reshape(B, m, c_in, H * W)).contiguous().view(B, m * c_out, H, W)
        return pointwise

    torch.manual_seed(0)
    model = b._build("fused", 5, 8, 8, 1, 0)
    opt = b._optimizer(model)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    ways = {"shipped": shipped, "matmul_everywhere": everywhere(True), "einsum_everywhere": everywhere(False)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(25):
        for name, f in ways.items():
            fused._pointwise = f
            t0 = time.perf_counter()
            b._step(model, opt, x, y)
            if r >= 3:    # warm-up rounds
                times[name].append(time.perf_counter() - t0)
    fused._pointwise = shipped
    print(json.dumps({"quick_step_ms_" + k: round(1000 * statistics.median(v), 1) for k, v in times.items()}), flush=True)


if __name__ == "__main__":
    main()
    quick_step()
