"""Command line: ``msrdarts search | train | eval | plot | report | info | sample | compare | bench``.

The flags of ``search`` and ``train`` are generated from :class:`msrdarts.config.SearchConfig` and
:class:`msrdarts.config.TrainConfig`, so every setting of a preset can be overridden and
``--help`` shows each preset's value. Parsing produces a typed config and calls
one function; user errors are printed as one line (``msrdarts: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from .errors import MsrdartsError, RunInterrupted


def _preset_help(name: str, presets: dict) -> str:
    return ", ".join(f"{p}: {_show(getattr(cfg, name))}" for p, cfg in presets.items())


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _add_config_flags(parser: argparse.ArgumentParser, cls: type, presets: dict) -> None:
    group = parser.add_argument_group("settings (default: the preset's value, shown as preset: value)")
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue   # set by the program, not by a flag
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} ({_preset_help(f.name, presets)})"
        default = getattr(cls(), f.name)
        if f.name == "progress":   # --progress forces bars, --no-progress turns them off; auto by default
            group.add_argument("--progress", dest="progress", action="store_const", const="on", default=None,
                               help=help_text)
            group.add_argument("--no-progress", dest="progress", action="store_const", const="off",
                               help="no progress bars (one line per epoch)")
        elif f.name == "recompute_depthwise":   # a bare flag is 'on', as when it was a switch
            group.add_argument(flag, nargs="?", const="on", default=None, metavar="auto|on|off", help=help_text)
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_const", const="off",
                               help="the same as " + flag + " off")
        elif isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, tuple):
            group.add_argument(flag, type=lambda s: tuple(p.strip() for p in s.split(",") if p.strip()),
                               default=None, metavar="A,B,...", help=help_text)
        else:
            group.add_argument(flag, type=type(default), default=None, metavar=type(default).__name__.upper(),
                               help=help_text)


def _overrides(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata.get("cli", True)}


def build_parser() -> argparse.ArgumentParser:
    from .config import SEARCH_PRESETS, TRAIN_PRESETS, SearchConfig, TrainConfig
    from .data.registry import list_datasets
    from .methods import list_methods

    parser = argparse.ArgumentParser(prog="msrdarts", description="MSR-DARTS neural architecture search")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("search", help="search a cell architecture with MSR-DARTS (or another --method)",
                       description=f"Train a supernet and derive a genotype. Methods: {', '.join(list_methods())} "
                                   f"(each brings its own defaults on top of the preset; a flag still wins). "
                                   f"Data sets: {', '.join(list_datasets())}.")
    s.add_argument("--preset", default=None, help=f"protocol preset: {', '.join(SEARCH_PRESETS)} "
                                                  f"(default: cifar10; on --resume, the run's own config)")
    s.add_argument("--out", required=True, type=Path, help="run folder (refuses one that holds a run unless --resume)")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed epoch")
    _add_config_flags(s, SearchConfig, SEARCH_PRESETS)

    t = sub.add_parser("train", help="train a genotype from scratch (DARTS protocol)",
                       description="Train a genotype's evaluation network from scratch and report test error, "
                                   "parameters and mult-adds.")
    t.add_argument("--preset", default=None, help=f"protocol preset: {', '.join(TRAIN_PRESETS)} "
                                                  f"(default: cifar10; on --resume, the run's own config)")
    t.add_argument("--out", required=True, type=Path, help="run folder (refuses one that holds a run unless --resume)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed epoch")
    _add_config_flags(t, TrainConfig, TRAIN_PRESETS)

    e = sub.add_parser("eval", help="re-evaluate a trained checkpoint (best.pt or checkpoint.pt) on the test split")
    e.add_argument("--checkpoint", required=True, type=Path, help="RUN/best.pt or RUN/checkpoint.pt")
    e.add_argument("--data", default=None, help="data folder (default: the one the run used)")
    e.add_argument("--device", default="auto", help="device (default: auto)")
    e.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("plot", help="draw a run's pictures into RUN/plots/, or any genotype's two cells",
                       description="msrdarts plot RUN_DIR: (re)draw every picture of a search or training run into "
                                   "RUN_DIR/plots/ (cells, stable-rank heatmap and trajectories, curves; SVG and "
                                   "PNG). msrdarts plot --genotype NAME_OR_FILE [--out F]: draw one genotype's cells.")
    p.add_argument("run", nargs="?", type=Path, default=None, help="a run folder (the --out of search or train)")
    p.add_argument("--genotype", default=None,
                   help="genotype.json, genotype-cells.json (per-cell: every cell drawn), a file or string in DARTS "
                        "Genotype(...) form, or a zoo name")
    p.add_argument("--out", type=Path, default=None,
                   help="with --genotype: picture file to write (.png, .svg, .pdf; default: NAME-cells.png)")

    rp = sub.add_parser("report", help="one self-contained HTML page for one or several runs",
                        description="Write an HTML report (pictures inlined, opens without network) of search and "
                                    "training runs: config, genotype, results, pictures and, for several runs, the "
                                    "comparison of msrdarts compare.")
    rp.add_argument("runs", nargs="+", type=Path, help="run folders (the --out of search or train)")
    rp.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file to write (default: report.html)")
    rp.add_argument("--title", default="msrdarts report", help="page title (default: msrdarts report)")

    i = sub.add_parser("info", help="parameters and mult-adds of the evaluation network of a genotype")
    i.add_argument("--genotype", required=True, help="genotype.json, genotype-cells.json (per-cell), a DARTS "
                                                     "Genotype(...) string or file, or a zoo name")
    i.add_argument("--dataset", default="cifar10", help="data set whose shape to use (default: cifar10; also "
                                                       "digits, cifar100, svhn, imagenet)")
    i.add_argument("--layers", type=int, default=None, help="cells (default: 20; a per-cell genotype: its cell count)")
    i.add_argument("--channels", type=int, default=36, help="initial channels (default: 36)")
    i.add_argument("--json", action="store_true", help="print one JSON object")

    r = sub.add_parser("sample", help="draw random genotypes (the random-search baseline)",
                       description="Draw genotypes uniformly from a search space, optionally only those within a "
                                   "parameter budget; each is written as DIR/sample-KK/genotype.json.")
    r.add_argument("--space", default="msr", help="msr (its 4 conv ops) or darts (the 7 DARTS ops besides none) "
                                                  "(default: msr)")
    r.add_argument("--n", type=int, default=8, help="how many genotypes (default: 8)")
    r.add_argument("--seed", type=int, default=0, help="seed of the draws (default: 0)")
    r.add_argument("--out", type=Path, required=True, help="folder for the sample-KK/ folders")
    r.add_argument("--params-m", type=float, default=None,
                   help="keep only genotypes with this many million parameters, within --tolerance (default: any)")
    r.add_argument("--tolerance", type=float, default=0.1, help="relative tolerance of --params-m (default: 0.1)")
    r.add_argument("--dataset", default="cifar10", help="data set whose network --params-m counts (default: cifar10)")
    r.add_argument("--layers", type=int, default=20, help="cells of that network (default: 20)")
    r.add_argument("--channels", type=int, default=36, help="initial channels of that network (default: 36)")

    c = sub.add_parser("compare", help="one table of search, sample and training runs: test error over seeds, "
                                       "cost, size, rank against the random baseline",
                       description="Gather run folders into one markdown table (printed, and written to --out) and "
                                   "CSV files. A training run's method is read from where its genotype came from: "
                                   "a search run, msrdarts sample (random), or a named genotype.")
    c.add_argument("runs", nargs="+", type=Path, help="run folders (train, search, sample-KK)")
    c.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    c.add_argument("--csv", type=Path, default=None,
                   help="write the per-run rows here, and the per-method summary as <stem>-methods.csv beside it")

    b = sub.add_parser("bench", help="micro-benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    st = bsub.add_parser("search-step", help="time one supernet training step: fused vs reference, with and "
                                             "without spectral norm, against the machine's copy and matmul ceilings")
    _bench_arguments(st, layers=8, channels=16, batch_size=64, steps=10)
    st.add_argument("--profile", action="store_true", help="also print the fused step's top operators by self time")
    st.add_argument("--sn-refresh-interval", type=float, default=10.0, metavar="STEPS",
                    help="mean weight steps between refreshes of all spectral norms to amortise in the overhead "
                         "(an upper bound: a search refreshes only the bundles of convs that drifted; "
                         "--sn-refresh-history amortises those at their real rates); default 10, the fixed "
                         "schedule before the drift trigger. Not used with --method, whose steps run the "
                         "search's own refreshes")
    st.add_argument("--sn-refresh-history", default=None, metavar="HISTORY",
                    help="instead of --sn-refresh-interval: a real search's history.jsonl (same layers, channels "
                         "and sizes); each bundle of depthwise convs is refreshed alone in the bench and amortised "
                         "at the rate that search refreshed it (sn_refreshes_by_map over train_steps)")
    st.add_argument("--method", default=None, metavar="A,B,...",
                    help="instead of the variants: time one whole search step (architecture step, weight step, "
                         "amortised spectral-norm refresh) of each of these methods (msr, darts, pc-darts, p-darts) "
                         "side by side at the same configuration, in eager fp32")
    st.add_argument("--space", default="msr", help="with --method: the candidate ops of every method (msr|darts)")
    tr = bsub.add_parser("train-step", help="time one training step of the evaluation network (auxiliary head, "
                                            "drop path 0.2): the reference network vs the fast path (--impl fast)")
    tr.add_argument("--genotype", default="DARTS_V2", help="genotype file, string or zoo name (default: DARTS_V2)")
    _bench_arguments(tr, layers=20, channels=36, batch_size=96, steps=6)
    return parser


def _bench_arguments(p: argparse.ArgumentParser, layers: int, channels: int, batch_size: int, steps: int) -> None:
    """The flags both step benchmarks take."""
    p.add_argument("--layers", type=int, default=layers, help=f"cells (default: {layers})")
    p.add_argument("--channels", type=int, default=channels, help=f"initial channels (default: {channels})")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"images per step (default: {batch_size})")
    p.add_argument("--input-size", type=int, default=32, help="image side (default: 32)")
    p.add_argument("--in-channels", type=int, default=3, help="image channels (default: 3)")
    p.add_argument("--steps", type=int, default=steps, help=f"timed steps, median reported (default: {steps})")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: 2)")
    p.add_argument("--device", default="cpu", help="device (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurement (two extra processes)")
    p.add_argument("--amp", default="auto", help="bf16 autocast, as for search and train: auto|bf16|off (default: "
                                                 "auto, on for an accelerator)")
    p.add_argument("--channels-last", default="auto", help="as for search and train: auto|on|off (default: auto)")
    p.add_argument("--compile", default="auto", help="torch.compile the forwards, as for search and train: "
                                                     "auto|on|off (default: auto; compiling happens in the warm-up "
                                                     "steps)")


def _config(args: argparse.Namespace, cls: type, make: Any) -> tuple[Any, dict[str, Any]]:
    """The preset (or, on --resume, the run's own settings) with the flags' overrides applied, and
    where each setting came from (``make``: :func:`msrdarts.api.search_config` or ``train_config``)."""
    from .runs.checkpoint import load_resume_checkpoint
    from .runs.folder import CHECKPOINT, CONFIG, read_json

    base: Any = args.preset or "cifar10"
    ckpt = args.out / CHECKPOINT
    if args.resume and args.preset is None and ckpt.is_file():
        # The run's own settings; the checkpoint is their source of truth (the run warns of a fallback).
        saved = load_resume_checkpoint(ckpt, log=lambda message: None)[0].get("config")
        try:
            base = cls.from_dict(saved, source=str(ckpt))
        except (TypeError, AttributeError) as e:
            raise MsrdartsError(f"{ckpt}: no usable config ({e})") from None
    elif args.resume and args.preset is None and _staged(args.out):
        # a search in stages (P-DARTS): its settings are in RUN/config.json, its checkpoints in RUN/stage-K/
        base = cls.from_dict(read_json(args.out / CONFIG), source=str(args.out / CONFIG))
    return make(base, **_overrides(args, cls))


def _staged(out: Path) -> bool:
    """Whether ``out`` holds a search in stages (P-DARTS): settings in config.json, no checkpoint of its own."""
    from .runs.folder import CHECKPOINT, CONFIG, read_json

    if (out / CHECKPOINT).is_file() or not (out / CONFIG).is_file():
        return False
    try:
        return len(read_json(out / CONFIG).get("stage_layers") or ()) > 1
    except (MsrdartsError, AttributeError):   # unreadable: the run's own resume gives the message
        return False


def _run(args: argparse.Namespace, run: Any, cfg: Any, origin: dict[str, Any]) -> int:
    from .runs.folder import CHECKPOINT

    try:
        run(cfg, args.out, resume=args.resume, origin=origin)
    except KeyboardInterrupt:
        if (args.out / CHECKPOINT).is_file() or _staged(args.out):
            print(f"msrdarts: interrupted; continue with: msrdarts {args.command} --out {args.out} --resume",
                  file=sys.stderr)
        else:
            print("msrdarts: interrupted before the first epoch completed; nothing was saved", file=sys.stderr)
        return 130
    return 0


def _search(args: argparse.Namespace) -> int:
    from .api import search_config
    from .config import SearchConfig
    from .runs.search import run_search

    return _run(args, run_search, *_config(args, SearchConfig, search_config))


def _train(args: argparse.Namespace) -> int:
    from .api import train_config
    from .config import TrainConfig
    from .runs.train import run_train

    return _run(args, run_train, *_config(args, TrainConfig, train_config))


def _eval(args: argparse.Namespace) -> int:
    from .runs.train import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data, args.device, progress=not args.json)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>16}: {v}" for k, v in result.items()))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .zoo import load_genotype
    from .nn.ops import list_ops
    from .views.plots import plot_genotype, plot_run

    if (args.run is None) == (args.genotype is None):
        raise MsrdartsError("plot: give either a run folder or --genotype NAME_OR_FILE")
    if args.run is not None:
        if args.out is not None:
            raise MsrdartsError("plot RUN_DIR writes into RUN_DIR/plots/; --out goes with --genotype")
        files = plot_run(args.run)
        print(f"wrote {len(files)} pictures into {files[0].parent}/: "
              + ", ".join(sorted({f.stem for f in files})))
        return 0
    genotype = load_genotype(args.genotype, primitives=list_ops())
    if args.out is None:
        stem = Path(args.genotype).stem if Path(args.genotype).suffix else str(args.genotype)
        args.out = Path(("".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:60] or "genotype")
                        + "-cells.png")
    if args.out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise MsrdartsError(f"--out {args.out}: unsupported picture type; use .png, .svg or .pdf")
    if not args.out.parent.is_dir():
        raise MsrdartsError(f"--out {args.out}: folder {args.out.parent} does not exist")
    plot_genotype(genotype, args.out, title=str(args.genotype) if len(str(args.genotype)) < 60 else None)
    print(f"{genotype}\nwrote {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .views.report import write_report

    out = write_report(args.runs, args.out, title=args.title)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB, {len(args.runs)} run(s))")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .data.registry import dataset_info
    from .genotype import CellGenotypes
    from .zoo import load_genotype
    from .nn.metrics import count_mult_adds, count_parameters
    from .nn.network import Network
    from .nn.ops import list_ops

    genotype = load_genotype(args.genotype, primitives=list_ops())
    shape = dataset_info(args.dataset)
    layers = args.layers if args.layers is not None else (genotype.layers if isinstance(genotype, CellGenotypes) else 20)
    net = Network(genotype, shape.num_classes, layers, args.channels, stem=shape.stem,
                  in_channels=shape.in_channels, input_size=shape.input_size, auxiliary=True)
    result = {"genotype": str(args.genotype), "dataset": args.dataset, "layers": layers,
              "channels": args.channels, "params_m": round(count_parameters(net) / 1e6, 4),
              "mult_adds_m": round(count_mult_adds(net, shape.in_channels, shape.input_size) / 1e6, 2)}
    print(json.dumps(result) if args.json else "\n".join(f"{k:>12}: {v}" for k, v in result.items()))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .data.registry import dataset_info
    from .runs.sample import run_sample

    dataset_info(args.dataset)   # a one-line error for an unknown name
    for name in ("layers", "channels"):
        if getattr(args, name) < 1:
            raise MsrdartsError(f"--{name}={getattr(args, name)}: must be a positive integer")
    run_sample(args.space, args.n, args.seed, args.out, args.params_m, args.tolerance, args.dataset, args.layers,
               args.channels)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .views.compare import run_compare

    print(run_compare(args.runs, args.out, args.csv), end="")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import bench_methods, bench_search_step, bench_train_step, refresh_rates_of
    from .config import AMP_MODES, SWITCHES, check_choice

    for name in ("layers", "channels", "batch_size", "input_size", "in_channels", "steps"):
        if getattr(args, name) < 1:
            raise MsrdartsError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be a positive integer")
    if args.warmup < 0:
        raise MsrdartsError(f"--warmup={args.warmup}: must be >= 0")
    if not getattr(args, "sn_refresh_interval", 1.0) > 0:
        raise MsrdartsError(f"--sn-refresh-interval={args.sn_refresh_interval}: must be > 0")
    for name, allowed in (("amp", AMP_MODES), ("channels_last", SWITCHES), ("compile", SWITCHES)):
        check_choice(name, getattr(args, name), allowed)
    if args.bench == "train-step":
        from .nn.ops import list_ops
        from .zoo import load_genotype

        load_genotype(args.genotype, primitives=list_ops())   # a bad --genotype: its one-line error first
        if args.in_channels != 3:
            raise MsrdartsError("bench train-step: --in-channels must be 3 (the CIFAR stem)")
        result = bench_train_step(args.genotype, args.layers, args.channels, args.batch_size, args.input_size,
                                  steps=args.steps, warmup=args.warmup, device=args.device, threads=args.threads,
                                  memory=args.memory, amp=args.amp, channels_last=args.channels_last,
                                  compile=args.compile)
        if args.json:
            print(json.dumps(result))
        else:
            for k, v in result.items():
                print(f"{k:>44}: {v}")
        return 0
    if args.method:
        from .config import check_choice
        from .methods import list_methods
        from .primitives import SPACES

        methods = [m.strip() for m in args.method.split(",") if m.strip()]
        for m in methods:
            check_choice("method", m, list_methods())
        check_choice("space", args.space, list(SPACES))
        result = bench_methods(methods, args.space, args.layers, args.channels, args.batch_size, args.input_size,
                               args.in_channels, args.steps, args.warmup, args.device, args.threads,
                               memory=args.memory)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{args.space} space, L = {args.layers}, C = {args.channels}, batch {args.batch_size}, "
                  f"{args.input_size} px, {result['device']}, {result['threads']} threads, median of {result['steps']}")
            for m, row in result["methods"].items():
                print(f"  {m:10s} {row['ms_per_step']:9.1f} ms/step {row['images_per_s']:8.1f} img/s  "
                      f"peak {row.get('peak_step_memory_mb')} MB")
        return 0
    try:
        rates = None if args.sn_refresh_history is None else refresh_rates_of(args.sn_refresh_history)
    except ValueError as e:
        raise MsrdartsError(f"--sn-refresh-history {e}") from None
    result = bench_search_step(layers=args.layers, channels=args.channels, batch_size=args.batch_size,
                               input_size=args.input_size, in_channels=args.in_channels, steps=args.steps,
                               warmup=args.warmup, device=args.device, threads=args.threads, memory=args.memory,
                               profile=args.profile, amp=args.amp, channels_last=args.channels_last,
                               compile=args.compile, refresh_interval=args.sn_refresh_interval,
                               refresh_rates=rates)
    table = result.pop("profile_fused", None)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>36}: {v}")
    if table is not None:
        print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        commands = {"search": _search, "train": _train, "eval": _eval, "plot": _plot, "info": _info,
                    "sample": _sample, "compare": _compare, "bench": _bench, "report": _report}
        return commands[args.command](args)
    except RunInterrupted as e:   # SIGINT/SIGTERM: a checkpoint was saved
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"msrdarts: {e}", file=sys.stderr)
        return e.exit_code
    except MsrdartsError as e:
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        print(f"msrdarts: error: {'' if rank is None else f'[rank {rank}] '}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msrdarts: interrupted", file=sys.stderr)
        return 130
    finally:
        from .distributed import shutdown

        shutdown()
