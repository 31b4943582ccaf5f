import json
from dataclasses import replace

import pytest
import torch

from msrdarts.runs.checkpoint import load_checkpoint
from msrdarts.config import SearchConfig, get_preset
from msrdarts.errors import CheckpointError, ConfigError
from msrdarts.zoo import load_genotype
from msrdarts.runs.folder import read_history
from msrdarts.methods import get_method
from msrdarts.runs.search import run_search

# Pictures and TensorBoard events are tested in test_report.py; here they would only cost time.
TINY = SearchConfig(dataset="digits", layers=3, channels=4, batch_size=256, epochs=2, lr=0.05, seed=0,
                    bn_recalibration=2, device="cpu", progress=False, plots=False, tensorboard=False)
TIMING = ("epoch_time_s", "train_images_per_s")


def quiet(_msg):
    pass


class Stop(Exception):
    pass


def _strip(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    result = run_search(TINY, out, log=quiet)
    return out, result


def test_run_folder_contents(full_run):
    out, result = full_run
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "config.json",
                                                      "genotype-cells-max.json", "genotype-cells.json",
                                                      "genotype-max.json", "genotype.json", "history.jsonl"]
    assert SearchConfig.from_dict(json.loads((out / "config.json").read_text())) == TINY
    history = read_history(out)
    assert [r["epoch"] for r in history] == [1, 2]
    for r in history:
        for key in ("train_loss", "train_acc", "valid_loss", "valid_acc", "lr"):
            assert isinstance(r[key], float)
        table = r["stable_rank"]
        assert table["ops"] == list(TINY.primitives) and len(table["edges"]) == 14
        assert len(table["normal"]) == 14 and len(table["normal"][0]) == 4
        load_genotype(out / "genotype.json")  # valid file
    assert history[0]["lr"] == pytest.approx(TINY.lr)
    # genotype.json is the genotype of the epoch with the best validation accuracy.
    best = max(history, key=lambda r: (r["valid_acc"], -r["epoch"]))
    assert json.loads((out / "genotype.json").read_text()) == best["genotype"]
    assert result.best_epoch == best["epoch"] and result.genotype.to_dict() == best["genotype"]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"] == TINY.to_dict()


def test_history_genotype_is_derived_from_the_recorded_table(full_run):
    from msrdarts.methods.derive import derive_genotype

    out, _ = full_run
    for r in read_history(out):
        t = r["stable_rank"]
        g = derive_genotype(torch.tensor(t["normal"]), torch.tensor(t["reduce"]), t["ops"])
        assert g.to_dict() == r["genotype"]


def test_per_cell_genotypes_come_from_the_recorded_cell_tables_at_the_best_epoch(full_run):
    from msrdarts.methods.derive import derive_cells

    out, result = full_run
    history = read_history(out)
    for r in history:
        t = r["stable_rank"]
        assert t["cell_types"] == ["normal", "reduce", "reduce"] and t["select"] == "min"   # L = 3: reductions 1, 2
        cells = torch.tensor(t["cells"])
        assert cells.shape == (3, 14, 4)
        # the mean table is the mean over the cells of each type
        torch.testing.assert_close(torch.tensor(t["normal"]), cells[0])
        torch.testing.assert_close(torch.tensor(t["reduce"]), cells[1:].mean(0))
        again = derive_cells(cells, [c == "reduce" for c in t["cell_types"]], t["ops"])
        assert again.to_dict() == r["genotype_cells"]
    best = max(history, key=lambda r: (r["valid_acc"], -r["epoch"]))
    assert json.loads((out / "genotype-cells.json").read_text()) == best["genotype_cells"]
    # the authors' max ablation, from the same weights and epoch: the recorded tables, negated
    t = best["stable_rank"]
    neg = [c == "reduce" for c in t["cell_types"]]
    top = derive_cells(-torch.tensor(t["cells"]), neg, t["ops"])
    assert json.loads((out / "genotype-cells-max.json").read_text()) == top.to_dict() == \
        best["ablations"]["cells-max"]
    assert json.loads((out / "genotype-max.json").read_text()) == best["ablations"]["max"]
    assert result.cells.to_dict() == best["genotype_cells"] and result.cells.layers == TINY.layers


