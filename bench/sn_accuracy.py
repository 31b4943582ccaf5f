"""How close to 1 the spectral norms hold during a real search (issue 18, item 1).

    python bench/sn_accuracy.py [--preset quick] [--epochs 2] [--every 1] [--lr LR] [--batch-size B]
        [--sn-refresh-every N] [--sn-refresh-depthwise-every M] [--dataset D --data FILE]
        [--sample K] [--max-steps S] [--channels]

Runs a real MSR-DARTS search (the preset's optimiser, data and refresh schedule; nothing mocked)
and, after every ``--every``-th training forward, reads every spectrally normalised conv's weight as
that forward used it (the trained weight over the sigma estimate its power iteration had then)
and measures its true operator norm on the conv's real input shape by brute force: the dense
operator of each channel (depthwise convs: the conv applied to every one-hot input) or the
matrix (1x1 convs), then its largest singular value in float64. Prints one JSON line per checked
step (worst and median |norm - 1|, and where the step sits relative to a refresh) and a summary.

On a preset with 32x32 maps a dense check of every conv takes minutes per step: ``--sample K``
checks a fixed random sample of K convs (seed 0) at every checked forward instead, and
``--max-steps S`` stops the search after S weight steps (e.g. the cifar10 preset on the
offline mini CIFAR-10: ``--preset cifar10 --dataset npz --data cifar10-mini.npz``).
``--channels`` adds, for the worst conv of each checked forward, each channel's three largest true
singular values beside the estimate its tracked vectors give: which singular value was missed.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from dataclasses import replace

import torch
import torch.nn.functional as F

from msrdarts.config import get_preset
from msrdarts.nn.ops import OpConv
from msrdarts.nn.spectral import ConvSpectralNorm
from msrdarts.nn.spectral_batch import _sn
from msrdarts.runs.search import SearchRun


class Stop(Exception):
    """Raised by the hook after ``--max-steps`` training forwards."""


def _top_singular(m: torch.Tensor) -> torch.Tensor:
    """Largest singular value of each (g, a, b) matrix: the square root of the top eigenvalue of
    its smaller Gram matrix (float64; a few times faster than an SVD of 1024 x 1024 operators)."""
    gram = m @ m.mT if m.shape[-2] <= m.shape[-1] else m.mT @ m
    return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()


@torch.no_grad()
def dense_groups(conv: OpConv) -> torch.Tensor:
    """Each channel group of a non-1x1 conv's trained weight as its dense operator on the conv's
    input, float64, (groups, C_out/g*H'*W', C_in/g*H*W): the conv applied to every one-hot input."""
    w = conv.parametrizations.weight.original.detach().double()
    H, W = conv.input_hw
    cin = conv.in_channels // conv.groups   # one group's inputs, every group at once
    eye = torch.eye(cin * H * W, dtype=torch.float64).view(cin * H * W, cin, H, W).repeat(1, conv.groups, 1, 1)
    y = F.conv2d(eye, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)   # (cin*HW, C_out, H', W')
    return y.view(cin * H * W, conv.groups, -1).permute(1, 2, 0)


@torch.no_grad()
def true_norms(convs: list[OpConv]) -> list[float]:
    """Largest singular value of each conv's trained weight as an operator on its input (float64)."""
    out = []
    for conv in convs:
        if conv.kernel_size == (1, 1) and conv.padding == (0, 0) and conv.groups == 1:
            w = conv.parametrizations.weight.original.detach().double()
            out.append(float(torch.linalg.matrix_norm(w.flatten(1), ord=2)))
        else:
            out.append(float(_top_singular(dense_groups(conv)).max()))
    return out


