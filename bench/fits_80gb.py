"""What fits in 80 GB (H100/H200 class) at each search preset (issue 18, item 2).

    python bench/fits_80gb.py [--presets quick cifar10 imagenet] [--batches 32 64] [--device cpu]

For each preset's supernet (its layers, channels, classes, input size and stem; the fused forward
with spectral norms, as the search builds it), measures the peak memory one search step adds at two
batch sizes, each in a fresh process (``msrdarts.bench._peak_mb``: on the CPU the resident
high-water mark over the resident size before the step, after glibc's ``malloc_trim`` has handed
back what building the model freed, else the step reuses it unseen; on an accelerator its peak
allocated memory), plain, with ``--recompute-depthwise`` and with ``--checkpoint-cells``. It fits memory = fixed + per_image * batch and
prints, per preset and variant, the per-image memory, the estimated peak at the preset's own batch
size and the largest batch whose estimate fits in 80 GB (the model, its gradients and momentum
added: small next to the activations). On the CPU resident memory stands in for device memory (the
allocators differ and cuDNN workspaces are not counted): an estimate to size a run, not a
guarantee. One JSON line per preset and variant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

GB80_MB = 80 * 1000 ** 3 / 2 ** 20     # 80 GB (decimal, as sold) in MiB


VARIANTS = ((False, False), (False, True), (True, False))   # (checkpoint_cells, recompute_depthwise)


def child(preset: str, batch: int, checkpoint_cells: bool, recompute_depthwise: bool, device: str) -> dict:
    """In a fresh process: the model's size and the peak memory (MB) one step adds at ``batch``."""
    import torch

    import msrdarts.bench as b
    from msrdarts.config import get_preset
    from msrdarts.data.registry import dataset_spec
    from msrdarts.device import Accel, resolve_device
    from msrdarts.nn.supernet import SuperNet

    cfg = get_preset(preset)
    spec = dataset_spec(cfg.dataset)
    size = cfg.image_size or spec.size
    dev = resolve_device(device)
    accel = Accel.resolve(dev, "off", "off", "off")
    torch.manual_seed(0)
    model = SuperNet(spec.num_classes, cfg.layers, cfg.channels, size, stem=spec.stem, in_channels=spec.in_channels,
                     impl="fused", checkpoint_cells=checkpoint_cells, recompute_depthwise=recompute_depthwise).to(dev)
    opt = b._optimizer(model)
    x = torch.randn(batch, spec.in_channels, size, size, device=dev)
    y = torch.randint(0, spec.num_classes, (batch,), device=dev)
    params = sum(p.numel() for p in model.parameters())
    return {"input_size": size, "layers": cfg.layers, "channels": cfg.channels, "params": params,
            "step_mb": b._peak_mb(lambda: b._step(model, opt, x, y, None, None, accel), dev)}


def measure(preset: str, batch: int, checkpoint_cells: bool, recompute_depthwise: bool, device: str) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import fits_80gb as f; print(json.dumps(f.child({preset!r}, {batch}, {checkpoint_cells}, "
            f"{recompute_depthwise}, {device!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"fits_80gb: {preset} at batch {batch} failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["quick", "cifar10", "imagenet"])
    p.add_argument("--batches", nargs=2, type=int, default=[32, 64], metavar=("B1", "B2"))
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    from msrdarts.config import get_preset

    b1, b2 = args.batches
    for preset in args.presets:
        for checkpoint_cells, recompute_depthwise in VARIANTS:
            m1, m2 = (measure(preset, b, checkpoint_cells, recompute_depthwise, args.device) for b in (b1, b2))
            per_image = (m2["step_mb"] - m1["step_mb"]) / (b2 - b1)
            fixed = m1["step_mb"] - per_image * b1
            model_mb = 3 * m1["params"] * 4 / 2 ** 20          # weights, gradients, momentum (fp32)
            batch = get_preset(preset).batch_size
            fits = int((GB80_MB - model_mb - fixed) // per_image) if per_image > 0 else None
            print(json.dumps({"preset": preset, "checkpoint_cells": checkpoint_cells,
                              "recompute_depthwise": recompute_depthwise, "device": args.device,
                              "layers": m1["layers"], "channels": m1["channels"], "input_size": m1["input_size"],
                              "batches": [b1, b2], "step_mb": [m1["step_mb"], m2["step_mb"]],
                              "per_image_mb": round(per_image, 2), "fixed_mb": round(fixed, 1),
                              "model_mb": round(model_mb, 1), "preset_batch": batch,
                              "preset_batch_peak_gb": round((model_mb + fixed + per_image * batch) / 1024, 2),
                              "largest_batch_in_80gb": fits}), flush=True)


if __name__ == "__main__":
    main()
