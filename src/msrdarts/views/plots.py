"""Pictures of genotypes and runs (PNG and SVG), drawn from the run folder's own files.

- :func:`draw_cells`: both cells of a genotype as DAGs, the op written on every edge.
- :func:`draw_score_heatmap`: the final mean stable rank (or DARTS's softmax(alpha)) of every
  (edge, op) for each cell type; each edge's chosen op is framed, the kept edges' in bold.
- :func:`draw_trajectories`: each edge's scores over the epochs, one panel per edge, with the
  epoch from which the derived cell no longer changed.
- :func:`draw_curves`: losses, accuracies and learning rate over the epochs.

:func:`plot_run` writes all that applies to a run into ``RUN/plots/`` (``msrdarts plot RUN``).
Every drawn edge, choice and line carries an SVG id (``gid``) that names what it shows, so tests
can check the picture against the genotype, and SVG text stays text (``svg.fonttype: none``).
Uses matplotlib's object API (Figure + Agg canvas): no global pyplot state and no display.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

from .._io import atomic_write_bytes
from ..errors import MsrdartsError, first_line
from ..genotype import CellGenotypes, Genotype, Pairs, edge_index
from ..primitives import colour, get_primitive
from ..runs import folder as F
from ..zoo import load_genotype

CELL_TYPES = ("normal", "reduce")
#: Picture formats :func:`plot_run` writes.
FORMATS = ("svg", "png")


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def render(fig: Any, fmt: str, dpi: int = 110) -> bytes:
    """The figure as ``fmt`` bytes (png, svg or pdf); SVG text stays searchable text."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "msrdarts"}):
        fig.savefig(buf, dpi=dpi, format=fmt, metadata={"Date": None} if fmt in ("svg", "pdf") else None)
    return buf.getvalue()


def _op_colour(op: str) -> str:
    return colour(op)


# ---------------------------------------------------------------- cells


def node_positions(steps: int) -> dict[str, tuple[float, float]]:
    """Layout: the two inputs on the left, intermediate nodes zig-zag left to right, output right.
    Intermediate nodes carry the genotype's numbers (2..steps+1), as in history.jsonl and the
    heatmaps; the inputs c_{k-2} and c_{k-1} are nodes 0 and 1."""
    pos = {"c_{k-2}": (0.0, 1.0), "c_{k-1}": (0.0, -1.0)}
    for i in range(steps):
        pos[str(2 + i)] = (1.6 + 1.4 * i, 0.9 if i % 2 == 0 else -0.9)
    pos["c_{k}"] = (1.6 + 1.4 * steps + 0.6, 0.0)
    return pos


