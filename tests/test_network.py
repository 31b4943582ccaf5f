import pytest
import torch

from msrdarts.errors import ConfigError
from msrdarts.genotype import Genotype
from msrdarts.nn.metrics import count_mult_adds, count_parameters
from msrdarts.nn.network import Network
from msrdarts.zoo import get_genotype, list_genotypes

CONCAT = (2, 3, 4, 5)


def uniform(op: str) -> Genotype:
    """Every node takes `op` from its two predecessors-by-index 0 and 1."""
    pairs = tuple((op, i) for _ in range(4) for i in (0, 1))
    return Genotype(pairs, CONCAT, pairs, CONCAT)


# SPEC section 7 (auxiliary head not counted), checked to within 1 %.
@pytest.mark.parametrize("genotype, layers, channels, stem, classes, size, millions", [
    (get_genotype("DARTS_V2"), 20, 36, "cifar", 10, 32, 3.35),
    (get_genotype("MSR_DARTS"), 20, 36, "cifar", 10, 32, 4.01),
    (get_genotype("MSR_DARTS"), 8, 36, "cifar", 10, 32, 1.63),
    (get_genotype("MSR_DARTS"), 14, 48, "imagenet", 1000, 224, 5.67),
    (uniform("dil_conv_3x3"), 20, 36, "cifar", 10, 32, 3.04),
    (uniform("sep_conv_5x5"), 20, 36, "cifar", 10, 32, 5.14),
])
def test_parameter_counts_match_the_spec(genotype, layers, channels, stem, classes, size, millions):
    net = Network(genotype, classes, layers, channels, stem=stem, input_size=size, auxiliary=True)
    assert count_parameters(net) / 1e6 == pytest.approx(millions, rel=0.01)
    assert count_parameters(net, exclude_auxiliary=False) > count_parameters(net)


@pytest.mark.parametrize("name", list_genotypes())
@pytest.mark.parametrize("stem, size", [("cifar", 32), ("imagenet", 224)])
def test_every_zoo_genotype_trains_at_both_input_sizes(name, stem, size):
    torch.manual_seed(0)
    net = Network(get_genotype(name), 7, 3, 4, stem=stem, input_size=size, auxiliary=True)
    net.set_drop_path(0.2)
    x = torch.randn(2, 3, size, size)
    logits, aux = net(x)
    assert logits.shape == aux.shape == (2, 7)
    (logits.sum() + 0.4 * aux.sum()).backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if not n.startswith("auxiliary_head"))
    net.eval()
    with torch.no_grad():
        a, no_aux = net(x)
        b, _ = net(x)
    assert no_aux is None and torch.equal(a, b)   # eval: no drop path, no auxiliary head


def test_drop_path_spares_identity_edges():
    torch.manual_seed(0)
    g = get_genotype("DARTS_V2")
    net = Network(g, 10, 3, 4, input_size=8)
    cell = net.cells[0]
    ids = [k for k, op in enumerate(cell.ops) if isinstance(op, torch.nn.Identity)]
    assert ids, "DARTS_V2's normal cell has skip connections"
    net.train()
    s = torch.randn(4, 12, 8, 8)
    out = cell(s, s, drop_prob=0.999999)   # every non-identity branch dropped
    pre = cell.pre0(s)
    # node 5 = skip(x0) + dil_conv_3x3(x2): with the conv dropped, node 5 equals the preprocessed x0
    torch.testing.assert_close(out[:, -4:], pre)


def test_unknown_op_and_bad_sizes():
    bad = Genotype((("conv_9x9", 0), ("sep_conv_3x3", 1)), (2,), (("sep_conv_3x3", 0), ("sep_conv_3x3", 1)), (2,))
    with pytest.raises(ConfigError, match="has op 'conv_9x9'"):
        Network(bad, 10, 3, 4)
    with pytest.raises(ConfigError, match="layers=2"):
        Network(get_genotype("MSR_DARTS"), 10, 2, 4)


@pytest.mark.parametrize("name, millions", [("PC_DARTS", 558), ("P_DARTS", 532)])
def test_mult_adds_match_published_cifar_figures(name, millions):
    # SPEC section 6: PC_DARTS 558M, P_DARTS 532M at L = 20, C = 36 on CIFAR-10
    net = Network(get_genotype(name), 10, 20, 36, input_size=32, auxiliary=True)
    assert count_mult_adds(net, 3, 32) / 1e6 == pytest.approx(millions, rel=0.01)


def test_mult_adds_of_a_single_conv_by_hand():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False))
    assert count_mult_adds(conv, 3, 10) == 8 * 3 * 9 * 10 * 10


