"""Candidate ops, the op registry, FactorizedReduce, depthwise_conv2d and drop_path."""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from msrdarts import primitives
from msrdarts.errors import ConfigError
from msrdarts.nn import kernels, ops
from msrdarts.nn.batchnorm import BatchNorm2d
from msrdarts.nn.kernels import depthwise_conv2d
from msrdarts.primitives import DARTS_PRIMITIVES, MSR_PRIMITIVES
from msrdarts.nn.ops import (DilConv, FactorizedReduce, OpConv, SepConv, Zero,
                             drop_path, get_op, list_ops, register_op)
from msrdarts.primitives import Primitive, get_primitive, list_primitives

ALL_OPS = list_ops()
CONV_OPS = {"sep_conv_3x3": ("sep", 3), "sep_conv_5x5": ("sep", 5), "dil_conv_3x3": ("dil", 3),
            "dil_conv_5x5": ("dil", 5)}


def test_registry_contains_darts_and_msr_primitives():
    assert set(DARTS_PRIMITIVES) <= set(ALL_OPS)
    assert set(MSR_PRIMITIVES) <= set(DARTS_PRIMITIVES)
    assert len(set(ALL_OPS)) == len(ALL_OPS)


@pytest.mark.parametrize("name", ALL_OPS)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (6, 9), (5, 4)])
@pytest.mark.parametrize("affine", [False, True])
def test_op_shape_forward_backward(name, stride, hw, affine):
    torch.manual_seed(0)
    C, N = 4, 3
    op = get_op(name)(C, stride, affine)
    assert isinstance(op, nn.Module)
    op.train()
    x = torch.randn(N, C, *hw, requires_grad=True)
    y = op(x)
    assert y.shape == (N, C, math.ceil(hw[0] / stride), math.ceil(hw[1] / stride))
    assert torch.isfinite(y).all()
    g = torch.randn_like(y)
    (y * g).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    if name != "none":
        assert x.grad.abs().sum() > 0
    else:
        assert torch.equal(y, torch.zeros_like(y)) and torch.equal(x.grad, torch.zeros_like(x))
    for p in op.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # affine only adds BN parameters; ops without BN carry no parameters besides conv weights
    bns = [m for m in op.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        assert bn.affine == affine
    # evaluation mode gives the same shape
    op.eval()
    with torch.no_grad():
        assert op(x).shape == y.shape


@pytest.mark.parametrize("name", ["max_pool_3x3", "avg_pool_3x3", "skip_connect"])
def test_parameter_free_ops_values(name):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 7, 6)
    op1 = get_op(name)(3, 1, False)
    if name == "skip_connect":
        assert torch.equal(op1(x), x)
        assert isinstance(get_op(name)(3, 2, False), FactorizedReduce)
    elif name == "max_pool_3x3":
        ref = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=-float("inf")), 3, 1)
        torch.testing.assert_close(op1(x), ref)
        ref2 = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=-float("inf")), 3, 2, ceil_mode=False)
        torch.testing.assert_close(get_op(name)(3, 2, False)(x), ref2)
    else:
        # average over the in-image part of each 3x3 window (count_include_pad=False)
        ones = torch.ones(1, 1, 7, 6)
        s = F.conv2d(F.pad(x, (1, 1, 1, 1)).reshape(6, 1, 9, 8), torch.ones(1, 1, 3, 3)).reshape(2, 3, 7, 6)
        n = F.conv2d(F.pad(ones, (1, 1, 1, 1)), torch.ones(1, 1, 3, 3))
        torch.testing.assert_close(op1(x), s / n)


def test_get_op_unknown_raises_config_error_naming_known_ops():
    with pytest.raises(ConfigError) as info:
        get_op("bogus")
    msg = str(info.value)
    assert "bogus" in msg
    for name in ALL_OPS:
        assert name in msg
    assert isinstance(info.value, ValueError)


