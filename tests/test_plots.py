import re
import xml.etree.ElementTree as ET

import pytest

from msrdarts.genotype import Genotype
from msrdarts.views.plots import (cell_edges, draw_cells, draw_curves, draw_score_heatmap, draw_trajectories,
                                node_positions, plot_genotype, render, settle_epoch)
from msrdarts.zoo import get_genotype


def test_drawn_edges_are_the_genotype():
    g = get_genotype("MSR_DARTS")
    edges = cell_edges(g.normal, g.normal_concat)
    # By hand from SPEC section 5: node 2 <- (sep_conv_3x3, 1), (sep_conv_3x3, 0); node 5 <- ..., (dil_conv_5x5, 2)
    # (nodes keep the genotype's numbers: inputs 0 and 1 are c_{k-2} and c_{k-1})
    assert edges[:2] == [("c_{k-1}", "2", "sep_conv_3x3"), ("c_{k-2}", "2", "sep_conv_3x3")]
    assert edges[4] == ("3", "4", "dil_conv_3x3")
    assert edges[7] == ("2", "5", "dil_conv_5x5")
    assert edges[8:] == [(str(i), "c_{k}", "") for i in range(2, 6)]
    assert set(node_positions(4)) == {"c_{k-2}", "c_{k-1}", "2", "3", "4", "5", "c_{k}"}


def test_plot_writes_png_and_svg(tmp_path):
    g = get_genotype("DARTS_V2")
    assert plot_genotype(g, tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = plot_genotype(g, tmp_path / "g.svg").read_text()
    assert "<svg" in svg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "g.svg"]   # no temporary files left


# ---------------------------------------------------------------- pictures read back from the SVG

SVG_NS = "{http://www.w3.org/2000/svg}"
OPS = ["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5"]
EDGES = [(s, 2 + i) for i in range(4) for s in range(2 + i)]


def _ids(fig) -> dict[str, ET.Element]:
    root = ET.fromstring(render(fig, "svg"))
    return {el.get("id"): el for el in root.iter() if el.get("id")}


def _texts(el) -> list[str]:
    return ["".join(t.itertext()).strip() for t in el.iter(SVG_NS + "text")]


@pytest.mark.parametrize("name", ["MSR_DARTS", "DARTS_V2", "PC_DARTS"])
def test_cell_picture_draws_exactly_the_genotypes_edges_with_their_ops(name):
    g = get_genotype(name)
    ids = _ids(draw_cells(g))
    for cell, pairs in (("normal", g.normal), ("reduce", g.reduce)):
        drawn = sorted(i for i in ids if re.fullmatch(rf"{cell}-edge-\d+-\d+-\d+-\w+", i))
        # by hand: pair k feeds node 2 + k // 2 from its input
        expected = sorted(f"{cell}-edge-{k}-{inp}-{2 + k // 2}-{op}" for k, (op, inp) in enumerate(pairs))
        assert drawn == expected
        for gid in drawn:
            assert _texts(ids[gid]) == [gid.rsplit("-", 1)[1]]        # the label printed on the edge is its op
            assert gid + "-arrow" in ids                               # and the edge is drawn


def _record(epoch: int, normal_min_op, reduce_min_op, strength) -> dict:
    """A search record whose edge e has its lowest stable rank at op normal_min_op(e), of value strength(e)."""
    def table(min_op):
        return [[strength(e) if j == min_op(e) else strength(e) + 5.0 + j for j in range(4)] for e in range(14)]
    normal, reduce = table(normal_min_op), table(reduce_min_op)
    return {"epoch": epoch, "lr": 0.1, "train_loss": 2.0 / epoch, "train_acc": 10.0 * epoch, "valid_loss": 2.5 / epoch,
            "valid_acc": 9.0 * epoch, "stable_rank": {"ops": OPS, "edges": [list(e) for e in EDGES],
                                                      "normal": normal, "reduce": reduce},
            "genotype": _hand_genotype(normal, reduce).to_dict()}


def _hand_genotype(normal, reduce) -> Genotype:
    """Brute force: per edge its cheapest op; per node the 2 cheapest edges (ties: lower source)."""
    def cell(table):
        out = []
        for node in range(2, 6):
            cands = sorted((min(table[e]), src, OPS[table[e].index(min(table[e]))])
                           for e, (src, dst) in enumerate(EDGES) if dst == node)
            out += [(op, src) for _, src, op in cands[:2]]
        return tuple(out)
    return Genotype(normal=cell(normal), normal_concat=(2, 3, 4, 5), reduce=cell(reduce), reduce_concat=(2, 3, 4, 5))


