"""Spectral normalisation of OpConvs against the dense zero-padding operator (brute force)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from msrdarts.nn.ops import FactorizedReduce, OpConv, record_input_sizes
from msrdarts.nn.spectral import REFRESH_TOL, ConvSpectralNorm, apply_spectral_norm, refresh_spectral_norms
from msrdarts.runs.folder import read_history

from _reference import dense_conv, dense_of, op_norm

# name -> (C_in, C_out, k, stride, padding, dilation, groups, (H, W))
GEOMS = {
    "dw3_s1_8x8": (4, 4, 3, 1, 1, 1, 4, (8, 8)),
    "dw3_s1_7x7": (3, 3, 3, 1, 1, 1, 3, (7, 7)),
    "dw3_s2_8x8": (4, 4, 3, 2, 1, 1, 4, (8, 8)),
    "dw3_s2_7x7": (4, 4, 3, 2, 1, 1, 4, (7, 7)),
    "dw3_s2_6x5": (3, 3, 3, 2, 1, 1, 3, (6, 5)),
    "dw5_s1_8x8": (3, 3, 5, 1, 2, 1, 3, (8, 8)),
    "dw5_s2_7x7": (3, 3, 5, 2, 2, 1, 3, (7, 7)),
    "dw3_d2_s1_7x7": (3, 3, 3, 1, 2, 2, 3, (7, 7)),
    "dw3_d2_s2_8x8": (3, 3, 3, 2, 2, 2, 3, (8, 8)),
    "dw5_d2_s1_8x8": (3, 3, 5, 1, 4, 2, 3, (8, 8)),
    "dw5_d2_s2_8x8": (3, 3, 5, 2, 4, 2, 3, (8, 8)),
    "dw5_d2_s2_7x7": (3, 3, 5, 2, 4, 2, 3, (7, 7)),
    "dw5_d2_s1_3x3": (2, 2, 5, 1, 4, 2, 2, (3, 3)),  # kernel span exceeds the input
    "pw_4to4_8x8": (4, 4, 1, 1, 0, 1, 1, (8, 8)),
    "pw_3to5_5x7": (3, 5, 1, 1, 0, 1, 1, (5, 7)),
    "dense3_s2_7x7": (2, 3, 3, 2, 1, 1, 1, (7, 7)),  # non-matrix, non-depthwise
    "dw3_s2_4x4": (5, 5, 3, 2, 1, 1, 5, (4, 4)),      # exact: a 2x2 output
    "dw5_s1_2x2": (5, 5, 5, 1, 2, 1, 5, (2, 2)),      # exact: a 2x2 input, the kernel wider than the map
    "dw3_d2_s1_2x2": (4, 4, 3, 1, 2, 2, 4, (2, 2)),   # exact: polyphase to a 1x1 map
}
MATRIX = {n for n, g in GEOMS.items() if g[2] == 1}


def make_conv(name: str, seed: int = 0, dtype=torch.float32, scale: float = 1.0) -> OpConv:
    c_in, c_out, k, s, p, d, g, hw = GEOMS[name]
    torch.manual_seed(seed)
    conv = OpConv(c_in, c_out, k, stride=s, padding=p, dilation=d, groups=g, bias=False).to(dtype)
    with torch.no_grad():
        conv.weight.mul_(scale)
    conv.input_hw = hw
    return conv


def register(conv: OpConv, **kw) -> ConvSpectralNorm:
    sn = ConvSpectralNorm(conv, conv.input_hw, **kw)
    parametrize.register_parametrization(conv, "weight", sn)
    return sn


def true_norm(conv: OpConv, weight: torch.Tensor | None = None) -> float:
    return op_norm(dense_of(conv, weight=weight))


def converge(conv: OpConv, n: int = 400) -> None:
    """Run ``n`` training-mode parametrization passes (one power iteration each)."""
    was = conv.training
    conv.train()
    for _ in range(n):
        conv.weight
    conv.train(was)


@pytest.mark.parametrize("name", list(GEOMS))
@pytest.mark.parametrize("scale", [1.0, 37.0])
def test_operator_norm_is_one_right_after_registration(name, scale):
    conv = make_conv(name, seed=1, scale=scale)
    raw = conv.weight.detach().clone()
    raw_norm = true_norm(conv)
    sn = register(conv)
    assert sn.matrix == (name in MATRIX)
    for mode in (False, True):  # eval reads the stored vectors; train runs one more iteration
        conv.train(mode)
        w = conv.weight
        assert w.shape == raw.shape
        assert true_norm(conv, w) == pytest.approx(1.0, rel=0.01)
    # sigma estimates the operator norm of the raw weight
    assert float(sn.sigma(raw).detach()) == pytest.approx(raw_norm, rel=0.01)


@pytest.mark.parametrize("name", list(GEOMS))
@pytest.mark.parametrize("scale", [1.0, 37.0])
def test_operator_norm_is_one_after_power_iteration_converges(name, scale):
    # the fixed point of the iteration is the true operator norm: checks _A/_At and the scaling
    conv = make_conv(name, seed=1, scale=scale)
    raw = conv.weight.detach().clone()
    raw_norm = true_norm(conv)
    sn = register(conv)
    converge(conv)
    for mode in (False, True):
        conv.train(mode)
        assert true_norm(conv, conv.weight) == pytest.approx(1.0, rel=1e-3)
    # power iteration approaches sigma from below, so the normalised norm is never below 1
    assert float(sn.sigma(raw).detach()) == pytest.approx(raw_norm, rel=1e-3)
    assert float(sn.sigma(raw).detach()) <= raw_norm * (1 + 1e-5)
    torch.testing.assert_close(conv.parametrizations.weight.original.detach(), raw, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["dw3_s1_8x8", "dw5_d2_s2_7x7", "pw_3to5_5x7"])
def test_input_hw_from_record_input_sizes(name):
    c_in, c_out, k, s, p, d, g, hw = GEOMS[name]
    torch.manual_seed(2)
    net = nn.Sequential(nn.ReLU(), OpConv(c_in, c_out, k, stride=s, padding=p, dilation=d, groups=g, bias=False))
    record_input_sizes(net, torch.zeros(1, c_in, *hw))
    conv = net[1]
    assert conv.input_hw == hw
    assert apply_spectral_norm(net) == 1
    assert parametrize.is_parametrized(conv, "weight")
    assert conv.parametrizations.weight[0].input_hw == hw
    converge(conv)
    assert true_norm(conv) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("target", [0.5, 2.0])
def test_target(target):
    conv = make_conv("dw3_s2_7x7", seed=3)
    register(conv, target=target)
    converge(conv)
    assert true_norm(conv) == pytest.approx(target, rel=1e-3)


def test_operator_norm_differs_from_kernel_matrix_norm():
    # the reference that matters is the operator on (C_in, H, W), not the reshaped kernel matrix:
    # make sure the geometry used here is one where the two differ a lot.
    conv = make_conv("dw3_s1_8x8", seed=4)
    kernel_matrix_norm = float(torch.linalg.matrix_norm(conv.weight.detach().double().flatten(1), ord=2))
    register(conv)
    converge(conv)
    assert true_norm(conv) == pytest.approx(1.0, rel=1e-3)
    sigma = float(conv.parametrizations.weight[0].sigma(conv.parametrizations.weight.original).detach())
    assert abs(kernel_matrix_norm / sigma - 1) > 0.1


@pytest.mark.parametrize("name", [n for n in GEOMS if n not in MATRIX])
def test_A_and_At_match_dense_matrix(name):
    conv = make_conv(name, seed=5, dtype=torch.float64)
    sn = ConvSpectralNorm(conv, conv.input_hw)
    w = conv.weight.detach()
    # the operator at the norm's own geometry: the conv's, or for a dilated stride-1 conv its
    # polyphase reduction (which has the same singular values: the quarter-map test below)
    A = dense_conv(w, sn.input_hw, sn.stride, sn.padding, sn.dilation, sn.groups)
    c_in, H, W = conv.in_channels, *sn.input_hw
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, c_in, H, W, generator=gen, dtype=torch.float64)
    Ax = sn._A(x, w)
    torch.testing.assert_close(Ax.reshape(2, -1), x.reshape(2, -1) @ A.t(), atol=1e-12, rtol=0)
    y = torch.randn(2, *Ax.shape[1:], generator=gen, dtype=torch.float64)
    Aty = sn._At(y, w)
    assert Aty.shape == x.shape, "conv_transpose2d output_padding does not restore the input size"
    torch.testing.assert_close(Aty.reshape(2, -1), y.reshape(2, -1) @ A, atol=1e-12, rtol=0)
    # adjointness: <A x, y> == <x, A^T y>
    lhs = (Ax * y).sum()
    rhs = (x * Aty).sum()
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_matrix_path_starts_exact_iterates_from_below_and_refreshes_exactly(name):
    conv = make_conv(name, seed=7, dtype=torch.float64)
    sn = ConvSpectralNorm(conv, conv.input_hw)
    assert sn.matrix and sn.u.shape == (conv.in_channels,) and sn.v.shape == (conv.out_channels,)
    w = conv.weight.detach()
    # the operator norm of a 1x1 conv on any H x W is its matrix norm; the vectors start exact
    assert float(sn.sigma(w)) == pytest.approx(true_norm(conv), rel=1e-12)
    U, S, Vh = torch.linalg.svd(w.flatten(1))
    wr = w.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(sn.sigma(wr), wr)
    torch.testing.assert_close(grad.flatten(1), torch.outer(U[:, 0], Vh[0]))   # d sigma_1 / dW, whatever the signs
    sn.eval()
    assert torch.autograd.gradcheck(lambda w: sn(w), (wr,), eps=1e-6, atol=1e-6)

    # a changed weight: each training forward runs one matrix power iteration, a lower bound that
    # rises to the true norm; eval forwards leave the vectors alone
    torch.manual_seed(8)
    w2 = w + 0.5 * torch.randn_like(w)
    true2 = true_norm(conv, w2)
    u0 = sn.u.clone()
    sn(w2)
    assert torch.equal(sn.u, u0)
    sn.train()
    estimates = []
    for _ in range(40):
        sn(w2)
        estimates.append(float(sn.sigma(w2)))
    assert max(estimates) <= true2 * (1 + 1e-12)
    assert estimates[0] < estimates[-1] == pytest.approx(true2, rel=1e-9)
    # refresh: exact at once
    w3 = torch.randn_like(w)
    sn.refresh(w3)
    assert float(sn.sigma(w3)) == pytest.approx(true_norm(conv, w3), rel=1e-12)


@pytest.mark.parametrize("name", ["dw5_d2_s2_8x8", "pw_4to4_8x8"])
def test_original_kept_and_weight_is_original_over_sigma(name):
    conv = make_conv(name, seed=9, dtype=torch.float64)
    raw = conv.weight.detach().clone()
    target = 2.5
    sn = register(conv, target=target)
    orig = conv.parametrizations.weight.original
    assert isinstance(orig, nn.Parameter)
    assert torch.equal(orig.detach(), raw)
    conv.eval()
    sigma = sn.sigma(orig).detach()
    assert float(sigma) == pytest.approx(true_norm(conv, raw), rel=0.01)
    torch.testing.assert_close(conv.weight.detach(), raw / sigma * target, atol=1e-14, rtol=1e-12)
    assert not torch.allclose(conv.weight.detach(), raw)  # the raw weight is not already normalised
    # the forward of the conv uses the normalised weight
    x = torch.randn(2, conv.in_channels, *conv.input_hw, dtype=torch.float64)
    torch.testing.assert_close(conv(x), F.conv2d(x, raw / sigma * target, None, conv.stride, conv.padding,
                                                 conv.dilation, conv.groups))
    # and training the conv leaves `original` a free parameter (the optimizer sees it)
    assert any(p is orig for p in conv.parameters())


@pytest.mark.parametrize("name", ["dw3_s2_7x7", "dense3_s2_7x7"])
def test_vectors_persist_update_in_training_only(name):
    conv = make_conv(name, seed=10)
    sn = register(conv)
    sd = conv.state_dict()
    assert "parametrizations.weight.0.u" in sd and "parametrizations.weight.0.v" in sd
    torch.testing.assert_close(sd["parametrizations.weight.0.u"], sn.u)

    # new raw weights: the stored vectors are now stale
    with torch.no_grad():
        conv.parametrizations.weight.original.copy_(torch.randn_like(conv.parametrizations.weight.original))
    u0, v0 = sn.u.clone(), sn.v.clone()
    conv.eval()
    for _ in range(3):
        conv.weight
        conv(torch.randn(1, conv.in_channels, *conv.input_hw))
    assert torch.equal(sn.u, u0) and torch.equal(sn.v, v0), "eval-mode forward changed the power-iteration vectors"

    conv.train()
    conv(torch.randn(1, conv.in_channels, *conv.input_hw))
    assert (sn.u - u0).abs().max() > 1e-3, "training forward did not update u"
    assert torch.equal(conv.state_dict()["parametrizations.weight.0.u"], sn.u)
    u1 = sn.u.clone()
    # a few more training forwards track the new weight's operator norm
    for _ in range(30):
        conv(torch.randn(1, conv.in_channels, *conv.input_hw))
    assert not torch.equal(sn.u, u1)
    conv.eval()
    assert true_norm(conv) == pytest.approx(1.0, rel=0.01)

    # loading the state dict restores the vectors (and hence the normalised weight in eval)
    other = make_conv(name, seed=11)
    register(other)
    other.load_state_dict(conv.state_dict())
    other.eval()
    assert torch.equal(other.parametrizations.weight[0].u, sn.u)
    torch.testing.assert_close(other.weight, conv.weight, atol=0, rtol=0)


@torch.no_grad()
def _true_norms(convs: list[OpConv]) -> list[float]:
    """The operator norm of each conv's trained weight on its input, brute force: the conv applied to
    every one-hot input of one channel group's channels, then the largest singular value of each
    group's dense (C_in/g*H*W, C_out/g*H'*W') matrix in float64 (the square root of its smaller Gram
    matrix's top eigenvalue), the largest over groups. Convs of one geometry and map run as one
    grouped conv, their groups' matrices as one batch. A 1x1 conv without padding acts on each pixel
    alike (its operator is its matrix times the identity on the map), so it is taken on a 1x1 map."""
    batches: dict[tuple, list[int]] = {}
    for i, c in enumerate(convs):
        pointwise = c.kernel_size == (1, 1) and c.padding == (0, 0) and c.stride == (1, 1)
        key = (c.in_channels // c.groups, c.out_channels // c.groups, c.groups, c.kernel_size, c.stride,
               c.padding, c.dilation, (1, 1) if pointwise else tuple(c.input_hw))
        batches.setdefault(key, []).append(i)
    out = [0.0] * len(convs)
    for (cin, cout, _, _, stride, padding, dilation, (H, W)), idx in batches.items():
        w = torch.cat([convs[i].parametrizations.weight.original.detach().double() for i in idx])
        g = w.shape[0] // cout                                   # every group of every conv of the batch
        eye = torch.eye(cin * H * W, dtype=torch.float64).view(cin * H * W, cin, H, W).repeat(1, g, 1, 1)
        y = F.conv2d(eye, w, None, stride, padding, dilation, g)
        m = y.view(cin * H * W, g, -1).permute(1, 2, 0)          # (groups, C_out/g*H'*W', C_in/g*H*W)
        gram = m @ m.mT if m.shape[1] <= m.shape[2] else m.mT @ m
        norms = torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt().view(len(idx), -1).amax(1)
        for i, n in zip(idx, norms.tolist()):
            out[i] = n
    return out


@pytest.mark.slow
def test_every_conv_stays_within_2pct_of_norm_one_during_a_real_search(tmp_path):
    """A real MSR-DARTS search (the quick preset: digits, its optimiser, its refreshes, drift-triggered
    per bundle and scheduled, and the fused forward), one epoch: at every training forward, those just before
    and just after each refresh included, every normalised conv's weight as that forward used it has
    operator norm within 2 % of 1, checked against its dense operator."""
    from dataclasses import replace

    from msrdarts.config import get_preset
    from msrdarts.runs.search import SearchRun

    seen: list[tuple[int, float, float]] = []
    full_refreshes: list[int] = []          # the forwards each full refresh followed

    class Checked(SearchRun):
        def build(self, data):
            net, wrapped = super().build(data)
            pairs = [(m, m.parametrizations.weight[0]) for m in net.modules()
                     if isinstance(m, OpConv) and parametrize.is_parametrized(m, "weight")]
            forwards = [0]
            refresh = net.refresh_spectral_norms

            names = net.spectral_bundle_names()

            def counted(**kw):   # a refresh of depthwise convs: all bundles' or the drifted ones'
                if kw.get("bundles") is None or any(names[k] != "1x1" for k in kw["bundles"]):
                    full_refreshes.append(forwards[0] - 1)
                refresh(**kw)

            def check(module, args, output):
                if not module.training:
                    return
                forwards[0] += 1
                worst, lowest = 0.0, 1.0
                true = _true_norms([conv for conv, _ in pairs])
                for (conv, sn), t in zip(pairs, true):   # the weight this forward used: W / sigma, sigma from these vectors
                    norm = t * sn.target / float(sn.sigma(conv.parametrizations.weight.original.detach()))
                    worst, lowest = max(worst, abs(norm - 1)), min(lowest, norm)
                seen.append((forwards[0] - 1, worst, lowest))

            net.refresh_spectral_norms = counted
            net.register_forward_hook(check)
            return net, wrapped

    cfg = replace(get_preset("quick"), epochs=1, device="cpu", progress=False, plots=False, tensorboard=False)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.sn_refresh_every, cfg.sn_refresh_depthwise_every,
            cfg.sn_refresh_drift) == (0.05, 0.9, 3e-4, 5, 100, 0.15)
    Checked.start(cfg, tmp_path / "run", log=lambda m: None)
    assert [s[0] for s in seen] == list(range(len(seen))) and len(seen) >= 16
    # where some bundle's weights drifted by 15 % (the schedule's first is after step 100): a few in this epoch
    assert full_refreshes[0] > 0 and 2 <= len(full_refreshes) <= 8, full_refreshes
    assert read_history(tmp_path / "run")[0]["sn_refreshes"] == len(full_refreshes)
    assert all(worst < 0.02 for _, worst, _ in seen), seen
    assert all(lowest > 1 - 1e-4 for _, _, lowest in seen), seen   # sigma is a lower bound: never below 1


@pytest.mark.parametrize("name", ["dw5_d2_s2_7x7", "pw_4to4_8x8"])
def test_gradient_flows_to_original(name):
    conv = make_conv(name, seed=13)
    register(conv)
    x = torch.randn(2, conv.in_channels, *conv.input_hw)
    conv(x).square().sum().backward()
    g = conv.parametrizations.weight.original.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0
    # the gradient sees sigma: for loss = ||A_W x||^2 with W = W_o / sigma(W_o), scaling W_o leaves
    # the loss unchanged, so its gradient is orthogonal to W_o.
    w0 = conv.parametrizations.weight.original.detach()
    assert abs(float((g * w0).sum())) < 1e-4 * float(g.norm() * w0.norm())


@pytest.mark.parametrize("name", ["dw3_s2_7x7", "dw5_d2_s1_8x8", "dense3_s2_7x7"])
def test_gradcheck_parametrized_forward(name):
    conv = make_conv(name, seed=14, dtype=torch.float64)
    sn = ConvSpectralNorm(conv, conv.input_hw)
    sn.eval()
    w = conv.weight.detach().clone().requires_grad_(True)
    u0, v0 = sn.u.clone(), sn.v.clone()
    assert torch.autograd.gradcheck(lambda w: sn(w), (w,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda w: sn.sigma(w), (w,), eps=1e-6, atol=1e-6)
    x = torch.randn(1, conv.in_channels, *conv.input_hw, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda w: F.conv2d(x, sn(w), None, conv.stride, conv.padding, conv.dilation, conv.groups), (w,),
        eps=1e-6, atol=1e-6)
    assert torch.equal(sn.u, u0) and torch.equal(sn.v, v0)
    # sigma is the largest per-group v_g^T A_g u_g; it is linear in the weight for fixed vectors, so its
    # gradient along d equals v_g^T A_g(d) u_g for the winning group g.
    per_group = (sn.v * sn._A(sn.u, w.detach())).reshape(conv.groups, -1).sum(1)
    top = int(per_group.argmax())
    assert float(sn.sigma(w).detach()) == pytest.approx(float(per_group[top]), rel=1e-12)
    g, = torch.autograd.grad(sn.sigma(w), w)
    d = torch.randn_like(w)
    along = (sn.v * sn._A(sn.u, d)).reshape(conv.groups, -1).sum(1)[top]
    assert float((g * d).sum()) == pytest.approx(float(along), rel=1e-10)


def test_supernet_registers_on_every_opconv_only():
    from msrdarts.nn.supernet import SuperNet

    torch.manual_seed(15)
    net = SuperNet(10, 3, 4, 8, in_channels=1)
    op_convs, plain, factorized = [], [], []
    for m in net.modules():
        if isinstance(m, OpConv):
            op_convs.append(m)
        elif isinstance(m, nn.Conv2d):
            plain.append(m)
        if isinstance(m, FactorizedReduce):
            factorized.append(m)
    # 3 cells x 14 edges x (2 sep ops x 4 convs + 2 dil ops x 2 convs)
    assert len(op_convs) == 3 * 14 * 12
    assert factorized, "expected a FactorizedReduce preprocess after the reduction cell"
    assert len(plain) >= 1 + 2 * 3  # stem + two preprocess convs per cell (FR has two)
    for c in op_convs:
        assert parametrize.is_parametrized(c, "weight")
        assert isinstance(c.parametrizations.weight[0], ConvSpectralNorm)
    for c in plain:
        assert not parametrize.is_parametrized(c), f"plain conv {c} was normalised"
    for fr in factorized:
        assert not parametrize.is_parametrized(fr.conv_1) and not parametrize.is_parametrized(fr.conv_2)

    # each parametrization uses the input size the conv really sees
    seen = {}
    hooks = [c.register_forward_pre_hook(lambda mod, args: seen.__setitem__(id(mod), tuple(args[0].shape[-2:])))
             for c in op_convs]
    net.eval()
    with torch.no_grad():
        net.forward_reference(torch.randn(2, 1, 8, 8))   # the per-op forward calls the conv modules
    for h in hooks:
        h.remove()
    for c in op_convs:   # (a dilated stride-1 conv's norm works on its polyphase map, 1/d per side)
        sn = c.parametrizations.weight[0]
        assert seen[id(c)] == c.input_hw
        shrink = c.dilation if c.stride == (1, 1) and all(n % d == 0 for n, d in zip(c.input_hw, c.dilation)) \
            else (1, 1)
        assert sn.input_hw == tuple(n // d for n, d in zip(c.input_hw, shrink))
    assert {seen[id(c)] for c in op_convs} == {(8, 8), (4, 4), (2, 2)}

    # and normalises them: spot-check the true operator norm of a sample of convs
    norms = [true_norm(c) for c in op_convs[::37]]
    assert norms == pytest.approx([1.0] * len(norms), rel=0.01)
    assert min(norms) > 1 - 1e-4  # sigma is a lower bound: never over-normalised


def test_a_block_locked_away_from_the_top_singular_value_is_freed_by_the_probe_and_by_a_refresh():
    """Put u on the 2nd singular vector and the block on the 3rd and 4th: an invariant subspace, which
    block power iteration alone never leaves. The training forwards take the circular top vector as
    an extra vector at every step and reach the top at once; a refresh finds it too."""
    conv = OpConv(1, 1, 3, padding=1, groups=1, bias=False).double()
    with torch.no_grad():  # a separable blur: top singular values (2+2cos(k pi/9)) products, gap ~9 %
        conv.weight.copy_(torch.outer(torch.tensor([1.0, 2, 1]), torch.tensor([1.0, 2, 1])).view(1, 1, 3, 3))
    conv.input_hw = (8, 8)
    sn = register(conv)
    A = dense_of(conv, weight=conv.parametrizations.weight.original.detach())
    evals, evecs = torch.linalg.eigh(A.t() @ A)                   # ascending
    s1, s2 = evals[-1].sqrt().item(), evals[-2].sqrt().item()
    assert s2 < 0.97 * s1                                         # a real gap, so locking matters
    w = conv.parametrizations.weight.original.detach()

    def lock():
        with torch.no_grad():
            sn.u.copy_(evecs[:, -2].reshape_as(sn.u))
            sn.v.copy_(F.normalize(A @ evecs[:, -2], dim=0).reshape_as(sn.v))
            sn.basis.copy_(torch.stack([evecs[:, -3], evecs[:, -4]]).view_as(sn.basis))
        assert float(sn.sigma(w)) == pytest.approx(s2, rel=1e-6)
        conv.eval()                                                   # no iteration: the locked norm
        assert true_norm(conv) == pytest.approx(s1 / s2, rel=1e-6) and s1 / s2 > 1.03

    lock()
    conv.train()
    conv.weight                                                   # one training forward: one block step
    assert float(sn.sigma(w)) == pytest.approx(s1, rel=1e-2)
    lock()
    refresh_spectral_norms(conv)
    assert float(sn.sigma(w)) == pytest.approx(s1, rel=1e-2)
    conv.eval()
    assert true_norm(conv) == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("seed, k, stride", [(1, 3, 2), (5, 3, 2)])
def test_a_random_kernels_locked_block_reaches_the_top_within_five_steps(seed, k, stride):
    """A random kernel's block locked on its 2nd to 4th singular vectors (8x8 map): the probe's
    share of the top vector is small against its weight on lower ones. When the probe took the
    block's last slot these two cases stayed locked unless the probe first took power steps of its
    own; as an extra vector its share enters the top Ritz vector, and 5 training forwards reach the top."""
    torch.manual_seed(seed)
    conv = OpConv(1, 1, k, stride=stride, padding=k // 2, groups=1, bias=False).double()
    conv.input_hw = (8, 8)
    sn = register(conv)
    w = conv.parametrizations.weight.original.detach()
    A = dense_of(conv, weight=w)
    evals, evecs = torch.linalg.eigh(A.t() @ A)
    s1, s2 = evals[-1].sqrt().item(), evals[-2].sqrt().item()
    with torch.no_grad():
        sn.u.copy_(evecs[:, -2].reshape_as(sn.u))
        sn.v.copy_(F.normalize(A @ evecs[:, -2], dim=0).reshape_as(sn.v))
        sn.basis.copy_(torch.stack([evecs[:, -3], evecs[:, -4]]).view_as(sn.basis))
    assert float(sn.sigma(w)) == pytest.approx(s2, rel=1e-9) and s2 < 0.99 * s1
    conv.train()
    for _ in range(5):
        conv.weight
    assert float(sn.sigma(w)) == pytest.approx(s1, rel=2e-3)


def _span_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of ``a`` and ``b`` (k, n), ascending."""
    qa, qb = torch.linalg.qr(a.t())[0], torch.linalg.qr(b.t())[0]
    return torch.linalg.svdvals(qa.t() @ qb).sort().values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_block_step_with_an_extra_vector_keeps_the_top_ritz_directions(seed):
    """block_step on b vectors with rows = b - 1 keeps the top b - 1 Ritz directions of their span,
    against a Rayleigh-Ritz solved by eigh on an orthonormal basis of the images (a dense 30 x 20
    operator): the new u is the top Ritz vector A^T z_1 / ||A^T z_1||, and u with the basis spans
    A^T z_1 .. A^T z_(b-1). With rows = b it keeps the whole span."""
    from msrdarts.nn.block_power import block_step
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(30, 20, generator=g, dtype=torch.float64)
    X = torch.randn(1, 4, 20, generator=g, dtype=torch.float64)          # one group, b = 4
    Z = X @ A.t()                                                       # A x per row
    Y = Z @ A                                                           # A^T A x per row
    Q = torch.linalg.qr(Z[0].t())[0]                                    # (30, 4): the images' span
    ritz, c = torch.linalg.eigh(Q.t() @ A @ A.t() @ Q)                  # ||A^T z||^2 / ||z||^2, ascending
    ritz_vectors = (Q @ c.flip(1)).t() @ A                              # A^T z_i, top first
    assert ritz[-3] > 1.01 * ritz[-4]                                   # the dropped direction is the last
    u, v, basis = block_step(Z, Y, 1e-12, rows=3)
    assert basis.shape == (1, 2, 20)
    assert abs(float(F.normalize(ritz_vectors[0], dim=0) @ u[0])) == pytest.approx(1.0, abs=1e-9)
    assert float(v[0] @ (A @ u[0])) == pytest.approx(ritz[-1].sqrt().item(), rel=1e-9)
    cos = _span_cosines(torch.cat([u, basis[0]]), ritz_vectors[:3])
    assert float(cos[0]) == pytest.approx(1.0, abs=1e-6)   # the dropped direction by 256 powers of a 3 x 3
    _, _, whole = block_step(Z, Y, 1e-12)
    assert float(_span_cosines(torch.cat([u, whole[0]]), ritz_vectors)[0]) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="rows must be 4 or 3"):
        block_step(Z, Y, 1e-12, rows=2)


