"""P-DARTS (msrdarts.methods.pdarts, the staged search in msrdarts.runs.search) against hand-made
alphas and hand-computed schedules: op dropping, the skip limit, dropout on skips, the stages'
networks, and resume at a stage boundary."""

import math

import pytest
import torch

from msrdarts.api import search_config
from msrdarts.errors import ConfigError
from msrdarts.methods.pdarts import PDARTS, keep_ops, limited_skips, skip_dropout_rate
from msrdarts.nn.edges import SkipDropMixedOp
from msrdarts.nn.supernet import SuperNet
from msrdarts.primitives import DARTS_PRIMITIVES

OPS = DARTS_PRIMITIVES   # none, max_pool_3x3, avg_pool_3x3, skip_connect, sep_conv_3x3, sep_conv_5x5, dil_3, dil_5
I = {name: i for i, name in enumerate(OPS)}


def test_keep_ops_takes_the_strongest_with_ties_to_the_lower_op_and_never_none_alone():
    probs = torch.tensor([
        [0.30, 0.05, 0.05, 0.20, 0.10, 0.10, 0.10, 0.10],   # none, skip, then four ops tied at 0.10
        [0.50, 0.10, 0.05, 0.05, 0.05, 0.05, 0.10, 0.10],   # none strongest
    ])
    avail = torch.ones(2, 8, dtype=torch.bool)
    kept = keep_ops(probs, avail, OPS, 3)
    # edge 0: none (0.30), skip (0.20), then the first of the tied 0.10 ops (sep_conv_3x3)
    assert kept[0] == ("none", "skip_connect", "sep_conv_3x3")
    assert kept[1] == ("none", "max_pool_3x3", "dil_conv_3x3")   # 0.10 tie: max_pool (1) before dil_3 (6)
    # keeping one op where none is strongest: the best other op instead (max_pool, the lower of the tie)
    assert keep_ops(probs, avail, OPS, 1) == (("skip_connect",), ("max_pool_3x3",))
    # only available ops count: edge 0 without skip keeps none + sep_conv_3x3
    avail[0, I["skip_connect"]] = False
    assert keep_ops(probs, avail, OPS, 2)[0] == ("none", "sep_conv_3x3")


def _costs(strengths):
    """A cost table (edges, ops) from {edge: {op: strength}}; ops not named are unavailable."""
    c = torch.full((14, 8), float("inf"), dtype=torch.float64)
    for e, ops in strengths.items():
        for op, v in ops.items():
            c[e, I[op]] = -v
    return c


# Edges: node 2 <- 0 (e0), 1 (e1); node 3 <- 0, 1, 2 (e2-e4); node 4 <- e5-e8; node 5 <- e9-e13.
def _table():
    return {
        0: {"skip_connect": 0.6, "sep_conv_3x3": 0.3, "none": 0.1},
        1: {"skip_connect": 0.5, "dil_conv_3x3": 0.4, "none": 0.1},          # node 2: both best edges skips
        2: {"sep_conv_5x5": 0.5, "skip_connect": 0.3, "none": 0.2},
        3: {"skip_connect": 0.7, "max_pool_3x3": 0.2, "none": 0.1},
        4: {"none": 0.8, "dil_conv_5x5": 0.15, "avg_pool_3x3": 0.05},        # none strongest: excluded
        5: {"sep_conv_3x3": 0.4, "skip_connect": 0.35, "none": 0.25},
        6: {"dil_conv_3x3": 0.3, "sep_conv_5x5": 0.3, "none": 0.4},          # tie: the lower op (sep_conv_5x5)
        7: {"skip_connect": 0.45, "avg_pool_3x3": 0.1, "none": 0.45},
        8: {"max_pool_3x3": 0.2, "dil_conv_5x5": 0.1, "none": 0.7},
        9: {"sep_conv_3x3": 0.9, "skip_connect": 0.05, "none": 0.05},
        10: {"skip_connect": 0.4, "sep_conv_5x5": 0.35, "none": 0.25},
        11: {"dil_conv_3x3": 0.2, "max_pool_3x3": 0.1, "none": 0.7},
        12: {"avg_pool_3x3": 0.3, "skip_connect": 0.3, "none": 0.4},         # tie: avg_pool (2) before skip (3)
        13: {"dil_conv_5x5": 0.1, "sep_conv_3x3": 0.05, "none": 0.85},
    }


