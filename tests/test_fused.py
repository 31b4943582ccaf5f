"""The fused supernet forward against the per-op reference, in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from msrdarts.bench import saved_for_backward_mb
from msrdarts.device import Accel
from msrdarts.errors import ConfigError
from msrdarts.nn.kernels import DepthwiseRunner, _Geometry
from msrdarts.nn.ops import OpConv
from msrdarts.primitives import DARTS_PRIMITIVES
from msrdarts.nn.spectral import ConvSpectralNorm
from msrdarts.nn.spectral_batch import SpectralBatch
from msrdarts.methods.msr import msr_genotype, use_srsoftmax
from msrdarts.methods.stable_rank import stable_rank_table
from msrdarts.nn.supernet import SuperNet

from _reference import dense_of, op_norm

TOL = dict(rtol=1e-6, atol=1e-6)


def _pair(mixing="sum", recompute_depthwise=False, **kw):
    torch.manual_seed(kw.pop("seed", 0))
    adapt = use_srsoftmax if mixing == "srsoftmax" else (lambda net: net)
    ref = adapt(SuperNet(impl="reference", **kw)).double()
    with torch.no_grad():   # move the weights off the converged vectors, so the power iterations have work
        for p in ref.parameters():
            p.mul_(1 + 0.3 * torch.randn_like(p))
    fused = adapt(SuperNet(impl="fused", recompute_depthwise=recompute_depthwise, **kw)).double()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def _normalised(net):
    return [(m, m.parametrizations.weight[0]) for m in net.modules()
            if isinstance(m, OpConv) and parametrize.is_parametrized(m, "weight")]


def _span(basis: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector onto the span of each group's basis rows (groups, b-1, n): the
    tracked subspace, which rounding cannot move, where the rows themselves may rotate within it."""
    q = torch.linalg.qr(basis.double().mT).Q
    return q @ q.mT


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute_depthwise"])
@pytest.mark.parametrize("stem, size", [("cifar", 16), ("imagenet", 64)])
@pytest.mark.parametrize("mixing", ["sum", "srsoftmax"])
def test_fused_matches_reference_forward_backward_and_state(stem, size, mixing, recompute):
    ref, fused = _pair(num_classes=5, layers=3, channels=4, input_size=size, stem=stem, mixing=mixing,
                       recompute_depthwise=recompute)
    assert ref.cells[1].reduction and not ref.cells[0].reduction   # normal and reduction cells both covered
    torch.manual_seed(1)
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    for _ in range(2):   # two training forwards: power iterations and BN statistics advance twice
        out_r, out_f = ref(x), fused(x)
        torch.testing.assert_close(out_f, out_r, **TOL)
        g = torch.randn_like(out_r)
        grads_r = torch.autograd.grad(out_r, list(ref.parameters()), g)
        grads_f = torch.autograd.grad(out_f, list(fused.parameters()), g)
        for (name, _), gr, gf in zip(ref.named_parameters(), grads_r, grads_f):
            torch.testing.assert_close(gf, gr, **TOL, msg=name)
    # Every buffer the reference updates (u, v, BN running statistics, batch counts) is the same.
    sr, sf = _state(ref), _state(fused)
    assert sr.keys() == sf.keys()
    for k in sr:
        torch.testing.assert_close(sf[k], sr[k], **TOL, msg=k)
    # The normalised weights the fused path gathers are the convs' own ``weight``s (eval: no iteration).
    ref.eval()
    fused.eval()
    convs = [c for c in fused.modules() if isinstance(c, OpConv)]
    batch = fused._fused.batch
    weights = batch.weights(training=False)
    for c in convs:
        g, i = batch.where[id(c)]
        torch.testing.assert_close(weights[g][i], c.weight, **TOL)
    torch.testing.assert_close(fused(x), ref(x), **TOL)
    # Stable ranks and the derived genotype do not depend on the implementation.
    torch.testing.assert_close(stable_rank_table(fused), stable_rank_table(ref), **TOL)
    assert msr_genotype(fused) == msr_genotype(ref)


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute_depthwise"])
def test_two_forwards_then_one_backward_use_each_forwards_own_vectors(recompute):
    """Gradient accumulation: the second training forward advances the power iterations before
    the first forward's backward runs; that backward must still see the first forward's G (and,
    recomputing the depthwise convs, the first forward's weights and inputs)."""
    ref, fused = _pair(num_classes=5, layers=3, channels=4, input_size=8, stem="cifar", mixing="sum",
                       recompute_depthwise=recompute)
    torch.manual_seed(8)
    x1, x2 = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for net in (ref, fused):
        loss = net(x1).square().sum() + net(x2).sum()
        grads.append(torch.autograd.grad(loss, list(net.parameters())))
    for (name, _), gr, gf in zip(ref.named_parameters(), *grads):
        torch.testing.assert_close(gf, gr, **TOL, msg=name)


