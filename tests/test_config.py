"""Run configurations (msrdarts.config): presets, the JSON round trip, and one message per setting."""

import dataclasses

import pytest

from msrdarts.config import (SEARCH_PRESETS, TRAIN_PRESETS, SearchConfig, TrainConfig, check_choice, check_ops,
                             get_preset, get_train_preset)
from msrdarts.errors import ConfigError


@pytest.mark.parametrize("name", list(SEARCH_PRESETS))
def test_every_search_preset_is_valid_and_survives_json(name):
    cfg = get_preset(name).validate()
    again = SearchConfig.from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again.primitives, tuple)


@pytest.mark.parametrize("name", list(TRAIN_PRESETS))
def test_every_train_preset_is_valid_and_survives_json(name):
    cfg = get_train_preset(name).validate()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_config_json_extras_are_ignored_and_unknown_fields_named():
    d = {**SearchConfig().to_dict(), "runtime": {"device": "cpu"}, "origin": {"preset": "quick"}}
    assert SearchConfig.from_dict(d) == SearchConfig()
    with pytest.raises(ConfigError, match="run/config.json: unknown field\\(s\\) colour, zz"):
        SearchConfig.from_dict({"zz": 1, "colour": 2}, source="run/config.json")


def test_progress_written_as_a_bool_reads_as_on_or_off():
    assert SearchConfig.from_dict({"progress": False}).progress == "off"
    assert TrainConfig(progress=True).progress == "auto"


@pytest.mark.parametrize("cls, change, message", [
    (SearchConfig, dict(layers=2), "--layers=2: need at least 3 cells (normal and reduction cells)"),
    (TrainConfig, dict(layers=2), "--layers=2: need at least 3 cells (normal and reduction cells)"),
    (SearchConfig, dict(channels=1), "--channels=1: need at least 2 (FactorizedReduce splits channels in two)"),
    (SearchConfig, dict(epochs=0), "--epochs=0: must be a positive integer"),
    (TrainConfig, dict(batch_size=1.5), "--batch-size=1.5: must be a positive integer"),
    (SearchConfig, dict(amp="fp16"), "--amp='fp16': unknown; allowed: auto, bf16, off"),
    (TrainConfig, dict(loading="disk"), "--loading='disk': unknown; allowed: auto, memory, stream"),
    (SearchConfig, dict(progress="maybe"), "--progress='maybe': unknown; allowed: auto, on, off"),
    (SearchConfig, dict(dataset="mnist"), "--dataset='mnist': unknown; allowed: "),
    (SearchConfig, dict(mixing="max"), "--mixing='max': unknown; allowed: sum, srsoftmax"),
    (SearchConfig, dict(space="nas201"), "--space='nas201': unknown; allowed: msr, darts"),
    (SearchConfig, dict(space="darts", primitives=("skip_connect",)), "give --space or --primitives, not both"),
    (SearchConfig, dict(primitives=("conv_7x7",)), "--primitives: unknown op(s) conv_7x7; known: none,"),
    (SearchConfig, dict(impl="fast"), "--impl='fast': unknown; allowed: auto, fused, reference"),
    (SearchConfig, dict(space="darts", impl="fused"), "--impl=fused: supports the ops sep_conv_3x3"),
    (TrainConfig, dict(schedule="linear"), "--schedule='linear': unknown; allowed: cosine, step"),
    (TrainConfig, dict(lr_min=1.0), "--lr-min=1.0: must not exceed --lr=0.025"),
])
def test_each_bad_setting_gets_its_one_line_message(cls, change, message):
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(cls(), **change).validate()
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_the_network_builders_share_the_configs_messages():
    """SuperNet and Network check their arguments with the same functions as the configs."""
    from msrdarts.nn.network import Network
    from msrdarts.nn.supernet import SuperNet
    from msrdarts.zoo import get_genotype

    with pytest.raises(ConfigError, match="^--layers=2: need at least 3 cells"):
        SuperNet(10, 2, 4, 8)
    with pytest.raises(ConfigError, match="^--layers=2: need at least 3 cells"):
        Network(get_genotype("DARTS_V2"), 10, 2, 8)


def test_check_helpers():
    check_choice("amp", "off", ("auto", "off"))
    with pytest.raises(ConfigError, match="^--channels-last='x': unknown; allowed: a, b$"):
        check_choice("channels_last", "x", ("a", "b"))
    check_ops(("sep_conv_3x3", "skip_connect"))
    with pytest.raises(ConfigError, match="distinct"):
        check_ops(("sep_conv_3x3", "sep_conv_3x3"))


def test_sn_refresh_drift_must_not_be_negative():
    assert SearchConfig(sn_refresh_drift=0.04).validate().sn_refresh_drift == 0.04
    with pytest.raises(ConfigError, match="^--sn-refresh-drift=-0.1: must be >= 0$"):
        SearchConfig(sn_refresh_drift=-0.1).validate()
