"""Pictures of genotypes: both cells as DAGs with the op written on every edge (PNG, SVG, PDF).

Uses matplotlib's object API (Figure + Agg canvas), so no global pyplot state and no display.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from ._io import atomic_write_bytes
from .genotype import Genotype, Pairs

_OP_COLOURS = {
    "sep_conv_3x3": "#1f77b4", "sep_conv_5x5": "#17becf", "dil_conv_3x3": "#d62728", "dil_conv_5x5": "#ff7f0e",
    "skip_connect": "#7f7f7f", "max_pool_3x3": "#2ca02c", "avg_pool_3x3": "#9467bd", "none": "#cccccc",
}


def node_positions(steps: int) -> dict[str, tuple[float, float]]:
    """Layout: the two inputs on the left, intermediate nodes zig-zag left to right, output right."""
    pos = {"c_{k-2}": (0.0, 1.0), "c_{k-1}": (0.0, -1.0)}
    for i in range(steps):
        pos[str(i)] = (1.6 + 1.4 * i, 0.9 if i % 2 == 0 else -0.9)
    pos["c_{k}"] = (1.6 + 1.4 * steps + 0.6, 0.0)
    return pos


def cell_edges(pairs: Pairs, concat: tuple[int, ...]) -> list[tuple[str, str, str]]:
    """(source label, target label, op) of every edge drawn for one cell, output edges included."""
    names = ["c_{k-2}", "c_{k-1}"] + [str(i) for i in range(len(pairs) // 2)]
    edges = [(names[inp], names[2 + k // 2], op) for k, (op, inp) in enumerate(pairs)]
    edges += [(names[c], "c_{k}", "") for c in concat]
    return edges


def _draw_cell(ax, pairs: Pairs, concat: tuple[int, ...], title: str) -> None:
    steps = len(pairs) // 2
    pos = node_positions(steps)
    for src, dst, op in cell_edges(pairs, concat):
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        rad = 0.25 if (x1 - x0) > 1.5 else 0.0
        colour = _OP_COLOURS.get(op, "#444444") if op else "#bbbbbb"
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.6, shrinkA=14, shrinkB=14,
                                    connectionstyle=f"arc3,rad={rad}"))
        if op:
            # Label on the edge's curve (the quadratic Bezier of matplotlib's arc3 at parameter t);
            # edges from the cell inputs get theirs near the source, where they do not cross.
            t = 0.3 if src.startswith("c_") else 0.5
            cx, cy = (x0 + x1) / 2 + rad * (y1 - y0), (y0 + y1) / 2 - rad * (x1 - x0)
            mx = (1 - t) ** 2 * x0 + 2 * t * (1 - t) * cx + t ** 2 * x1
            my = (1 - t) ** 2 * y0 + 2 * t * (1 - t) * cy + t ** 2 * y1
            ax.text(mx, my, op, fontsize=7, ha="center", va="center", color=colour,
                    bbox=dict(boxstyle="round,pad=0.15", fc="white", ec=colour, lw=0.6))
    for name, (x, y) in pos.items():
        is_io = name.startswith("c_")
        ax.text(x, y, f"${name}$" if is_io else name, ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="circle,pad=0.3" if not is_io else "round,pad=0.35",
                          fc="#e8f0fe" if not is_io else "#fde8c8", ec="#333333"))
    xs = [p[0] for p in pos.values()]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(-2.3, 2.3)
    ax.set_title(title, fontsize=11)
    ax.axis("off")


def plot_genotype(genotype: Genotype, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the normal and the reduction cell one above the other into ``path`` (format from suffix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(10, 7.5))
    FigureCanvasAgg(fig)
    ax_n, ax_r = fig.subplots(2, 1)
    _draw_cell(ax_n, genotype.normal, genotype.normal_concat, "normal cell")
    _draw_cell(ax_r, genotype.reduce, genotype.reduce_concat, "reduction cell")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=130, format=path.suffix.lstrip(".").lower() or "png")
    atomic_write_bytes(path, buf.getvalue())
    return path
