"""The Python API (msrdarts.api): configs with their origin, method defaults, the README example."""

import json
import re
from pathlib import Path

import pytest
import torch

import msrdarts
from msrdarts.api import search_config, train_config
from msrdarts.config import SearchConfig, TrainConfig
from msrdarts.errors import ConfigError
from msrdarts.nn.spectrum import conv_singular_values
from msrdarts.primitives import MSR_PRIMITIVES
from msrdarts.runs.loop import show_progress

README = Path(__file__).resolve().parents[1] / "README.md"


def test_presets_lists_every_preset():
    p = msrdarts.presets()
    assert {"cifar10", "quick", "imagenet", "darts-cifar10"} <= set(p["search"])
    assert {"cifar10", "quick", "cifar10-l8"} <= set(p["train"])


def test_a_method_brings_its_defaults_on_top_of_the_preset():
    cfg, origin = search_config("quick", method="darts")
    assert (cfg.method, cfg.spectral_norm, cfg.ops) == ("darts", False, MSR_PRIMITIVES)   # the preset's ops stay
    assert (cfg.dataset, cfg.layers, cfg.epochs) == ("digits", 5, 8)   # the preset's data and budget stay
    assert origin == {"preset": "quick", "method": "darts", "method_defaults": ["spectral_norm"],
                      "overrides": ["method"]}
    cfg, origin = search_config("quick", method="darts", space="darts")
    assert cfg.ops[0] == "none" and origin["method_defaults"] == ["spectral_norm"]
    # settings only the previous method reads go back to their defaults unless given
    cfg, origin = search_config("authors", method="darts")
    assert (cfg.mixing, cfg.authors_reduce_resolution) == ("sum", False)
    assert origin["method_defaults"] == ["authors_reduce_resolution", "mixing", "spectral_norm"]
    # the user's own ops replace the preset's named space
    cfg, _ = search_config("darts-cifar10", primitives="skip_connect,sep_conv_3x3")
    assert cfg.space == "" and cfg.ops == ("skip_connect", "sep_conv_3x3")
    # the method still checks what it cannot run with
    with pytest.raises(ConfigError, match="without spectral normalisation"):
        search_config("quick", method="darts", spectral_norm=True)
    with pytest.raises(ConfigError, match="--space=darts: MSR-DARTS ranks ops by the stable rank"):
        search_config("darts-cifar10", method="msr")


def test_same_method_as_the_preset_brings_nothing():
    cfg, origin = search_config("darts-cifar10", epochs=3)
    assert cfg.order == 2 and cfg.epochs == 3 and origin["method_defaults"] == []
    cfg, origin = search_config("quick")
    assert cfg.spectral_norm and origin == {"preset": "quick", "method": "msr", "method_defaults": [],
                                            "overrides": []}


def test_back_to_msr_from_a_darts_preset_restores_its_settings():
    cfg, origin = search_config("darts-cifar10", method="msr", space="msr")
    assert cfg.spectral_norm and cfg.order == 1 and cfg.ops == MSR_PRIMITIVES
    assert origin["method_defaults"] == ["order", "spectral_norm"]


def test_bad_settings_get_one_line_errors():
    with pytest.raises(ConfigError, match="unknown setting"):
        search_config("quick", learning_rate=0.1)
    with pytest.raises(ConfigError, match="--method='gdas': unknown; allowed: msr, darts"):
        search_config("quick", method="gdas")
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        train_config("fast")


def test_progress_bars_only_on_a_terminal_unless_forced():
    class Tty:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    assert show_progress("auto", Tty(True)) and not show_progress("auto", Tty(False))
    assert show_progress("on", Tty(False)) and not show_progress("off", Tty(True))
    # configs written before auto/on/off read as on/off
    assert SearchConfig(progress=False).progress == "off"
    assert TrainConfig.from_dict({"progress": True}).progress == "auto"   # the old default: bars where they help


def test_stable_rank_and_spectral_norm_of_any_conv_against_a_dense_operator():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", bias=False).double()
    n = 5
    # the conv as a dense (4*25) x (3*25) matrix, column by column (circular boundary)
    basis = torch.eye(3 * n * n, dtype=torch.float64).reshape(-1, 3, n, n)
    with torch.no_grad():
        A = conv(basis).reshape(3 * n * n, -1).T
    s = torch.linalg.svdvals(A)
    assert msrdarts.spectral_norm(conv, n) == pytest.approx(float(s[0]), rel=1e-9)
    assert msrdarts.stable_rank(conv, n) == pytest.approx(float((s ** 2).sum() / s[0] ** 2), rel=1e-9)
    assert msrdarts.stable_rank(conv.weight, n) == pytest.approx(msrdarts.stable_rank(conv, n))
    assert conv_singular_values(conv.weight, n).numel() == 3 * n * n
    with pytest.raises(ConfigError, match="stride-1"):
        msrdarts.stable_rank(torch.nn.Conv2d(3, 3, 3, stride=2), 8)


def _readme_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's example, as written, in an empty folder (a short search and training on digits)."""
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), scope)
    found, trained = scope["found"], scope["trained"]
    assert isinstance(found.genotype, msrdarts.Genotype) and len(found.history) == 2
    assert msrdarts.load_genotype(str(tmp_path / "runs/quick/genotype.json")) == found.genotype
    config = json.loads((tmp_path / "runs/quick/config.json").read_text())
    assert config["origin"] == {"preset": "quick", "method": "msr", "method_defaults": [],
                                "overrides": ["epochs"]}
    assert 0 <= trained.results["test_top1_error"] <= 100
    assert json.loads((tmp_path / "runs/quick-train/results.json").read_text())["genotype"] == \
        found.genotype.to_dict()


def test_config_json_keeps_the_origin_of_the_first_start_on_resume(tmp_path):
    tiny = dict(layers=3, channels=4, batch_size=256, epochs=2, device="cpu", plots=False, tensorboard=False,
                bn_recalibration=1)

    class Stop(Exception):
        pass

    def stop(epoch, record):
        raise Stop

    with pytest.raises(Stop):
        msrdarts.search("quick", tmp_path / "run", log=lambda m: None, on_epoch_end=stop, method="darts",
                        order=1, **tiny)
    first = json.loads((tmp_path / "run" / "config.json").read_text())["origin"]
    assert first["method_defaults"] == ["spectral_norm"] and "order" in first["overrides"]
    cfg = SearchConfig.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    result = msrdarts.search(cfg, tmp_path / "run", resume=True, log=lambda m: None)
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["origin"] == first
