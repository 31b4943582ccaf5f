"""What a search step keeps in memory, and --recompute-depthwise auto (msrdarts.runs.memory)."""

import pytest
import torch

from msrdarts.cli import build_parser
from msrdarts.config import SearchConfig
from msrdarts.device import Accel
from msrdarts.errors import ConfigError
from msrdarts.nn.supernet import SuperNet
from msrdarts.runs.memory import (BYTES_PER_PARAMETER_FACTOR, PEAK_OVER_KEPT, activation_bytes, available_bytes,
                                  plain_step_bytes, auto_recompute_depthwise, saved_bytes)

CPU = Accel(torch.device("cpu"), False, False, False)


def _net(**kw):
    torch.manual_seed(0)
    return SuperNet(10, 4, 4, 16, **kw)


def test_activation_bytes_from_two_small_batches_predict_a_large_batch():
    """The fit from batches of 2 and 4 images gives what autograd keeps at 64 images, measured
    directly at 64, within 5 % (at 24 images and up some kernels keep a few MB more, a step the
    fit cannot see; PEAK_OVER_KEPT covers it); and it leaves every buffer (BN statistics,
    power-iteration vectors) as it was."""
    net = _net(impl="fused")
    net.cells[0].eval()                                       # a mixed set of module modes
    before = {k: b.clone() for k, b in net.named_buffers()}
    modes = [m.training for m in net.modules()]
    rng = torch.get_rng_state()
    per_image, fixed = activation_bytes(net, (3, 16, 16), CPU)
    for k, b in net.named_buffers():
        assert torch.equal(b, before[k]), k
    assert [m.training for m in net.modules()] == modes and not net.cells[0].training
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(1)
    measured = saved_bytes(net.train(), torch.randn(64, 3, 16, 16))
    assert per_image > 0
    assert fixed + 64 * per_image == pytest.approx(measured, rel=0.05)


def test_set_recompute_depthwise_after_building_is_the_built_option():
    """Switched on after building, the network keeps what one built with the option keeps (under
    half of the plain step's) and computes the same gradients as the plain step (float64)."""
    plain, lean, built = _net(impl="fused").double(), _net(impl="fused").double(), \
        _net(impl="fused", recompute_depthwise=True).double()
    lean.load_state_dict(plain.state_dict())
    built.load_state_dict(plain.state_dict())
    lean.set_recompute_depthwise(True)
    assert lean.recompute_depthwise and not plain.recompute_depthwise
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    kept = {n: saved_bytes(m.train(), x) for n, m in (("plain", plain), ("lean", lean), ("built", built))}
    assert kept["lean"] == kept["built"] < 0.5 * kept["plain"], kept
    grads = []
    for m in (plain, lean):
        m.load_state_dict(built.state_dict())
        m.zero_grad()
        m(x).square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    lean.set_recompute_depthwise(False)
    assert saved_bytes(lean, x) == kept["plain"]


def test_auto_stays_off_where_the_step_fits_and_turns_on_where_it_does_not():
    """auto: off for a small network and batch on this machine; on for a batch of a billion images
    per process, which no device holds (the estimate is linear in the batch)."""
    free = available_bytes(torch.device("cpu"))
    assert free is not None and free > 2 ** 28          # Linux: MemAvailable
    said = []
    net = _net(impl="fused", recompute_depthwise=True)               # measured as the plain step, left plain
    assert auto_recompute_depthwise(net, 64, (3, 16, 16), CPU, said.append) is False
    assert not net.recompute_depthwise
    assert said and said[-1].startswith("--recompute-depthwise auto: off") and "free on cpu" in said[-1]
    small = float(said[-1].split("needs about ")[1].split(" GB")[0])
    assert auto_recompute_depthwise(net, 10 ** 9, (3, 16, 16), CPU, said.append) is True
    assert said[-1].startswith("--recompute-depthwise auto: on") and len(said) == 2
    assert float(said[-1].split("needs about ")[1].split(" GB")[0]) > 1e5 * max(small, 0.1)
    reference = _net(impl="reference")                               # no fused forward: never on, nothing measured
    assert auto_recompute_depthwise(reference, 10 ** 9, (3, 16, 16), CPU, said.append) is False
    assert len(said) == 2
    with pytest.raises(ConfigError, match="--recompute-depthwise: needs the fused"):
        reference.set_recompute_depthwise(True)


def test_plain_step_bytes_formula():
    """kept bytes at the batch with the transients' factor, plus the parameters' copies."""
    assert plain_step_bytes(1000.0, 500.0, 8, 100, 4) == PEAK_OVER_KEPT * 8500 + BYTES_PER_PARAMETER_FACTOR * 400
    assert plain_step_bytes(1.0, -50.0, 2, 0, 4) == 0.0                # a fit's negative remainder is no memory


@pytest.mark.parametrize("argv, expected", [([], None), (["--recompute-depthwise"], "on"),
                                            (["--recompute-depthwise", "off"], "off"),
                                            (["--no-recompute-depthwise"], "off"),
                                            (["--recompute-depthwise", "auto"], "auto")])
def test_recompute_depthwise_flag(argv, expected):
    """A bare flag is on, a value is taken as given, no flag leaves the preset's (auto)."""
    args = build_parser().parse_args(["search", "--out", "x", *argv, "--no-progress"])
    assert args.recompute_depthwise == expected
    assert SearchConfig().recompute_depthwise == "auto"


def test_auto_measures_the_architecture_step_of_a_darts_supernet():
    """With architecture parameters (DARTS's alphas), the measurement lets them take gradients, as
    the architecture step does, which keeps every op's output for the mixing gradient: more than the
    weight step with the alphas frozen. Their requires_grad is put back."""
    from msrdarts.methods import get_method

    cfg = SearchConfig(method="darts", space="msr", spectral_norm=False, layers=4, channels=4)
    net = _net(impl="fused", spectral_norm=False)
    get_method("darts")(cfg).adapt(net)
    alphas = list(net.arch_parameters())
    assert alphas
    for a in alphas:
        a.requires_grad_(False)
    frozen = saved_bytes(net.train(), torch.randn(4, 3, 16, 16))
    per_image, fixed = activation_bytes(net, (3, 16, 16), CPU)
    assert fixed + 4 * per_image > 1.05 * frozen
    assert not any(a.requires_grad for a in alphas)


def test_recompute_depthwise_settings_of_old_runs_and_bad_values():
    """config.json written when the setting was a switch reads as on or off; an unknown value is
    refused with the allowed ones."""
    assert SearchConfig.from_dict({"recompute_depthwise": True}).recompute_depthwise == "on"
    assert SearchConfig.from_dict({"recompute_depthwise": False}).recompute_depthwise == "off"
    with pytest.raises(ConfigError, match=r"--recompute-depthwise='yes': unknown; allowed: auto, on, off"):
        SearchConfig(recompute_depthwise="yes").validate()
