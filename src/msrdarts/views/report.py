"""``msrdarts report RUN_DIR... --out report.html``: one self-contained HTML page per set of runs.

Per run: the config, the genotype (text and cells), the results, and every picture of
:mod:`msrdarts.views.plots` (inlined as SVG, so the page needs no other file and no network).
With several runs the page opens with the comparison of :mod:`msrdarts.views.compare`. A small inline
script marks the page ``data-render="ok"`` once every picture has been laid out (or lists the
ones that were not), which the browser test reads.
"""

from __future__ import annotations

import datetime
import html
import os
from pathlib import Path
from typing import Any, Sequence

from .._io import atomic_write_bytes
from .compare import gather, method_name, summarize
from ..errors import MsrdartsError, first_line
from ..genotype import CellGenotypes
from ..runs.folder import run_kind
from .plots import best_record, read_run, render, run_figures, settle_epoch

_CAPTIONS = {
    "cells": "The genotype: the normal and the reduction cell (a per-cell genotype: every cell of the network).",
    "cells-per-cell": "One genotype per cell of the supernet (genotype-cells.json, SPEC section 4a): each cell's "
                      "own stable ranks, at the same epoch as genotype.json.",
    "scores": "Scores per edge and op at the epoch genotype.json comes from, for each cell type. The frame "
              "marks each edge's chosen op; red frames and labels mark the edges the genotype keeps.",
    "trajectories-normal": "Normal cell: every op's score on every edge over the epochs.",
    "trajectories-reduce": "Reduction cell: every op's score on every edge over the epochs.",
    "curves": "Loss, accuracy and learning rate per epoch.",
}

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-top: 1.4em; color: #444; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f5f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code, pre { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.88em; }
pre { background: #f6f8fa; padding: 0.6em; overflow-x: auto; white-space: pre-wrap; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; } figcaption { color: #555; font-size: 0.9em; }
details > summary { cursor: pointer; color: #333; }
nav a { margin-right: 1em; }
.meta { color: #666; font-size: 0.9em; }
"""

_SCRIPT = """
window.addEventListener("error", function (e) {
  document.body.dataset.errors = (document.body.dataset.errors || "") + String(e.message) + ";";
});
window.addEventListener("load", function () {
  var bad = [];
  document.querySelectorAll("figure svg").forEach(function (s) {
    var box = s.getBoundingClientRect();
    if (!(box.width > 0 && box.height > 0)) bad.push(s.closest("figure").id);
  });
  document.body.dataset.figures = String(document.querySelectorAll("figure svg").length);
  document.body.dataset.render = bad.length ? "missing: " + bad.join(",") : "ok";
});
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(header)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{_num(v)}</td>' if n else f"<td>{_e(v)}</td>"
                                    for v, n in zip(row, numeric)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _svg(fig: Any) -> str:
    text = render(fig, "svg").decode()
    return text[text.index("<svg"):]          # drop the XML prolog and doctype: inline SVG


def _results(run: dict[str, Any]) -> str:
    history = run["history"]
    if not history:
        return "<p>No completed epoch yet.</p>"
    last = history[-1]
    rows: list[tuple[str, Any]] = [("epochs completed", last["epoch"]),
                                   ("time (sum of epoch times, s)", sum(r.get("epoch_time_s", 0.0) for r in history))]
    if run["kind"] == "search":
        best = best_record(history) or last
        rows += [("best epoch (the genotype's)", best["epoch"]), ("best search-valid accuracy (%)", best["valid_acc"]),
                 ("final train accuracy (%)", last["train_acc"]), ("final search-valid accuracy (%)", last["valid_acc"]),
                 ("derived normal cell unchanged from epoch (to the last)", settle_epoch(history, "normal")),
                 ("derived reduction cell unchanged from epoch (to the last)", settle_epoch(history, "reduce"))]
    else:
        rows += [("final train accuracy (%)", last["train_acc"]), ("final test top-1 accuracy (%)", last["test_acc"]),
                 ("best test top-1 accuracy (%)", max(r["test_acc"] for r in history))]
        for key, label in (("test_top1_error", "final test top-1 error (%)"),
                           ("test_top5_error", "final test top-5 error (%)"), ("params_m", "parameters (M)"),
                           ("mult_adds_m", "mult-adds (M)"), ("device_hours", "device-hours")):
            if run["results"] and key in run["results"]:
                rows.append((label, run["results"][key]))
    return _table(["", "value"], rows, [False, True])


def _config(config: dict[str, Any]) -> str:
    items = [(k, v) for k, v in config.items() if k != "runtime"]
    runtime = config.get("runtime", {})
    table = _table(["setting", "value"], [(k, ", ".join(map(str, v)) if isinstance(v, list) else v)
                                          for k, v in items])
    extra = _table(["runtime", "value"], [(k, v) for k, v in runtime.items()]) if runtime else ""
    return f"<details><summary>all {len(items)} settings</summary>{table}{extra}</details>"


def _genotype_text(genotype: Any) -> str:
    """A genotype as text: the DARTS form, or a per-cell genotype one cell a line."""
    if isinstance(genotype, CellGenotypes):
        return "\n".join(f"cell {k} ({c.type}): {[list(p) for p in c.pairs]}" for k, c in enumerate(genotype.cells))
    return str(genotype)


def _run_section(index: int, run: dict[str, Any]) -> str:
    config = run["config"]
    name = run["path"].name or str(run["path"])
    method = method_name(config) if run["kind"] == "search" else f"trains {config.get('genotype', '?')}"
    parts = [f'<section id="run-{index}" class="run" data-kind="{run["kind"]}">',
             f"<h2>{_e(name)} <span class=\"meta\">({_e(run['kind'])}: {_e(method)}; "
             f"{_e(config.get('dataset', '?'))})</span></h2>",
             f'<p class="meta">{_e(run["path"].resolve())}</p>',
             f'<h3 id="run-{index}-results">Results</h3>', _results(run),
             f'<h3 id="run-{index}-genotype">Genotype</h3>',
             f"<pre>{_e(_genotype_text(run['genotype'])) if run['genotype'] is not None else 'none yet'}</pre>",
             f'<h3 id="run-{index}-config">Configuration</h3>', _config(config),
             f'<h3 id="run-{index}-pictures">Pictures</h3>']
    for fig_name, fig in run_figures(run).items():
        parts.append(f'<figure id="run-{index}-{fig_name}">{_svg(fig)}'
                     f"<figcaption>{_e(_CAPTIONS.get(fig_name, fig_name))}</figcaption></figure>")
    parts.append("</section>")
    return "\n".join(parts)


def _comparison(paths: Sequence[Path]) -> str:
    rows = gather(paths)
    summary = summarize(rows)
    methods = _table(["method", "trained / runs", "test error (%)", "± std", "search (device-h)", "params (M)",
                      "mult-adds (M)", "rank vs random"],
                     [(s["method"], f"{s['trained']}/{s['runs']}", s["test_error_mean"], s["test_error_std"],
                       s["search_hours_mean"], s["params_m_mean"], s["mult_adds_m_mean"], s["rank_vs_random"] or "-")
                      for s in summary], [False, False, True, True, True, True, True, False])
    per_run = _table(["method", "seed", "test error (%)", "search (device-h)", "params (M)", "genotype", "run"],
                     [(r.method, r.seed, r.test_error, r.search_hours, r.params_m, r.genotype, r.run) for r in rows],
                     [False, True, True, True, True, False, False])
    return (f'<section id="comparison"><h2>Comparison</h2>'
            f"<p>Per method: the mean and sample standard deviation of the final test top-1 error over its "
            f"trained runs, and its rank against the random genotypes (msrdarts compare).</p>{methods}"
            f"<h3>Runs</h3>{per_run}</section>")


def build_report(run_dirs: Sequence[str | os.PathLike], title: str = "msrdarts report") -> str:
    """The HTML text of the report for ``run_dirs``: search and training run folders, and
    ``msrdarts sample`` folders, which count in the comparison only (they hold no run)."""
    if not run_dirs:
        raise MsrdartsError("report: give at least one run folder")
    samples = [Path(p) for p in run_dirs if run_kind(p) == "sample"]
    runs = [read_run(p) for p in run_dirs if Path(p) not in samples]
    if not runs:
        raise MsrdartsError("report: no search or training run folder among the ones given")
    nav = "".join(f'<a href="#run-{i}">{_e(r["path"].name)}</a>' for i, r in enumerate(runs))
    body = []
    if len(runs) + len(samples) > 1:
        try:
            body.append(_comparison([r["path"] for r in runs] + samples))
        except Exception as e:   # noqa: BLE001 - the runs' own sections are still worth the page
            body.append(f'<section id="comparison"><h2>Comparison</h2><p>Not available: '
                        f'{_e(type(e).__name__)}: {_e(first_line(e))}</p></section>')
    body += [_run_section(i, r) for i, r in enumerate(runs)]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if len(runs) + len(samples) > 1:
        nav = '<a href="#comparison">comparison</a>' + nav
    head = ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n")
    top = (f'<body><h1>{_e(title)}</h1><p class="meta">{len(runs)} run(s), generated {stamp} by msrdarts</p>'
           f"<nav>{nav}</nav>\n")
    return head + top + "\n".join(body) + f"\n<script>{_SCRIPT}</script></body></html>\n"


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike, title: str = "msrdarts report"
                 ) -> Path:
    """Write :func:`build_report` to ``out`` atomically; refuses to write into a run folder's own files."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise MsrdartsError(f"--out {out}: the report is an HTML file; give a name ending in .html")
    if not out.parent.is_dir():
        raise MsrdartsError(f"--out {out}: folder {out.parent} does not exist")
    page = build_report(run_dirs, title)
    try:
        atomic_write_bytes(out, page.encode())
    except OSError as e:
        raise MsrdartsError(f"--out {out}: cannot write ({e.strerror or e})") from None
    return out