def test_register_op_duplicate_raises(monkeypatch):
    # keep both global registries clean: the ops' factories and their facts
    monkeypatch.setattr(ops, "_OPS", dict(ops._OPS))
    monkeypatch.setattr(primitives, "_PRIMITIVES", dict(primitives._PRIMITIVES))
    with pytest.raises(ValueError, match="sep_conv_3x3"):
        register_op("sep_conv_3x3")(lambda C, stride, affine: nn.Identity())
    assert get_op("sep_conv_3x3")(4, 1, False).__class__ is SepConv  # not replaced
    with pytest.raises(ValueError, match="my_test_op"):                # a new op must bring its facts
        register_op("my_test_op")(lambda C, stride, affine: nn.Identity())
    assert "my_test_op" not in list_ops() and "my_test_op" not in list_primitives()

    @register_op("my_test_op", Primitive("my_test_op", "t", "#000000"))
    def _mine(C, stride, affine):
        return nn.Identity()

    assert "my_test_op" in list_ops() and get_op("my_test_op") is _mine
    assert get_primitive("my_test_op") == Primitive("my_test_op", "t", "#000000")
    with pytest.raises(ValueError):
        register_op("my_test_op", Primitive("my_test_op", "u", "#ffffff"))(lambda C, stride, affine: nn.Identity())
    assert get_op("my_test_op") is _mine and get_primitive("my_test_op").short == "t"


def test_register_op_leaves_no_trace():
    assert "my_test_op" not in list_ops()
    assert "my_test_op" not in list_primitives()


def _leaf_types(module: nn.Module) -> list[type]:
    return [type(m) for m in module.modules() if len(list(m.children())) == 0]