def test_select_max_records_and_derives_the_highest_ranks(tmp_path):
    from msrdarts.methods.derive import derive_cells, derive_genotype

    res = run_search(replace(TINY, select="max", epochs=1), tmp_path / "max", log=quiet)
    r = read_history(tmp_path / "max")[0]
    t = r["stable_rank"]
    assert t["select"] == "max"
    neg = lambda v: -torch.tensor(v)   # noqa: E731
    assert derive_genotype(neg(t["normal"]), neg(t["reduce"]), t["ops"]).to_dict() == r["genotype"]
    assert derive_cells(neg(t["cells"]), [c == "reduce" for c in t["cell_types"]], t["ops"]).to_dict() == \
        r["genotype_cells"] == res.cells.to_dict()
    assert json.loads((tmp_path / "max" / "config.json").read_text())["select"] == "max"


def test_refuses_existing_run_and_leaves_it_untouched(full_run):
    out, _ = full_run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CheckpointError, match="already holds a run"):
        run_search(TINY, out, log=quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.slow   # whole searches, run twice (resume equivalence also: test_loop's kills)
def test_resume_equals_uninterrupted_run(full_run, tmp_path):
    out_full, _ = full_run
    out = tmp_path / "interrupted"

    def stop_after_first(epoch, record):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        run_search(TINY, out, on_epoch_end=stop_after_first, log=quiet)
    assert [r["epoch"] for r in read_history(out)] == [1]
    run_search(TINY, out, resume=True, log=quiet)
    assert _strip(read_history(out)) == _strip(read_history(out_full))
    assert (out / "genotype.json").read_text() == (out_full / "genotype.json").read_text()
    a, b = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(out_full / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_resume_refuses_changed_settings_and_missing_runs(full_run, tmp_path):
    out, _ = full_run
    with pytest.raises(CheckpointError, match="changed settings \\(channels: run has 4, now 6"):
        run_search(replace(TINY, channels=6), out, resume=True, log=quiet)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        run_search(TINY, tmp_path / "empty", resume=True, log=quiet)


def test_checkpoint_from_before_pointwise_vectors_resumes_with_exact_ones(full_run, tmp_path):
    """Checkpoints written before 1x1 convs had power-iteration vectors still resume; any other
    missing entry is named."""
    import shutil

    from msrdarts.nn.spectral import matrix_top_vectors

    out, _ = full_run
    old = tmp_path / "old"
    shutil.copytree(out, old)
    ckpt = load_checkpoint(old / "checkpoint.pt")
    ckpt["epoch"] = 1                              # resume one epoch before the end
    ckpt["history"] = ckpt["history"][:1]
    pointwise = [k[:-2] for k in ckpt["model"] if k.endswith(".u") and ckpt["model"][k].dim() == 1]
    assert pointwise
    for k in pointwise:
        del ckpt["model"][k + ".u"], ckpt["model"][k + ".v"]
    bases = [k for k in ckpt["model"] if k.endswith(".basis")]   # and before block power iteration
    assert bases
    for k in bases:
        del ckpt["model"][k]
    torch.save(ckpt, old / "checkpoint.pt")
    (old / "checkpoint.prev.pt").unlink()
    logs = []
    res = run_search(TINY, old, resume=True, log=logs.append)
    assert any("were set to the exact ones" in m and f"their {len(pointwise)} vectors" in m for m in logs)
    assert any("before block power iteration" in m and f"{len(bases)} convs" in m for m in logs)
    assert len(res.history) == TINY.epochs
    del ckpt["model"][next(k for k in ckpt["model"] if k.endswith("running_mean"))]
    torch.save(ckpt, old / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="does not match this network \\(missing 1 entries"):
        run_search(TINY, old, resume=True, log=quiet)


def test_a_run_from_before_recompute_auto_resumes_and_a_resumed_run_keeps_its_choice(full_run, tmp_path):
    """A run written when --recompute-depthwise was a switch (false in its config, nothing in its
    checkpoint) resumes under today's default, auto, which then measures and chooses; a checkpoint
    that records the choice is resumed with that step, whatever the free memory says now."""
    import json
    import shutil

    out, _ = full_run
    for name, recorded in (("old", None), ("lean", True)):
        run = tmp_path / name
        shutil.copytree(out, run)
        ckpt = load_checkpoint(run / "checkpoint.pt")
        ckpt["epoch"], ckpt["history"] = 1, ckpt["history"][:1]
        ckpt["config"]["recompute_depthwise"] = False
        if recorded is None:
            del ckpt["recompute_depthwise"]
        else:
            ckpt["recompute_depthwise"] = recorded
        torch.save(ckpt, run / "checkpoint.pt")
        (run / "checkpoint.prev.pt").unlink()
        config = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**config, "recompute_depthwise": False}))
        logs = []
        res = run_search(TINY, run, resume=True, log=logs.append)
        assert len(res.history) == TINY.epochs
        said = [m for m in logs if m.startswith("--recompute-depthwise auto")]
        if recorded is None:
            assert len(said) == 1 and said[0].startswith("--recompute-depthwise auto: off (the plain fused step")
            assert load_checkpoint(run / "checkpoint.pt")["recompute_depthwise"] is False
        else:
            assert said == ["--recompute-depthwise auto: on, as the run was checkpointed with"]
            assert load_checkpoint(run / "checkpoint.pt")["recompute_depthwise"] is True