def test_final_cell_without_a_limit_is_the_darts_rule_without_none():
    cell = limited_skips(_costs(_table()), OPS, 4, -1)
    assert cell == [("skip_connect", 0), ("skip_connect", 1),
                    ("skip_connect", 1), ("sep_conv_5x5", 0),
                    ("skip_connect", 2), ("sep_conv_3x3", 0),
                    ("sep_conv_3x3", 0), ("skip_connect", 1)]


def test_skip_limit_replaces_the_weakest_skips_by_next_best_ops_and_rederives():
    # 5 skips chosen: e0 0.6, e1 0.5, e3 0.7, e7 0.45, e10 0.4. With M = 2 the weakest go, one at a
    # time, each edge falling back to its next-best op (and each node choosing its edges again):
    # 1. e10 (0.40) -> sep_conv_5x5 0.35: node 5 keeps e9 (0.9) and e10 (0.35 > e12's 0.3)
    # 2. e7 (0.45) -> avg_pool 0.10: node 4 now takes e5 sep3 0.4 and e6 sep5 0.3 (e7 drops out)
    # 3. e1 (0.50) -> dil_conv_3x3 0.4: node 2 is e0 skip 0.6, e1 dil3 0.4; skips left: e0, e3 = 2
    cell = limited_skips(_costs(_table()), OPS, 4, 2)
    assert cell == [("skip_connect", 0), ("dil_conv_3x3", 1),
                    ("skip_connect", 1), ("sep_conv_5x5", 0),
                    ("sep_conv_3x3", 0), ("sep_conv_5x5", 1),
                    ("sep_conv_3x3", 0), ("sep_conv_5x5", 1)]
    assert sum(op == "skip_connect" for op, _ in limited_skips(_costs(_table()), OPS, 4, 0)) == 0


def test_a_skip_with_no_other_candidate_stays():
    t = _table()
    t[0] = {"skip_connect": 0.6, "none": 0.4}        # e0 can only be a skip (none never chosen)
    cell = limited_skips(_costs(t), OPS, 4, 0)
    assert cell[0] == ("skip_connect", 0) and sum(op == "skip_connect" for op, _ in cell) == 1


def test_skip_dropout_schedule_per_epoch():
    # 25 epochs, arch steps from epoch 10 (0-based): linear before, exponential after (their code)
    r = 0.4
    assert skip_dropout_rate(r, 0, 25, 10) == pytest.approx(0.4 * 24 / 25)
    assert skip_dropout_rate(r, 9, 25, 10) == pytest.approx(0.4 * 15 / 25)
    assert skip_dropout_rate(r, 10, 25, 10) == pytest.approx(0.4)
    assert skip_dropout_rate(r, 15, 25, 10) == pytest.approx(0.4 * math.exp(-1.0))
    assert skip_dropout_rate(r, 24, 25, 10) == pytest.approx(0.4 * math.exp(-2.8))


def test_skip_dropout_edge_drops_only_the_identity_skip_while_training():
    torch.manual_seed(0)
    edge = SkipDropMixedOp(4, 1, ("skip_connect", "avg_pool_3x3"), p=0.5).double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    w = torch.tensor([1.0, 0.0], dtype=torch.float64)   # the skip alone
    edge.train()
    out = edge(x, w)
    zeros = out == 0
    assert 0.3 < zeros.double().mean() < 0.7                  # about half the elements dropped
    assert torch.allclose(out[~zeros], 2 * x[~zeros])        # the rest scaled by 1 / (1 - p)
    edge.eval()
    assert torch.equal(edge(x, w), x)
    reduce_edge = SkipDropMixedOp(4, 2, ("skip_connect",), p=0.5)   # a factorised reduction: no dropout
    assert reduce_edge.skip is None