@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute_depthwise"])
def test_fused_with_a_subset_of_ops_in_another_order(recompute):
    """Sep and dil ops interleaved: the sep ops' second blocks are not a contiguous slice."""
    ref, fused = _pair(num_classes=3, layers=3, channels=4, input_size=8, in_channels=1,
                       primitives=("dil_conv_5x5", "sep_conv_3x3", "dil_conv_3x3"), recompute_depthwise=recompute)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    out_r, out_f = ref(x), fused(x)
    torch.testing.assert_close(out_f, out_r, **TOL)
    out_r.sum().backward()
    out_f.sum().backward()
    for (name, pr), pf in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, **TOL, msg=name)


def test_fused_without_spectral_norm_matches_reference():
    ref, fused = _pair(num_classes=3, layers=3, channels=4, input_size=8, in_channels=1, spectral_norm=False)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fused(x), ref(x), **TOL)


def test_impl_choice_and_errors():
    assert SuperNet(10, 3, 4, 8, in_channels=1).impl == "fused"
    assert SuperNet(10, 3, 4, 8, in_channels=1, primitives=DARTS_PRIMITIVES, spectral_norm=False).impl == "reference"
    with pytest.raises(ConfigError, match="--impl=fused: supports the ops"):
        SuperNet(10, 3, 4, 8, in_channels=1, primitives=DARTS_PRIMITIVES, spectral_norm=False, impl="fused")
    with pytest.raises(ConfigError, match="impl='fast': unknown"):
        SuperNet(10, 3, 4, 8, in_channels=1, impl="fast")


@pytest.mark.parametrize("k, dil, stride, hw, batch", [
    (3, 1, 1, (4, 4), 3), (5, 1, 1, (8, 8), 3), (3, 2, 2, (8, 8), 3), (5, 2, 1, (2, 2), 3), (5, 2, 2, (5, 7), 3),
    (3, 2, 1, (6, 6), 3),
    (5, 1, 1, (4, 4), 20), (3, 1, 2, (8, 8), 20)])   # operators smaller than the batch's input: kept, not rebuilt
def test_depthwise_runner_dense_operator_matches_conv2d(k, dil, stride, hw, batch):
    """The dense-operator path (maps of at most 64 pixels) against F.conv2d, values and gradients."""
    torch.manual_seed(2)
    C, pad = 6, dil * (k - 1) // 2
    conv = OpConv(C, C, k, stride=stride, padding=pad, dilation=dil, groups=C, bias=False)
    x = torch.randn(batch, C, *hw, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, 1, k, k, dtype=torch.float64, requires_grad=True)
    runner = DepthwiseRunner()
    y = runner(x, w, _Geometry.of(conv))
    assert runner.taps._cache, "the dense path was not taken"
    ref = F.conv2d(x, w, None, stride, pad, dil, C)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k, dil, stride, hw, subsampled", [
    (3, 2, 2, (20, 20), True), (5, 2, 2, (17, 23), True), (5, 2, 2, (3, 5), True),   # dil convs of a reduction
    (3, 1, 2, (20, 20), False), (5, 1, 2, (17, 17), False), (3, 2, 1, (20, 20), False)])
