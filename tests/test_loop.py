"""Crash safety of the one run loop (msrdarts.runs.loop, signals, checkpoint, epoch.EpochState): kills, signals,
divergence, lr on resume.

The runs are real processes killed for real (SIGKILL, SIGTERM); "equal" means the history (timings
aside), the genotype and every weight and buffer of the final checkpoint are bitwise equal to those
of an uninterrupted run with the same seed.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from msrdarts.runs.checkpoint import load_checkpoint, previous_path
from msrdarts.config import SearchConfig, TrainConfig
from msrdarts.runs.epoch import EpochState, train_one_epoch
from msrdarts.errors import MsrdartsError
from msrdarts.runs.search import run_search
from msrdarts.runs.train import run_train

SEARCH_ARGS = ["search", "--dataset", "digits", "--layers", "3", "--channels", "4", "--batch-size", "64",
               "--epochs", "2", "--checkpoint-every", "4", "--device", "cpu", "--no-progress", "--no-plots",
               "--no-tensorboard"]
TRAIN_ARGS = ["train", "--preset", "quick", "--genotype", "DARTS_V2", "--layers", "3", "--channels", "4",
              "--batch-size", "32", "--epochs", "2", "--checkpoint-every", "5", "--device", "cpu", "--no-progress",
              "--no-plots", "--no-tensorboard"]
TIMING = ("epoch_time_s", "train_images_per_s")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1")


def _cli(args, out):
    return subprocess.run([sys.executable, "-m", "msrdarts", *args, "--out", str(out)], capture_output=True,
                          text=True, timeout=300, env=_env())


def _start(args, out):
    return subprocess.Popen([sys.executable, "-m", "msrdarts", *args, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def _wait_for_step_checkpoint(out, proc, timeout=120):
    """Poll until the run has saved a mid-epoch checkpoint; returns when it exists."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before a step checkpoint: {proc.communicate()}")
        if (out / "checkpoint.pt").is_file():
            return
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def _history(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "history.jsonl").read_text().splitlines()]


def _assert_same_run(a: Path, b: Path, genotype_file="genotype.json"):
    assert _history(a) == _history(b)
    assert (a / genotype_file).read_text() == (b / genotype_file).read_text()
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    assert ca["position"] is None and cb["position"] is None


