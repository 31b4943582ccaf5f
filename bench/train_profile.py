"""Where the evaluation network's training step spends its time: one profiled step per build.

    python bench/train_profile.py [--batch-size 96] [--top 12]

The step is ``msrdarts bench train-step``'s (DARTS_V2, L = 20, C = 36, auxiliary head, drop
path 0.2, 32x32 RGB random data, 2 threads), for the ``reference`` and ``fast`` builds, each after
two warm-up steps. One JSON line per build: the profiler's total self CPU time and the ``--top``
aten ops by self CPU time (ms, share of the total, calls). The profiler adds its own overhead, so
compare shares, not the totals with ``bench train-step``'s times.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import profile

from msrdarts.bench import _train_setup, _train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=96)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for variant in ("reference", "fast"):
        net, opt, forward, accel, x, y = _train_setup(variant, "DARTS_V2", 20, 36, args.batch_size, 32, 10, "cpu", 0,
                                                      "auto", "auto", "auto")
        for _ in range(2):
            _train_step(net, opt, forward, accel, x, y)
        with profile() as prof:
            _train_step(net, opt, forward, accel, x, y)
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000
        events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
        top = [{"op": e.key, "ms": round(e.self_cpu_time_total / 1000, 1),
                "share": round(e.self_cpu_time_total / 1000 / total, 3), "calls": e.count} for e in events[:args.top]]
        print(json.dumps({"variant": variant, "batch_size": args.batch_size, "self_cpu_ms_total": round(total, 1),
                          "top": top}), flush=True)


if __name__ == "__main__":
    main()