def test_depthwise_runner_subsamples_strided_dilated_convs(k, dil, stride, hw, subsampled):
    """A stride-2 conv with dilation 2 runs as a stride-1 undilated conv on x[..., ::2, ::2]:
    same values and gradients as F.conv2d, on small (dense) and large maps, even and odd sizes."""
    torch.manual_seed(3)
    C, pad = 5, dil * (k - 1) // 2
    conv = OpConv(C, C, k, stride=stride, padding=pad, dilation=dil, groups=C, bias=False)
    assert (_Geometry.of(conv).subsampled(hw) is not None) == subsampled
    x = torch.randn(2, C, *hw, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C, 1, k, k, dtype=torch.float64, requires_grad=True)
    y = DepthwiseRunner()(x, w, _Geometry.of(conv))
    ref = F.conv2d(x, w, None, stride, pad, dil, C)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_spectral_batch_groups_consecutive_convs_and_refuses_scattered_ones():
    net = SuperNet(10, 3, 4, 8, in_channels=1)
    batch = net._fused.batch
    convs = [c for c in net.modules() if isinstance(c, OpConv)]
    assert sum(len(g) for g in batch.groups) == len(convs)
    for group in batch.groups:   # one geometry per group
        assert len({(c.kernel_size, c.stride, c.dilation, c.in_channels, c.input_hw) for c in group}) == 1
    g = batch.groups[0]
    assert batch.slice_of(g[2:5]).count == 3
    with pytest.raises(ValueError, match="consecutive"):
        batch.slice_of([g[0], g[2]])
    assert isinstance(batch, SpectralBatch)