@pytest.fixture(scope="module")
def reference_search(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "search"
    r = _cli(SEARCH_ARGS, out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def reference_train(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "train"
    r = _cli(TRAIN_ARGS, out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow   # end to end: real processes
def test_sigkill_during_an_epoch_then_resume_equals_the_uninterrupted_search(reference_search, tmp_path):
    out = tmp_path / "killed"
    proc = _start(SEARCH_ARGS, out)
    _wait_for_step_checkpoint(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["position"] is not None and saved["position"]["step"] % 4 == 0   # killed within an epoch
    r = _cli(["search", "--resume"], out)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    _assert_same_run(out, reference_search)


KILL_IN_WRITE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import msrdarts.runs.checkpoint as ck
    from msrdarts.cli import main

    real = ck.atomic_write_bytes
    kill_at = int(os.environ["KILL_AT_WRITE"])
    count = [0]

    def dying(path, data, keep=None):
        path = Path(path)
        if path.name == "checkpoint.pt":
            count[0] += 1
            if count[0] == kill_at:   # half of the new file is on disk, then the process dies
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        return real(path, data, keep)

    ck.atomic_write_bytes = dying
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow   # end to end: real processes
def test_kill_during_a_checkpoint_write_then_resume_equals_the_uninterrupted_training(reference_train, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "die.py"
    script.write_text(KILL_IN_WRITE)
    env = dict(_env(), KILL_AT_WRITE="3")
    r = subprocess.run([sys.executable, str(script), *TRAIN_ARGS, "--out", str(out)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == -signal.SIGKILL
    assert (out / ".checkpoint.pt.tmp").is_file()          # the torn write
    load_checkpoint(out / "checkpoint.pt")                 # the last complete checkpoint is intact
    r = _cli(["train", "--resume"], out)
    assert r.returncode == 0, r.stderr
    _assert_same_run(out, reference_train)
    assert json.loads((out / "results.json").read_text())["test_top1_error"] == \
        json.loads((reference_train / "results.json").read_text())["test_top1_error"]


@pytest.mark.slow   # end to end: real processes
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_exit_with_a_resume_hint(reference_search, tmp_path, signum):
    out = tmp_path / "preempted"
    proc = _start(SEARCH_ARGS, out)
    _wait_for_step_checkpoint(out, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"stopped by {signal.Signals(signum).name}" in err and f"msrdarts search --out {out} --resume" in err
    assert "Traceback" not in err
    assert load_checkpoint(out / "checkpoint.pt")["position"] is not None
    r = _cli(["search", "--resume"], out)
    assert r.returncode == 0, r.stderr
    _assert_same_run(out, reference_search)


def test_an_epoch_restarted_at_a_step_ends_as_the_uninterrupted_one():
    from msrdarts.data import load_dataset

    data = load_dataset("digits")

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loader = data.loader("train", 100, "cpu", augment=True, shuffle=True,
                             generator=torch.Generator().manual_seed(3))
        return model, opt, loader

    model, opt, loader = fresh()
    full = train_one_epoch(model, loader, opt, torch.device("cpu"), progress=False)
    saved = {}

    class Stop(Exception):
        pass

    def stop_at_5(state, check):
        if state.step == 5:
            check()
            saved.update(state=state.to_dict(), model={k: v.clone() for k, v in model2.state_dict().items()},
                         opt=opt2.state_dict())
            raise Stop

    model2, opt2, loader2 = fresh()
    with pytest.raises(Stop):
        train_one_epoch(model2, loader2, opt2, torch.device("cpu"), progress=False, on_step=stop_at_5)
    model3, opt3, loader3 = fresh()
    model3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    rest = train_one_epoch(model3, loader3, opt3, torch.device("cpu"), progress=False,
                           state=EpochState.from_dict(saved["state"]))
    assert rest["loss"] == full["loss"] and rest["acc"] == full["acc"]
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = TrainConfig(dataset="digits", genotype="DARTS_V2", layers=3, channels=4, batch_size=32, epochs=3,
                      lr=0.05, grad_clip=0.0, cutout=0, auxiliary_weight=0.0, device="cpu", progress=False,
                      plots=False, tensorboard=False)
    out = tmp_path / "run"
    seen = []
    # A good first epoch, then an absurd learning rate: the weights overflow for real.
    monkeypatch.setattr("msrdarts.runs.train.lr_factor", lambda c: (lambda e: 1.0 if e == 0 else 1e30))
    with pytest.raises(MsrdartsError) as err:
        run_train(cfg, out, on_epoch_end=lambda epoch, record: seen.append(epoch), log=lambda m: None)
    msg = str(err.value)
    assert "non-finite" in msg and "epoch 1" in msg and f"--out {out} --resume --lr 0.025" in msg
    assert seen == [1]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_resume_with_a_lower_lr_scales_the_schedule(tmp_path):
    cfg = TrainConfig(dataset="digits", genotype="DARTS_V2", layers=3, channels=4, batch_size=256, epochs=3,
                      lr=0.1, device="cpu", progress=False, plots=False, tensorboard=False)
    out = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop(epoch, record):
        raise Stop

    with pytest.raises(Stop):
        run_train(cfg, out, on_epoch_end=stop, log=lambda m: None)
    logs = []
    res = run_train(replace(cfg, lr=0.05), out, resume=True, log=logs.append)
    lrs = [h["lr"] for h in res.history]
    full = [0.1 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)]   # cosine to lr_min = 0
    assert lrs[0] == pytest.approx(full[0]) and lrs[1:] == pytest.approx([f / 2 for f in full[1:]])
    assert any("scaled by 0.5" in m for m in logs)


@pytest.mark.slow   # whole searches, run twice (resume equivalence also: test_loop's kills)
def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = SearchConfig(dataset="digits", layers=3, channels=4, batch_size=512, epochs=2, device="cpu",
                       progress=False, bn_recalibration=1, plots=False, tensorboard=False)
    out = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop_after_2(epoch, record):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        run_search(replace(cfg, epochs=3), out, on_epoch_end=stop_after_2, log=lambda m: None)
    assert load_checkpoint(previous_path(out / "checkpoint.pt"))["epoch"] == 1
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])   # a disk fault
    logs = []
    res = run_search(replace(cfg, epochs=3), out, resume=True, log=logs.append)
    assert any("resuming from the previous checkpoint" in m for m in logs)
    assert [h["epoch"] for h in res.history] == [1, 2, 3]


@pytest.mark.slow   # end to end: a real process under a file-size limit
def test_a_full_disk_while_saving_is_one_line_and_the_last_checkpoint_resumes(tmp_path):
    """A checkpoint that cannot be written (here: a file-size limit below its size, which fails the
    write like a full disk) stops the run with one line naming the run folder; the checkpoint of the
    previous epoch is untouched, loads, and the run resumes from it once there is room again."""
    args = ["search", "--dataset", "digits", "--layers", "3", "--channels", "4", "--batch-size", "64", "--epochs", "2",
            "--device", "cpu", "--no-progress", "--no-plots", "--no-tensorboard"]
    out = tmp_path / "run"
    ok = _cli(args, out)
    assert ok.returncode == 0, ok.stderr
    shutil.copytree(out, tmp_path / "ref")          # the uninterrupted run, to compare the resumed one with
    size = (out / "checkpoint.pt").stat().st_size
    code = ("import resource, sys; from msrdarts.cli import main; "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size // 2}, {size // 2})); sys.exit(main(sys.argv[1:]))")
    ckpt = out / "checkpoint.pt"
    prev = load_checkpoint(previous_path(ckpt))
    assert prev["epoch"] == 1
    # put the run back at epoch 1 (as if epoch 2's save had failed), then fail epoch 2's save for real
    ckpt.write_bytes(previous_path(ckpt).read_bytes())
    before = ckpt.read_bytes()
    full = subprocess.run([sys.executable, "-c", code, *args, "--out", str(out), "--resume"], capture_output=True,
                          text=True, timeout=300, env=_env())
    assert full.returncode == 2, full.stderr
    err = full.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"msrdarts: error: {out}: could not save the run (") and "--resume" in err
    assert ckpt.read_bytes() == before and not list(out.glob(".*.tmp"))   # untouched, no torn temporary left
    assert load_checkpoint(ckpt)["epoch"] == 1
    again = _cli([*args, "--resume"], out)
    assert again.returncode == 0, again.stderr
    _assert_same_run(tmp_path / "ref", out)
