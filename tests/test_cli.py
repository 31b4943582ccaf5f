import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from msrdarts.cli import main


def run_cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny networks: one thread, no spin-wait contention
    return subprocess.run([sys.executable, "-m", "msrdarts", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=env)


def test_help_shows_every_preset_value():
    r = run_cli("search", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for fragment in ("--epochs", "cifar10: 50", "quick: 8", "--batch-size", "cifar10: 128", "--lr-min",
                     "--no-spectral-norm", "--resume", "--primitives"):
        assert fragment in text, fragment


@pytest.mark.parametrize("args, fragment", [
    (["--preset", "bogus"], "unknown preset 'bogus'; allowed: cifar10, quick"),
    (["--preset", "quick", "--epochs", "0"], "--epochs=0: must be a positive integer"),
    (["--preset", "quick", "--channels", "-3"], "--channels=-3"),
    (["--preset", "quick", "--primitives", "sep_conv_3x3,conv_9x9"], "unknown op(s) conv_9x9"),
    (["--preset", "cifar10", "--data", "DIR/nowhere"], "CIFAR-10 not found in"),
    (["--preset", "quick", "--resume"], "nothing to resume"),
])
def test_bad_input_one_line_no_traceback(tmp_path, capsys, args, fragment):
    args = [a.replace("DIR", str(tmp_path)) for a in args]
    code = main(["search", "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err
    assert err.count("\n") == 1 and err.startswith("msrdarts: error: ")
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_existing_run_folder_is_refused_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text('{"precious": true}')
    code = main(["search", "--preset", "quick", "--out", str(out)])
    assert code == 2
    assert "already holds a run (config.json)" in capsys.readouterr().err
    assert (out / "config.json").read_text() == '{"precious": true}'


def test_plot_zoo_and_bad_genotype_file(tmp_path, capsys):
    assert main(["plot", "--genotype", "MSR_DARTS", "--out", str(tmp_path / "msr.png")]) == 0
    assert (tmp_path / "msr.png").read_bytes()[:4] == b"\x89PNG"
    bad = tmp_path / "g.json"
    bad.write_text(json.dumps({"normal": [["sep_conv_3x3", 0], ["sep_conv_5x5", 5]], "normal_concat": [2],
                               "reduce": [["sep_conv_3x3", 0], ["sep_conv_3x3", 1]], "reduce_concat": [2]}))
    capsys.readouterr()
    assert main(["plot", "--genotype", str(bad), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "g.json: normal[1] feeds node 2 from node 5" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow   # end to end: real processes
def test_console_search_end_to_end(tmp_path):
    """The installed entry point runs a (tiny) search offline and reports where the results are."""
    out = tmp_path / "run"
    r = run_cli("search", "--preset", "quick", "--out", str(out), "--epochs", "1", "--layers", "3",
                "--channels", "2", "--batch-size", "512", "--no-progress", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "genotype (epoch 1" in r.stdout and f"results in {out}" in r.stdout
    assert json.loads((out / "config.json").read_text())["channels"] == 2
    r2 = run_cli("search", "--out", str(out), "--resume", "--no-progress")
    assert r2.returncode == 0, r2.stderr  # already complete: nothing to do, files rewritten identically
    assert "resuming" in r2.stdout


def test_plot_rejects_unknown_op_and_bench_rejects_bad_counts(tmp_path, capsys):
    text = ("Genotype(normal=[('conv_9x9', 0), ('sep_conv_3x3', 1)], normal_concat=[2], "
            "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])")
    assert main(["plot", "--genotype", text, "--out", str(tmp_path / "g.png")]) == 2
    assert "normal[0] has op 'conv_9x9'" in capsys.readouterr().err
    assert main(["bench", "search-step", "--steps", "0"]) == 2
    assert "--steps=0: must be a positive integer" in capsys.readouterr().err
    assert main(["bench", "search-step", "--amp", "fp16", "--no-memory"]) == 2
    assert "--amp='fp16': unknown; allowed: auto, bf16, off" in capsys.readouterr().err
    for bad in ("0", "nan", "-3"):
        assert main(["bench", "search-step", "--sn-refresh-interval", bad, "--no-memory"]) == 2
        assert f"--sn-refresh-interval={float(bad)}: must be > 0" in capsys.readouterr().err


def test_info_prints_params_and_mult_adds(capsys):
    assert main(["info", "--genotype", "P_DARTS", "--dataset", "cifar10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params_m"] == pytest.approx(3.43, abs=0.01) and out["mult_adds_m"] == pytest.approx(532, rel=0.01)
    assert main(["info", "--genotype", "P_DARTS", "--dataset", "mnist"]) == 2
    assert "unknown dataset 'mnist'" in capsys.readouterr().err


@pytest.mark.slow   # end to end: the whole bench, with its peak-memory subprocesses
@pytest.mark.parametrize("amp", ["auto", "bf16"])
def test_bench_search_step_runs_and_reports_every_figure(capsys, amp):
    rc = main(["bench", "search-step", "--layers", "3", "--channels", "2", "--batch-size", "2", "--input-size", "8",
               "--in-channels", "1", "--steps", "2", "--warmup", "0", "--json", "--no-memory", "--amp", amp,
               "--sn-refresh-interval", "12.5"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["amp"] == ("off" if amp == "auto" else "bf16") and out["compile"] is False   # auto: off on the CPU
    for key in ("ms_per_step_reference", "ms_per_step_fused", "ms_per_step_fused_no_sn", "speedup_fused_vs_reference",
                "sn_overhead_fused", "gflop_s_fused", "gb_s_fused", "copy_gb_s", "matmul_gflop_s",
                "stable_rank_table_and_derivation_ms", "sn_refresh_ms", "sn_overhead_fused_with_refresh",
                "ms_per_step_fused_recompute_depthwise", "sn_refresh_full_length_ms",
                "sn_overhead_fused_with_full_length_refresh"):
        assert out[key] > 0, key
    # what autograd keeps: --recompute-depthwise keeps less than the plain fused forward
    assert 0 < out["saved_for_backward_mb_fused_recompute_depthwise"] < out["saved_for_backward_mb_fused"]
    # a full refresh every 12.5 steps (as given), the 1x1 convs' every 5, the drift check every step
    assert (out["sn_refresh_every"], out["sn_refresh_interval"]) == (5, 12.5) and out["sn_drift_check_ms"] > 0
    assert out["sn_refresh_ms_per_step"] == pytest.approx(
        out["sn_refresh_ms"] / 12.5 + out["sn_refresh_pointwise_ms"] / 5 + out["sn_drift_check_ms"], rel=0.02, abs=0.01)
    assert out["sn_overhead_fused_with_refresh"] == pytest.approx(
        (out["ms_per_step_fused"] + out["sn_refresh_ms_per_step"]) / out["ms_per_step_fused_no_sn"], rel=0.01)
    assert out["speedup_fused_vs_reference"] == pytest.approx(out["ms_per_step_reference"] / out["ms_per_step_fused"],
                                                             rel=0.01)
    # 2 steps are one round: its pair of medians is the whole run's, and both quartiles are that ratio
    assert out["sn_overhead_fused_paired"] == pytest.approx(out["sn_overhead_fused"], rel=0.01)
    assert out["sn_overhead_fused_paired_quartiles"] == [out["sn_overhead_fused_paired"]] * 2
    assert out["sn_overhead_fused_paired_with_refresh"] == pytest.approx(
        out["sn_overhead_fused_paired"] + out["sn_refresh_ms_per_step"] / out["ms_per_step_fused_no_sn"], abs=0.002)


def test_bench_amortises_each_bundle_at_the_rate_a_search_history_gives(tmp_path, capsys):
    """--sn-refresh-history: each bundle's refreshes per weight step are its sn_refreshes_by_map
    summed over the records over their train_steps (here 4 in 40 steps and 2 in 40), and each is
    amortised at that rate, with the 1x1 convs' reset every 5 steps and the drift check."""
    from msrdarts.bench import refresh_rates_of

    history = tmp_path / "history.jsonl"
    history.write_text(json.dumps({"epoch": 1, "train_steps": 10, "sn_refreshes_by_map": {"8x8/1": 3}}) + "\n"
                       + json.dumps({"epoch": 2, "train_steps": 30, "sn_refreshes_by_map": {"8x8/1": 1, "4x4/1": 2}})
                       + "\n")
    assert refresh_rates_of(str(history)) == {"8x8/1": 0.1, "4x4/1": 0.05}
    rc = main(["bench", "search-step", "--layers", "3", "--channels", "2", "--batch-size", "2", "--input-size", "8",
               "--in-channels", "1", "--steps", "2", "--warmup", "0", "--json", "--no-memory",
               "--sn-refresh-history", str(history)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["sn_refresh_rates"] == {"8x8/1": 0.1, "4x4/1": 0.05}
    by_map = out["sn_refresh_ms_by_map"]
    assert set(by_map) == {"8x8/1", "4x4/1"} and all(t > 0 for t in by_map.values())
    assert out["sn_refresh_ms_per_step"] == pytest.approx(
        0.1 * by_map["8x8/1"] + 0.05 * by_map["4x4/1"] + out["sn_refresh_pointwise_ms"] / 5 + out["sn_drift_check_ms"],
        rel=0.02, abs=0.01)


def test_bench_refresh_history_gets_one_line_errors(tmp_path, capsys):
    """A missing file, a history without refresh counts, and a bundle this network does not have."""
    bench = ["bench", "search-step", "--layers", "3", "--channels", "2", "--batch-size", "2", "--input-size", "8",
             "--in-channels", "1", "--steps", "1", "--warmup", "0", "--json", "--no-memory", "--sn-refresh-history"]
    missing = tmp_path / "nope.jsonl"
    assert main(bench + [str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and "cannot read a search history" in err and len(err.splitlines()) == 1
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"epoch": 1, "train_steps": 10, "sn_refreshes": 2}) + "\n")
    assert main(bench + [str(old)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(old) in err and "sn_refreshes_by_map" in err and len(err.splitlines()) == 1
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"epoch": 1, "train_steps": 10, "sn_refreshes_by_map": {"32x32/1": 1}}) + "\n")
    assert main(bench + [str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert "32x32/1" in err and "not bundles of this network" in err and len(err.splitlines()) == 1


def test_bench_method_step_is_the_searchs_step():
    """A timed method step runs the method's architecture step, then the weight step; MSR-DARTS's
    refresh falls every sn_refresh_every steps."""
    from msrdarts.bench import _method_setup, _method_step

    for method in ("darts", "pc-darts", "p-darts"):
        net, opt, hook, x, y, cfg = _method_setup(method, "msr", 3, 4 if method != "pc-darts" else 8, 4, 8, 1,
                                                  "cpu", 0)
        arch = [p.detach().clone() for p in net.arch_parameters()]
        weights = [p.detach().clone() for p in net.weight_parameters()]
        _method_step(net, opt, hook, x, y, cfg, 0)
        assert all(not torch.equal(a, b) for a, b in zip(arch, net.arch_parameters())), method
        assert any(not torch.equal(a, b) for a, b in zip(weights, net.weight_parameters())), method
    net, opt, hook, x, y, cfg = _method_setup("msr", "msr", 3, 4, 4, 8, 1, "cpu", 0)
    assert hook is None and cfg.spectral_norm and (cfg.sn_refresh_every, cfg.sn_refresh_depthwise_every) == (5, 100)
    cfg = replace(cfg, sn_refresh_depthwise_every=10, sn_refresh_drift=0.0)   # the fixed schedule alone (the
    calls = []                                                                  # drift trigger: test_search)
    net.refresh_spectral_norms = lambda **kw: calls.append((i, kw.get("bundles")))
    pointwise = [net.spectral_bundle_names().index("1x1")]
    for i in range(21):
        _method_step(net, opt, hook, x, y, cfg, i)
    assert calls == [(4, pointwise), (9, None), (14, pointwise), (19, None)]   # None: all convs


def test_bench_method_rejects_unknown_method(capsys):
    assert main(["bench", "search-step", "--method", "msr,enas", "--no-memory"]) == 2
    assert "--method='enas': unknown; allowed: msr, darts, pc-darts, p-darts" in capsys.readouterr().err


@pytest.mark.slow   # end to end: the whole bench, with its peak-memory subprocesses
def test_bench_train_step_runs_and_reports_every_figure(capsys):
    rc = main(["bench", "train-step", "--genotype", "DARTS_V2", "--layers", "3", "--channels", "4", "--batch-size",
               "4", "--input-size", "16", "--steps", "2", "--warmup", "0", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["channels_last_reference"], out["channels_last_reference_channels_last"], out["channels_last_fast"]) \
        == (False, True, True)   # the CPU defaults: the reference NCHW, the fast path channels_last
    for v in ("reference", "reference_channels_last", "fast"):
        for key in ("ms_per_step", "images_per_s", "gflop_s", "gb_s"):
            assert out[f"{key}_{v}"] > 0, (key, v)
    for v in ("reference", "fast"):
        assert out[f"peak_step_memory_mb_{v}"] > 0
    assert out["speedup_fast_vs_reference"] == pytest.approx(out["ms_per_step_reference"] / out["ms_per_step_fast"],
                                                             rel=0.01)


def test_bench_train_step_flags_get_one_line_errors(capsys):
    assert main(["bench", "train-step", "--genotype", "NOPE", "--no-memory"]) == 2
    assert "genotype 'NOPE'" in capsys.readouterr().err
    assert main(["bench", "train-step", "--channels-last", "maybe", "--no-memory"]) == 2
    assert "--channels-last='maybe': unknown; allowed: auto, on, off" in capsys.readouterr().err


def test_bench_median_ms_times_each_timed_call_after_the_warm_ups(monkeypatch):
    """bench/'s shared timer, on a fake clock: the warm-up calls are not timed, the result is the
    median of the timed calls' durations in ms."""
    import msrdarts.bench as bench

    now = [0.0]
    durations = iter([5.0, 0.010, 0.030, 0.020])   # s: one slow warm-up, then three timed calls
    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])

    def fn():
        now[0] += next(durations)

    assert bench.median_ms(fn, repeats=3, warmup=1) == pytest.approx(20.0)
