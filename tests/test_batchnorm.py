"""The channels_last batch norm fast path against nn.BatchNorm2d (an independent reference: PyTorch's
own kernel on the NCHW copy of the same input)."""

import pytest
import torch
from torch import nn

from msrdarts.nn.batchnorm import BatchNorm2d, use_fast_batch_norm


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _step(bn, x, g):
    """Output, input gradient, parameter gradients and buffers after one training forward/backward."""
    x = x.clone().requires_grad_()
    y = bn(x)
    y.backward(g)
    out = {"y": y, "dx": x.grad} | {f"grad_{n}": p.grad for n, p in bn.named_parameters()}
    return out | {n: b.clone() for n, b in bn.named_buffers()}


@pytest.mark.parametrize("affine, momentum, track, offset", [(True, 0.1, True, 1.5), (False, 0.1, True, 1.5),
                                                             (True, None, True, 1.5), (True, 0.1, False, 1.5),
                                                             (True, 0.1, True, 400.0)])
def test_fast_batch_norm_equals_pytorch_in_float64(affine, momentum, track, offset):
    """Two training steps (so the running averages move twice): same outputs, gradients and buffers
    as nn.BatchNorm2d, and the output and input gradient stay channels_last; also for a mean far
    above the spread (``offset`` 400 against a spread of 3)."""
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(20, affine=affine, momentum=momentum, track_running_stats=track).double()
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 2), ref.bias.normal_()
    fast = BatchNorm2d(20, affine=affine, momentum=momentum, track_running_stats=track).double()
    fast.load_state_dict(ref.state_dict())
    fast.fast = True
    for step in range(2):
        x = _cl(torch.randn(6, 20, 9, 8, dtype=torch.float64) * 3 + offset)
        g = _cl(torch.randn(6, 20, 9, 8, dtype=torch.float64))
        assert use_fast_batch_norm(x)
        a, b = _step(fast, x, g), _step(ref, x.contiguous(), g.contiguous())
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12, msg=f"step {step}: {k}")
        assert a["y"].is_contiguous(memory_format=torch.channels_last)
        assert a["dx"].is_contiguous(memory_format=torch.channels_last)
        for p in list(ref.parameters()) + list(fast.parameters()):
            p.grad = None
    if track:
        assert int(fast.num_batches_tracked) == 2 and not torch.equal(fast.running_var, torch.ones(20))


@pytest.mark.parametrize("offset", [0.0, 1.5, 4.95, 400.0])
def test_fast_batch_norm_in_float32_is_as_accurate_as_pytorch_s(offset):
    """float32 against a float64 reference, for means of 0 to 800x the spread (0.5): the output,
    gradients and running statistics stay within 2e-5 (relative to their largest entry) however far
    the mean is from zero (one-pass statistics, E[x^2] - E[x]^2, were 7e-5 off at 3x and 5e-4 at 10x)."""
    torch.manual_seed(1)
    x64 = (torch.randn(32, 12, 32, 32, dtype=torch.float64) * 0.5 + offset).float().double()   # exact in float32
    g64 = torch.randn_like(x64).float().double()
    b = _step(nn.BatchNorm2d(12).double(), x64, g64)
    fast = BatchNorm2d(12)
    fast.fast = True
    assert use_fast_batch_norm(_cl(x64.float()))
    a = _step(fast, _cl(x64.float()), _cl(g64.float()))
    for k in ("y", "dx", "grad_weight", "grad_bias", "running_mean", "running_var"):
        ref = b[k].detach()
        err = float((a[k].detach().double() - ref).abs().max() / ref.abs().max())
        assert err < 2e-5, (k, err)


def test_fast_batch_norm_takes_pytorch_s_kernel_where_that_wins(monkeypatch):
    """The path runs only for training-mode channels_last CPU maps of < 64 channels, a count that is
    not a multiple of 8, >= 64 pixels, with the flag set; everywhere else the module is nn.BatchNorm2d."""
    import msrdarts.nn.batchnorm as bnmod

    calls = []
    real = bnmod.batch_norm_channels_last
    monkeypatch.setattr(bnmod, "batch_norm_channels_last", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))

    def fires(C, hw, cl=True, fast=True, training=True):
        calls.clear()
        bn = BatchNorm2d(C).train(training)
        bn.fast = fast
        x = torch.randn(2, C, hw, hw)
        bn(_cl(x) if cl else x)
        return bool(calls)

    assert fires(36, 32) and fires(20, 8) and fires(63, 8)
    assert not fires(36, 32, cl=False)           # NCHW: PyTorch's NCHW kernel
    assert not fires(36, 32, fast=False)         # flag off (the default, and the reference network)
    assert not fires(36, 32, training=False)     # evaluation: running statistics, PyTorch's kernel
    assert not fires(32, 32) and not fires(72, 16) and not fires(68, 16)   # multiple of 8, or >= 64 channels
    assert not fires(36, 7)                      # under 64 pixels
    assert BatchNorm2d.fast is False
    x = _cl(torch.randn(2, 36, 8, 8))
    assert use_fast_batch_norm(x) and not use_fast_batch_norm(x.bfloat16()) and not use_fast_batch_norm(x.half())
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False):         # a dispatch mode (the benches' FLOP and traffic counters)
        assert not use_fast_batch_norm(x)


def test_batch_norm_shares_nn_batchnorm2d_s_state_dict():
    """Checkpoints load either way: a trained nn.BatchNorm2d's state (parameters and running
    statistics) loaded into ours gives the same evaluation output, and back."""
    torch.manual_seed(2)
    ref = nn.BatchNorm2d(36)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2), ref.bias.normal_(), ref.running_mean.normal_(), ref.running_var.uniform_(0.5, 2)
    ours = BatchNorm2d(36)
    ours.fast = True
    ours.load_state_dict(ref.state_dict())
    x = _cl(torch.randn(2, 36, 8, 8))
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x), rtol=0, atol=0)
    back = nn.BatchNorm2d(36)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.eval()(x), ref(x), rtol=0, atol=0)


def test_fast_batch_norm_of_a_constant_channel_stays_finite():
    """A channel with zero variance (a dead ReLU's output): finite output and gradient, as PyTorch's
    (which gives the bias; float32 rounding leaves ours within 1e-4 of it)."""
    x = torch.randn(4, 12, 8, 8)
    x[:, 3] = 3.7
    fast = BatchNorm2d(12)
    fast.fast = True
    g = torch.randn_like(x)
    a, b = _step(fast, _cl(x), _cl(g)), _step(nn.BatchNorm2d(12), x, g)
    for k in a:
        assert torch.isfinite(a[k]).all(), k
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)
