"""Where the CPU search step's resident peak comes from (BENCHMARKS.md, "Search step").

    python bench/memory_timeline.py [--steps 2]

Builds the CIFAR-10 search configuration (L = 8, C = 16, batch 64, 32x32) with the fused forward,
plain and with ``--recompute-depthwise``, each in a fresh process, and for each of a few training
steps prints, in MB over the resident size before the step (after glibc's ``malloc_trim``): the
resident high-water mark of the forward, the resident size right after it, the same after a
``malloc_trim`` (what glibc can hand back: freed transients it held between live activations),
the bytes autograd keeps for the backward (``msrdarts.runs.memory.saved_tensor_storages``), and the high-water mark of the
backward. One JSON line per build and step.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys


def child(recompute: bool, steps: int) -> None:
    import torch

    from msrdarts.bench import _optimizer, _rss_kb
    from msrdarts.runs.memory import saved_tensor_storages
    from msrdarts.nn.supernet import SuperNet

    def trimmed() -> int:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")     # reset the high-water mark
        return _rss_kb("VmRSS")

    torch.manual_seed(0)
    net = SuperNet(10, 8, 16, 32, impl="fused", recompute_depthwise=recompute)
    opt = _optimizer(net)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    for step in range(steps):
        base = trimmed()
        with saved_tensor_storages() as storages:
            loss = torch.nn.functional.cross_entropy(net(x), y)
        forward_peak, after_forward = _rss_kb("VmHWM") - base, _rss_kb("VmRSS") - base
        after_trim = trimmed() - base
        opt.zero_grad(set_to_none=True)
        loss.backward()
        backward_peak = _rss_kb("VmHWM") - base
        opt.step()
        print(json.dumps({"recompute_depthwise": recompute, "step": step,
                          "forward_peak_mb": round(forward_peak / 1024), "after_forward_mb": round(after_forward / 1024),
                          "after_forward_trimmed_mb": round(after_trim / 1024),
                          "kept_for_backward_mb": round(sum(storages.values()) / 2 ** 20),
                          "backward_peak_mb": round(backward_peak / 1024)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args()
    for recompute in (False, True):
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"import memory_timeline as m; m.child({recompute}, {args.steps})")
        subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    main()