def test_corrupted_checkpoint_is_named(full_run, tmp_path):
    out, _ = full_run
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="checkpoint.pt: not a readable msrdarts checkpoint"):
        run_search(TINY, bad, resume=True, log=quiet)


def test_srsoftmax_search_runs(tmp_path):
    cfg = replace(TINY, mixing="srsoftmax", epochs=1, authors_reduce_resolution=True)
    result = run_search(cfg, tmp_path / "sr", log=quiet)
    result.genotype.validate(cfg.primitives)


@pytest.mark.parametrize("change, fragment", [
    (dict(epochs=0), "--epochs=0"),
    (dict(layers=2), "--layers=2"),
    (dict(dataset="imagenet21k"), "--dataset='imagenet21k'"),
    (dict(primitives=("sep_conv_3x3", "skip_connect")), "skip_connect have none"),
    (dict(train_portion=1.5), "--train-portion=1.5"),
    (dict(device="tpu9"), "--device='tpu9'"),
    (dict(rank_per_pixel=True, authors_reduce_resolution=True), "exclude each other"),
])
def test_bad_settings_fail_before_touching_the_folder(tmp_path, change, fragment):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as info:
        run_search(replace(TINY, **change), out, log=quiet)
    assert fragment in str(info.value)
    assert not out.exists()