def test_training_forwards_track_each_channels_top_three_singular_vectors_beside_the_probe():
    """The probe joins the block as an extra vector for each step and displaces none: after a few
    training forwards at fixed weights every channel's block of 3 (u and the basis) spans its top 3
    right singular vectors (dense SVD per channel), so a singular value rising from third place is
    already tracked when it overtakes. (When the probe took the block's last slot, the third
    direction was lost at every step and only the top two were tracked.)"""
    conv = make_conv("dw5_s1_8x8", seed=4, dtype=torch.float64)
    sn = register(conv)
    w = conv.parametrizations.weight.original.detach()
    conv.train()
    for _ in range(60):
        conv.weight
    checked = 0
    for c, M in enumerate(_dense_channels(conv, w)):
        _, S, Vh = torch.linalg.svd(M)
        if S[2] < 1.05 * S[3]:      # no gap below the third: its subspace converges too slowly to test
            continue
        block = torch.cat([sn.u[0, c].reshape(1, -1), sn.basis[c]])
        assert float(_span_cosines(block, Vh[:3])[0]) > 0.999, f"channel {c}: {S[:4].tolist()}"
        checked += 1
    assert checked >= 2


def test_matrix_top_vectors_with_a_repeated_or_nearly_repeated_top_singular_value():
    """Built from chosen singular values: where the top one repeats, any unit vector of its space
    serves (v^T W u is the top value); where it nearly repeats, the value is still exact to the gap."""
    from msrdarts.nn.spectral import matrix_top_vectors

    torch.manual_seed(4)
    U = torch.linalg.qr(torch.randn(3, 6, 6, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(3, 5, 5, dtype=torch.float64)).Q
    S = torch.tensor([[2.0, 2.0, 0.5, 0.1, 0.0], [2.0, 2.0 * (1 - 1e-7), 1.0, 0.3, 0.2],
                      [3.0, 0.1, 0.1, 0.1, 0.1]], dtype=torch.float64)
    w = U[..., :5] @ torch.diag_embed(S) @ V.mT                       # (3, 6, 5), singular values S
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        u, v = matrix_top_vectors(w.to(dtype))
        sigma = (v[:, None, :] @ w.to(dtype) @ u[:, :, None]).flatten().double()
        gap = 1 - (S[:, 1] / S[:, 0]).square()                          # 1 - l2/l1 of the Gram
        assert ((sigma - S[:, 0]).abs() / S[:, 0] <= torch.clamp(gap, max=1).clamp_min(tol) * 1.01).all(), sigma - S[:, 0]
        assert (sigma - S[:, 0]).abs()[[0, 2]].max() <= tol * 3                  # repeated, or well apart: exact
        torch.testing.assert_close(u.norm(dim=1).double(), torch.ones(3, dtype=torch.float64))
    u, v = matrix_top_vectors(torch.zeros(2, 4, 3))                    # no top direction: still unit vectors
    torch.testing.assert_close(u.norm(dim=1), torch.ones(2))


def test_matrix_top_vectors_and_power_iteration_against_the_svd():
    from msrdarts.nn.spectral import matrix_power_iteration, matrix_top_vectors

    torch.manual_seed(3)
    w = torch.randn(5, 7, 4, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(w)
    u, v = matrix_top_vectors(w)
    assert u.shape == (5, 4) and v.shape == (5, 7)
    torch.testing.assert_close((v[:, None, :] @ w @ u[:, :, None]).flatten(), S[:, 0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close((u * Vh[:, 0]).sum(1).abs(), torch.ones(5, dtype=torch.float64))  # same line
    # power iteration from a poor start converges to the same pair (up to sign)
    u1, v1 = matrix_power_iteration(w, torch.full((5, 4), 0.5, dtype=torch.float64), 200)
    torch.testing.assert_close((u1 * u).sum(1).abs(), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close((v1[:, None, :] @ w @ u1[:, :, None]).flatten(), S[:, 0], rtol=1e-10, atol=0)


def test_matrix_top_vectors_of_several_shapes_padded_into_one_batch_against_the_svd():
    """Batches of 8x8, 16x16, 32x16 and 5x3 matrices, padded with zeros into as few batches as cheap
    (here the 16-column ones together, the 8- and 3-column ones together): each gets the top
    singular pair of its own SVD, of its own shape; an all-zero matrix gets a unit u."""
    from msrdarts.nn.spectral import PAD_MAX_MACS, matrix_top_vectors_of

    torch.manual_seed(5)
    ws = [torch.randn(n, m, k, dtype=torch.float64) for n, m, k in ((30, 8, 8), (20, 16, 16), (10, 32, 16), (4, 5, 3))]
    ws[3][1] = 0
    assert sum(w.shape[0] for w in ws) * 16 ** 3 <= PAD_MAX_MACS   # the padded path
    out = matrix_top_vectors_of(ws)
    for w, (u, v) in zip(ws, out):
        assert u.shape == (w.shape[0], w.shape[2]) and v.shape == (w.shape[0], w.shape[1])
        S = torch.linalg.svdvals(w)[:, 0]
        torch.testing.assert_close((v[:, None, :] @ w @ u[:, :, None]).flatten(), S, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(u.norm(dim=1), torch.ones(w.shape[0], dtype=torch.float64))


def test_small_top_vectors_against_the_svd():
    """The exact top singular pair of operators with a side of at most 4 (A x = x M, M (G, n, m)):
    n < m, n > m, n = m, a 1-dim side, a top singular value repeated to 1e-6, and a zero operator;
    v^T A u is each one's largest singular value (from its SVD), u and v unit, v = A u / ||A u||."""
    from msrdarts.nn.block_power import small_top_vectors

    torch.manual_seed(7)
    Ms = [torch.randn(6, n, m, dtype=torch.float64) for n, m in ((4, 16), (16, 4), (3, 3), (1, 1), (1, 9))]
    Q = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    Ms[0][0] = Q @ torch.diag(torch.tensor([2.0, 2.0 - 2e-6, 1.0, 0.5], dtype=torch.float64)) @ torch.eye(4, 16,
                                                                                                   dtype=torch.float64)
    Ms[1][1] = 0
    for M, (u, v) in zip(Ms, small_top_vectors(Ms, 1e-12)):
        assert u.shape == M.shape[:2] and v.shape == (M.shape[0], M.shape[2])
        S = torch.linalg.svdvals(M)[:, 0]
        torch.testing.assert_close((u.unsqueeze(1) @ M @ v.unsqueeze(2)).flatten(), S, rtol=2e-4, atol=1e-12)
        small, other = (u, v) if M.shape[1] <= M.shape[2] else (v, u)   # the other is A u (or A^T v): 0 if A is
        torch.testing.assert_close(small.norm(dim=1), torch.ones(M.shape[0], dtype=torch.float64))
        torch.testing.assert_close(other.norm(dim=1)[S > 0], torch.ones(int((S > 0).sum()), dtype=torch.float64))


@pytest.mark.parametrize("name", ["dw3_s2_4x4", "dw5_s1_2x2", "dw3_d2_s1_2x2"])
def test_a_conv_with_a_side_of_at_most_4_pixels_is_normalised_exactly_at_every_forward(name):
    """Depthwise convs whose input or output has at most 4 pixels (EXACT_MAX_SIDE) get their exact
    top singular vectors at every training forward: right after a weight change of half the
    weight's norm, with no refresh, the normalised weight has operator norm 1 (dense brute force)."""
    conv = make_conv(name, seed=11)
    sn = register(conv)
    assert sn.exact and not ConvSpectralNorm(make_conv("dw3_s1_8x8"), (8, 8)).exact   # (an 8x8 map iterates)
    for seed in range(3):
        with torch.no_grad():
            w = conv.parametrizations.weight.original
            step = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed))
            w.add_(step * (0.5 * w.norm() / step.norm()))
        conv.train()
        weight = conv.weight                                   # one training forward: the exact vectors
        assert true_norm(conv, weight.detach().double()) == pytest.approx(1.0, abs=1e-4)


def _dense_channels(conv: OpConv, weight: torch.Tensor) -> list[torch.Tensor]:
    """Each channel of a depthwise conv as its own dense operator (brute force, float64)."""
    return [dense_conv(weight[c:c + 1].double(), conv.input_hw, conv.stride, conv.padding, conv.dilation, 1)
            for c in range(weight.shape[0])]


@pytest.mark.parametrize("name", ["dw3_s1_8x8", "dw3_s2_7x7", "dw3_d2_s1_7x7"])
def test_refresh_finds_a_singular_value_that_overtook_the_tracked_one(name):
    """The tracked vectors sit exactly on each channel's SECOND singular pair (what happens when
    training lifts another singular value past the tracked one): power iteration stays there for
    many steps, and the refresh must return the top one, checked against the dense operator."""
    conv = make_conv(name, seed=21, dtype=torch.float64)
    sn = register(conv)
    w = conv.parametrizations.weight.original.detach()
    tops, seconds = [], []
    with torch.no_grad():
        for c, M in enumerate(_dense_channels(conv, w)):       # M: (C_out/g * H'W', HW) of one channel
            U, S, Vh = torch.linalg.svd(M)
            tops.append(float(S[0]))
            seconds.append(float(S[1]))
            sn.u[0, c] = Vh[1].view(conv.input_hw)
            sn.v[0, c] = U[:, 1].view(sn.v.shape[2:])
    true = max(tops)
    assert float(sn.sigma(w)) == pytest.approx(max(seconds), rel=1e-9)   # the scenario: tracking the second
    stuck = copy.deepcopy(sn)   # 3 block steps alone (the old refresh's budget; the training step's probe aside)
    stuck._store(*stuck.conv_operator(w).power_iterate(stuck.u, 3, stuck.eps, stuck._basis()))
    assert true / float(stuck.sigma(w)) - 1 > 1e-3, "the scenario is too easy to test the refresh"
    sn.refresh(w)
    assert float(sn.sigma(w)) == pytest.approx(true, rel=1e-6)
    groups = sn._group_sigmas(w)
    # every channel, not only the largest: each to the refresh's convergence tolerance (a channel's
    # refresh stops once its top Ritz value changes by less than that; the exact start of its block
    # decides how close below it lands)
    assert groups.tolist() == pytest.approx(tops, rel=REFRESH_TOL)


def _trained_supernet():
    """A small supernet trained a few SGD steps at the quick preset's rate (close, moving singular
    values), then refreshed; with its normalised convs and a batch to train on."""
    from msrdarts.nn.supernet import SuperNet
    torch.manual_seed(3)
    net = SuperNet(10, 3, 4, 8, in_channels=1, primitives=["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
                                                          "dil_conv_5x5"], spectral_norm=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.refresh_spectral_norms()
    pairs = [(m, m.parametrizations.weight[0]) for m in net.modules()
             if isinstance(m, OpConv) and parametrize.is_parametrized(m, "weight")]
    return net, opt, pairs, x, y


def test_refresh_after_training_steps_matches_the_dense_norm_of_every_conv():
    net, opt, pairs, x, y = _trained_supernet()
    worst = 0.0
    for conv, sn in pairs:
        w = conv.parametrizations.weight.original.detach()
        worst = max(worst, true_norm(conv, w.double()) / float(sn.sigma(w)) - 1)
    assert len(pairs) > 100 and worst < 1e-4


def test_spectral_drift_is_the_relative_weight_change_since_the_refresh():
    net, opt, pairs, x, y = _trained_supernet()

    def step_and_drift() -> float:
        """One SGD step; the largest relative change of a non-1x1 conv's weight over it."""
        before = {id(c): c.parametrizations.weight.original.detach().clone() for c, sn in pairs if not sn.matrix}
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        return max(float((c.parametrizations.weight.original.detach() - before[id(c)]).norm() / before[id(c)].norm())
                   for c, sn in pairs if not sn.matrix)

    assert net.spectral_drift() == 0.0
    moved = step_and_drift()
    assert moved > 0 and net.spectral_drift() == pytest.approx(moved, rel=1e-5)
    net.refresh_spectral_norms()               # the new reference: no drift, then the next step's alone
    assert net.spectral_drift() == 0.0
    moved = step_and_drift()
    assert net.spectral_drift() == pytest.approx(moved, rel=1e-5)


def test_only_the_bundle_that_drifted_is_refreshed():
    """The drift trigger works per bundle of depthwise convs (one map size and stride): a conv whose
    weight moved by 20 % puts its bundle, and no other, over a 15 % threshold; refreshing that bundle
    alone leaves every other conv's vectors as they were, makes the moved conv's sigma its dense
    norm again, and resets its drift."""
    net, opt, pairs, x, y = _trained_supernet()
    names = net.spectral_bundle_names()
    assert names[0] == "8x8/1" and "1x1" in names and len(set(names)) == len(names) >= 4, names
    batch = net._spectral
    conv, sn = next((c, sn) for c, sn in pairs if not sn.matrix and c.input_hw == (4, 4))
    k = batch.bundles().index(next(b for b in batch.bundles() if batch.where[id(conv)][0] in b))
    assert net.spectral_drifted(0.15) == [] and net.spectral_drift() == 0.0
    with torch.no_grad():   # a step of 20 % of the weight's norm in a random direction
        w = conv.parametrizations.weight.original
        step = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
        w.add_(step * (0.2 * w.norm() / step.norm()))
    assert net.spectral_drifted(0.15) == [k] and net.spectral_drift() == pytest.approx(0.2, rel=1e-5)
    others = {id(c): [b.clone() for b in s._buffers.values()] for c, s in pairs if batch.where[id(c)][0] not in
              batch.bundles()[k]}
    net.refresh_spectral_norms(bundles=[k])
    assert net.spectral_drifted(0.0) == [] and net.spectral_drift() == 0.0
    for c, s in pairs:
        if id(c) in others:
            assert all(torch.equal(a, b) for a, b in zip(others[id(c)], s._buffers.values()))
    w = conv.parametrizations.weight.original.detach()
    assert true_norm(conv, w.double()) / float(sn.sigma(w)) == pytest.approx(1.0, abs=1e-4)


def test_the_drift_reference_follows_the_network_to_another_dtype_and_loads_into_a_fresh_one():
    """The drift is measured from the weights of the last refresh: after ``.double()`` it is still
    the same finite drift (not a "moved or reloaded" infinity), and a checkpoint's reference loaded
    into a freshly built network (float64 while the reference is float32, as on another device)
    gives that network the drift of the first. A reference of another shape is refused."""
    net, opt, pairs, x, y = _trained_supernet()
    conv = next(c for c, sn in pairs if not sn.matrix)
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(1.1)            # a drift of exactly 10 % on this conv
    drift, saved = net.spectral_drift(), net.drift_reference()
    assert drift == pytest.approx(0.1, rel=1e-5)
    net.double()
    assert net.spectral_drift() == pytest.approx(drift, rel=1e-5)
    net.to(memory_format=torch.channels_last)     # as an accelerator's search moves it (4-D weights only)
    assert net.spectral_drift() == pytest.approx(drift, rel=1e-5)
    from msrdarts.nn.supernet import SuperNet
    torch.manual_seed(3)                          # built as _trained_supernet builds, not trained
    fresh = SuperNet(10, 3, 4, 8, in_channels=1, primitives=["sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
                                                            "dil_conv_5x5"], spectral_norm=True).double()
    fresh.load_state_dict(net.state_dict())
    assert fresh.spectral_drift() > 2 * drift     # measured from its build: the training steps too
    fresh.load_drift_reference(saved)             # float32 tensors, as a checkpoint of the float32 net holds
    assert fresh.spectral_drift() == pytest.approx(drift, rel=1e-5)
    # a reference kept by the version that still refreshed the exact convs (a side of at most 4 pixels)
    batch = fresh._spectral
    exact = [g for g, sns in enumerate(batch._norms()) if sns[0] is not None and sns[0].exact]
    assert exact and not set(map(str, exact)) & set(saved)
    fresh.load_drift_reference({**saved, **{str(g): torch.stack(batch._raws(g)).detach().float() for g in exact}})
    assert fresh.spectral_drift() == pytest.approx(drift, rel=1e-5)
    bad = dict(saved)
    bad[next(iter(bad))] = torch.zeros(1)
    with pytest.raises(ValueError, match="does not match this network's spectral-norm groups"):
        fresh.load_drift_reference(bad)


def test_a_dilated_stride_1_conv_is_four_copies_of_its_undilated_kernel_on_the_quarter_map():
    """polyphase_geometry, against brute force: the dense operator of a dilation-2 stride-1 depthwise
    conv on an 8x8 map has exactly the singular values of the same kernel undilated on a 4x4 map
    (padding halved), each 4 times; the spectral norm works on that map (buffers 4x4) and reaches
    norm 1 on the real one. Strided, odd-sized or undilated convs keep their geometry."""
    from msrdarts.nn.spectral import polyphase_geometry

    for k in (3, 5):
        torch.manual_seed(k)
        w = torch.randn(2, 1, k, k, dtype=torch.float64)
        full = OpConv(2, 2, k, padding=k - 1, dilation=2, groups=2, bias=False).double()
        small = OpConv(2, 2, k, padding=(k - 1) // 2, groups=2, bias=False).double()
        full.input_hw, small.input_hw = (8, 8), (4, 4)
        s_full = torch.linalg.svdvals(dense_of(full, weight=w))
        s_small = torch.linalg.svdvals(dense_of(small, weight=w))
        assert s_full.shape[-1] == 4 * s_small.shape[-1]
        torch.testing.assert_close(s_full, s_small.repeat_interleave(4, dim=-1))
        assert polyphase_geometry((k, k), (1, 1), (k - 1, k - 1), (2, 2), (8, 8)) == \
            (((k - 1) // 2,) * 2, (1, 1), (4, 4))
        with torch.no_grad():
            full.weight.copy_(w)
        sn = register(full)
        assert tuple(sn.u.shape) == (1, 2, 4, 4) and true_norm(full, full.weight.detach()) == pytest.approx(1, abs=1e-6)
    for args in [((3, 3), (2, 2), (2, 2), (2, 2), (8, 8)),     # strided
                 ((3, 3), (1, 1), (2, 2), (2, 2), (7, 7)),     # odd map
                 ((3, 3), (1, 1), (1, 1), (1, 1), (8, 8))]:    # undilated
        assert polyphase_geometry(*args) == (args[2], args[3], args[4])


def test_a_checkpoint_with_full_map_vectors_loads_and_recomputes_them():
    """Checkpoints written before polyphase_geometry hold a dilated conv's vectors on its full map:
    drop_regridded_vectors leaves those out (the rest loads strictly), refresh_regridded recomputes
    them for the loaded weights, and every conv is at norm 1 against its dense operator."""
    from msrdarts.nn.spectral import drop_regridded_vectors, refresh_regridded
    from msrdarts.nn.supernet import SuperNet

    torch.manual_seed(3)
    net = SuperNet(10, 3, 4, 8, in_channels=1).double()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    old = {}
    for name, m in net.named_modules():
        if isinstance(m, ConvSpectralNorm) and m.dilation == (1, 1) and m.kernel_size != (1, 1):
            conv = net.get_submodule(name.rsplit(".parametrizations.", 1)[0])
            if conv.dilation != (1, 1):          # reduced: write vectors of the full map's shapes
                H, W = conv.input_hw
                state[f"{name}.u"] = torch.randn(1, conv.in_channels, H, W, dtype=torch.float64)
                state[f"{name}.v"] = torch.randn(1, conv.out_channels, H, W, dtype=torch.float64)
                state[f"{name}.basis"] = torch.randn(conv.groups, m.block - 1, H * W, dtype=torch.float64)
                old[name] = conv
    assert old
    with torch.no_grad():   # weights moved since the vectors converged
        for conv in old.values():
            conv.parametrizations.weight.original.mul_(1.5).add_(0.2)
    state.update({k: v for k, v in net.state_dict().items() if "original" in k})
    kept, dropped = drop_regridded_vectors(net, state)
    assert dropped == set(old)
    loaded = net.load_state_dict(kept, strict=False)
    assert not loaded.unexpected_keys and {k.rsplit(".", 1)[0] for k in loaded.missing_keys} == set(old)
    refresh_regridded(net, dropped)
    for name, conv in old.items():
        w = conv.parametrizations.weight.original.detach()
        sn = net.get_submodule(name)
        assert true_norm(conv, w) / float(sn.sigma(w)) == pytest.approx(1, abs=1e-4)