def test_heatmap_marks_each_edges_chosen_op_and_the_kept_edges():
    rec = _record(3, lambda e: e % 4, lambda e: (e * 3) % 4, lambda e: 1.0 + (e * 7) % 5)
    g = Genotype.from_dict(rec["genotype"])
    ids = _ids(draw_score_heatmap(rec))
    for cell, min_op, pairs in (("normal", lambda e: e % 4, g.normal), ("reduce", lambda e: (e * 3) % 4, g.reduce)):
        kept = {(inp, 2 + k // 2) for k, (_, inp) in enumerate(pairs)}
        expected = {f"{cell}-choice-{s}-{d}-{OPS[min_op(e)]}-{'kept' if (s, d) in kept else 'dropped'}"
                    for e, (s, d) in enumerate(EDGES)}
        assert {i for i in ids if i.startswith(f"{cell}-choice-")} == expected
        assert sum(i.endswith("-kept") for i in expected) == 8


def test_trajectories_draw_every_edge_and_op_and_mark_when_the_cell_settled():
    h = [_record(1, lambda e: 0, lambda e: 1, lambda e: 1.0 + e % 3),
         _record(2, lambda e: 1, lambda e: 1, lambda e: 1.0 + e % 3),
         _record(3, lambda e: 1, lambda e: 1, lambda e: 1.0 + e % 3)]
    assert settle_epoch(h, "normal") == 2 and settle_epoch(h, "reduce") == 1
    for cell, settled in (("normal", 2), ("reduce", 1)):
        ids = _ids(draw_trajectories(h, cell))
        lines = {i for i in ids if i.startswith(f"{cell}-traj-")}
        assert lines == {f"{cell}-traj-{s}-{d}-{op}" for s, d in EDGES for op in OPS}
        assert f"{cell}-settled-{settled}" in ids


def test_curves_draw_the_history_series():
    h = [_record(e, lambda e: 0, lambda e: 0, lambda e: 1.0) for e in (1, 2)]
    ids = _ids(draw_curves(h))
    assert {"curve-train_loss", "curve-valid_loss", "curve-train_acc", "curve-valid_acc", "curve-lr"} <= set(ids)


def test_darts_heatmap_picks_the_highest_alpha_and_never_none():
    ops = ["none", "max_pool_3x3", "sep_conv_3x3"]
    # edge e: 'none' always has the largest weight; among the others op 1 + (e % 2) wins
    table = [[0.5, 0.3 if e % 2 == 0 else 0.2, 0.2 if e % 2 == 0 else 0.3] for e in range(14)]
    strength = lambda e: max(table[e][1:])   # noqa: E731
    normal = [(op, src) for node in range(2, 6)
              for _, src, op in sorted((-strength(e), s, ops[1 + e % 2])
                                       for e, (s, d) in enumerate(EDGES) if d == node)[:2]]
    g = Genotype(normal=tuple(normal), normal_concat=(2, 3, 4, 5), reduce=tuple(normal), reduce_concat=(2, 3, 4, 5))
    rec = {"epoch": 1, "alpha": {"ops": ops, "edges": [list(e) for e in EDGES], "normal": table, "reduce": table},
           "genotype": g.to_dict()}
    ids = _ids(draw_score_heatmap(rec))
    choices = {i.split("-")[4] for i in ids if i.startswith("normal-choice-")}
    assert choices == {"max_pool_3x3", "sep_conv_3x3"}
    assert len([i for i in ids if i.startswith("normal-choice-")]) == 14


def test_run_pictures_mark_the_genotype_of_the_best_epoch_not_the_last(tmp_path):
    import json

    from msrdarts.errors import MsrdartsError
    from msrdarts.views.plots import plot_run, read_run, run_figures

    h = [_record(1, lambda e: 0, lambda e: 0, lambda e: 1.0 + e % 3),
         _record(2, lambda e: 3, lambda e: 3, lambda e: 1.0 + (e * 5) % 7),
         _record(3, lambda e: 3, lambda e: 3, lambda e: 1.0 + (e * 5) % 7)]
    h[0]["valid_acc"] = 99.0                     # epoch 1 is the best: genotype.json is its genotype
    best = Genotype.from_dict(h[0]["genotype"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in h))
    (run / "config.json").write_text(json.dumps({"method": "msr", "dataset": "digits"}))
    best.save(run / "genotype.json")
    figures = run_figures(read_run(run))
    ids = _ids(figures["scores"])
    kept = {i for i in ids if i.startswith("normal-choice-") and i.endswith("-kept")}
    assert kept == {f"normal-choice-{inp}-{2 + k // 2}-{OPS[0]}-kept" for k, (_, inp) in enumerate(best.normal)}
    traj = _ids(figures["trajectories-normal"])
    assert "normal-best-1" in traj and "normal-settled-2" in traj
    # a run folder with no completed epoch, and a broken results.json: one-line errors
    (run / "history.jsonl").write_text("")
    (run / "genotype.json").unlink()
    with pytest.raises(MsrdartsError, match="no completed epoch yet"):
        plot_run(run)
    (run / "results.json").write_text("{broken")
    with pytest.raises(MsrdartsError, match="unreadable run file"):
        read_run(run)


def test_a_per_cell_genotype_draws_every_cell_with_its_own_edges():
    from msrdarts.genotype import Cell, CellGenotypes

    gens = [get_genotype(n) for n in ("MSR_DARTS", "DARTS_V2", "PC_DARTS", "P_DARTS", "DARTS_V1")]
    types = ["normal", "reduce", "normal", "reduce", "normal"]
    cells = CellGenotypes(tuple(Cell(t, g.reduce if t == "reduce" else g.normal, (2, 3, 4, 5))
                                for t, g in zip(types, gens)))
    ids = _ids(draw_cells(cells))
    for k, c in enumerate(cells.cells):
        drawn = sorted(i for i in ids if re.fullmatch(rf"cell{k}-edge-\d+-\d+-\d+-\w+", i))
        assert drawn == sorted(f"cell{k}-edge-{j}-{inp}-{2 + j // 2}-{op}" for j, (op, inp) in enumerate(c.pairs))


def test_select_max_heatmap_frames_the_highest_rank():
    rec = _record(1, lambda e: e % 4, lambda e: 0, lambda e: 1.0)
    rec["stable_rank"]["select"] = "max"
    ids = _ids(draw_score_heatmap(rec, _hand_genotype(rec["stable_rank"]["normal"], rec["stable_rank"]["reduce"])))
    # every row's largest value is its last op (strength + 5 + 3), except where the min op is op 3 itself
    chosen = {i.split("-")[4] for i in ids if i.startswith("reduce-choice-")}
    assert chosen == {"dil_conv_5x5"}
