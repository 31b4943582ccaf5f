import pytest
import torch

from msrdarts.genotype import edge_index
from msrdarts.errors import ConfigError
from msrdarts.nn.ops import MSR_PRIMITIVES, OpConv
from msrdarts.nn.spectrum import conv_stable_rank
from msrdarts.methods.msr import msr_genotype, use_srsoftmax
from msrdarts.methods.stable_rank import cell_types, stable_rank_table, stable_ranks
from msrdarts.nn.supernet import SuperNet, raw_weight


def small(mixing="sum", **kw):
    torch.manual_seed(0)
    args = dict(num_classes=10, layers=3, channels=4, input_size=8, in_channels=1, spectral_norm=False)
    args.update(kw)
    net = SuperNet(**args)
    return use_srsoftmax(net) if mixing == "srsoftmax" else net


def test_layout_reductions_and_channels():
    net = small(layers=6)
    assert cell_types(net).tolist() == [False, False, True, False, True, False]   # floor(6/3), floor(12/3)
    # Each cell: 14 mixed edges x 4 ops; stride 2 exactly on the input edges of reduction cells.
    for cell in net.cells:
        assert len(cell.edges) == 14
        for (src, _), edge in zip(edge_index(4), cell.edges):
            first = next(m for m in edge.ops[0].modules() if isinstance(m, OpConv))
            assert first.stride == ((2, 2) if cell.reduction and src < 2 else (1, 1))
    x = torch.randn(2, 1, 8, 8)
    assert net(x).shape == (2, 10)
    # BN inside ops is affine-free during search (SPEC section 1).
    for edge in net.cells[0].edges:
        for bn in edge.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                assert not bn.affine


def test_imagenet_stem_resolutions():
    net = small(stem="imagenet", input_size=64, in_channels=3, layers=3)
    # stem: 64 -> 16 (s0) -> 8 (s1); cell 0 (normal) works at 8x8, reduction cells at 4 and 2.
    assert net.cells[0].edges[0].ops[0].last_conv.input_hw == (8, 8)
    assert net.cells[1].edges[0].ops[0].last_conv.input_hw == (4, 4)
    assert net.cells[2].edges[0].ops[0].last_conv.input_hw == (2, 2)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_recorded_input_sizes_in_reduction_cells():
    net = small(layers=3, input_size=8)     # cells: normal(8), reduce(8->4), reduce(4->2)
    red = net.cells[1]
    sep = red.edges[0].ops[MSR_PRIMITIVES.index("sep_conv_3x3")]
    convs = [m for m in sep.modules() if isinstance(m, OpConv)]
    assert [c.input_hw for c in convs] == [(8, 8), (4, 4), (4, 4), (4, 4)]
    assert red.edges[-1].ops[0].last_conv.input_hw == (4, 4)


def test_stable_ranks_match_fft_reference_and_type_means():
    net = small(layers=4, channels=3)
    ranks = stable_ranks(net)
    assert ranks.shape == (4, 14, 4)
    for li, cell in enumerate(net.cells):
        for e, edge in enumerate(cell.edges):
            for o, op in enumerate(edge.ops):
                c = op.last_conv
                ref = conv_stable_rank(raw_weight(c).double(), c.input_hw)
                assert ranks[li, e, o].item() == pytest.approx(ref, rel=1e-4)
    table = stable_rank_table(net)
    red = cell_types(net)
    torch.testing.assert_close(table[0], ranks[~red].mean(0))
    torch.testing.assert_close(table[1], ranks[red].mean(0))
    per_pixel = stable_ranks(net, resolution_normalized=True)
    hw = torch.tensor([[[float(op.last_conv.input_hw[0] * op.last_conv.input_hw[1]) for op in e.ops]
                        for e in c.edges] for c in net.cells])
    torch.testing.assert_close(per_pixel * hw, ranks)