@pytest.mark.parametrize("name", list(CONV_OPS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("affine", [False, True])
def test_conv_op_structure(name, stride, affine):
    kind, k = CONV_OPS[name]
    C = 6
    op = get_op(name)(C, stride, affine)
    convs = [m for m in op.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(c, OpConv) for c in convs)
    assert all(c.bias is None for c in convs)
    dw_kw = dict(kernel_size=(k, k), groups=C, in_channels=C, out_channels=C)
    pw_kw = dict(kernel_size=(1, 1), groups=1, in_channels=C, out_channels=C, stride=(1, 1), padding=(0, 0),
                 dilation=(1, 1))
    if kind == "sep":
        assert isinstance(op, SepConv)
        assert _leaf_types(op) == [nn.ReLU, OpConv, OpConv, BatchNorm2d] * 2
        assert len(convs) == 4
        expect = [dict(dw_kw, stride=(stride, stride), padding=(k // 2,) * 2, dilation=(1, 1)), pw_kw,
                  dict(dw_kw, stride=(1, 1), padding=(k // 2,) * 2, dilation=(1, 1)), pw_kw]
    else:
        assert isinstance(op, DilConv)
        assert _leaf_types(op) == [nn.ReLU, OpConv, OpConv, BatchNorm2d]
        assert len(convs) == 2
        expect = [dict(dw_kw, stride=(stride, stride), padding=(2 * (k // 2),) * 2, dilation=(2, 2)), pw_kw]
    for conv, exp in zip(convs, expect):
        for attr, val in exp.items():
            assert getattr(conv, attr) == val, (attr, conv)
    # exactly one conv carries the stride, and it is the first
    assert [c.stride for c in convs].count((stride, stride)) == (1 if stride == 2 else len(convs))
    assert op.last_conv is convs[-1]
    assert op.last_conv.kernel_size == (1, 1)
    # BN layers are affine only if asked, and ReLUs are not in-place (inputs are shared by ops)
    for m in op.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.affine == affine and m.num_features == C
        if isinstance(m, nn.ReLU):
            assert not m.inplace


@pytest.mark.parametrize("name", list(CONV_OPS))
@pytest.mark.parametrize("affine", [False, True])
def test_conv_op_parameter_count(name, affine):
    kind, k = CONV_OPS[name]
    C = 16
    op = get_op(name)(C, 1, affine)
    if kind == "sep":
        expected = 2 * (C * k * k + C * C) + (2 * 2 * C if affine else 0)
    else:
        expected = C * k * k + C * C + (2 * C if affine else 0)
    assert sum(p.numel() for p in op.parameters()) == expected
    # stride does not change the parameter count
    assert sum(p.numel() for p in get_op(name)(C, 2, affine).parameters()) == expected


@pytest.mark.parametrize("name", list(CONV_OPS))
def test_conv_op_matches_functional_reference(name):
    # the op computes exactly ReLU -> depthwise -> pointwise -> BN (-> repeat) with its own weights
    kind, k = CONV_OPS[name]
    torch.manual_seed(2)
    C = 3
    op = get_op(name)(C, 2, False).double().train()
    x = torch.randn(2, C, 9, 9, dtype=torch.float64)
    convs = [m for m in op.modules() if isinstance(m, OpConv)]

    def bn(t):
        return F.batch_norm(t, None, None, training=True, eps=1e-5)

    h = x
    for i in range(0, len(convs), 2):
        dw, pw = convs[i], convs[i + 1]
        h = F.relu(h)
        h = F.conv2d(h, dw.weight, None, dw.stride, dw.padding, dw.dilation, C)
        h = bn(F.conv2d(h, pw.weight))
    torch.testing.assert_close(op(x), h)


@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (5, 8), (1, 1), (2, 3)])
@pytest.mark.parametrize("c_in,c_out", [(4, 4), (4, 6), (3, 5), (6, 3)])
def test_factorized_reduce(hw, c_in, c_out):
    torch.manual_seed(3)
    fr = FactorizedReduce(c_in, c_out, affine=False).double()
    assert all(type(m) is nn.Conv2d for m in (fr.conv_1, fr.conv_2))
    assert fr.conv_1.out_channels + fr.conv_2.out_channels == c_out
    x = torch.randn(2, c_in, *hw, dtype=torch.float64, requires_grad=True)
    y = fr(x)
    Ho, Wo = math.ceil(hw[0] / 2), math.ceil(hw[1] / 2)
    assert y.shape == (2, c_out, Ho, Wo)
    # reference: path 1 on even pixels, path 2 on odd pixels (zero beyond the border)
    r = F.relu(x.detach())
    p1 = F.conv2d(r[:, :, ::2, ::2], fr.conv_1.weight)
    shifted = torch.zeros(2, c_in, 2 * Ho, 2 * Wo, dtype=torch.float64)
    shifted[:, :, :hw[0] - 1, :hw[1] - 1] = r[:, :, 1:, 1:]
    p2 = F.conv2d(shifted[:, :, ::2, ::2], fr.conv_2.weight)
    ref = F.batch_norm(torch.cat([p1, p2], 1), None, None, training=True, eps=fr.bn.eps)
    torch.testing.assert_close(y, ref)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()
    assert fr.conv_1.weight.grad.abs().sum() > 0
    if min(hw) > 1:  # on a 1-pixel-wide input the shifted path sees only padding
        assert fr.conv_2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("k,pad,dil", [(3, 1, 1), (5, 2, 1), (3, 2, 2), (5, 4, 2), (3, 0, 1), (3, 3, 1)])
@pytest.mark.parametrize("hw", [(6, 6), (5, 7)])
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_conv2d_matches_conv2d(k, pad, dil, hw, stride, monkeypatch):
    torch.manual_seed(4)
    C = 3
    monkeypatch.setattr(kernels, "TAP_BLOCK_ELEMENTS", 2 * 9)   # channel blocks of 1 or 2: the blocked loop
    x = torch.randn(2, C, *hw, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, 1, k, k, dtype=torch.float64, requires_grad=True)
    y = depthwise_conv2d(x, w, (pad, pad), (dil, dil), (stride, stride))
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = F.conv2d(x2, w2, None, stride, pad, dil, C)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x2, w2), g)
    torch.testing.assert_close(gx, rx, atol=1e-12, rtol=0)
    torch.testing.assert_close(gw, rw, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda a, b: depthwise_conv2d(a, b, (pad, pad), (dil, dil), (stride, stride)),
                                    (x, w))


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_conv2d_under_bf16_autocast_matches_conv2d(stride):
    """Under CPU bf16 autocast the forward runs in bf16 while the saved weight is float32: the
    backward must run in the gradient's dtype and give each input a gradient of its own dtype,
    as autograd through F.conv2d does."""
    torch.manual_seed(5)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    w = torch.randn(4, 1, 5, 5, requires_grad=True)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = depthwise_conv2d(x, w, (4, 4), (2, 2), (stride, stride))
        ref = F.conv2d(x2, w2, None, stride, 4, 2, 4)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    grads, refs = torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x2, w2), g)
    for a, b in zip(grads, refs):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.05 * float(b.abs().max()))


@pytest.mark.parametrize("k,pad,dil", [(5, 2, 1), (5, 4, 2)])
def test_opconv_fast_depthwise_path_matches_conv2d(k, pad, dil, monkeypatch):
    # OpConv routes stride-1 depthwise convs on >= 256-pixel CPU maps through depthwise_conv2d
    calls = []
    real = ops.depthwise_conv2d
    monkeypatch.setattr(ops, "depthwise_conv2d", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(5)
    C = 4
    conv = OpConv(C, C, k, padding=pad, dilation=dil, groups=C, bias=False)
    x = torch.randn(2, C, 16, 17, requires_grad=True)
    y = conv(x)
    assert calls, "fast path not taken"
    x2 = x.detach().clone().requires_grad_(True)
    w2 = conv.weight.detach().clone().requires_grad_(True)
    ref = F.conv2d(x2, w2, None, 1, pad, dil, C)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(y, (x, conv.weight), g)
    rx, rw = torch.autograd.grad(ref, (x2, w2), g)
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(6, 6), (7, 5)])
def test_zero_op(stride, hw):
    x = torch.randn(2, 3, *hw) + 1.0
    z = Zero(stride)
    y = z(x)
    assert y.shape == (2, 3, math.ceil(hw[0] / stride), math.ceil(hw[1] / stride))
    assert torch.equal(y, torch.zeros_like(y))
    assert y.dtype == x.dtype
    assert isinstance(get_op("none")(3, stride, False), Zero)


def test_zero_op_propagates_nan_free():
    # mul(0.0) keeps the autograd graph; the gradient through 'none' is exactly zero
    x = torch.randn(1, 2, 4, 4, requires_grad=True)
    Zero(2)(x).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_drop_path_keeps_expectation(p):
    torch.manual_seed(6)
    base = torch.randn(1, 2, 3, 3)
    n = 40000
    x = base.expand(n, -1, -1, -1).contiguous()
    y = drop_path(x, p, training=True)
    assert y.shape == x.shape
    # whole samples are dropped or scaled by 1/(1-p)
    flat = y.reshape(n, -1)
    dropped = (flat == 0).all(1)
    kept = ~dropped
    torch.testing.assert_close(flat[kept], (x.reshape(n, -1)[kept]) / (1 - p))
    frac = float(dropped.float().mean())
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n)
    mean = y.mean(0, keepdim=True)
    sd = math.sqrt(p / (1 - p)) * base.abs() / math.sqrt(n)
    assert ((mean - base).abs() <= 5 * sd + 1e-6).all()


def test_drop_path_identity_in_eval_and_at_zero():
    x = torch.randn(8, 2, 3, 3)
    assert torch.equal(drop_path(x, 0.5, training=False), x)
    assert torch.equal(drop_path(x, 0.0, training=True), x)


def test_drop_path_gradient():
    torch.manual_seed(7)
    x = torch.randn(64, 2, 2, 2, requires_grad=True)
    y = drop_path(x, 0.25, training=True)
    y.sum().backward()
    kept = (y.detach().reshape(64, -1) != 0).any(1)
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 1 / 0.75))
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))
    assert 0 < int((~kept).sum()) < 64


