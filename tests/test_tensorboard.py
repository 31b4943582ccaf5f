"""TensorBoard logging (msrdarts.views.tensorboard): tags, resume, off switch. The events of real runs
are checked against their history in tests/test_report.py."""

import pytest

from msrdarts.views.tensorboard import TensorBoardLog, scalar_tags


def quiet(_msg):
    pass


def test_scalar_tags_by_hand():
    record = {"epoch": 3, "lr": 0.1, "train_loss": 1.5, "valid_acc": 80.0, "test_acc5": 99.0,
              "train_images_per_s": 120.0, "epoch_time_s": 9.5, "drop_path": 0.1, "genotype": {"normal": []},
              "stable_rank": {"ops": ["a", "b"], "edges": [[0, 2], [1, 2]],
                              "normal": [[1.0, 2.0], [3.0, 4.0]], "reduce": [[5.0, 6.0], [7.0, 8.0]]}}
    assert scalar_tags(record) == {
        "run/lr": 0.1, "loss/train": 1.5, "accuracy/valid": 80.0, "accuracy_top5/test": 99.0,
        "throughput/train_images_per_s": 120.0, "run/epoch_time_s": 9.5, "run/drop_path": 0.1,
        "stable_rank/normal/0->2/a": 1.0, "stable_rank/normal/0->2/b": 2.0, "stable_rank/normal/1->2/a": 3.0,
        "stable_rank/normal/1->2/b": 4.0, "stable_rank/reduce/0->2/a": 5.0, "stable_rank/reduce/0->2/b": 6.0,
        "stable_rank/reduce/1->2/a": 7.0, "stable_rank/reduce/1->2/b": 8.0}


def test_tensorboard_on_resume_replaces_the_rerun_epochs(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardLog(tmp_path, True, quiet)
    for epoch, loss in ((1, 3.0), (2, 2.0), (3, 1.5)):          # epoch 3 was logged, then the run died
        first.epoch({"epoch": epoch, "train_loss": loss})
    first.close()
    again = TensorBoardLog(tmp_path, True, quiet, resume_epoch=2)   # resumed after epoch 2's checkpoint
    again.epoch({"epoch": 3, "train_loss": 1.25})
    again.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss/train")] == [(1, 3.0), (2, 2.0), (3, 1.25)]
    off = TensorBoardLog(tmp_path / "off", False, quiet)
    off.epoch({"epoch": 1, "train_loss": 1.0})
    assert not (tmp_path / "off").exists()