def test_bf16_autocast_keeps_spectral_norms_in_float32():
    torch.manual_seed(0)
    net = SuperNet(10, 3, 4, 8, in_channels=1)
    accel = Accel.resolve(torch.device("cpu"), amp="bf16")
    assert accel.amp and not Accel.resolve(torch.device("cpu")).amp   # auto: off on the CPU
    before = copy.deepcopy(net)
    x = accel.input(torch.randn(4, 1, 8, 8))
    with accel.autocast():
        out = net(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
    # The power iterations advanced in float32, as in a float32 forward of the same weights.
    before(torch.randn(4, 1, 8, 8))
    for (name, b), a in zip(before.named_buffers(), net.buffers()):
        if name.endswith(".u") or name.endswith(".v"):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for c in net.modules():
        if isinstance(c, OpConv) and parametrize.is_parametrized(c, "weight"):
            assert c.weight.dtype == torch.float32


def test_compile_failure_falls_back_to_eager_with_one_message():
    from msrdarts.device import _CompileOrEager

    net = torch.nn.Linear(3, 2)
    messages = []

    def broken(x):
        raise RuntimeError("backend exploded\nsecond line")

    fn = _CompileOrEager(net, broken, messages.append)
    x = torch.randn(4, 3)
    torch.testing.assert_close(fn(x), net(x))
    torch.testing.assert_close(fn(x), net(x))
    assert len(messages) == 1 and "backend exploded" in messages[0] and "--compile off" in messages[0]


def test_batched_refresh_and_each_convs_own_refresh_both_reach_the_dense_norm():
    """SuperNet.refresh_spectral_norms (1x1 convs in one eigh per shape, the rest in one block
    Krylov refresh) and every conv's own refresh both find each conv's true operator norm."""
    from msrdarts.nn.spectral import refresh_spectral_norms

    torch.manual_seed(4)
    net = SuperNet(10, 3, 4, 8, in_channels=1).double()
    with torch.no_grad():   # weights moved since the vectors converged
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    other = copy.deepcopy(net)
    net.refresh_spectral_norms()
    refresh_spectral_norms(other)
    # The batched refresh runs each bundle as one grouped conv and stops its Krylov cycles when every
    # group of every bundle has converged, so its vectors differ from the per-conv ones; both must
    # match the dense operator.
    n_matrix = n_conv = 0
    worst = 0.0
    for (c, a), (_, b) in zip(_normalised(net), _normalised(other)):
        w = c.parametrizations.weight.original.detach()
        true = op_norm(dense_of(c, weight=w))
        worst = max(worst, true / float(a.sigma(w)) - 1, true / float(b.sigma(w)) - 1)
        n_conv += 1
    # the weights moved by 0.3 * randn, as far as new ones: one refresh (6 Krylov steps at most) from
    # stale vectors is within 0.5 %; the training-step tests check what a search sees
    assert n_conv > 100 and worst < 5e-3, worst
    for c in net.modules():
        if isinstance(c, OpConv) and c.kernel_size == (1, 1):   # 1x1: exact again after the refresh
            sn = c.parametrizations.weight[0]
            w = c.parametrizations.weight.original.detach().flatten(1)
            assert float(sn.sigma(w.view_as(c.weight))) == pytest.approx(
                float(torch.linalg.matrix_norm(w, ord=2)), rel=1e-10)
            n_matrix += 1
    assert n_matrix > 0


def test_pointwise_refresh_makes_the_1x1_convs_exact_and_leaves_the_others_alone():
    """refresh_spectral_norms(depthwise=False), the search's refresh every --sn-refresh-every steps:
    each 1x1 conv's sigma becomes its matrix's largest singular value (SVD), and no other conv's
    vectors move (nor the drift reference, which belongs to the depthwise refresh)."""
    torch.manual_seed(5)
    net = SuperNet(10, 3, 4, 8, in_channels=1).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    drift = net.spectral_drift()
    convs = [c for c in net.modules() if isinstance(c, OpConv) and parametrize.is_parametrized(c, "weight")]
    before = {id(c): [b.clone() for b in c.parametrizations.weight[0].buffers()] for c in convs}
    stale = max(1 - float(c.parametrizations.weight[0].sigma(c.parametrizations.weight.original.detach()))
                / float(torch.linalg.svdvals(c.parametrizations.weight.original.detach().flatten(1))[0])
                for c in convs if c.kernel_size == (1, 1))
    assert stale > 1e-3       # the weights moved: the 1x1 convs' vectors are no longer the top ones
    net.refresh_spectral_norms(depthwise=False)
    n_matrix = n_other = 0
    for c in convs:
        sn = c.parametrizations.weight[0]
        w = c.parametrizations.weight.original.detach()
        if c.kernel_size == (1, 1):
            true = float(torch.linalg.svdvals(w.flatten(1))[0])
            assert float(sn.sigma(w)) == pytest.approx(true, rel=1e-10)
            n_matrix += 1
        else:
            assert all(torch.equal(a, b) for a, b in zip(before[id(c)], sn.buffers()))
            n_other += 1
    assert n_matrix > 10 and n_other > 10 and net.spectral_drift() == drift > 0


def test_fused_path_follows_buffers_that_to_replaced():
    """.to() gives the modules new buffer tensors: the fused path must update those, not stale ones."""
    ref, fused = _pair(num_classes=5, layers=3, channels=4, input_size=8, stem="cifar", mixing="sum")
    torch.manual_seed(5)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ref(x), fused(x)                       # the fused path has looked its buffers up
    ref.float(), fused.float()             # every buffer replaced by a float32 copy
    for _ in range(2):
        ref(x.float()), fused(x.float())
    sr, sf = _state(ref), _state(fused)
    for k in sr:   # the tracked vectors: float32 rounding may turn them within a near-repeated top
        if not k.endswith((".u", ".v", ".basis")):   # singular value, so compare what they give
            torch.testing.assert_close(sf[k], sr[k], rtol=1e-4, atol=1e-5, msg=k)
    for (c, a), (_, b) in zip(_normalised(fused), _normalised(ref)):
        w = c.parametrizations.weight.original.detach()
        torch.testing.assert_close(a._group_sigmas(w), b._group_sigmas(w), rtol=1e-4, atol=0)
        if a.block > 1:   # the same tracked subspace
            block = lambda sn: torch.cat([sn.u.reshape(sn.groups, 1, -1), sn.basis], 1)
            torch.testing.assert_close(_span(block(a)), _span(block(b)), rtol=0, atol=1e-2)


def test_linked_vectors_are_one_tensor_per_bundle_and_replaced_buffers_still_count():
    """SpectralBatch.link makes the u (and v) buffers of each bundle's convs views of one tensor,
    after building and after .double(); a buffer replaced by hand is still the one read and updated."""
    ref, fused = _pair(num_classes=5, layers=3, channels=4, input_size=8, stem="cifar", mixing="sum")
    batch = fused._fused.batch
    bundles = batch.bundles()
    assert sorted(g for b in bundles for g in b) == [g for g, sns in enumerate(batch._norms()) if sns[0] is not None]
    assert any(len(b) > 1 for b in bundles)
    for bundle in bundles:
        u_flat, v_flat, basis_flat = batch._linked[tuple(bundle)].flat
        sns = [sn for g in bundle for sn in batch._norms()[g]]
        assert all(sn.u._base is u_flat and sn.v._base is v_flat for sn in sns)
        assert (basis_flat is None) == all(sn.block == 1 for sn in sns)
        assert basis_flat is None or all(sn.basis._base is basis_flat for sn in sns)
        # each buffer is its own slice of the packed tensor: no overlaps, all of it covered
        assert sum(sn.u.numel() for sn in sns) == u_flat.numel()
        assert len({sn.u.data_ptr() for sn in sns}) == len(sns)
    # replace one conv's vectors by fresh tensors (as load_state_dict(assign=True) or a user would)
    name = next(n for n, m in fused.named_modules() if n.endswith("parametrizations.weight.0"))
    for net in (ref, fused):
        sn = net.get_submodule(name)
        sn.u = sn.u.clone()
        sn.v = sn.v.clone()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(fused(x), ref(x), **TOL)
    sr, sf = _state(ref), _state(fused)
    for k in sr:
        torch.testing.assert_close(sf[k], sr[k], **TOL, msg=k)
    assert fused.get_submodule(name).u._base is None   # the replaced buffer itself was updated


@pytest.mark.parametrize("geometries, hw", [
    ([(3, 1, 1)], (7, 9)), ([(5, 2, 2)], (9, 7)), ([(3, 1, 2)], (8, 8)),                # one geometry, odd sizes
    ([(3, 1, 1), (5, 1, 1), (3, 2, 1), (5, 2, 1)], (8, 8)),                              # a stride-1 bundle
    ([(3, 1, 2), (5, 1, 2), (3, 2, 2), (5, 2, 2)], (5, 5))])                             # a stride-2 bundle
def test_depthwise_dsigma_by_conv_equals_the_unfold_gradient(geometries, hw):
    """G = d(v^T A u)/dW of depthwise convs, computed as one conv of u with v for all parts at
    their union geometry, equals each conv's own unfold-based dsigma (ConvSpectralNorm.dsigma)."""
    from msrdarts.nn.spectral_batch import _depthwise_grads, _Part, _union_kernel

    torch.manual_seed(6)
    C, n = 3, 2
    parts, sns, ws = [], [], []
    for g, (k, dil, stride) in enumerate(geometries):
        conv = OpConv(C, C, k, stride=stride, padding=dil * (k - 1) // 2, dilation=dil, groups=C, bias=False).double()
        sn = ConvSpectralNorm(conv, hw, converge=False)
        w = torch.randn(n, C, 1, k, k, dtype=torch.float64)
        parts.append(_Part(g, sn, w))
        sns.append(sn)
    out_hw = _Geometry.of(sns[0]).out_size(hw)
    u = torch.randn(1, len(parts) * n * C, *hw, dtype=torch.float64)
    v = torch.randn(1, len(parts) * n * C, *out_hw, dtype=torch.float64)
    grads = _depthwise_grads(parts, u, v)
    us, vs = u.split(n * C, 1), v.split(n * C, 1)
    for part, sn, dsigma, u_p, v_p in zip(parts, sns, grads, us, vs):
        for i in range(n):   # each conv's own gradient, by the module's unfold + bmm
            sn.u, sn.v = u_p[:, i * C:(i + 1) * C], v_p[:, i * C:(i + 1) * C]
            torch.testing.assert_close(dsigma.G[i], sn.dsigma(part.w[i]), rtol=1e-12, atol=1e-12)
    # and the union kernel is the same operator: its conv of u equals the parts' own convs
    geo, wd = _union_kernel(parts)
    union = F.conv2d(u, wd, None, geo.stride, geo.padding, geo.dilation, u.shape[1])
    own = torch.cat([F.conv2d(u_p, p.w.flatten(0, 1), None, p.sn.stride, p.sn.padding, p.sn.dilation, n * C)
                     for p, u_p in zip(parts, us)], 1)
    torch.testing.assert_close(union, own, rtol=1e-12, atol=1e-12)


def test_normalize_function_matches_autograd_including_ties():
    """_Normalize (one autograd node for all groups) against autograd through W * (t / max_j <W_j, G_j>),
    for depthwise groups, 1x1 groups (G = v u^T) and a conv whose two groups tie for the max."""
    from msrdarts.nn.spectral import _Dsigma
    from msrdarts.nn.spectral import _Normalize, _OuterDsigma

    torch.manual_seed(7)
    w_dw = torch.randn(3, 4, 1, 3, 3, dtype=torch.float64)
    G_dw = torch.randn(3, 4, 1, 3, 3, dtype=torch.float64)
    w_dw[1, 0] = w_dw[1, 2] = 1.0                                        # conv 1: groups 0 and 2 tie
    G_dw[1, 0] = G_dw[1, 2] = 2.0                                        # at the max, 18
    w_mm = torch.randn(2, 5, 6, 1, 1, dtype=torch.float64)
    v, u = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    dsigmas = [_Dsigma(G_dw, 4), _OuterDsigma(v, u)]
    targets = [1.0, torch.tensor([2.0, 0.5], dtype=torch.float64)]
    sigmas = _Dsigma(G_dw, 4).sigmas(w_dw)
    assert (sigmas[1] == sigmas[1].max()).sum() == 2                     # the tie is there

    def reference(ws):
        out = []
        for w, G, groups, t in zip(ws, [G_dw, (v[:, :, None] * u[:, None, :])[..., None, None]], [4, 1], targets):
            sigma = (w * G).reshape(w.shape[0], groups, -1).sum(-1).amax(1)
            out.append(w * (t / sigma).view(-1, 1, 1, 1, 1))
        return out

    ws = [w_dw.clone().requires_grad_(), w_mm.clone().requires_grad_()]
    ws_ref = [w.detach().clone().requires_grad_() for w in ws]
    outs, refs = _Normalize.apply(dsigmas, targets, *ws), reference(ws_ref)
    gs = [torch.randn_like(o) for o in refs]
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-13, atol=1e-13)
    for a, b in zip(torch.autograd.grad(outs, ws, gs), torch.autograd.grad(refs, ws_ref, gs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mixing", ["sum", "srsoftmax"])
def test_checkpoint_cells_computes_the_same_step_and_state_and_runs_each_cell_twice(mixing, monkeypatch):
    """--checkpoint-cells: two training steps give the outputs, gradients, power-iteration vectors
    and BN statistics of the plain fused forward (the recomputation in the backward must not count
    a batch twice), and every cell really runs again in the backward."""
    from msrdarts.nn import fused as fused_module

    kw = dict(num_classes=5, layers=3, channels=4, input_size=16, mixing=mixing)
    _, plain = _pair(**kw)
    torch.manual_seed(0)
    adapt = use_srsoftmax if mixing == "srsoftmax" else (lambda net: net)
    ckpt = adapt(SuperNet(impl="fused", checkpoint_cells=True, num_classes=5, layers=3, channels=4,
                          input_size=16)).double()
    ckpt.load_state_dict(plain.state_dict())
    runs = []
    real = fused_module.FusedCell.__call__
    monkeypatch.setattr(fused_module.FusedCell, "__call__", lambda self, *a: runs.append(self) or real(self, *a))
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    for _ in range(2):
        runs.clear()
        out_p = plain(x)
        assert len(runs) == 3
        out_c = ckpt(x)
        torch.testing.assert_close(out_c, out_p, rtol=0, atol=0)
        g = torch.randn_like(out_p)
        grads_p = torch.autograd.grad(out_p, list(plain.parameters()), g)
        grads_c = torch.autograd.grad(out_c, list(ckpt.parameters()), g)
        assert len(runs) == 3 + 3 + 3     # plain: 3 cells; checkpointed: 3 in the forward, 3 again in the backward
        for (name, _), gp, gc in zip(plain.named_parameters(), grads_p, grads_c):
            torch.testing.assert_close(gc, gp, rtol=1e-12, atol=1e-12, msg=name)
    sp, sc = _state(plain), _state(ckpt)
    for k in sp:
        torch.testing.assert_close(sc[k], sp[k], rtol=0, atol=0, msg=k)
    ckpt.eval()
    runs.clear()
    with torch.no_grad():
        torch.testing.assert_close(ckpt(x), plain.eval()(x), rtol=0, atol=0)
    assert len(runs) == 3 + 3     # evaluation: no checkpointing


def test_checkpoint_cells_needs_the_fused_forward():
    with pytest.raises(ConfigError, match="--checkpoint-cells: needs the fused"):
        SuperNet(5, 3, 4, 16, impl="reference", checkpoint_cells=True)
    with pytest.raises(ConfigError, match="--recompute-depthwise: needs the fused"):
        SuperNet(5, 3, 4, 16, impl="reference", recompute_depthwise=True)
    with pytest.raises(ConfigError, match="--checkpoint-cells"):
        SuperNet(5, 3, 4, 16, primitives=DARTS_PRIMITIVES, checkpoint_cells=True)


def _assert_same_step(a, b, x):
    """One training forward of ``a`` and ``b`` on ``x``: the same output and parameter gradients (float64)."""
    out_a, out_b = a(x), b(x)
    torch.testing.assert_close(out_b, out_a, **TOL)
    g = torch.randn_like(out_a)
    for (name, _), ga, gb in zip(a.named_parameters(), torch.autograd.grad(out_a, list(a.parameters()), g),
                                 torch.autograd.grad(out_b, list(b.parameters()), g)):
        torch.testing.assert_close(gb, ga, **TOL, msg=name)


def test_recompute_depthwise_keeps_less_than_half_the_activations_and_the_same_channels_last_step():
    """--recompute-depthwise: per source node, a sep conv keeps 2 activations of m*C channels and a
    dil conv 1 where autograd keeps 5 and 2 (plus the spread input): what autograd keeps for a
    backward falls below half. In channels_last the step is still the plain one's (float64)."""
    torch.manual_seed(0)
    plain = SuperNet(5, 4, 8, 16, impl="fused").double()
    lean = SuperNet(5, 4, 8, 16, impl="fused", recompute_depthwise=True).double()
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    kept_plain, kept_lean = saved_for_backward_mb(plain, x), saved_for_backward_mb(lean, x)
    assert kept_lean < 0.5 * kept_plain, (kept_lean, kept_plain)
    lean.load_state_dict(plain.state_dict())     # the forwards above advanced both alike; start again equal
    plain, lean = (n.to(memory_format=torch.channels_last) for n in (plain, lean))
    xc = x.to(memory_format=torch.channels_last)
    _assert_same_step(plain, lean, xc)


def test_recompute_depthwise_under_bf16_autocast_matches_the_plain_step():
    """The recomputation in the backward runs under the forward's autocast: the same bf16 step as
    the plain fused path's (gradients within bf16 rounding of each other)."""
    torch.manual_seed(0)
    plain = SuperNet(10, 3, 4, 8, in_channels=1, impl="fused")
    lean = SuperNet(10, 3, 4, 8, in_channels=1, impl="fused", recompute_depthwise=True)
    lean.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 8, 8)
    grads = []
    for net in (plain, lean):
        with torch.autocast("cpu", torch.bfloat16):
            out = net(x)
        assert out.dtype == torch.bfloat16
        grads.append(torch.autograd.grad(out.float().square().sum(), list(net.parameters())))
    for (name, _), gp, gl in zip(plain.named_parameters(), *grads):
        assert gl.dtype == gp.dtype and torch.isfinite(gl).all(), name
        torch.testing.assert_close(gl, gp, rtol=0.05, atol=0.05 * gp.abs().max().item() + 1e-6, msg=name)


def test_checkpoint_cells_with_recompute_depthwise_is_the_plain_step():
    ref, fused = _pair(num_classes=5, layers=3, channels=4, input_size=16)
    torch.manual_seed(0)
    both = SuperNet(5, 3, 4, 16, impl="fused", checkpoint_cells=True, recompute_depthwise=True).double()
    both.load_state_dict(fused.state_dict())
    _assert_same_step(fused, both, torch.randn(3, 3, 16, 16, dtype=torch.float64))
    sf, sb = _state(fused), _state(both)
    for k in sf:
        torch.testing.assert_close(sb[k], sf[k], **TOL, msg=k)
