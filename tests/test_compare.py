"""msrdarts compare (msrdarts.views.compare) against a table computed by hand from fake run folders."""

import csv
import json

import pytest

from msrdarts.views.compare import compact, gather, run_compare
from msrdarts.errors import ConfigError
from msrdarts.zoo import get_genotype

G = get_genotype("MSR_DARTS")


def _write(folder, **files):
    folder.mkdir(parents=True)
    for name, content in files.items():
        name = name.replace("_json", ".json").replace("_jsonl", ".jsonl")
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


def _search(tmp, name, seed, epoch_seconds, devices=1):
    history = "".join(json.dumps({"epoch": i + 1, "epoch_time_s": s}) + "\n" for i, s in enumerate(epoch_seconds))
    f = _write(tmp / name, config_json={"seed": seed, "primitives": ["sep_conv_3x3"],
                                         "runtime": {"device": "cpu", "devices": devices}},
               genotype_json=G.to_dict())
    (f / "history.jsonl").write_text(history)
    return f


def _train(tmp, name, genotype, error, seed=0, params=3.3, madds=500.0, hours=2.0):
    return _write(tmp / name, config_json={"genotype": str(genotype), "seed": seed},
                  results_json={"test_top1_error": error, "params_m": params, "mult_adds_m": madds,
                                "device_hours": hours, "genotype": G.to_dict()})


def _sample(tmp, name, index):
    return _write(tmp / name, sample_json={"method": "random", "index": index}, genotype_json=G.to_dict())


@pytest.fixture
def runs(tmp_path):
    s1 = _search(tmp_path, "s1", seed=0, epoch_seconds=[3600, 1800])            # 1.5 device-h
    s2 = _search(tmp_path, "s2", seed=1, epoch_seconds=[900], devices=2)         # 0.5 device-h
    s3 = _search(tmp_path, "s3", seed=2, epoch_seconds=[360])                    # not trained: 0.1 device-h
    r = [_sample(tmp_path / "samples", f"sample-0{k}", k) for k in range(3)]
    trains = [_train(tmp_path, "t1", s1 / "genotype.json", 3.0),
              _train(tmp_path, "t2", s2 / "genotype.json", 4.0),
              _train(tmp_path, "r0", r[0] / "genotype.json", 5.0),
              _train(tmp_path, "r1", r[1] / "genotype.json", 2.5),
              _train(tmp_path, "r2", r[2] / "genotype.json", 6.0),
              _train(tmp_path, "z", "DARTS_V2", 3.2, seed=5)]
    return [*trains, s1, s2, s3, *r]


def test_rows_know_where_each_genotype_came_from(runs):
    rows = gather(runs)
    by_run = {r.run.split("/")[-1]: r for r in rows}
    assert [(by_run[k].method, by_run[k].seed) for k in ("t1", "t2", "r0", "r1", "r2", "z", "s3")] == [
        ("msr-darts", 0), ("msr-darts", 1), ("random", 0), ("random", 1), ("random", 2), ("DARTS_V2", 5),
        ("msr-darts", 2)]
    assert by_run["t1"].search_hours == pytest.approx(1.5) and by_run["t2"].search_hours == pytest.approx(0.5)
    assert by_run["r0"].search_hours == 0.0 and by_run["z"].search_hours is None
    assert by_run["s3"].test_error is None and by_run["s3"].search_hours == pytest.approx(0.1)
    assert len(rows) == 7                                   # s1 and s2 appear through their trainings


