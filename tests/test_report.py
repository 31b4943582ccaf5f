"""Run pictures, TensorBoard events and the HTML report of real (tiny) search and training runs."""

import os
import re
import shutil
import subprocess
from dataclasses import replace

import pytest

from msrdarts.cli import main
from msrdarts.config import SearchConfig, TrainConfig
from msrdarts.views.tensorboard import scalar_tags
from msrdarts.zoo import load_genotype
from msrdarts.views.report import build_report, write_report
from msrdarts.runs.folder import read_history
from msrdarts.runs.search import run_search
from msrdarts.runs.train import run_train

SEARCH = SearchConfig(dataset="digits", layers=3, channels=4, batch_size=256, epochs=3, lr=0.05, seed=0,
                      bn_recalibration=2, device="cpu", progress=False)
TRAIN = TrainConfig(dataset="digits", layers=3, channels=4, batch_size=256, epochs=1, lr=0.05, cutout=0, seed=0,
                    device="cpu", progress=False)


# End to end: real search and training runs, then their pictures, TensorBoard events, the report
# page and a real browser (pictures alone: test_plots.py, with made-up histories).
pytestmark = pytest.mark.slow


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    search = root / "search"
    run_search(SEARCH, search, log=quiet)
    train = root / "train"
    run_train(replace(TRAIN, genotype=str(search / "genotype.json")), train, log=quiet)
    return search, train


def test_runs_draw_their_pictures_when_they_end(runs):
    search, train = runs
    assert sorted(p.name for p in (search / "plots").iterdir()) == sorted(
        f"{n}.{fmt}" for n in ("cells", "cells-per-cell", "scores", "trajectories-normal", "trajectories-reduce",
                               "curves")
        for fmt in ("png", "svg"))
    assert sorted(p.name for p in (train / "plots").iterdir()) == ["cells.png", "cells.svg", "curves.png", "curves.svg"]
    for p in (search / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the search's cell picture is its genotype.json, edge for edge
    g = load_genotype(search / "genotype.json")
    svg = (search / "plots" / "cells.svg").read_text()
    drawn = sorted(re.findall(r'id="(normal-edge-\d+-\d+-\d+-\w+?)"', svg))
    assert drawn == sorted(f"normal-edge-{k}-{inp}-{2 + k // 2}-{op}" for k, (op, inp) in enumerate(g.normal))


def test_plot_command_redraws_a_run_and_draws_zoo_genotypes(runs, tmp_path, capsys, monkeypatch):
    search, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(search, copy, ignore=shutil.ignore_patterns("plots", "*.pt"))
    assert main(["plot", str(copy)]) == 0
    assert len(list((copy / "plots").iterdir())) == 12   # 6 pictures (per-cell grid included), SVG and PNG
    assert main(["plot", "--genotype", "DARTS_V2", "--out", str(tmp_path / "d.svg")]) == 0
    assert 'id="reduce-edge-7-1-5-max_pool_3x3"' in (tmp_path / "d.svg").read_text()
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "--genotype", "PC_DARTS"]) == 0 and (tmp_path / "PC_DARTS-cells.png").is_file()
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert main(["plot"]) == 2
    err = capsys.readouterr().err
    assert "no such run folder" in err and "give either a run folder or --genotype" in err
    assert "Traceback" not in err


def test_tensorboard_events_hold_every_epochs_figures(runs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    search, train = runs
    for run in (search, train):
        acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        history = read_history(run)
        expected = {}
        for record in history:
            for tag, value in scalar_tags(record).items():
                expected.setdefault(tag, []).append((record["epoch"], value))
        assert set(acc.Tags()["scalars"]) == set(expected)
        for tag, points in expected.items():
            got = [(e.step, e.value) for e in acc.Scalars(tag)]
            assert [s for s, _ in got] == [s for s, _ in points]
            assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6)
    # a search logs every (edge, op) stable rank and the accuracy under readable tags
    tags = set(scalar_tags(read_history(search)[0]))
    assert len([t for t in tags if t.startswith("stable_rank/")]) == 2 * 14 * 4
    assert {"loss/train", "loss/valid", "accuracy/train", "accuracy/valid", "run/lr"} <= tags
    assert "stable_rank/normal/0->2/sep_conv_3x3" in tags


def test_report_holds_every_section_and_inlines_its_pictures(runs, tmp_path):
    search, train = runs
    page = build_report([search, train])
    for section in ("comparison", "run-0", "run-0-results", "run-0-genotype", "run-0-config", "run-0-pictures",
                    "run-0-scores", "run-0-trajectories-normal", "run-1", "run-1-curves"):
        assert f'id="{section}"' in page
    assert page.count("<svg") == 6 + 2   # the search's 6 pictures (per-cell grid included), the training's 2
    assert 'id="run-0-cells-per-cell"' in page
    # self-contained: nothing is fetched (links are local anchors or data: URIs; namespaces are not fetches)
    assert re.findall(r'(?:src|href)\s*=\s*"(?!#|data:)([^"]*)"', page) == []
    assert re.findall(r"url\((?!#)", page) == [] and "<link" not in page
    assert str(load_genotype(search / "genotype.json")) in page.replace("&#x27;", "'")
    # the comparison names the trained search method
    assert "msr-darts" in page
    out = write_report([search], tmp_path / "r.html")
    assert out.read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(Exception, match="ending in .html"):
        write_report([search], tmp_path / "r.txt")


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_report_renders_in_headless_chromium(runs, tmp_path):
    exe = _chromium()
    if exe is None:
        if os.environ.get("MSRDARTS_REQUIRE_BROWSER"):
            pytest.fail("MSRDARTS_REQUIRE_BROWSER is set but no chromium is installed")
        pytest.skip("no chromium (Debian: apt-get install chromium; .ci/run installs it)")
    report = write_report(list(runs), tmp_path / "report.html")
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run(flags + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=180).stdout
    assert 'data-render="ok"' in dom, dom[:2000]
    assert 'data-figures="8"' in dom
    assert "data-errors" not in dom
    for section in ("comparison", "run-0-results", "run-0-scores", "run-1-curves"):
        assert f'id="{section}"' in dom
    shot = tmp_path / "shot.png"
    subprocess.run(flags + ["--window-size=1200,1600", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=180)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (1600, 1200) and pixels.std() > 0.05     # a page, not a blank one

