"""Device resolution and the speed settings (msrdarts.device), on the CPU this suite runs on."""

import pytest
import torch

from msrdarts.device import Accel, _CompileOrEager, resolve_device
from msrdarts.errors import ConfigError


def test_auto_is_the_cpu_without_an_accelerator():
    expected = torch.accelerator.current_accelerator(check_available=True) or torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, fragment", [("gpu0", "not a device name"), ("cuda:7", "cuda:7"),
                                            ("mps", "not available on this machine")])
def test_bad_devices_are_named(name, fragment):
    if torch.accelerator.current_accelerator(check_available=True) is not None:
        pytest.skip("this machine has an accelerator")
    with pytest.raises(ConfigError, match=fragment) as info:
        resolve_device(name)
    assert "\n" not in str(info.value) and name in str(info.value)


def test_auto_settings_are_off_on_the_cpu_and_switch_on_explicitly():
    cpu = torch.device("cpu")
    a = Accel.resolve(cpu)
    assert (a.amp, a.channels_last, a.compile) == (False, False, False)
    b = Accel.resolve(cpu, amp="bf16", channels_last="on", compile="on")
    assert (b.amp, b.channels_last, b.compile) == (True, True, True)
    # an accelerator turns the auto settings on (decided from the device type alone)
    c = Accel.resolve(torch.device("meta"))
    assert (c.amp, c.channels_last, c.compile) == (True, True, True)


@pytest.mark.parametrize("kw, message", [(dict(amp="fp16"), "--amp='fp16': unknown; allowed: auto, bf16, off"),
                                         (dict(compile="yes"), "--compile='yes': unknown; allowed: auto, on, off")])
def test_unknown_settings_name_the_flag_and_the_allowed_values(kw, message):
    with pytest.raises(ConfigError) as info:
        Accel.resolve(torch.device("cpu"), **kw)
    assert str(info.value) == message


def test_autocast_and_memory_format_do_what_they_say():
    x = torch.randn(2, 3, 4, 5)
    w = torch.randn(5, 5)
    on, off = Accel.resolve(torch.device("cpu"), amp="bf16", channels_last="on"), Accel.resolve(torch.device("cpu"))
    with on.autocast():
        assert (x @ w).dtype == torch.bfloat16
    with off.autocast():
        assert (x @ w).dtype == torch.float32
    assert on.input(x).is_contiguous(memory_format=torch.channels_last)
    assert off.input(x) is x
    conv = on.prepare_model(torch.nn.Conv2d(3, 4, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_failing_compile_falls_back_to_eager_once_with_one_message():
    model = torch.nn.Linear(3, 2)
    calls = []

    def broken(x):
        calls.append(x)
        raise RuntimeError("inductor: no C++ compiler\nmore detail")

    messages = []
    forward = _CompileOrEager(model, broken, messages.append)
    x = torch.randn(4, 3)
    torch.testing.assert_close(forward(x), model(x))
    torch.testing.assert_close(forward(x), model(x))
    assert len(calls) == 1 and len(messages) == 1
    assert "no C++ compiler" in messages[0] and "more detail" not in messages[0] and "--compile off" in messages[0]


def test_cpu_channels_last_default_is_per_network():
    cpu = torch.device("cpu")
    assert Accel.resolve(cpu).channels_last is False                            # the supernets
    assert Accel.resolve(cpu, cpu_channels_last=True).channels_last is True     # the fast evaluation network
    assert Accel.resolve(cpu, channels_last="off", cpu_channels_last=True).channels_last is False



def test_sgd_is_fused_on_the_cpu_and_updates_as_written_by_hand():
    from msrdarts.device import sgd

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = sgd(params, 0.1, 0.9, 1e-2)
    assert opt.defaults["fused"] is True
    start = [p.detach().clone() for p in params]
    buf = [torch.zeros_like(p) for p in params]
    for step in range(3):   # SGD with momentum and L2 weight decay (PyTorch's convention, DARTS's optimiser)
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for k, (w, g) in enumerate(zip(start, grads)):
            d = g + 1e-2 * w
            buf[k] = d if step == 0 else 0.9 * buf[k] + d
            start[k] = w - 0.1 * buf[k]
        for p, w in zip(params, start):
            torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-6)