def cell_edges(pairs: Pairs, concat: tuple[int, ...]) -> list[tuple[str, str, str]]:
    """(source label, target label, op) of every edge drawn for one cell, output edges included."""
    names = ["c_{k-2}", "c_{k-1}"] + [str(2 + i) for i in range(len(pairs) // 2)]
    edges = [(names[inp], names[2 + k // 2], op) for k, (op, inp) in enumerate(pairs)]
    edges += [(names[c], "c_{k}", "") for c in concat]
    return edges


def _node_number(label: str) -> int:
    """The genotype's node number of a drawn node label (inputs c_{k-2}, c_{k-1} are 0 and 1)."""
    return {"c_{k-2}": 0, "c_{k-1}": 1}.get(label, None) if label.startswith("c_") else int(label)


def _draw_cell(ax: Any, pairs: Pairs, concat: tuple[int, ...], cell: str, title: str) -> None:
    steps = len(pairs) // 2
    pos = node_positions(steps)
    for k, (src, dst, op) in enumerate(cell_edges(pairs, concat)):
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        rad = 0.25 if (x1 - x0) > 1.5 else 0.0
        colour = _op_colour(op) if op else "#bbbbbb"
        arrow = ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                            arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.6, shrinkA=14, shrinkB=14,
                                            connectionstyle=f"arc3,rad={rad}"))
        if not op:
            continue
        # the id names what is drawn: the nodes at the arrow's two ends and the label's op
        gid = f"{cell}-edge-{k}-{_node_number(src)}-{_node_number(dst)}-{op}"
        arrow.arrow_patch.set_gid(gid + "-arrow")
        # Label on the edge's curve (the quadratic Bezier of matplotlib's arc3 at parameter t);
        # edges from the cell inputs get theirs near the source, where they do not cross.
        t = 0.3 if src.startswith("c_") else 0.5
        cx, cy = (x0 + x1) / 2 + rad * (y1 - y0), (y0 + y1) / 2 - rad * (x1 - x0)
        mx = (1 - t) ** 2 * x0 + 2 * t * (1 - t) * cx + t ** 2 * x1
        my = (1 - t) ** 2 * y0 + 2 * t * (1 - t) * cy + t ** 2 * y1
        ax.text(mx, my, op, fontsize=7, ha="center", va="center", color=colour, gid=gid,
                bbox=dict(boxstyle="round,pad=0.15", fc="white", ec=colour, lw=0.6))
    for name, (x, y) in pos.items():
        is_io = name.startswith("c_")
        label = {"c_{k-2}": "0: $c_{k-2}$", "c_{k-1}": "1: $c_{k-1}$"}.get(name, f"${name}$" if is_io else name)
        ax.text(x, y, label, ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="circle,pad=0.3" if not is_io else "round,pad=0.35",
                          fc="#e8f0fe" if not is_io else "#fde8c8", ec="#333333"))
    xs = [p[0] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(-2.3, 2.3)
    ax.set_title(title, fontsize=11)
    ax.axis("off")


def draw_cells(genotype: Genotype | CellGenotypes, title: str | None = None) -> Any:
    """The normal and the reduction cell one above the other (a per-cell genotype: every cell)."""
    if isinstance(genotype, CellGenotypes):
        return draw_cell_grid(genotype, title)
    fig = _figure(10, 7.5)
    ax_n, ax_r = fig.subplots(2, 1)
    _draw_cell(ax_n, genotype.normal, genotype.normal_concat, "normal", "normal cell")
    _draw_cell(ax_r, genotype.reduce, genotype.reduce_concat, "reduce", "reduction cell")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def draw_cell_grid(cells: CellGenotypes, title: str | None = None, columns: int = 2) -> Any:
    """Every cell of a per-cell genotype as a small DAG, in depth order, row by row."""
    rows = -(-cells.layers // columns)
    fig = _figure(5.2 * columns, 2.9 * rows)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for k, (ax, cell) in enumerate(zip(axes, cells.cells)):
        _draw_cell(ax, cell.pairs, cell.concat, f"cell{k}", f"cell {k}: {'reduction' if cell.type == 'reduce' else 'normal'}")
        for text in ax.texts:   # small DAGs: smaller labels
            text.set_fontsize(min(text.get_fontsize(), 6))
    for ax in axes[cells.layers:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_genotype(genotype: Genotype | CellGenotypes, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw both cells of ``genotype`` into ``path`` (format from the suffix: .png, .svg or .pdf)."""
    path = Path(path)
    atomic_write_bytes(path, render(draw_cells(genotype, title), path.suffix.lstrip(".").lower() or "png", dpi=130))
    return path


# ---------------------------------------------------------------- search scores


def score_table(record: dict[str, Any]) -> dict[str, Any] | None:
    """The per-(edge, op) scores of one search epoch: ``kind`` (the method's score key: 'stable_rank'
    or 'alpha' or a user's method's own), ``lower_wins``, ``ops``, ``edges`` [(source, target)], and
    the ``normal`` and ``reduce`` tables (edges x ops). None for a training record."""
    keys = [record["score_key"]] if "score_key" in record else ["stable_rank", "alpha"]   # older records
    for kind in keys:
        if kind in record:
            t = record[kind]
            return {"kind": kind, "ops": list(t["ops"]), "edges": [tuple(e) for e in t["edges"]],
                    "normal": t["normal"], "reduce": t["reduce"], "select": t.get("select", "min"),
                    "lower_wins": t.get("lower_wins", kind == "stable_rank")}
    return None


def costs(scores: dict[str, Any], cell: str) -> list[list[float]]:
    """The costs derivation minimises (msrdarts.methods.derive): stable ranks (negated for --select
    max, the authors' ablation), or -softmax(alpha) with ``none`` never chosen; another method's
    scores by its ``lower_wins``."""
    table = scores[cell]
    if scores["lower_wins"]:
        sign = -1.0 if scores.get("select") == "max" else 1.0
        return [[sign * v for v in row] for row in table]
    return [[math.inf if op == "none" else -a for op, a in zip(scores["ops"], row)] for row in table]


def edge_choices(scores: dict[str, Any], cell: str) -> list[int]:
    """Per edge, the index of its chosen op: the first lowest cost (the derivation's tie rule)."""
    return [min(range(len(row)), key=lambda j: (row[j], j)) for row in costs(scores, cell)]


def kept_edges(genotype: Genotype, cell: str) -> set[tuple[int, int, str]]:
    """(source, target, op) of the edges the genotype keeps in one cell."""
    pairs = genotype.normal if cell == "normal" else genotype.reduce
    return {(inp, 2 + k // 2, op) for k, (op, inp) in enumerate(pairs)}


def _fmt_score(value: float, kind: str) -> str:
    if kind == "alpha":              # softmax weights near 1/ops: the differences are in the 3rd-4th digit
        return f"{value:.4f}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def draw_score_heatmap(record: dict[str, Any], genotype: Genotype | None = None, title: str | None = None) -> Any:
    """One heatmap per cell type of one epoch's scores, the kept edges those of ``genotype``
    (default: the genotype derived at that epoch, as the record holds it)."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    scores = score_table(record)
    if scores is None:
        raise ValueError("not a search record: no stable_rank or alpha table")
    genotype = genotype or Genotype.from_dict(record["genotype"])
    ops, edges = scores["ops"], scores["edges"]
    fig = _figure(4.2 + 1.15 * len(ops), 0.5 + 0.36 * len(edges))
    axes = fig.subplots(1, 2)
    low_wins = scores["lower_wins"] and scores["kind"] == "stable_rank"   # log colours for stable ranks
    for ax, cell in zip(axes, CELL_TYPES):
        table = np.array(scores[cell], dtype=float)
        shown = np.log10(np.maximum(table, 1e-12)) if low_wins else table
        image = ax.imshow(shown, cmap="viridis" if low_wins else "viridis_r", aspect="auto")
        kept = kept_edges(genotype, cell)
        choices = edge_choices(scores, cell)
        for e, (src, dst) in enumerate(edges):
            for j in range(len(ops)):
                r, g, b, _ = image.cmap(image.norm(shown[e, j]))      # the cell's colour: dark text on light
                ax.text(j, e, _fmt_score(table[e, j], scores["kind"]), ha="center", va="center", fontsize=7,
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
            op = ops[choices[e]]
            is_kept = (src, dst, op) in kept
            ax.add_patch(Rectangle((choices[e] - 0.48, e - 0.45), 0.96, 0.9, fill=False,
                                   ec="#e8112d" if is_kept else "white", lw=2.4 if is_kept else 1.0,
                                   ls="-" if is_kept else "--",
                                   gid=f"{cell}-choice-{src}-{dst}-{op}-{'kept' if is_kept else 'dropped'}"))
        ax.set_xticks(range(len(ops)), [o.replace("_conv", "") for o in ops], rotation=30, ha="right", fontsize=8)
        labels = [f"{s}->{d}" for s, d in edges]
        ax.set_yticks(range(len(edges)), labels, fontsize=8)
        for label, (src, dst), c in zip(ax.get_yticklabels(), edges, choices):
            if (src, dst, ops[c]) in kept:
                label.set_fontweight("bold")
                label.set_color("#e8112d")
        ax.set_title(f"{cell} cell", fontsize=10)
        ax.set_xlabel("op", fontsize=8)
    axes[0].set_ylabel("edge (source -> node; inputs are 0, 1)", fontsize=8)
    what = ("mean stable rank (" + ("higher wins: --select max" if scores.get("select") == "max" else "lower wins")
            + "; colour: log10)") if low_wins else \
        ("softmax(alpha) (higher wins)" if scores["kind"] == "alpha" else
         f"{scores['kind']} ({'lower' if scores['lower_wins'] else 'higher'} wins)")
    fig.suptitle(f"{title or 'epoch ' + str(record['epoch'])}: {what}. Frame: each edge's op; red: the kept edges",
                 fontsize=9)
    fig.tight_layout()
    return fig


def draw_edge_weights(record: dict[str, Any], title: str | None = None) -> Any:
    """PC-DARTS's normalised edge weights softmax(beta) of one epoch: one bar per edge, grouped by
    the node the edges enter, per cell type."""
    scores = score_table(record)
    edges = scores["edges"] if scores else [list(e) for e in edge_index(4)]
    fig = _figure(9, 3.0)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, cell in zip(axes, CELL_TYPES):
        values = record["beta"][cell]
        colours = ["#4c72b0" if dst % 2 == 0 else "#dd8452" for _, dst in edges]
        ax.bar(range(len(values)), values, color=colours, gid=f"beta-{cell}")
        ax.set_xticks(range(len(edges)), [f"{s}->{d}" for s, d in edges], rotation=60, fontsize=7)
        ax.set_title(f"{cell} cell", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("softmax(beta) over the node's inputs")
    fig.suptitle(f"{title or 'epoch ' + str(record['epoch'])}: edge normalisation (PC-DARTS)", fontsize=9)
    fig.tight_layout()
    return fig


def draw_stages(history: Sequence[dict[str, Any]]) -> Any:
    """A staged search (P-DARTS): for every stage and cell type, softmax(alpha) at the stage's last
    epoch (blank: ops the stage no longer had) with the ops each edge keeps for the next stage framed."""
    import numpy as np
    from matplotlib.patches import Rectangle

    stages = sorted({r["stage"] for r in history})
    last = [[r for r in history if r["stage"] == s][-1] for s in stages]
    scores = [score_table(r) for r in last]
    ops, edges = scores[0]["ops"], scores[0]["edges"]
    fig = _figure(1.2 + 0.5 * len(ops) * len(stages), 1.2 + 0.62 * 2 * len(edges) / 2.2)
    axes = np.array(fig.subplots(2, len(stages), squeeze=False))
    for col, (record, table) in enumerate(zip(last, scores)):
        kept = record.get("kept_ops")
        for row, cell in enumerate(CELL_TYPES):
            ax = axes[row, col]
            values = np.array(table[cell], dtype=float)
            ax.imshow(np.where(values > 0, values, np.nan), cmap="viridis", aspect="auto")
            for e in range(len(edges)):
                for j, op in enumerate(ops):
                    if kept and op in kept[cell][e]:
                        ax.add_patch(Rectangle((j - 0.45, e - 0.4), 0.9, 0.8, fill=False, ec="#e8112d", lw=1.4,
                                               gid=f"stage{record['stage']}-{cell}-{e}-{op}-kept"))
            ax.set_xticks(range(len(ops)), [get_primitive(o).short for o in ops], fontsize=7)
            ax.set_yticks(range(len(edges)), [f"{s}->{d}" for s, d in edges] if col == 0 else [], fontsize=7)
            ax.set_title(f"stage {record['stage']}, {cell} ({int((values[0] > 0).sum())} ops per edge)", fontsize=8)
    fig.suptitle("softmax(alpha) at the end of each stage; red frames: the ops each edge keeps for the next stage",
                 fontsize=9)
    fig.tight_layout()
    return fig


def best_record(history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The search epoch genotype.json comes from (the run folder's best-epoch rule)."""
    return F.best_record([r for r in history if score_table(r) is not None], F.BEST_KEY["search"])


def settle_epoch(history: Sequence[dict[str, Any]], cell: str) -> int | None:
    """The first epoch from which the derived ``cell`` ('normal' or 'reduce') never changed again."""
    search = [r for r in history if "genotype" in r]
    if not search:
        return None
    final = search[-1]["genotype"][cell]
    epoch = search[-1]["epoch"]
    for r in reversed(search):
        if r["genotype"][cell] != final:
            break
        epoch = r["epoch"]
    return epoch


def draw_trajectories(history: Sequence[dict[str, Any]], cell: str) -> Any:
    """One panel per edge of ``cell``: every op's score over the epochs (rows: target nodes).
    Dotted: the epoch from which the derived cell never changed again; dashed: the epoch the
    run's genotype comes from; "(kept)": the edges that genotype keeps."""
    from matplotlib.ticker import MaxNLocator

    records = [r for r in history if score_table(r) is not None]
    if not records:
        raise ValueError("no search records in this history")
    first = score_table(records[0])
    ops, edges = first["ops"], first["edges"]
    epochs = [r["epoch"] for r in records]
    targets = sorted({d for _, d in edges})
    width = max(sum(1 for _, d in edges if d == t) for t in targets)
    height = 1.9 * len(targets) + 0.7
    fig = _figure(2.5 * width, height)
    axes = fig.subplots(len(targets), width, squeeze=False)
    settled = settle_epoch(records, cell)
    best = best_record(records)
    kept = {(s, d) for s, d, _ in kept_edges(Genotype.from_dict(best["genotype"]), cell)}
    for ax in axes.flat:
        ax.axis("off")
    for e, (src, dst) in enumerate(edges):
        ax = axes[targets.index(dst)][src]
        ax.axis("on")
        for j, op in enumerate(ops):
            ys = [score_table(r)[cell][e][j] for r in records]
            ax.plot(epochs, ys, color=_op_colour(op), lw=1.3, label=op, gid=f"{cell}-traj-{src}-{dst}-{op}")
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        if settled is not None and len(epochs) > 1:
            ax.axvline(settled, color="#555555", ls=":", lw=1, gid=f"{cell}-settled-{settled}" if e == 0 else None)
            ax.axvline(best["epoch"], color="#e8112d", ls="--", lw=0.8,
                       gid=f"{cell}-best-{best['epoch']}" if e == 0 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{src}->{dst}" + ("  (kept)" if (src, dst) in kept else ""), fontsize=8,
                     fontweight="bold" if (src, dst) in kept else "normal")
        ax.tick_params(labelsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    free = [ax for ax in axes.flat if not ax.axison]                 # an empty slot for the legend, if any
    (free[-1] if free else axes[0][-1]).legend(handles, labels, loc="center", fontsize=8, title="op")
    what = {"stable_rank": "mean stable rank", "alpha": "softmax(alpha)"}.get(first["kind"], first["kind"])
    fig.suptitle(f"{cell} cell: {what} per edge (source->node) over the epochs; dotted: the derived cell is "
                 f"unchanged from epoch {settled} on; red dashed: epoch {best['epoch']}, where genotype.json comes from "
                 f"(its edges: 'kept')", fontsize=9, x=0.01, y=0.995, ha="left", va="top")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))
    return fig


def draw_curves(history: Sequence[dict[str, Any]]) -> Any:
    """Loss, top-1 accuracy and learning rate per epoch (validation for a search, test for training)."""
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    held = "valid" if any("valid_acc" in r for r in history) else "test"
    fig = _figure(12, 3.4)
    axes = fig.subplots(1, 3)
    for ax, metric, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "top-1 accuracy (%)")):
        for split, style in (("train", "-"), (held, "--")):
            key = f"{split}_{metric}"
            if any(key in r for r in history):
                ax.plot(epochs, [r.get(key, float("nan")) for r in history], style, marker="o", ms=3,
                        label=split if split == "train" else f"{split} ({'search-valid' if held == 'valid' else 'test'})",
                        gid=f"curve-{key}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[2].plot(epochs, [r["lr"] for r in history], color="#555555", marker="o", ms=3, gid="curve-lr")
    axes[2].set_xlabel("epoch")
    axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[2].set_ylabel("learning rate")
    axes[2].grid(alpha=0.3)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- run folders


def read_run(run: str | os.PathLike) -> dict[str, Any]:
    """A run folder's config, history, genotype and results; a one-line error when it is not one."""
    run = Path(run)
    if not run.is_dir():
        raise MsrdartsError(f"{run}: no such run folder")
    if not (run / F.HISTORY).is_file():
        raise MsrdartsError(f"{run}: not a run folder (no {F.HISTORY}; give the --out folder of a search or train)")
    history = F.read_history(run)
    config = F.read_json(run / F.CONFIG) if (run / F.CONFIG).is_file() else {}
    results = F.read_json(run / F.RESULTS) if (run / F.RESULTS).is_file() else None
    genotype = load_genotype(run / F.GENOTYPE) if (run / F.GENOTYPE).is_file() else None
    cells = load_genotype(run / F.GENOTYPE_CELLS) if (run / F.GENOTYPE_CELLS).is_file() else None
    kind = F.run_kind(run)
    if kind is None:   # history without config.json: a search if its epochs carry score tables
        kind = "search" if any(score_table(r) is not None for r in history) else "train"
    return {"path": run, "config": config, "history": history, "genotype": genotype, "cells": cells,
            "results": results, "kind": kind}


def run_figures(run: dict[str, Any]) -> dict[str, Any]:
    """The pictures of one run (see :func:`read_run`), by name, in reading order."""
    history, genotype = run["history"], run["genotype"]
    figures: dict[str, Any] = {}
    if genotype is not None:
        figures["cells"] = draw_cells(genotype)
    if run.get("cells") is not None:
        figures["cells-per-cell"] = draw_cell_grid(run["cells"], f"one genotype per cell ({F.GENOTYPE_CELLS})")
    staged = bool(history) and "stage" in history[-1]   # P-DARTS: genotype.json is the last epoch's
    best = (history[-1] if staged else best_record(history)) if run["kind"] == "search" else None
    if best is not None:
        last = history[-1]["epoch"]
        title = f"epoch {best['epoch']} of {last} (genotype.json's" + (")" if best["epoch"] == last else
                                                                         "; the best search-valid accuracy)")
        figures["scores"] = draw_score_heatmap(best, genotype, title)
        if "beta" in best:
            figures["betas"] = draw_edge_weights(best, title)
        if staged:
            figures["stages"] = draw_stages(history)
        for cell in CELL_TYPES:
            figures[f"trajectories-{cell}"] = draw_trajectories(history, cell)
    if history:
        figures["curves"] = draw_curves(history)
    return figures


def plot_run(run_dir: str | os.PathLike, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write every picture of a run into ``RUN/plots/`` (each as SVG and PNG); returns the files."""
    run = read_run(run_dir)
    figures = run_figures(run)
    if not figures:
        raise MsrdartsError(f"{run['path']}: no completed epoch yet, nothing to draw")
    folder = run["path"] / F.PLOTS
    try:
        folder.mkdir(exist_ok=True)
        written = []
        for name, fig in figures.items():
            for fmt in formats:
                path = folder / f"{name}.{fmt}"
                atomic_write_bytes(path, render(fig, fmt))
                written.append(path)
    except OSError as e:
        raise MsrdartsError(f"{folder}: cannot write the pictures ({e.strerror or e})") from None
    return written


def plot_run_quietly(run_dir: str | os.PathLike, log: Any = print) -> None:
    """:func:`plot_run` at the end of a run: a failure to draw is a warning, never a failed run."""
    try:
        plot_run(run_dir)
    except Exception as e:   # noqa: BLE001 - the run's results are saved; only the pictures are missing
        log(f"warning: could not draw the pictures ({type(e).__name__}: {first_line(e)}); "
            f"retry with: msrdarts plot {run_dir}")