def test_presets_follow_the_spec():
    c = get_preset("cifar10")
    assert (c.layers, c.channels, c.batch_size, c.epochs, c.lr, c.lr_min, c.momentum, c.weight_decay, c.grad_clip,
            c.train_portion, c.dataset, c.mixing, c.spectral_norm) == \
           (8, 16, 128, 50, 0.025, 0.001, 0.9, 3e-4, 5.0, 0.8, "cifar10", "sum", True)
    assert c.primitives == ("sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
    assert get_preset("quick").dataset == "digits"
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        get_preset("fast")


def test_crash_before_the_first_epoch_leaves_a_restartable_folder(tmp_path, monkeypatch):
    import msrdarts.runs.loop as search_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(search_module, "train_one_epoch", crash)
    with pytest.raises(KeyboardInterrupt):
        run_search(TINY, out, log=quiet)
    assert list(out.iterdir()) == []          # nothing that would block a fresh start
    monkeypatch.undo()
    run_search(replace(TINY, epochs=1), out, log=quiet)
    assert [r["epoch"] for r in read_history(out)] == [1]
    assert json.loads((out / "config.json").read_text())["runtime"]["device"] == "cpu"


def test_streamed_imagenet_search_on_a_subset_is_the_same_for_any_workers(tmp_path):
    """The ImageNet path end to end on a fake tree: streamed 72 px images, ImageNet stem, a
    class-balanced subset; the history does not depend on the number of decoding workers."""
    from test_data import _noise_tree

    _noise_tree(tmp_path / "inet", "train", ["n1", "n2", "n3"], 12, (60, 48))
    _noise_tree(tmp_path / "inet", "val", ["n1", "n2", "n3"], 2, (60, 48))
    cfg = replace(TINY, dataset="imagenet", data=str(tmp_path / "inet"), image_size=72, batch_size=8,
                  subset=0.5, subset_valid=0.25, bn_recalibration=0, workers=0,
                  spectral_norm=False)  # (building the normalised supernet would dominate this data test)
    lines = []
    r0 = run_search(cfg, tmp_path / "w0", log=lines.append)
    r2 = run_search(replace(cfg, workers=2), tmp_path / "w2", log=quiet)
    assert lines[0] == "imagenet: 18 search-train / 9 search-valid images, 72 px, streamed"
    assert _strip(r0.history) == _strip(r2.history)
    assert r0.genotype == r2.genotype


DARTS_TINY = SearchConfig(dataset="digits", method="darts", space="msr", spectral_norm=False, layers=3, channels=4,
                          batch_size=128, epochs=2, train_portion=0.5, seed=0, device="cpu", progress=False,
                          plots=False, tensorboard=False)


def test_darts_search_learns_alphas_and_derives_from_them(tmp_path):
    from msrdarts.methods.derive import derive_genotype

    res = run_search(DARTS_TINY, tmp_path / "d", log=quiet)
    for record in res.history:
        t = record["alpha"]
        assert "stable_rank" not in record and t["ops"] == list(SearchConfig().primitives)
        normal, reduce = torch.tensor(t["normal"]), torch.tensor(t["reduce"])
        assert torch.allclose(normal.sum(-1), torch.ones(14)) and normal.std() > 0   # softmax rows, moved
        assert derive_genotype(-normal, -reduce, t["ops"]).to_dict() == record["genotype"]
    ckpt = load_checkpoint(tmp_path / "d" / "checkpoint.pt")
    assert ckpt["arch_optimizer"]["state"] and ckpt["model"]["alphas"].shape == (2, 14, 4)
    assert torch.allclose(torch.softmax(ckpt["model"]["alphas"], -1), torch.tensor(
        [res.history[-1]["alpha"]["normal"], res.history[-1]["alpha"]["reduce"]]), atol=1e-6)


@pytest.mark.slow   # whole searches, run twice (resume equivalence also: test_loop's kills)
def test_darts_resume_equals_uninterrupted(tmp_path):
    full = run_search(DARTS_TINY, tmp_path / "full", log=quiet)

    def stop(epoch, record):
        raise Stop

    with pytest.raises(Stop):
        run_search(DARTS_TINY, tmp_path / "cut", on_epoch_end=stop, log=quiet)
    resumed = run_search(DARTS_TINY, tmp_path / "cut", resume=True, log=quiet)
    assert _strip(resumed.history) == _strip(full.history)


@pytest.mark.slow   # whole searches, run twice (resume equivalence also: test_loop's kills)
def test_second_order_darts_on_the_darts_space_never_picks_none(tmp_path):
    cfg = replace(DARTS_TINY, space="darts", order=2, epochs=1, batch_size=256)
    res = run_search(cfg, tmp_path / "d2", log=quiet)
    assert "none" not in res.genotype.ops() and len(res.history[0]["alpha"]["ops"]) == 8
    with pytest.raises(ConfigError, match="without spectral normalisation"):
        get_method("darts").validate(replace(cfg, spectral_norm=True))


@pytest.mark.parametrize("every, depthwise_every, drift", [(1000, 1000, 0.0), (1000, 1000, 1e-9), (2, 3, 0.0)])
def test_spectral_refreshes_follow_the_schedule_and_the_drift_trigger(tmp_path, every, depthwise_every, drift):
    """Refreshes after weight step s (counted from 0 over the whole run): all convs' after every
    --sn-refresh-depthwise-every steps (s + 1 a multiple of it), else the 1x1 convs' only after every
    --sn-refresh-every steps; none after step 0 (the build converged the vectors). A drift trigger
    below any real step's weight change refreshes every bundle of depthwise convs after every step
    (but those exact at every forward, and the 1x1 convs only on their schedule); the history counts those steps and each bundle's refreshes."""
    from msrdarts.runs.search import SearchRun

    calls, steps, names = [], [], []

    class Counting(SearchRun):
        def build(self, data):
            net, wrapped = super().build(data)
            refresh = net.refresh_spectral_norms
            names[:] = net.spectral_bundle_names()

            def counted(**kw):
                bundles = kw.get("bundles")
                calls.append((len(steps), set(names) if bundles is None else {names[k] for k in bundles}))
                refresh(**kw)

            net.refresh_spectral_norms = counted
            net.register_forward_hook(lambda m, a, o: steps.append(1) if m.training else None)
            return net, wrapped

    cfg = replace(TINY, sn_refresh_every=every, sn_refresh_depthwise_every=depthwise_every, sn_refresh_drift=drift)
    Counting.start(cfg, tmp_path / "run", log=quiet)
    history = read_history(tmp_path / "run")
    assert len(history) == cfg.epochs and len(steps) > 2 * cfg.epochs
    depthwise = set(names) - {"1x1"}
    # the convs with at most 4 pixels in or out (1x1 and 2x2 maps, 4x4 at stride 2) are exact at
    # every forward: no drift to track; the drift trigger refreshes the others
    drifting = depthwise - {"1x1/1", "2x2/1", "4x4/2"}
    assert "1x1" in names and depthwise == {"1x1/1", "2x2/1", "4x4/1", "4x4/2", "8x8/1", "8x8/2"}, names
    if drift:                      # after every step, every bundle of depthwise convs that can drift
        expected = [(n, drifting) for n in range(1, len(steps) + 1)]
    else:                          # forward n (from 1) is step n - 1 of the run
        expected = [(n, set(names) if n % depthwise_every == 0 else {"1x1"}) for n in range(1, len(steps) + 1)
                    if n % depthwise_every == 0 or n % every == 0]
    assert calls == expected
    per_epoch = len(steps) // cfg.epochs
    if (every, depthwise_every) == (2, 3):   # steps 0 none, 1 pointwise, 2 all, 3 pointwise (epoch 2), 4 none, 5 all
        assert per_epoch == 4 and calls[:4] == [(2, {"1x1"}), (3, set(names)), (4, {"1x1"}), (6, set(names))]
    refreshing = [sum(1 for n, which in calls if (n - 1) // per_epoch == e and which & depthwise)
                  for e in range(cfg.epochs)]
    assert [r["sn_refreshes"] for r in history] == refreshing
    counted = drifting if drift else depthwise
    assert [r["sn_refreshes_by_map"] for r in history] == [{name: k for name in sorted(counted)} if k else {}
                                                          for k in refreshing]


def test_a_resumed_search_refreshes_on_the_drift_of_the_uninterrupted_one(tmp_path):
    """The drift trigger compares the weights with those of the last full refresh: the checkpoint
    keeps them (and the epoch's refresh count), so a search resumed after epoch 1 refreshes on the
    same steps as one that ran through: the same history (sn_refreshes per epoch included) and the
    same final weights. A checkpoint whose reference does not fit the network is one line."""
    cfg = replace(TINY, sn_refresh_drift=0.05, sn_refresh_depthwise_every=1000, bn_recalibration=1)
    full = run_search(cfg, tmp_path / "full", log=quiet)
    counts = [r["sn_refreshes"] for r in full.history]
    # epoch 2's refreshes are the drift trigger's alone (the schedule's first after step 0 is step 1000)
    assert counts[1] >= 1 and all(r["train_steps"] > c for r, c in zip(full.history, counts)), counts

    def stop_after_first(epoch, record):
        if epoch == 1:
            raise Stop

    out = tmp_path / "interrupted"
    with pytest.raises(Stop):
        run_search(cfg, out, on_epoch_end=stop_after_first, log=quiet)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert set(ckpt["spectral_norm"]) == {"drift_reference", "refreshes_this_epoch", "refreshes_by_map_this_epoch"}
    run_search(cfg, out, resume=True, log=quiet)
    assert _strip(read_history(out)) == _strip(full.history)
    a, b = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    bad = tmp_path / "bad"
    with pytest.raises(Stop):
        run_search(cfg, bad, on_epoch_end=stop_after_first, log=quiet)
    ckpt = load_checkpoint(bad / "checkpoint.pt")
    ckpt["spectral_norm"]["drift_reference"]["0"] = torch.zeros(1)
    torch.save(ckpt, bad / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: its spectral-norm state does not match this network"):
        run_search(cfg, bad, resume=True, log=quiet)