def test_summary_matches_the_hand_computed_table(runs, tmp_path):
    text = run_compare(runs, tmp_path / "t.md", tmp_path / "t.csv")
    assert (tmp_path / "t.md").read_text() == text
    summary = {r["method"]: r for r in csv.DictReader(open(tmp_path / "t-methods.csv"))}
    msr, rnd, darts = summary["msr-darts"], summary["random"], summary["DARTS_V2"]
    # msr-darts: errors 3.0 and 4.0 (s3 untrained) -> mean 3.5, std sqrt(0.5) = 0.7071;
    # search cost (1.5 + 0.5 + 0.1) / 3 = 0.7; one random error (2.5) is lower -> rank 2 of 4.
    assert float(msr["test_error_mean"]) == pytest.approx(3.5)
    assert float(msr["test_error_std"]) == pytest.approx(0.70710678)
    assert float(msr["search_hours_mean"]) == pytest.approx(0.7)
    assert (msr["runs"], msr["trained"], msr["rank_vs_random"]) == ("3", "2", "2/4")
    # random: 5.0, 2.5, 6.0 -> mean 4.5, std sqrt(6.5 / 2) = 1.8028
    assert float(rnd["test_error_mean"]) == pytest.approx(4.5)
    assert float(rnd["test_error_std"]) == pytest.approx(1.80277564)
    assert rnd["rank_vs_random"] == ""
    assert float(darts["test_error_mean"]) == pytest.approx(3.2) and darts["test_error_std"] == ""
    assert darts["rank_vs_random"] == "2/4" and darts["search_hours_mean"] == ""
    assert "| msr-darts | 2/3 | 3.50 ± 0.71 | 0.700 |" in text
    assert compact(G) in text
    rows = list(csv.DictReader(open(tmp_path / "t.csv")))
    assert [r["method"] for r in rows].count("random") == 3


def test_not_a_run_folder_is_named(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(ConfigError, match="x: not a run folder"):
        gather([tmp_path / "x"])


def test_method_labels():
    from msrdarts.views.compare import method_name

    assert method_name({"method": "msr"}) == "msr-darts" and method_name({}) == "msr-darts"
    assert method_name({"method": "darts", "order": 2, "space": "darts"}) == "darts-2nd"
    assert method_name({"method": "darts", "order": 1, "space": "msr"}) == "darts-1st (msr space)"
    assert method_name({"method": "pc-darts", "order": 1, "space": "darts"}) == "pc-darts"
    assert method_name({"method": "pc-darts", "order": 1, "space": "msr"}) == "pc-darts (msr space)"


def test_compact_genotype():
    assert compact(get_genotype("DARTS_V2")).startswith("N: s3@0 s3@1, s3@0 s3@1, s3@1 id@0, id@0 d3@2 | R: mp@0 mp@1")


def test_per_cell_and_max_runs_are_their_own_methods(tmp_path):
    cells = {"cells": [{"type": t, "pairs": [list(p) for p in (G.reduce if t == "reduce" else G.normal)],
                        "concat": [2, 3, 4, 5]} for t in ("normal", "reduce", "reduce")]}
    s = _search(tmp_path, "s", seed=3, epoch_seconds=[360])
    (s / "genotype-cells.json").write_text(json.dumps(cells))
    smax = _search(tmp_path, "smax", seed=4, epoch_seconds=[360])
    cfg = json.loads((smax / "config.json").read_text())
    (smax / "config.json").write_text(json.dumps({**cfg, "select": "max"}))
    t_cells = _write(tmp_path / "tc", config_json={"genotype": str(s / "genotype-cells.json"), "seed": 0},
                     results_json={"test_top1_error": 3.0, "params_m": 1.0, "mult_adds_m": 10.0,
                                   "device_hours": 1.0, "genotype": cells})
    t_mean = _train(tmp_path, "tm", s / "genotype.json", 3.5)
    rows = {r.run.split("/")[-1]: r for r in gather([t_cells, t_mean, smax])}
    assert (rows["tc"].method, rows["tc"].seed) == ("msr-darts-cells", 3)
    assert rows["tm"].method == "msr-darts" and rows["smax"].method == "msr-darts-max"
    assert rows["tc"].genotype.startswith("0N: s3@1 s3@0, ") and " | 1R: s3@0 d3@1, " in rows["tc"].genotype