def test_compiled_tap_products_match_the_conv_weight_gradient():
    """CompiledTaps (torch.compile of tap_products, batch and channels dynamic) gives PyTorch's
    depthwise weight gradient, for two batch/channel counts (one compile: both are dynamic)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: torch.compile cannot build CPU kernels here")
    messages = []
    taps = kernels.CompiledTaps(log=messages.append, min_elements=0)
    torch.manual_seed(6)
    for k, pad, dil in [(5, 4, 2)]:
        for B, C in [(2, 3), (3, 3), (4, 5)]:   # B == C once: maybe_mark_dynamic, not mark_dynamic
            x = torch.randn(B, C, 9, 8, dtype=torch.float64)
            w = torch.randn(C, 1, k, k, dtype=torch.float64, requires_grad=True)
            xg = x.clone().requires_grad_(True)
            y = depthwise_conv2d(xg, w, (pad, pad), (dil, dil), taps=taps)
            g = torch.randn_like(y)
            gx, gw = torch.autograd.grad(y, (xg, w), g)
            w2 = w.detach().clone().requires_grad_(True)
            rw, = torch.autograd.grad(F.conv2d(x, w2, None, 1, pad, dil, C), (w2,), g)
            torch.testing.assert_close(gw, rw, atol=1e-12, rtol=1e-12)
    assert taps.failed is None and not messages, messages


def test_compiled_taps_fall_back_to_eager_with_one_message(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    messages = []
    taps = kernels.CompiledTaps(log=messages.append, min_elements=0)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    g = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    xp = F.pad(x, (1, 1, 1, 1))
    for _ in range(2):
        got = taps(xp, g, (3, 3), (1, 1), (1, 1))
        torch.testing.assert_close(got, kernels.tap_products(xp, g, (3, 3), (1, 1), (1, 1)), atol=1e-12, rtol=0)
    assert messages == ["compiling the depthwise weight gradient failed (RuntimeError: no compiler here); "
                        "computing it eagerly"]
    # below the size threshold nothing is compiled at all
    small = kernels.CompiledTaps(log=messages.append)
    small(xp, g, (3, 3), (1, 1), (1, 1))
    assert small.failed is None and len(messages) == 1
