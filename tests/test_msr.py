"""MSR-DARTS (msrdarts.methods.msr): the genotype read off hand-set weights, srsoftmax mixing, and the
method's settings."""

import pytest
import torch

from msrdarts.genotype import edge_index
from msrdarts.errors import ConfigError
from msrdarts.methods.msr import msr_genotype, use_srsoftmax
from msrdarts.methods.stable_rank import stable_ranks
from msrdarts.nn.supernet import raw_weight

from _nets import small


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


def test_msr_refuses_ops_without_a_conv_and_brings_spectral_norms():
    from dataclasses import replace

    from msrdarts.config import SearchConfig
    from msrdarts.methods import get_method

    msr = get_method("msr")
    assert msr.defaults["spectral_norm"] is True and msr.score_key == "stable_rank" and msr.lower_wins
    with pytest.raises(ConfigError, match="skip_connect have none"):
        msr.validate(replace(SearchConfig(), primitives=("skip_connect", "sep_conv_3x3")))


def test_the_supernet_sums_until_a_method_adapts_it():
    net = small()
    assert net.mixer is None and net.arch_parameters() == [] and "cells.0.mix" not in net.state_dict()
    use_srsoftmax(net)
    assert "cells.0.mix" in net.state_dict() and net.mixing_weights(net.cells[0]) is net.cells[0].mix


def test_the_authors_preset_mixes_by_softmax_of_quirked_ranks_against_a_dense_reference(tmp_path):
    """``--preset authors``: every edge mixes its ops by softmax(-R), R each op's last conv's stable
    rank as a dense operator (brute force) on the resolution the authors' code uses: a reduction
    cell's stride-1 edges are ranked at the cell's input resolution (twice the side)."""
    from dataclasses import replace

    from _reference import dense_circular, stable_rank_dense
    from msrdarts.config import get_preset
    from msrdarts.genotype import edge_index
    from msrdarts.methods import get_method

    cfg = replace(get_preset("authors"), layers=3, channels=4)
    assert (cfg.mixing, cfg.authors_reduce_resolution, cfg.batch_size, cfg.train_portion) == ("srsoftmax", True,
                                                                                              128, 0.8)
    net = small()
    method = get_method(cfg.method)(cfg)
    method.adapt(net)
    method.setup(net, None, None)
    with torch.no_grad():   # move the weights so each cell's ranks differ
        for p in net.parameters():
            p.mul_(1 + 0.5 * torch.randn_like(p))
    method.new_epoch(0, fresh=True)   # the authors' code refreshes the mixing at every epoch
    for cell in net.cells:
        side = 8 // (2 ** sum(c.reduction for c in net.cells[:list(net.cells).index(cell) + 1]))
        for e, ((src, _), edge) in enumerate(zip(edge_index(4), cell.edges)):
            hw = 2 * side if cell.reduction and src >= 2 else side   # the quirk
            ranks = torch.tensor([stable_rank_dense(dense_circular(raw_weight(op.last_conv).double(), hw, hw))
                                  for op in edge.ops])
            torch.testing.assert_close(cell.mix[e].double(), torch.softmax(-ranks.double(), 0), rtol=1e-4, atol=1e-6)