@pytest.mark.parametrize("size", [8, 7, 4, 2])
def test_auxiliary_head_pools_to_2x2_then_1x1(size):
    from msrdarts.nn.network import AuxiliaryHead

    head = AuxiliaryHead(6, 10, size)
    x = torch.randn(2, 6, size, size)
    pooled = head.features[:2](x)
    assert pooled.shape[-2:] == (2, 2)                      # DARTS: 8 -> 2 (pool 5/3), 7 -> 2 (pool 5/2)
    assert head.features(x).shape == (2, 768, 1, 1) and head(x).shape == (2, 10)


def test_imagenet_auxiliary_head_sees_7x7():
    net = Network(get_genotype("MSR_DARTS"), 10, 6, 4, stem="imagenet", input_size=224, auxiliary=True)
    seen = []
    net.auxiliary_head.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[-2:])))
    net.train()
    net(torch.randn(2, 3, 224, 224))
    assert seen == [(7, 7)]
    assert isinstance(net.auxiliary_head.features[1], torch.nn.AvgPool2d) and net.auxiliary_head.features[1].stride == 2


def _per_cell(types_and_pairs):
    from msrdarts.genotype import Cell, CellGenotypes

    return CellGenotypes(tuple(Cell(t, p, CONCAT) for t, p in types_and_pairs))


def test_a_per_cell_network_is_the_sum_of_its_cells_built_one_at_a_time():
    """Cell k of a per-cell network has the parameters of cell k of a mean network whose cells of
    that type all use cell k's genotype; stem, head and classifier are those of any network."""
    msr, darts = get_genotype("MSR_DARTS"), get_genotype("DARTS_V2")
    s5, d3 = uniform("sep_conv_5x5"), uniform("dil_conv_3x3")
    sources = [msr, darts, msr, s5, d3, darts, s5, msr]            # the genotype each cell comes from
    types = ["normal", "normal", "reduce", "normal", "normal", "reduce", "normal", "normal"]   # L = 8: 2, 5
    cells = _per_cell([(t, g.reduce if t == "reduce" else g.normal) for t, g in zip(types, sources)])
    net = Network(cells, 10, 8, 16, auxiliary=True)
    expected = 0
    for k, g in enumerate(sources):
        whole = Network(g, 10, 8, 16, auxiliary=True)
        expected += sum(p.numel() for p in whole.cells[k].parameters())
    rest = Network(msr, 10, 8, 16, auxiliary=True)
    expected += sum(p.numel() for m in (rest.stem, rest.classifier) for p in m.parameters())
    assert count_parameters(net) == expected
    # every cell of the network is its own entry
    assert [tuple((type(op).__name__) for op in c.ops) for c in net.cells][3] == ("SepConv",) * 8
    x = torch.randn(2, 3, 32, 32)
    assert net(x)[0].shape == (2, 10)


def test_a_per_cell_network_of_identical_cells_is_the_mean_network():
    g = get_genotype("MSR_DARTS")
    cells = _per_cell([("reduce" if k in (2, 5) else "normal", g.reduce if k in (2, 5) else g.normal)
                       for k in range(8)])
    torch.manual_seed(0)
    a = Network(cells, 10, 8, 36)
    torch.manual_seed(0)
    b = Network(g, 10, 8, 36)
    assert count_parameters(a) / 1e6 == pytest.approx(1.63, rel=0.01)   # SPEC section 7, L = 8
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize("layers, types, message", [
    (6, ["normal", "normal", "reduce", "normal", "normal", "reduce", "normal", "normal"],
     "--layers=6: the per-cell genotype has 8 cells"),
    (8, ["normal", "reduce", "normal", "normal", "normal", "reduce", "normal", "normal"],
     "per-cell genotype: cell 1 is 'reduce' but a network of 8 cells has a normal cell there "
     "(reduction cells at 2 and 5)"),
])
def test_a_per_cell_genotype_that_does_not_fit_gets_one_line(layers, types, message):
    g = get_genotype("MSR_DARTS")
    cells = _per_cell([(t, g.reduce if t == "reduce" else g.normal) for t in types])
    with pytest.raises(ConfigError) as info:
        Network(cells, 10, layers, 16)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_pc_darts_imagenet_matches_its_published_size():
    # SPEC section 5: PC-DARTS searched on ImageNet, mobile setting: 5.3M parameters, 597M mult-adds.
    net = Network(get_genotype("PC_DARTS_IMAGENET"), 1000, 14, 48, stem="imagenet", input_size=224, auxiliary=True)
    assert count_parameters(net) / 1e6 == pytest.approx(5.3, rel=0.015)
    # our convention (multiply-accumulates of every conv and linear, torch.utils.flop_counter) gives 582M:
    # 2.6 % under the paper's 597M, like DARTS_V2's 530M against its published 574M
    assert count_mult_adds(net, 3, 224) / 1e6 == pytest.approx(597, rel=0.03)


