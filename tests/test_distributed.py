"""torch.distributed runs (msrdarts.distributed): 2 gloo processes on the CPU, as torchrun starts them.

Each process runs a driver that sets the environment torchrun would set, records every file write
the library attempts (through the one atomic writer and the plot), and writes what run_search /
run_train returned on that rank to a file of its own.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from msrdarts.data import DeviceLoader, shard_bounds
from msrdarts.distributed import Dist

DRIVER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import msrdarts._io as io_, msrdarts.runs.checkpoint as ck, msrdarts.runs.search as se, msrdarts.runs.train as tr
    import msrdarts.views.plots as vz
    from msrdarts.config import SearchConfig, TrainConfig

    rank, out, report = int(os.environ["RANK"]), Path(sys.argv[1]), Path(sys.argv[2])
    writes = []
    real_write = io_.atomic_write_bytes

    def recording(path, data, keep=None):
        writes.append(str(path))
        return real_write(path, data, keep)

    io_.atomic_write_bytes = ck.atomic_write_bytes = vz.atomic_write_bytes = recording
    search = se.run_search(SearchConfig(dataset="digits", layers=3, channels=4, batch_size=64, epochs=2,
                                        bn_recalibration=2, device="cpu", progress=False), out / "search")
    train = tr.run_train(TrainConfig(dataset="digits", genotype=str(out / "search" / "genotype.json"), layers=3,
                                     channels=4, batch_size=64, epochs=1, device="cpu", progress=False),
                         out / "train")
    darts = se.run_search(SearchConfig(dataset="digits", method="darts", space="msr", spectral_norm=False,
                                       train_portion=0.5, layers=3, channels=4, batch_size=128, epochs=1,
                                       device="cpu", progress=False, plots=False, tensorboard=False), out / "darts")
    pc = se.run_search(SearchConfig(dataset="digits", method="pc-darts", space="msr", spectral_norm=False,
                                    partial_channels=2, train_portion=0.5, layers=3, channels=4, batch_size=128,
                                    epochs=2, arch_start=1, device="cpu", progress=False, plots=False,
                                    tensorboard=False), out / "pc-darts")
    pd = se.run_search(SearchConfig(dataset="digits", method="p-darts", space="darts", spectral_norm=False,
                                    stage_layers=(3, 3, 3), stage_keep=(5, 3, 1), skip_dropout=(0.1, 0.4, 0.7),
                                    train_portion=0.5, layers=3, channels=4, batch_size=128, epochs=1,
                                    device="cpu", progress=False, plots=False, tensorboard=False), out / "p-darts")
    import torch
    report.write_text(json.dumps({"threads": torch.get_num_threads(), "genotype": str(search.genotype), "best_epoch": search.best_epoch,
                                  "history": search.history, "train": train.results, "writes": writes,
                                  "darts": darts.history, "pc-darts": pc.history, "p-darts": pd.history}))
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "driver.py").write_text(DRIVER)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="2", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(tmp / "driver.py"), str(tmp / "runs"),
                                       str(tmp / f"rank{rank}.json")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:   # a hang must fail the test, not the suite
        for p in procs:
            p.kill()
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    return tmp, [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)], outs


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "train_images_per_s", "device_hours")}
            for r in records]


@pytest.mark.slow   # end to end: real processes
def test_both_ranks_derive_the_same_genotype_and_history(two_ranks):
    tmp, (r0, r1), _ = two_ranks
    assert r0["genotype"] == r1["genotype"] and r0["best_epoch"] == r1["best_epoch"]
    assert _untimed(r0["history"]) == _untimed(r1["history"])   # reduced metrics, identical stable-rank tables
    assert _untimed([r0["train"]]) == _untimed([r1["train"]])
    assert _untimed(r0["darts"]) == _untimed(r1["darts"])       # DARTS: alphas averaged over ranks
    assert _untimed(r0["pc-darts"]) == _untimed(r1["pc-darts"])  # PC-DARTS: alphas and betas averaged
    assert _untimed(r0["p-darts"]) == _untimed(r1["p-darts"])    # P-DARTS: the same ops kept in every stage
    assert [r["stage"] for r in r0["p-darts"]] == [1, 2, 3]
    # OMP_NUM_THREADS=2 in the shell: each of the 2 ranks takes its share of the cores, at most 2
    assert r0["threads"] == r1["threads"] == max(1, min(2, len(os.sched_getaffinity(0)) // 2))
    assert json.loads((tmp / "runs" / "search" / "genotype.json").read_text()) == r0["history"][r0["best_epoch"] - 1]["genotype"]


@pytest.mark.slow   # end to end: real processes
def test_rank_0_alone_writes_files_and_logs(two_ranks):
    tmp, (r0, r1), outs = two_ranks
    assert r1["writes"] == []
    names = {os.path.basename(p) for p in r0["writes"]}
    assert {"checkpoint.pt", "history.jsonl", "genotype.json", "config.json", "cells.png", "results.json"} <= names
    assert {"scores.svg", "trajectories-normal.png", "curves.svg"} <= names   # the run's pictures, by rank 0
    if importlib.util.find_spec("tensorboard") is not None:                  # events from rank 0 alone
        assert len(list((tmp / "runs" / "search" / "tensorboard").iterdir())) == 1
    assert "epoch 1/2" in outs[0][0] and outs[1][0] == ""
    assert "all 2 processes derived this genotype" in outs[0][0]
    assert "2 processes, 32 images each per step, " in outs[0][0] and "CPU threads each" in outs[0][0]
    assert r0["train"]["devices"] == 2


@pytest.mark.slow   # end to end: real processes
def test_metrics_count_every_validation_image_once(two_ranks):
    tmp, (r0, _), _ = two_ranks
    # digits: 1437 training images, 287 search-valid (odd, so the ranks hold 144 and 143 of them):
    # an accuracy over the exact set is a multiple of 100/287.
    for h in r0["history"]:
        k = h["valid_acc"] * 287 / 100
        assert abs(k - round(k)) < 1e-6


def test_shards_of_every_global_batch_make_up_the_single_process_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (23, 1, 6, 6), dtype=torch.uint8, generator=g)
    y = torch.arange(23)

    def batches(rank, world, start=0):
        loader = DeviceLoader(x, y, 8, (0.5,), (0.25,), "cpu", shuffle=True, crop_padding=2, flip=True,
                              cutout=3, rank=rank, world=world)
        return list(loader.batches(1234, start))

    single = batches(0, 1)
    assert len(single) == 3 and [len(b[1]) for b in single] == [8, 8, 7]
    for world in (2, 3):
        shards = [batches(r, world) for r in range(world)]
        for b, (xs, ys) in enumerate(single):
            assert torch.equal(torch.cat([s[b][1] for s in shards]), ys)
            assert torch.equal(torch.cat([s[b][0] for s in shards]), xs)   # same crops, flips, cutouts
    # restarting at a batch gives the rest of the epoch
    for (xa, ya), (xb, yb) in zip(batches(0, 1, start=1), single[1:]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_shard_bounds_partition_evenly():
    for n in range(0, 20):
        for world in (1, 2, 3, 8):
            bounds = [shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_cpu_ranks_share_the_cores():
    from msrdarts.distributed import cpu_threads_per_rank

    assert cpu_threads_per_rank(2, 2, 2) == 1        # the crawl: OMP_NUM_THREADS=2 on 2 cores, 2 ranks
    assert cpu_threads_per_rank(2, 16, 4) == 4       # never more than the process was given
    assert cpu_threads_per_rank(4, 16, 16) == 4
    assert cpu_threads_per_rank(8, 4, 4) == 1        # more ranks than cores: one thread each
    assert cpu_threads_per_rank(1, 8, 8) == 8


def test_single_process_is_a_no_op_and_batch_must_divide():
    d, dev = Dist.start(torch.device("cpu"))
    assert not d.active and d.main and dev == torch.device("cpu")
    assert d.sum(torch.tensor([1.0, 2.0])).tolist() == [1.0, 2.0] and d.any(True) and not d.any(False)
    assert d.per_rank_batch(64) == 64
    from msrdarts.errors import ConfigError

    with pytest.raises(ConfigError, match="divisible by the world size 3"):
        Dist(rank=0, world=3).per_rank_batch(64)


@pytest.mark.slow   # end to end: real processes
def test_sigterm_stops_both_ranks_at_one_step_and_they_resume(tmp_path):
    import signal
    import time

    from msrdarts.runs.checkpoint import load_checkpoint

    out = tmp_path / "run"
    args = [sys.executable, "-m", "msrdarts", "search", "--dataset", "digits", "--layers", "3", "--channels", "4",
            "--batch-size", "32", "--epochs", "2", "--checkpoint-every", "5", "--device", "cpu", "--no-progress",
            "--no-plots", "--no-tensorboard", "--out", str(out)]

    def start(extra=()):
        port = _free_port()
        return [subprocess.Popen([*args, *extra], env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r),
                                                           LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                           MASTER_PORT=str(port)),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]

    procs = start()
    try:
        t0 = time.time()
        while not (out / "checkpoint.pt").is_file():
            assert time.time() - t0 < 120 and all(p.poll() is None for p in procs), "no step checkpoint"
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGTERM)          # one rank is preempted: both stop, together
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [143, 143], outs
    assert "stopped by SIGTERM" in outs[0][1] and "--resume" in outs[0][1]
    assert load_checkpoint(out / "checkpoint.pt")["position"] is not None
    procs = start(["--resume"])
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    assert "all 2 processes derived this genotype" in outs[0][0]
    assert "2 processes, 16 images each per step, " in outs[0][0] and "CPU threads each" in outs[0][0]


GRADIENTS = textwrap.dedent("""
    import os, sys, torch
    from msrdarts.distributed import Dist, shutdown
    torch.manual_seed(int(os.environ["RANK"]))          # different starting weights on each rank
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 5))
    d, _ = Dist.start(torch.device("cpu"))
    model = d.wrap(net)
    data = torch.load(sys.argv[1])
    lo, hi = (0, 6) if d.rank == 0 else (6, 10)          # unequal shards of the global batch of 10
    for step in range(2):                                # a second backward averages again
        net.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(data["x"][lo:hi]), data["y"][lo:hi], reduction="sum") * 2 / 10
        loss.backward()
    torch.save({"weights": {k: v for k, v in net.state_dict().items()},
                "grads": [p.grad for p in net.parameters()]}, sys.argv[2])
    shutdown()                                           # as the CLI does on exit
""")


@pytest.mark.slow   # end to end: real processes
def test_cpu_ranks_average_the_gradients_of_the_whole_batch(tmp_path):
    """AveragedGradients (the CPU's DDP): rank 0's weights everywhere, and each rank's gradient is
    the mean over ranks of its shard's, i.e. the single-process gradient of the whole batch."""
    torch.manual_seed(5)
    x, y = torch.randn(10, 3, 6, 6), torch.randint(0, 5, (10,))
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    (tmp_path / "driver.py").write_text(GRADIENTS)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path / "data.pt"),
                               str(tmp_path / f"rank{r}.pt")],
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), errs
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    torch.manual_seed(0)                                   # rank 0's start, in this process
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 5))
    for k, v in net.state_dict().items():
        assert torch.equal(r0["weights"][k], v) and torch.equal(r1["weights"][k], v)
    # each rank's loss is its shard's sum x world / global batch: the average over ranks is the mean loss
    torch.nn.functional.cross_entropy(net(x), y).backward()
    for g0, g1, p in zip(r0["grads"], r1["grads"], net.parameters()):
        assert torch.equal(g0, g1)
        torch.testing.assert_close(g0, p.grad, rtol=1e-5, atol=1e-6)
