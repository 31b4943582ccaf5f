"""The search step now against the search step of an earlier commit, side by side in one process.

Issue 18 asks for a CIFAR-10 search step of at most 3.4 GB "with the step no slower than now",
"now" being the code when the issue was filed (commit 3472016, the HEAD its first commit built on).
Timings of two runs on a shared VM differ by 10-20 %, so this script loads that commit's package
(``git archive`` into a temporary folder, imported under another name: the package imports itself
only relatively) and times its fused step beside today's fused step and today's
``--recompute-depthwise`` step in alternating rounds, on the same random batch, each with its own
package's optimizer and step function. The resident peak of one step of each build is read in a
fresh process (``_peak_mb`` of today's bench, applied to each model alike).

    python bench/since_filing.py                      # CIFAR-10 search configuration, CPU
    python bench/since_filing.py --commit 3472016 --rounds 4 --steps-per-round 2

Prints one JSON object (``bash bench/run_all.sh since-filing`` keeps it in bench/results/).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BUILDS = ("then_fused", "now_fused", "now_recompute_depthwise")


def _load_then(commit: str, root: Path):
    """The package at ``commit`` as ``msrdarts_then`` (its bench module), from ``git archive``."""
    archive = root / "then.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(REPO), "archive", commit, "src/msrdarts"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    (root / "src" / "msrdarts").rename(root / "msrdarts_then")
    sys.path.insert(0, str(root))
    return importlib.import_module("msrdarts_then.bench")


def _model(build: str, then_bench, args: argparse.Namespace):
    """(model, time_search_step, optimizer) of one build, each from its own package."""
    import msrdarts.bench as now
    if build == "then_fused":
        torch.manual_seed(args.seed)
        m = then_bench._build("fused", args.layers, args.channels, args.input_size, 3, args.seed)
        return m, then_bench.time_search_step, then_bench._optimizer(m)
    m = now._build("fused" if build == "now_fused" else "fused_recompute_depthwise",
                   args.layers, args.channels, args.input_size, 3, args.seed)
    return m, now.time_search_step, now._optimizer(m)


def _child(build: str, commit: str, args: argparse.Namespace) -> float | None:
    """Peak MB one step of ``build`` adds, in this (fresh) process."""
    import msrdarts.bench as now
    with tempfile.TemporaryDirectory() as tmp:
        then_bench = _load_then(commit, Path(tmp)) if build == "then_fused" else None
        model, _, opt = _model(build, then_bench, args)
        model.train()
        x = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
        y = torch.randint(0, 10, (args.batch_size,))
        step = (then_bench._step if then_bench is not None else now._step)
        return now._peak_mb(lambda: step(model, opt, x, y), torch.device("cpu"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commit", default="3472016", help="the earlier commit (default: issue 18's filing)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=BUILDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.commit], capture_output=True,
                            text=True, check=True).stdout.strip()
    if args.child:
        print(json.dumps(_child(args.child, commit, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        then_bench = _load_then(commit, Path(tmp))
        built = {b: _model(b, then_bench, args) for b in BUILDS}
        torch.manual_seed(args.seed)
        x = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
        y = torch.randint(0, 10, (args.batch_size,))
        times: dict[str, list[float]] = {b: [] for b in BUILDS}
        for r in range(args.rounds):      # alternating rounds; each round's first step is untimed
            for b, (model, timer, opt) in built.items():
                times[b] += timer(model, x, y, steps=args.steps_per_round, warmup=1, opt=opt)
    ms = {b: 1000 * statistics.median(t) for b, t in times.items()}
    peak = {}
    for b in BUILDS:     # one fresh process each
        out = subprocess.run([sys.executable, __file__, "--child", b, "--commit", commit,
                              "--layers", str(args.layers), "--channels", str(args.channels),
                              "--batch-size", str(args.batch_size), "--input-size", str(args.input_size),
                              "--seed", str(args.seed)],
                             capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
        peak[b] = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
        if out.returncode != 0:
            print(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"{b}: child failed", file=sys.stderr)
    print(json.dumps({
        "then_commit": commit, "layers": args.layers, "channels": args.channels, "batch_size": args.batch_size,
        "input_size": args.input_size, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "steps_per_build": len(times["now_fused"]),
        **{f"ms_per_step_{b}": round(ms[b], 1) for b in BUILDS},
        "now_fused_over_then_fused": round(ms["now_fused"] / ms["then_fused"], 3),
        "now_recompute_depthwise_over_then_fused": round(ms["now_recompute_depthwise"] / ms["then_fused"], 3),
        **{f"peak_step_memory_mb_{b}": None if peak[b] is None else round(peak[b], 1) for b in BUILDS},
    }, indent=1))


if __name__ == "__main__":
    main()
