"""Stable rank / singular values of conv operators against a dense brute-force reference."""

from __future__ import annotations

import pytest
import torch

from msrdarts.nn.spectrum import (conv_singular_values, conv_stable_rank, kernel_spectrum,
                                  pointwise_stable_ranks)

from _reference import dense_circular, spectrum_formula, stable_rank_dense

# (C_out, C_in, k, H, W, dilation, groups)
CASES = {
    "3x3": (3, 3, 3, 6, 6, 1, 1),
    "5x5": (2, 3, 5, 6, 6, 1, 1),
    "3x3_dil2": (3, 3, 3, 7, 7, 2, 1),
    "5x5_dil2": (2, 2, 5, 8, 8, 2, 1),
    "nonsquare_5x7": (3, 2, 3, 5, 7, 1, 1),
    "nonsquare_dil2_7x5": (2, 3, 5, 7, 5, 2, 1),
    "cout_gt_cin": (4, 2, 3, 5, 5, 1, 1),
    "cout_lt_cin": (2, 4, 3, 5, 5, 1, 1),
    "grouped_2": (4, 4, 3, 5, 6, 1, 2),
    "grouped_2_uneven": (2, 4, 3, 5, 5, 1, 2),
    "grouped_dil2": (4, 2, 3, 6, 6, 2, 2),
    "depthwise_3x3": (4, 4, 3, 6, 6, 1, 4),
    "depthwise_5x5_dil2": (3, 3, 5, 7, 7, 2, 3),
    "pointwise_1x1": (3, 4, 1, 5, 6, 1, 1),
    "wrap_5x5_dil2_on_4x4": (2, 2, 5, 4, 4, 2, 1),
    "wrap_3x3_on_2x2": (2, 3, 3, 2, 2, 1, 1),
    "wrap_depthwise_5x5_dil2_on_3x5": (3, 3, 5, 3, 5, 2, 3),
}


def _weight(case, seed=0, dtype=torch.float64):
    c_out, c_in, k, H, W, d, g = case
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(c_out, c_in // g, k, k, generator=gen, dtype=dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_singular_values_match_dense_circular_operator(name):
    case = CASES[name]
    c_out, c_in, k, H, W, d, g = case
    w = _weight(case)
    ref = torch.linalg.svdvals(dense_circular(w, H, W, d, g))  # descending
    got = conv_singular_values(w, (H, W), dilation=d, groups=g)
    assert got.dtype == torch.float64
    assert got.shape == ref.shape == (H * W * min(c_out, c_in),)
    assert torch.all(got[:-1] >= got[1:]), "not sorted descending"
    torch.testing.assert_close(got, ref, atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_stable_rank_matches_dense(name):
    case = CASES[name]
    c_out, c_in, k, H, W, d, g = case
    w = _weight(case, seed=1)
    ref = stable_rank_dense(dense_circular(w, H, W, d, g))
    got = conv_stable_rank(w, (H, W), dilation=d, groups=g)
    assert isinstance(got, float)
    assert got == pytest.approx(ref, rel=1e-9)
    assert 1.0 <= got <= H * W * min(c_out, c_in) + 1e-9


@pytest.mark.parametrize("name", ["3x3_dil2", "nonsquare_dil2_7x5", "grouped_2", "wrap_5x5_dil2_on_4x4"])
def test_float32_input_agrees_with_float64(name):
    case = CASES[name]
    c_out, c_in, k, H, W, d, g = case
    w = _weight(case, seed=2)
    ref = torch.linalg.svdvals(dense_circular(w, H, W, d, g))
    got = conv_singular_values(w.float(), (H, W), dilation=d, groups=g)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-4 * float(ref[0]), rtol=0)
    assert conv_stable_rank(w.float(), (H, W), d, g) == pytest.approx(stable_rank_dense(
        dense_circular(w, H, W, d, g)), rel=1e-4)


@pytest.mark.parametrize("name", ["3x3", "5x5_dil2", "nonsquare_dil2_7x5", "wrap_5x5_dil2_on_4x4",
                                  "pointwise_1x1"])
def test_kernel_spectrum_matches_formula(name):
    case = CASES[name]
    c_out, c_in, k, H, W, d, g = case
    w = _weight(case, seed=3)
    spec = kernel_spectrum(w, (H, W), dilation=d, groups=g)
    assert spec.shape == (H, W, 1, c_out, c_in)
    torch.testing.assert_close(spec[:, :, 0], spectrum_formula(w, H, W, d), atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["grouped_2", "grouped_2_uneven", "grouped_dil2", "depthwise_3x3",
                                  "depthwise_5x5_dil2"])
def test_kernel_spectrum_grouped_blocks(name):
    case = CASES[name]
    c_out, c_in, k, H, W, d, g = case
    w = _weight(case, seed=4)
    spec = kernel_spectrum(w, (H, W), dilation=d, groups=g)
    co_g, ci_g = c_out // g, c_in // g
    assert spec.shape == (H, W, g, co_g, ci_g)
    for gi in range(g):
        block = w[gi * co_g:(gi + 1) * co_g]
        torch.testing.assert_close(spec[:, :, gi], spectrum_formula(block, H, W, d), atol=1e-10, rtol=0)


def test_int_input_size_equals_tuple():
    w = _weight(CASES["5x5_dil2"], seed=5)
    torch.testing.assert_close(conv_singular_values(w, 8, dilation=2), conv_singular_values(w, (8, 8), dilation=2))
    ref = stable_rank_dense(dense_circular(w, 8, 8, 2, 1))
    assert conv_stable_rank(w, 8, dilation=2) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("c_out,c_in,H,W", [(3, 4, 5, 6), (4, 2, 3, 3), (1, 5, 2, 7), (6, 6, 4, 4)])
def test_pointwise_stable_rank_is_hw_times_matrix_stable_rank(c_out, c_in, H, W):
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(c_out, c_in, 1, 1, generator=gen, dtype=torch.float64)
    s = torch.linalg.svdvals(w[:, :, 0, 0])
    matrix_sr = float(s.square().sum() / s[0].square())
    got = conv_stable_rank(w, (H, W))
    assert got == pytest.approx(H * W * matrix_sr, rel=1e-10)
    assert got == pytest.approx(stable_rank_dense(dense_circular(w, H, W)), rel=1e-10)
    # every frequency carries the matrix's singular values
    sv = conv_singular_values(w, (H, W))
    torch.testing.assert_close(sv, s.repeat_interleave(H * W), atol=1e-10, rtol=0)


@pytest.mark.parametrize("name", ["3x3", "5x5_dil2", "grouped_2", "depthwise_3x3", "wrap_5x5_dil2_on_4x4"])
@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, -2.0])
def test_stable_rank_scale_invariant(name, scale):
    case = CASES[name]
    c_out, c_in, k, H, W, d, g = case
    w = _weight(case, seed=7)
    base = conv_stable_rank(w, (H, W), d, g)
    assert conv_stable_rank(w * scale, (H, W), d, g) == pytest.approx(base, rel=1e-10)
    # while singular values scale linearly
    torch.testing.assert_close(conv_singular_values(w * scale, (H, W), d, g),
                               abs(scale) * conv_singular_values(w, (H, W), d, g), atol=1e-10, rtol=1e-10)