@torch.no_grad()
def channel_spectra(conv: OpConv, sn: ConvSpectralNorm, top: int = 3) -> list[dict]:
    """Per channel group of a non-1x1 conv: its ``top`` largest true singular values (dense
    operator, float64) beside the estimate its tracked vectors give (v^T A u of that group)."""
    values = torch.linalg.svdvals(dense_groups(conv))[:, :top]
    estimates = sn._group_sigmas(conv.parametrizations.weight.original.detach())
    return [{"true": [round(float(x), 5) for x in values[g]], "estimate": round(float(estimates[g]), 5)}
            for g in range(conv.groups)]


def where(conv: OpConv, sn: ConvSpectralNorm) -> str:
    """A conv's geometry as normalised: "1x1 16x8" (C_out x C_in) or "8x8/1 k3 d1" (the input map,
    stride, kernel and dilation), with "exact" where it is normalised exactly at every forward."""
    if sn.matrix:
        return f"1x1 {conv.out_channels}x{conv.in_channels}"
    return (f"{sn.input_hw[0]}x{sn.input_hw[1]}/{sn.stride[0]} k{sn.kernel_size[0]} d{sn.dilation[0]}"
            + (" exact" if sn.exact else ""))


def normalised_convs(net) -> list[tuple[OpConv, ConvSpectralNorm]]:
    return [(m, _sn(m)) for m in net.modules() if isinstance(m, OpConv) and _sn(m) is not None]


