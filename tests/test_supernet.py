import pytest
import torch

from msrdarts.genotype import edge_index
from msrdarts.errors import ConfigError
from msrdarts.nn.ops import OpConv
from msrdarts.primitives import MSR_PRIMITIVES
from msrdarts.methods.stable_rank import cell_types

from _nets import small


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
