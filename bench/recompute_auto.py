"""What ``--recompute-depthwise auto`` decides at each search preset, here and on an 80 GB device.

    python bench/recompute_auto.py [--presets quick cifar10 imagenet] [--device cpu] [--amp off|bf16]

For each preset's supernet (its layers, channels, classes, input size and stem; the fused forward
with spectral norms, as the search builds it), runs the estimate ``auto`` runs before a search's
first step (:func:`msrdarts.runs.memory.activation_bytes`: what autograd keeps from a training
forward at 2 and 4 images, fitted linearly) and prints, at the preset's batch: the kept bytes per
image and fixed, the plain fused step's estimated peak (:func:`msrdarts.runs.memory.plain_step_bytes`),
the memory free on this device and what ``auto`` chooses here, and what it would choose on a device
with 80 GB free (H100/H200 class). ``--amp bf16`` measures under bf16 autocast, as a GPU run does by
default (it keeps about half the bytes); on the CPU the default is float32, as a CPU run. Compare the
estimate with the measured peaks of ``bench/fits_80gb.py`` (float32). One JSON line per preset.
"""

from __future__ import annotations

import argparse
import json

GB80 = 80 * 1000 ** 3      # 80 GB (decimal, as sold)


def estimate(preset: str, device: str, amp: str = "off") -> dict:
    import torch

    from msrdarts.config import get_preset
    from msrdarts.data.registry import dataset_spec
    from msrdarts.device import Accel, resolve_device
    from msrdarts.nn.supernet import SuperNet
    from msrdarts.runs.memory import activation_bytes, available_bytes, plain_step_bytes

    cfg = get_preset(preset)
    spec = dataset_spec(cfg.dataset)
    size = cfg.image_size or spec.size
    dev = resolve_device(device)
    accel = Accel.resolve(dev, amp, "off", "off")
    torch.manual_seed(0)
    net = SuperNet(spec.num_classes, cfg.layers, cfg.channels, size, stem=spec.stem, in_channels=spec.in_channels,
                   impl="fused").to(dev)
    per_image, fixed = activation_bytes(net, (spec.in_channels, size, size), accel)
    params = list(net.parameters())
    need = plain_step_bytes(per_image, fixed, cfg.batch_size, sum(p.numel() for p in params), params[0].element_size())
    free = available_bytes(dev)
    return {"preset": preset, "layers": cfg.layers, "channels": cfg.channels, "input_size": size,
            "batch_size": cfg.batch_size, "kept_mb_per_image": round(per_image / 2 ** 20, 2),
            "kept_mb_fixed": round(fixed / 2 ** 20, 1), "plain_step_estimate_gb": round(need / 1e9, 2),
            "device": str(dev), "amp": "bf16" if accel.amp else "off", "free_gb_here": None if free is None else round(free / 1e9, 2),
            "auto_here": "on" if free is not None and need > free else "off",
            "auto_with_80gb_free": "on" if need > GB80 else "off"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["quick", "cifar10", "imagenet"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="off", choices=("off", "bf16"))
    args = p.parse_args()
    for preset in args.presets:
        print(json.dumps(estimate(preset, args.device, args.amp)), flush=True)


if __name__ == "__main__":
    main()