def test_each_stage_has_its_depth_width_and_kept_ops():
    cfg, _ = search_config("p-darts-cifar10")
    assert (cfg.stage_layers, cfg.stage_keep, cfg.skip_dropout, cfg.max_skips) == ((5, 11, 17), (5, 3, 1),
                                                                                  (0.1, 0.4, 0.7), 2)
    assert (cfg.epochs, cfg.arch_start, cfg.batch_size, cfg.channels, cfg.train_portion) == (25, 10, 96, 16, 0.5)
    assert search_config("p-darts-cifar100")[0].skip_dropout == (0.1, 0.2, 0.3)
    assert PDARTS.stages(cfg) == 3
    s0 = PDARTS.stage_config(cfg, 0, None)
    assert (s0.stage, s0.layers, s0.edge_ops) == (0, 5, ())
    kept = {"normal": [list(OPS[3:])] * 14, "reduce": [list(OPS[:5])] * 14}
    s1 = PDARTS.stage_config(cfg, 1, {"kept_ops": kept})
    assert (s1.stage, s1.layers, s1.channels) == (1, 11, 16)
    net = SuperNet(10, s1.layers, s1.channels, 8, in_channels=1, primitives=s1.ops, spectral_norm=False,
                   **PDARTS.supernet_options(s1))
    assert len(net.cells) == 11 and sum(c.reduction for c in net.cells) == 2
    for cell in net.cells:   # every edge of a normal cell has the 5 kept ops, of a reduction cell its own 5
        want = OPS[:5] if cell.reduction else OPS[3:]
        assert all(e.primitives == want and len(e.ops) == 5 for e in cell.edges)
        assert all(isinstance(e, SkipDropMixedOp) for e in cell.edges)
    method = PDARTS(s1)
    method.adapt(net)
    assert net.alphas.shape == (2, 14, 5)
    assert net.stem(torch.zeros(1, 1, 8, 8))[1].shape[1] == 48   # the stem's 3C channels at C = 16


def test_settings_are_checked_with_one_line():
    with pytest.raises(ConfigError, match="--method p-darts: give --stage-layers"):
        search_config("quick", method="p-darts", space="darts")
    with pytest.raises(ConfigError, match="need one value per stage"):
        search_config("p-darts-quick", stage_keep=(5, 1))
    with pytest.raises(ConfigError, match="--stage-keep=5,3,1: must fall strictly from below the 4 ops"):
        search_config("p-darts-quick", space="msr")
    with pytest.raises(ConfigError, match="--stage-keep=5,5,1"):
        search_config("p-darts-quick", stage_keep=(5, 5, 1))
    with pytest.raises(ConfigError, match="--skip-dropout=.*in \\[0, 1\\)"):
        search_config("p-darts-quick", skip_dropout=(0.1, 1.0, 0.2))
    with pytest.raises(ConfigError, match="--stage-layers=.*need comma-separated integers"):
        search_config("p-darts-quick", stage_layers=("5", "x", "7"))
    with pytest.raises(ConfigError, match="need at least 3 cells"):
        search_config("p-darts-quick", stage_layers=(2, 4, 5))
    assert search_config("p-darts-quick", space="msr", stage_keep=(3, 2, 1))[0].ops[0] == "sep_conv_3x3"


def test_edge_ops_must_be_ordered_subsets_of_the_space():
    bad = ((("sep_conv_3x3",),) * 14, (("skip_connect", "none"),) * 14)   # out of the space's order
    with pytest.raises(ConfigError, match="reduce edge 0 has"):
        SuperNet(10, 3, 4, 8, in_channels=1, primitives=OPS, spectral_norm=False, edge_ops=bad)