def test_stable_rank_extremes():
    # rank-one 1x1 conv: stable rank is exactly H*W; orthogonal 1x1: H*W*C
    u = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, -1.0, 3.0, 1.0]], dtype=torch.float64)
    assert conv_stable_rank((u @ v)[:, :, None, None], (3, 5)) == pytest.approx(15.0, rel=1e-12)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8)))
    assert conv_stable_rank(q[:, :, None, None], (3, 5)) == pytest.approx(60.0, rel=1e-12)
    # a single-tap (delta) 3x3 kernel is a shifted identity per channel: stable rank H*W*C
    w = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    w[0, 0, 0, 2] = w[1, 1, 0, 2] = 1.0
    assert conv_stable_rank(w, (4, 5)) == pytest.approx(40.0, rel=1e-12)


@pytest.mark.parametrize("shape5", [False, True])
def test_pointwise_batch_matches_per_conv(shape5):
    gen = torch.Generator().manual_seed(9)
    n, c_out, c_in = 7, 5, 3
    w = torch.randn(n, c_out, c_in, generator=gen, dtype=torch.float64)
    w[2] *= 100.0  # scale differences between convs must not matter
    pixels = torch.tensor([64, 16, 4, 64, 1, 9, 25], dtype=torch.float64)
    hw = [(8, 8), (4, 4), (2, 2), (8, 8), (1, 1), (3, 3), (5, 5)]
    batch = w[..., None, None] if shape5 else w
    got = pointwise_stable_ranks(batch, pixels)
    assert got.shape == (n,)
    ref = torch.tensor([conv_stable_rank(w[i, :, :, None, None], hw[i]) for i in range(n)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, atol=0, rtol=1e-10)
    # scalar pixel count
    got_scalar = pointwise_stable_ranks(batch, 16)
    ref_scalar = torch.tensor([conv_stable_rank(w[i, :, :, None, None], (4, 4)) for i in range(n)],
                              dtype=torch.float64)
    torch.testing.assert_close(got_scalar.double(), ref_scalar, atol=0, rtol=1e-10)


def test_pointwise_batch_float32():
    gen = torch.Generator().manual_seed(10)
    w = torch.randn(4, 6, 6, generator=gen)
    got = pointwise_stable_ranks(w, 16.0)
    ref = torch.tensor([stable_rank_dense(dense_circular(w[i, :, :, None, None], 4, 4)) for i in range(4)])
    torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("fn", ["singular_values", "stable_rank", "spectrum"])
@pytest.mark.parametrize("args", [
    dict(weight_shape=(3, 3, 3), input_size=(5, 5)),            # not 4-D
    dict(weight_shape=(2, 3, 3, 3, 1), input_size=(5, 5)),      # 5-D
    dict(weight_shape=(3, 2, 3, 3), input_size=(5, 5), groups=2),  # C_out not divisible by groups
    dict(weight_shape=(2, 2, 3, 3), input_size=(0, 5)),          # empty input
    dict(weight_shape=(2, 2, 3, 3), input_size=(5, -1)),
    dict(weight_shape=(2, 2, 3, 3), input_size=0),
    dict(weight_shape=(2, 2, 3, 3), input_size=(5, 5), dilation=0),
])
def test_bad_shapes_raise_value_error(fn, args):
    f = {"singular_values": conv_singular_values, "stable_rank": conv_stable_rank,
         "spectrum": kernel_spectrum}[fn]
    w = torch.randn(*args["weight_shape"])
    kwargs = {k: v for k, v in args.items() if k in ("dilation", "groups")}
    with pytest.raises(ValueError):
        f(w, args["input_size"], **kwargs)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4, 1), (2, 3, 4, 3, 3), (2, 3, 4, 1, 2), (2, 3, 4, 1, 1, 1)])
def test_pointwise_bad_shapes_raise_value_error(shape):
    with pytest.raises(ValueError):
        pointwise_stable_ranks(torch.randn(*shape), 4)
