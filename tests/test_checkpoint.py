"""Checkpoint serialisation (msrdarts.runs.checkpoint): plain data only, atomic, RNG states as data."""

import random

import numpy as np
import pytest
import torch

from msrdarts.config import SearchConfig
from msrdarts.errors import CheckpointError
from msrdarts.runs.checkpoint import (config_mismatch, load_checkpoint, load_resume_checkpoint, previous_path,
                                      restore_state, rng_state, save_checkpoint, set_rng_state)


def test_round_trip_of_plain_data_and_tensors(tmp_path):
    state = {"format": "msrdarts-test", "epoch": 3, "model": {"w": torch.arange(6.0).view(2, 3)},
             "history": [{"loss": 0.5, "genotype": {"normal": [["sep_conv_3x3", 0]]}}], "best": None}
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    back = load_checkpoint(tmp_path / "checkpoint.pt")
    assert back["epoch"] == 3 and back["history"] == state["history"] and back["best"] is None
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert not list(tmp_path.glob(".*.tmp"))   # the temporary file was renamed over the target


def test_keep_previous_keeps_the_replaced_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    assert previous_path(path) == tmp_path / "checkpoint.prev.pt"
    save_checkpoint(path, {"format": "x", "epoch": 1}, keep_previous=True)
    assert not previous_path(path).exists()
    save_checkpoint(path, {"format": "x", "epoch": 2}, keep_previous=True)
    assert load_checkpoint(path)["epoch"] == 2 and load_checkpoint(previous_path(path))["epoch"] == 1


def test_code_in_a_checkpoint_is_refused_with_one_line(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "x", "obj": torch.nn.Linear(1, 1)}, path)   # loading would run a class's code
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: not a readable msrdarts checkpoint") and "\n" not in str(info.value)


@pytest.mark.parametrize("content, fragment", [(b"", "not a readable"), (b"\x80\x02garbage", "not a readable")])
def test_truncated_or_foreign_files_are_named(tmp_path, content, fragment):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=fragment):
        load_checkpoint(path)
    torch.save({"weights": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="no 'format' field"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_an_unreadable_newest_falls_back_to_the_previous(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": "x", "epoch": 1}, keep_previous=True)
    save_checkpoint(path, {"format": "x", "epoch": 2}, keep_previous=True)
    path.write_bytes(b"torn")
    said = []
    state, used = load_resume_checkpoint(path, said.append)
    assert state["epoch"] == 1 and used == previous_path(path) and "previous checkpoint" in said[0]
    previous_path(path).write_bytes(b"torn too")
    with pytest.raises(CheckpointError, match="the previous one is unusable too"):
        load_resume_checkpoint(path, said.append)


def test_rng_states_restore_every_stream(tmp_path):
    gen = torch.Generator().manual_seed(5)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = rng_state(torch.device("cpu"), {"loader": gen})
    save_checkpoint(tmp_path / "c.pt", {"format": "x", "rng": saved})   # the states are plain data
    first = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"], torch.device("cpu"), {"loader": gen})
    again = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=gen).item())
    assert first == again


def test_config_mismatch_ignores_only_the_resumable_settings():
    saved = SearchConfig()
    now = SearchConfig(data="/elsewhere", device="cpu", progress="off", workers=3, lr=0.01, epochs=9, seed=5)
    diff = config_mismatch(saved, now)
    assert [d.split(":")[0] for d in diff] == ["epochs", "seed"]


def test_a_checkpoint_of_the_unfused_optimiser_resumes_on_the_fused_kernel_with_its_momentum(tmp_path):
    """Checkpoints written before the fused SGD kernel hold fused=None; resuming keeps the optimiser
    this code builds (the momentum buffers are the same state either way)."""
    from msrdarts.device import sgd

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    old = torch.optim.SGD(net.parameters(), 0.1, momentum=0.9, weight_decay=1e-2)
    for _ in range(2):
        net.zero_grad()
        net(torch.randn(5, 4)).square().sum().backward()
        old.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(old, 10)
    ckpt = {"format": "x", "model": net.state_dict(), "optimizer": old.state_dict(), "scheduler": sched.state_dict(),
            "config": {"lr": 0.1}, "rng": rng_state(torch.device("cpu"), {})}
    save_checkpoint(tmp_path / "c.pt", ckpt)
    net2 = torch.nn.Linear(4, 3)
    new = sgd(net2.parameters(), 0.1, 0.9, 1e-2)
    restore_state(load_checkpoint(tmp_path / "c.pt"), tmp_path / "c.pt", torch.device("cpu"), net2, new,
                  torch.optim.lr_scheduler.CosineAnnealingLR(new, 10), {}, log=lambda m: None)
    assert new.param_groups[0]["fused"] is True
    x = torch.randn(5, 4)
    for n, o in ((net2, new), (net, old)):       # one more step of each: the same update
        n.zero_grad()
        n(x).square().sum().backward()
        o.step()
    for a, b in zip(net.parameters(), net2.parameters()):
        torch.testing.assert_close(a, b)