class Probe(SearchRun):
    """The search run itself, with a forward hook on the supernet that measures the norms."""

    every = 1
    sample = 0
    max_steps = 0
    channels = False
    rows: list[dict] = []

    def build(self, data):
        net, wrapped = super().build(data)
        pairs = normalised_convs(net)
        if self.sample and self.sample < len(pairs):
            keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:self.sample]
            pairs = [pairs[i] for i in sorted(keep.tolist())]
        counter = {"forward": 0, "refreshed": None, "refreshes": 0, "pointwise_refreshed": None}
        refresh = net.refresh_spectral_norms

        names = net.spectral_bundle_names()

        def counted_refresh(**kw) -> None:   # the loop's refreshes (periodic and on drift), counted
            refresh(**kw)
            bundles = kw.get("bundles")
            which = ({names[k] for k in bundles} if bundles is not None else
                     set(names) if kw.get("depthwise", True) else {"1x1"})
            if "1x1" in which:
                counter["pointwise_refreshed"] = counter["forward"]
            if which - {"1x1"}:                # some depthwise convs' (all, or the bundles that drifted)
                counter["refreshed"], counter["refreshes"] = counter["forward"], counter["refreshes"] + 1

        net.refresh_spectral_norms = counted_refresh

        def check(module, args, output):
            if not module.training:
                return
            step = counter["forward"]
            counter["forward"] += 1
            if self.max_steps and step >= self.max_steps:
                raise Stop
            if step % self.every:
                return
            est = [float(sn.sigma(c.parametrizations.weight.original.detach())) for c, sn in pairs]
            true = true_norms([c for c, _ in pairs])
            dev = [t / e * sn.target - 1 for t, e, (_, sn) in zip(true, est, pairs)]
            depthwise = [d for d, (_, sn) in zip(dev, pairs) if not sn.matrix]
            pointwise = [d for d, (_, sn) in zip(dev, pairs) if sn.matrix]
            since = None if counter["refreshed"] is None else step - counter["refreshed"]
            since_pw = None if counter["pointwise_refreshed"] is None else step - counter["pointwise_refreshed"]
            row = {"forward": step, "epoch": step // len(self.train_loader) + 1, "steps_since_refresh": since,
                   "steps_since_pointwise_refresh": since_pw, "refreshes": counter["refreshes"],
                   "worst": max(map(abs, dev)), "median": statistics.median(map(abs, dev)),
                   "worst_depthwise": max(map(abs, depthwise)), "worst_pointwise": max(map(abs, pointwise)),
                   "worst_conv": where(*pairs[max(range(len(dev)), key=lambda i: abs(dev[i]))]),
                   "drift": net.spectral_drift(), "convs": len(dev)}
            if self.channels:                  # the worst conv's channels, where it has several
                worst_conv, worst_sn = pairs[max(range(len(dev)), key=lambda i: abs(dev[i]))]
                if not worst_sn.matrix:
                    row["worst_conv_channels"] = channel_spectra(worst_conv, worst_sn)
            self.rows.append(row)
            print(json.dumps(row), flush=True)

        net.register_forward_hook(check)
        return net, wrapped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="quick")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--every", type=int, default=1, help="check every N-th training forward")
    p.add_argument("--lr", type=float, default=None, help="the weight learning rate (default: the preset's)")
    p.add_argument("--sn-iterations", type=int, default=None, help="power iterations per forward (default: the preset's)")
    p.add_argument("--sn-refresh-every", type=int, default=None,
                   help="steps between the 1x1 convs' refreshes (default: the preset's)")
    p.add_argument("--sn-refresh-depthwise-every", type=int, default=None,
                   help="steps between all convs' refreshes (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per step (default: the preset's); smaller: more, noisier steps per epoch")
    p.add_argument("--sn-refresh-drift", type=float, default=None, help="refresh on this weight drift (default: the preset's)")
    p.add_argument("--dataset", default=None, help="the data set (default: the preset's)")
    p.add_argument("--data", default=None, help="its file or folder (npz, folder)")
    p.add_argument("--sample", type=int, default=0, help="check a fixed random sample of this many convs (0: all)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many weight steps (0: run the epochs)")
    p.add_argument("--channels", action="store_true",
                   help="also print, for the worst conv of each checked forward (unless a 1x1 conv), each channel group's "
                        "3 largest true singular values beside its estimate")
    args = p.parse_args()
    cfg = replace(get_preset(args.preset), epochs=args.epochs, progress="off", plots=False, tensorboard=False,
                  device="cpu")
    cfg = replace(cfg, **{k: v for k, v in (("lr", args.lr), ("sn_iterations", args.sn_iterations),
                                            ("sn_refresh_every", args.sn_refresh_every),
                                            ("sn_refresh_depthwise_every", args.sn_refresh_depthwise_every),
                                            ("batch_size", args.batch_size),
                                            ("sn_refresh_drift", args.sn_refresh_drift),
                                            ("dataset", args.dataset), ("data", args.data)) if v is not None})
    print(json.dumps({"preset": args.preset, "epochs": cfg.epochs, "lr": cfg.lr, "momentum": cfg.momentum,
                      "weight_decay": cfg.weight_decay, "sn_iterations": cfg.sn_iterations,
                      "sn_refresh_every": cfg.sn_refresh_every,
                      "sn_refresh_depthwise_every": cfg.sn_refresh_depthwise_every,
                      "sn_refresh_drift": cfg.sn_refresh_drift, "layers": cfg.layers, "channels": cfg.channels,
                      "batch_size": cfg.batch_size, "dataset": cfg.dataset, "sample": args.sample,
                      "max_steps": args.max_steps}), flush=True)
    Probe.every, Probe.sample, Probe.max_steps, Probe.channels = args.every, args.sample, args.max_steps, args.channels
    with tempfile.TemporaryDirectory() as out:
        try:
            Probe.start(cfg, out, log=lambda s: None)
        except Stop:
            pass
    worst = max(r["worst"] for r in Probe.rows)
    at = max(Probe.rows, key=lambda r: r["worst"])
    print(json.dumps({"summary": True, "checked_forwards": len(Probe.rows), "worst": worst,
                      "worst_at": at["forward"], "worst_steps_since_refresh": at["steps_since_refresh"],
                      "mean_of_worst": statistics.fmean(r["worst"] for r in Probe.rows),
                      "refreshes": Probe.rows[-1]["refreshes"],
                      "within_2pct": worst <= 0.02 and not math.isnan(worst)}))


if __name__ == "__main__":
    main()