def test_authors_quirk_scales_intermediate_edges_of_reduction_cells_by_4():
    net = small(layers=3, input_size=8)
    plain, quirk = stable_ranks(net), stable_ranks(net, authors_quirk=True)
    stride1 = torch.tensor([src >= 2 for src, _ in edge_index(4)])
    for li, cell in enumerate(net.cells):
        factor = torch.where(stride1, 4.0, 1.0) if cell.reduction else torch.ones(14)
        torch.testing.assert_close(quirk[li], plain[li] * factor[:, None])


def _set_diag(conv, diag):
    C = conv.weight.shape[0]
    d = torch.zeros(C)
    d[:len(diag)] = torch.tensor(diag)
    with torch.no_grad():
        raw_weight(conv).copy_(torch.diag(d).view(C, C, 1, 1))


def test_genotype_read_off_weights_by_hand():
    """Give the ops we want exact low stable ranks and check the derivation against a hand-made answer.

    diag(1) has stable rank 1, diag(1, 0.5) 1.25, near-identity about C: times H*W of each conv.
    """
    net = small(layers=3, channels=4)
    # (source, target) -> (op index, diagonal); per node the diag(1) edge must come first.
    chosen = {(1, 2): (0, [1.0]), (0, 2): (1, [1.0, 0.5]),
              (2, 3): (2, [1.0]), (0, 3): (3, [1.0, 0.5]),
              (3, 4): (1, [1.0]), (1, 4): (0, [1.0, 0.5]),
              (0, 5): (3, [1.0]), (4, 5): (2, [1.0, 0.5])}
    torch.manual_seed(1)
    for cell in net.cells:
        for (src, dst), edge in zip(edge_index(4), cell.edges):
            for o, op in enumerate(edge.ops):
                w = raw_weight(op.last_conv)
                with torch.no_grad():
                    w.copy_(torch.eye(w.shape[0]).view_as(w) + 0.01 * torch.randn_like(w))
                if (src, dst) in chosen and o == chosen[(src, dst)][0]:
                    _set_diag(op.last_conv, chosen[(src, dst)][1])
    expect = [("sep_conv_3x3", 1), ("sep_conv_5x5", 0),
              ("dil_conv_3x3", 2), ("dil_conv_5x5", 0),
              ("sep_conv_5x5", 3), ("sep_conv_3x3", 1),
              ("dil_conv_5x5", 0), ("dil_conv_3x3", 4)]
    g = msr_genotype(net)
    assert list(g.normal) == expect
    assert list(g.reduce) == expect


def test_srsoftmax_mixing_weights():
    net = small(mixing="srsoftmax")
    ranks = stable_ranks(net)
    for cell, r in zip(net.cells, ranks):
        torch.testing.assert_close(cell.mix, torch.softmax(-r.double(), -1).float())
        assert torch.allclose(cell.mix.sum(1), torch.ones(14))
    # The weighted forward equals the explicit weighted sum of ops on one edge.
    edge, w = net.cells[0].edges[3], net.cells[0].mix[3]
    x = torch.randn(2, 4, 8, 8)
    net.eval()
    torch.testing.assert_close(edge(x, w), sum(wi * op(x) for wi, op in zip(w, edge.ops)))
    torch.testing.assert_close(edge(x), sum(op(x) for op in edge.ops))


@pytest.mark.parametrize("kw, fragment", [
    (dict(layers=2), "layers=2"),
    (dict(channels=1), "channels=1"),
    (dict(stem="resnet"), "unknown stem 'resnet'"),
    (dict(primitives=("sep_conv_3x3", "conv_7x7")), "unknown op(s) conv_7x7"),
    (dict(input_size=0), "input-size=0"),
])
def test_bad_arguments(kw, fragment):
    with pytest.raises(ConfigError) as info:
        small(**kw)
    assert fragment in str(info.value)


def test_stable_ranks_need_conv_ops():
    net = small(primitives=("skip_connect", "sep_conv_3x3"))
    with pytest.raises(ConfigError, match="have no conv"):
        stable_ranks(net)