# Every op of the DARTS space, in normal and reduction cells, with skip and pool edges.
EVERY_OP = Genotype(
    (("sep_conv_3x3", 0), ("sep_conv_5x5", 1), ("dil_conv_3x3", 0), ("dil_conv_5x5", 2),
     ("skip_connect", 1), ("avg_pool_3x3", 3), ("max_pool_3x3", 2), ("sep_conv_3x3", 4)), CONCAT,
    (("dil_conv_5x5", 0), ("sep_conv_5x5", 1), ("skip_connect", 0), ("max_pool_3x3", 1),
     ("avg_pool_3x3", 0), ("dil_conv_3x3", 3), ("sep_conv_3x3", 4), ("skip_connect", 2)), CONCAT)


def _train_step_state(net, x, y, drop_seed):
    """Logits, auxiliary logits, every gradient and every BN buffer after one training forward/backward."""
    torch.manual_seed(drop_seed)   # the drop-path masks
    logits, aux = net(x)
    loss = torch.nn.functional.cross_entropy(logits, y) + 0.4 * torch.nn.functional.cross_entropy(aux, y)
    loss.backward()
    return ({"logits": logits, "aux": aux} | {n: p.grad for n, p in net.named_parameters()}
            | {n: b for n, b in net.named_buffers()})


@pytest.mark.parametrize("channels_last, stem, size", [(True, "cifar", 16), (False, "cifar", 16),
                                                       (True, "imagenet", 64)])
def test_fast_network_equals_the_plain_pytorch_reference_in_float64(channels_last, stem, size):
    """--impl fast (channels_last on the CPU, format-keeping concatenation, or NCHW with the fast
    depthwise backward on maps of 256+ px) computes DARTS's network: same outputs, gradients and
    BN statistics as the plain-PyTorch reference, in float64, with drop path and auxiliary head."""
    states = {}
    for impl in ("reference", "fast"):
        torch.manual_seed(0)
        net = Network(EVERY_OP, 10, 5, 6, stem=stem, input_size=size, auxiliary=True, impl=impl).double()
        net.set_drop_path(0.3)
        x = torch.randn(4, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        if impl == "fast" and channels_last:
            net = net.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        states[impl] = _train_step_state(net.train(), x, torch.tensor([0, 3, 5, 9]), drop_seed=7)
    ref, fast = states["reference"], states["fast"]
    assert ref.keys() == fast.keys() and all(v is not None for v in ref.values())
    for k in ref:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-10, atol=1e-12, msg=k)
    assert (ref["logits"] != 0).all() and ref["stem.stem0.0.weight"].abs().sum() > 0


def test_fast_network_runs_few_channel_batch_norms_on_the_channels_last_path(monkeypatch):
    """The fast build in channels_last runs the ops' BNs of 6 and 12 channels (not multiples of 8)
    through msrdarts.nn.batchnorm's path; the reference build and NCHW inputs never do, and the
    stem's BN (18 channels) is PyTorch's."""
    import msrdarts.nn.batchnorm as bnmod

    calls = []
    real = bnmod.batch_norm_channels_last
    monkeypatch.setattr(bnmod, "batch_norm_channels_last", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k))
    x = torch.randn(2, 3, 16, 16)
    for impl, cl in (("fast", True), ("fast", False), ("reference", True)):
        calls.clear()
        net = Network(EVERY_OP, 10, 5, 6, input_size=16, impl=impl)
        xx = x
        if cl:
            net, xx = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        net(xx)
        assert (set(calls) == {6, 12}) if (impl, cl) == ("fast", True) else not calls, (impl, cl, calls)


