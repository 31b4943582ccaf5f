"""A supernet's stable-rank tables (msrdarts.methods.stable_rank) against a brute-force FFT reference."""

import pytest
import torch

from msrdarts.genotype import edge_index
from msrdarts.errors import ConfigError
from msrdarts.nn.spectrum import conv_stable_rank
from msrdarts.methods.stable_rank import cell_types, stable_rank_table, stable_ranks
from msrdarts.nn.supernet import raw_weight

from _nets import small


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


def test_stable_ranks_need_conv_ops():
    net = small(primitives=("skip_connect", "sep_conv_3x3"))
    with pytest.raises(ConfigError, match="have no conv"):
        stable_ranks(net)