def _tiny(tmp_path, name, **kw):
    from msrdarts.api import search

    return search("p-darts-quick", out=tmp_path / name, stage_layers=(3, 3, 4), epochs=2, layers=3, channels=4,
                  progress="off", plots=False, tensorboard=False, log=lambda *_: None, **kw)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real three-stage run (folder, result), shared by the slow tests that compare with it."""
    folder = tmp_path_factory.mktemp("pdarts")
    return folder, _tiny(folder, "a")


@pytest.mark.slow   # three real stages, and a resumed copy of them
def test_resume_at_a_stage_boundary_gives_the_same_run(tiny_run, tmp_path):
    import shutil

    from msrdarts.genotype import read_genotype_file
    from msrdarts.runs import folder as F

    root, full = tiny_run
    shutil.copytree(root / "a", tmp_path / "a")
    assert [r["stage"] for r in full.history] == [1, 1, 2, 2, 3, 3]
    assert [r["epoch"] for r in full.history] == list(range(1, 7))
    kept = full.history[1]["kept_ops"]["normal"]
    assert all(len(ops) == 5 for ops in kept) and "kept_ops" not in full.history[-1]
    assert read_genotype_file(tmp_path / "a" / F.GENOTYPE) == full.genotype
    assert sum(op == "skip_connect" for op, _ in full.genotype.normal) <= 2
    # the same run stopped after stage 1: stages 2 and 3 and the run's own files gone
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for p in ("stage-2", "stage-3"):
        shutil.rmtree(tmp_path / "b" / p)
    (tmp_path / "b" / F.HISTORY).unlink()
    (tmp_path / "b" / F.GENOTYPE).unlink()
    from msrdarts.api import search

    again = search(full_config(tmp_path / "a"), out=tmp_path / "b", resume=True, log=lambda *_: None)
    untimed = [{k: v for k, v in r.items() if k not in ("epoch_time_s", "train_images_per_s")} for r in again.history]
    assert untimed == [{k: v for k, v in r.items() if k not in ("epoch_time_s", "train_images_per_s")}
                       for r in full.history]
    assert again.genotype == full.genotype
    with pytest.raises(Exception, match="already holds a run"):
        _tiny(tmp_path, "a")
    # the stages picture frames, per stage and cell type, exactly the ops the next stage kept
    from msrdarts.views.plots import plot_run

    plot_run(tmp_path / "a", formats=("svg",))
    svg = (tmp_path / "a" / "plots" / "stages.svg").read_text()
    for e, ops in enumerate(kept):
        for op in OPS:
            assert (f'id="stage1-normal-{e}-{op}-kept"' in svg) == (op in ops)
    stage3 = full_config(tmp_path / "a" / "stage-3")
    assert [list(o) for o in stage3.edge_ops[0]] == full.history[3]["kept_ops"]["normal"]


def full_config(folder):
    from msrdarts.config import SearchConfig
    from msrdarts.runs import folder as F

    return SearchConfig.from_dict(F.read_json(folder / F.CONFIG))


@pytest.mark.slow   # real processes: a kill -9 inside stage 2, then msrdarts search --resume
def test_killed_inside_a_stage_resumes_from_the_command_line_to_the_same_run(tiny_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from msrdarts.runs import folder as F

    full = tiny_run[1]
    args = [sys.executable, "-m", "msrdarts", "search", "--preset", "p-darts-quick", "--stage-layers", "3,3,4",
            "--epochs", "2", "--layers", "3", "--channels", "4", "--no-progress", "--no-plots", "--no-tensorboard",
            "--out", str(tmp_path / "c")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "c" / "stage-2" / F.CHECKPOINT).is_file():   # stage 2's first epoch is saved
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    resumed = subprocess.run([*args[:4], "--out", str(tmp_path / "c"), "--resume", "--no-progress"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    untimed = [{k: v for k, v in r.items() if k not in ("epoch_time_s", "train_images_per_s")}
               for r in F.read_history(tmp_path / "c")]
    assert untimed == [{k: v for k, v in r.items() if k not in ("epoch_time_s", "train_images_per_s")}
                       for r in full.history]


def test_each_stage_sets_its_own_dropout_rate_and_keeps_its_own_count():
    cfg, _ = search_config("p-darts-quick", channels=4)
    kept = {"normal": [list(OPS[:5])] * 14, "reduce": [list(OPS[3:])] * 14}
    s1 = PDARTS.stage_config(cfg, 1, {"kept_ops": kept})     # stage 2: rate 0.4, keeps 3
    torch.manual_seed(0)
    net = SuperNet(10, s1.layers, s1.channels, 8, in_channels=1, primitives=s1.ops, spectral_norm=False,
                   **PDARTS.supernet_options(s1))
    method = PDARTS(s1)
    method.adapt(net)
    for epoch in range(s1.epochs):
        method.new_epoch(epoch, True)
        rates = {m.p for m in net.modules() if isinstance(m, SkipDropMixedOp)}
        assert len(rates) == 1 and rates.pop() == pytest.approx(skip_dropout_rate(0.4, epoch, s1.epochs,
                                                                                  s1.arch_start))
    # hand-made alphas over each edge's own 5 ops: normal edges have none..sep_conv_3x3, reduce edges
    # skip_connect..dil_conv_5x5; the table spreads them over the 8 ops (0 where an edge lacks one)
    alphas = torch.zeros(2, 14, 5)
    alphas[0, :, 4] = 2.0     # normal: sep_conv_3x3 strongest everywhere
    alphas[0, :, 3] = 1.0     # then skip_connect
    alphas[0, 0, 0] = 3.0     # edge 0: none strongest
    alphas[1, :, 2] = 1.5     # reduce: sep_conv_5x5 (the third of skip, sep3, sep5, dil3, dil5)
    alphas[1, :, 4] = 1.0     # then dil_conv_5x5
    with torch.no_grad():
        net.alphas.copy_(alphas)
    d = method.derive(net)
    p = torch.softmax(alphas, -1)
    assert torch.allclose(d.scores[0, :, :5], p[0]) and (d.scores[0, :, 5:] == 0).all()
    assert torch.allclose(d.scores[1, :, 3:], p[1]) and (d.scores[1, :, :3] == 0).all()
    # stage 2 keeps 3 per edge: normal edge 0 none, skip, sep3; other normal edges sep3, skip, then
    # the first of the tied rest (none); reduce: sep5, dil5, then skip (the first of the tied rest)
    assert d.extra["kept_ops"]["normal"][0] == ["none", "skip_connect", "sep_conv_3x3"]
    assert d.extra["kept_ops"]["normal"][5] == ["none", "skip_connect", "sep_conv_3x3"]
    assert d.extra["kept_ops"]["reduce"][3] == ["skip_connect", "sep_conv_5x5", "dil_conv_5x5"]
    # sep_conv_3x3 everywhere; node 2's edge 0 is weaker (none's 3.0 shares its softmax): 1 before 0;
    # the other nodes' edges tie: the lower sources first
    assert d.genotype.normal == (("sep_conv_3x3", 1), ("sep_conv_3x3", 0)) + (("sep_conv_3x3", 0),
                                                                             ("sep_conv_3x3", 1)) * 3
    assert all(op == "sep_conv_5x5" for op, _ in d.genotype.reduce)


def test_p_darts_preset_schedule_and_label():
    from msrdarts.views.compare import method_name

    cfg, _ = search_config("p-darts-cifar10")
    assert (cfg.lr, cfg.lr_min, cfg.momentum, cfg.weight_decay, cfg.grad_clip) == (0.025, 0.0, 0.9, 3e-4, 5.0)
    assert (cfg.arch_lr, cfg.arch_weight_decay, cfg.order, cfg.spectral_norm) == (6e-4, 1e-3, 1, False)
    assert method_name(cfg.to_dict()) == "p-darts"
    assert method_name({**cfg.to_dict(), "space": "msr"}) == "p-darts (msr space)"