def test_fast_network_runs_depthwise_convs_in_the_mode_that_wins(monkeypatch):
    """The fast path's depthwise convs: the custom backward for large NCHW maps, PyTorch's own conv
    for channels_last inputs (faster there) and for every input of the reference network."""
    import msrdarts.nn.ops as ops

    calls = []
    real = ops.depthwise_conv2d
    monkeypatch.setattr(ops, "depthwise_conv2d", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x = torch.randn(2, 3, 16, 16)
    for impl, cl, used in (("fast", False, True), ("fast", True, False), ("reference", False, False)):
        calls.clear()
        net = Network(EVERY_OP, 10, 5, 6, input_size=16, impl=impl)
        if cl:
            net, xx = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        else:
            xx = x
        net(xx)
        assert bool(calls) == used, (impl, cl)
        assert all(s[-1] * s[-2] >= 256 for s in calls)


def test_channels_cat_gives_each_input_its_gradient_in_its_own_format():
    from msrdarts.nn.kernels import channels_cat

    a = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    b = torch.randn(2, 2, 4, 5).requires_grad_()
    out = channels_cat([a, b])
    torch.testing.assert_close(out, torch.cat([a, b], 1), rtol=0, atol=0)
    g = torch.randn(2, 5, 4, 5).contiguous(memory_format=torch.channels_last)
    out.backward(g)
    assert a.grad.is_contiguous(memory_format=torch.channels_last) and not a.grad.is_contiguous()
    assert b.grad.is_contiguous()
    torch.testing.assert_close(a.grad, g[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(b.grad, g[:, 3:], rtol=0, atol=0)


def test_network_impl_is_checked():
    with pytest.raises(ConfigError, match="impl"):
        Network(get_genotype("DARTS_V2"), 10, 5, 4, impl="fused")


def test_step_flops_count_a_depthwise_weight_gradient_once_not_per_group():
    """By hand: a depthwise 3x3 conv on (2, 8, 6, 6) with padding 1 costs 2 * 2*8*36 * 9 FLOPs
    forward, and as much again for each of the input and the weight gradient."""
    from msrdarts.nn.metrics import count_step_flops

    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    w = torch.randn(8, 1, 3, 3, requires_grad=True)
    forward = 2 * (2 * 8 * 36) * 9
    assert count_step_flops(lambda: torch.nn.functional.conv2d(x, w, padding=1, groups=8).sum().backward()) \
        == 3 * forward
    w2 = torch.randn(4, 8, 1, 1, requires_grad=True)   # a dense 1x1 conv: 2 * (2*4*36) * 8 each way
    assert count_step_flops(lambda: torch.nn.functional.conv2d(x, w2).sum().backward()) == 3 * 2 * (2 * 4 * 36) * 8


@pytest.mark.parametrize("fast", [True, False])
def test_factorized_reduce_shift_keeps_the_gradient_format_on_the_fast_path(fast):
    """On even maps FactorizedReduce reads x[:, :, 1:, 1:] (DARTS's own shift, no padding needed).
    Autograd's slice backward hands a channels_last input an NCHW gradient; the fast path's shift
    (kernels.shifted_view) does not. The block computes the zero-padded shift's function either way."""
    from msrdarts.nn.kernels import shifted_view
    from msrdarts.nn.ops import FactorizedReduce

    x = torch.randn(2, 4, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    h = x * 1.0   # not a leaf: autograd restrides a leaf's .grad to the leaf's layout, hiding the format
    seen = []
    h.register_hook(seen.append)
    (shifted_view(h) if fast else h[:, :, 1:, 1:]).backward(g)
    assert (seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()) == fast
    assert seen[0][:, :, 0].abs().sum() == 0 and seen[0][:, :, :, 0].abs().sum() == 0
    torch.testing.assert_close(seen[0][:, :, 1:, 1:], g, rtol=0, atol=0)

    torch.manual_seed(0)
    m = FactorizedReduce(4, 6).double().to(memory_format=torch.channels_last)
    m.fast = fast
    x.grad = None
    g = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    m(x).backward(g)
    xr = x.detach().clone().requires_grad_()   # the independent reference: the padded shift, by hand
    r = torch.relu(xr)
    shifted = torch.nn.functional.pad(r, (0, 1, 0, 1))[:, :, 1:, 1:]
    m.bn(torch.cat([m.conv_1(r), m.conv_2(shifted)], dim=1)).backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)


def _count_nodes(t: torch.Tensor, name: str) -> int:
    seen, stack, n = set(), [t.grad_fn], 0
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        n += type(f).__name__ == name
        stack += [g for g, _ in f.next_functions]
    return n


def test_fast_cell_runs_one_relu_per_state_for_the_ops_that_begin_with_one():
    """Eight sep convs all reading input 0: the reference cell's graph has 2 ReLUs per sep conv
    (8 * 2 = 16; the preprocessors' ReLUs act on inputs that need no gradient, so they have no
    node); the fast cell shares input 0's ReLU among the eight (1 + 8 inner = 9), same output."""
    from msrdarts.nn.network import EvalCell

    pairs = (("sep_conv_3x3", 0),) * 8
    x0, x1 = torch.randn(2, 8, 8, 8, dtype=torch.float64), torch.randn(2, 8, 8, 8, dtype=torch.float64)
    outs = {}
    for fast in (False, True):
        torch.manual_seed(0)
        cell = EvalCell(pairs, (2, 3, 4, 5), 8, 8, 4, False, False, fast=fast).double()
        outs[fast] = cell(x0, x1)
        assert _count_nodes(outs[fast], "ReluBackward0") == (9 if fast else 16)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-12, atol=1e-12)
