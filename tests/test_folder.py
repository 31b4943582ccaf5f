"""The run folder (msrdarts.runs.folder): kinds, history, the best-epoch rule, refuse and resume."""

import json

import pytest

from msrdarts.errors import CheckpointError, ConfigError, MsrdartsError
from msrdarts.runs import folder as F


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


def test_run_kind_of_each_folder(tmp_path):
    search, train, sample, other = (tmp_path / n for n in ("s", "t", "sample-00", "o"))
    _write(search / F.CONFIG, {"method": "msr"})
    _write(search / F.HISTORY, "")
    _write(train / F.CONFIG, {"genotype": "DARTS_V2"})
    _write(train / F.HISTORY, "")      # still running: no results.json yet, but a training all the same
    _write(sample / F.SAMPLE, {"index": 0})
    other.mkdir()
    assert [F.run_kind(p) for p in (search, train, sample, other)] == ["search", "train", "sample", None]
    _write(train / F.RESULTS, {})
    assert F.run_kind(train) == "train"


def test_history_round_trip_and_unreadable_files_named(tmp_path):
    F.write_history(tmp_path, [{"epoch": 1, "valid_acc": 50.0}, {"epoch": 2, "valid_acc": 60.0}])
    assert [r["epoch"] for r in F.read_history(tmp_path)] == [1, 2]
    (tmp_path / F.HISTORY).write_text('{"epoch": 1}\n{"epo')
    with pytest.raises(MsrdartsError) as info:
        F.read_history(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / F.HISTORY}: unreadable run file") and "\n" not in str(info.value)
    with pytest.raises(MsrdartsError, match="config.json: unreadable"):
        F.read_json(tmp_path / F.CONFIG)


def test_best_epoch_rule_higher_wins_ties_keep_the_earlier():
    history = [{"epoch": 1, "valid_acc": 80.0}, {"epoch": 2, "valid_acc": 90.0}, {"epoch": 3, "valid_acc": 90.0},
               {"epoch": 4, "valid_acc": 85.0}, {"epoch": 5, "test_acc": 99.0}]
    assert F.best_record(history)["epoch"] == 2
    assert F.best_record(history, "test_acc")["epoch"] == 5
    assert F.best_record([], "valid_acc") is None
    assert F.improves(1.0, None, "valid_acc") and not F.improves(90.0, {"valid_acc": 90.0}, "valid_acc")
    # warm-up epochs (weights only: PC-DARTS's first 15) never count, however good
    warm = [{"epoch": 1, "valid_acc": 95.0, "warmup": True}, {"epoch": 2, "valid_acc": 70.0},
            {"epoch": 3, "valid_acc": 75.0}]
    assert F.best_record(warm)["epoch"] == 3


def test_a_run_is_refused_over_a_run_and_resume_needs_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    F.check_run_folder(out, False, F.SEARCH_FILES)           # nothing there: fine
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    F.check_run_folder(out, False, F.SEARCH_FILES)           # a folder with other files: fine
    _write(out / F.HISTORY, "")
    with pytest.raises(CheckpointError, match="already holds a run \\(history.jsonl\\); pass --resume"):
        F.check_run_folder(out, False, F.SEARCH_FILES)
    with pytest.raises(CheckpointError, match="checkpoint.pt not found; nothing to resume"):
        F.check_run_folder(out, True, F.SEARCH_FILES)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="exists and is not a folder"):
        F.check_run_folder(tmp_path / "file", False, F.SEARCH_FILES)


def test_make_run_folder_records_settings_origin_and_runtime(tmp_path):
    rec = F.make_run_folder(tmp_path / "a" / "b", {"lr": 0.1}, {"device": "cpu"}, {"preset": "quick"})
    assert (tmp_path / "a" / "b").is_dir()
    assert rec == {"lr": 0.1, "runtime": {"device": "cpu"}, "origin": {"preset": "quick"}}
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="cannot create the run folder"):
        F.make_run_folder(tmp_path / "f" / "x", {}, {})
