"""PC-DARTS (msrdarts.nn.edges, msrdarts.methods.pcdarts) against hand-built references: the
partial-channel edge channel by channel, edge normalisation, derivation on a hand-computed table,
the warm-up and the settings."""

import math

import pytest
import torch
import torch.nn.functional as F

from msrdarts.api import search_config
from msrdarts.errors import ConfigError
from msrdarts.genotype import edge_index
from msrdarts.methods import get_method
from msrdarts.methods.darts import Architect
from msrdarts.methods.pcdarts import PCDARTS, node_softmax
from msrdarts.nn.edges import PartialMixedOp
from msrdarts.nn.supernet import SuperNet
from msrdarts.primitives import DARTS_PRIMITIVES, MSR_PRIMITIVES

C = 8


def _max_pool_by_hand(x):
    """2x2 windows, stride 2, the last row / column alone where the side is odd."""
    n, c, h, w = x.shape
    out = torch.empty(n, c, (h + 1) // 2, (w + 1) // 2, dtype=x.dtype)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            out[:, :, i, j] = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].amax(dim=(2, 3))
    return out


@pytest.mark.parametrize("k", [1, 2, 4])   # every K dividing C = 8 into parts of >= 2 channels
@pytest.mark.parametrize("stride,side", [(1, 6), (2, 6), (2, 7)])
def test_partial_edge_is_slice_ops_concat_and_shuffle_channel_by_channel(k, stride, side):
    torch.manual_seed(k)
    edge = PartialMixedOp(C, stride, DARTS_PRIMITIVES, k).double().eval()
    x = torch.randn(2, C, side, side, dtype=torch.float64)
    w = torch.softmax(torch.randn(len(DARTS_PRIMITIVES), dtype=torch.float64), 0)
    out = edge(x, w)
    part = C // k
    ops_out = sum(w[i] * op(x[:, :part]) for i, op in enumerate(edge.ops))   # ops built for C/K channels
    bypass = x[:, part:] if stride == 1 else _max_pool_by_hand(x[:, part:])
    joined = torch.cat([ops_out, bypass], dim=1)
    assert out.shape == joined.shape == (2, C, ops_out.shape[2], ops_out.shape[3])
    for g in range(k):                      # shuffle with k groups: channel g * part + i -> i * k + g
        for i in range(part):
            assert torch.allclose(out[:, i * k + g], joined[:, g * part + i], atol=1e-12), (g, i)


def test_partial_edge_ops_see_only_their_channels():
    """The op weights' gradients depend on the first C/K channels only; the bypassed channels
    reach the output unchanged (gradient 1 through the shuffle's permutation)."""
    torch.manual_seed(0)
    k, part = 4, C // 4
    edge = PartialMixedOp(C, 1, MSR_PRIMITIVES, k).double().eval()
    assert all(p.shape[0] in (part, 1) or p.shape[1] == part for p in edge.parameters() if p.dim() == 4)
    x = torch.randn(2, C, 6, 6, dtype=torch.float64)
    up = torch.randn(2, C, 6, 6, dtype=torch.float64)    # the same upstream gradient for both inputs

    def grads(inp):
        inp = inp.clone().requires_grad_(True)
        (edge(inp) * up).sum().backward()
        g = [p.grad.clone() for p in edge.parameters()]
        edge.zero_grad(set_to_none=True)
        return g, inp.grad

    g1, gx = grads(x)
    x2 = x.clone()
    x2[:, part:] += torch.randn_like(x2[:, part:])          # change only the bypassed channels
    g2, _ = grads(x2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert all(a.abs().sum() > 0 for a in g1)
    # the bypassed channel c (position c in the concat) lands at output (c % part) * k + c // part
    for c in range(part, C):
        assert torch.allclose(gx[:, c], up[:, (c % part) * k + c // part])


def test_node_softmax_normalises_each_nodes_incoming_edges():
    betas = torch.tensor([0.0, math.log(3.0),                     # node 2: 1/4, 3/4
                          0.0, 0.0, 0.0,                          # node 3: thirds
                          math.log(2.0), 0.0, 0.0, math.log(4.0),   # node 4: 2/7, 1/7, 1/7, 4/7
                          0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    expected = [1 / 4, 3 / 4, 1 / 3, 1 / 3, 1 / 3, 2 / 8, 1 / 8, 1 / 8, 4 / 8, *[1 / 5] * 5]
    assert torch.allclose(node_softmax(betas, 4), torch.tensor(expected, dtype=torch.float64))


def _pc_net(k=2, primitives=DARTS_PRIMITIVES, **kw):
    cfg, _ = search_config("quick", method="pc-darts", space="darts" if primitives == DARTS_PRIMITIVES else "msr",
                           layers=3, channels=4, partial_channels=k, **kw)
    torch.manual_seed(0)
    net = SuperNet(10, 3, 4, 8, in_channels=1, primitives=cfg.ops, spectral_norm=False,
                   **PCDARTS.supernet_options(cfg))
    method = PCDARTS(cfg)
    method.adapt(net)
    return net.double(), method, cfg


def test_cell_sums_edges_weighted_by_normalised_betas():
    net, _, _ = _pc_net()
    with torch.no_grad():
        net.alphas.normal_()
        net.betas.normal_()
    net.eval()
    cell = net.cells[0]
    s0, s1 = torch.randn(2, 2, 12, 8, 8, dtype=torch.float64)     # the stem's 3C channels at 8 x 8
    a = torch.softmax(net.alphas[0], -1)
    b = node_softmax(net.betas[0], 4)
    states = [cell.pre0(s0), cell.pre1(s1)]
    for j in range(4):
        states.append(sum(b[e] * cell.edges[e](states[i], a[e])
                          for e, (i, t) in enumerate(edge_index(4)) if t == j + 2))
    assert torch.allclose(cell(s0, s1, net.mixing_weights(cell), net.edge_weights(cell)),
                          torch.cat(states[2:], 1), atol=1e-12)


def test_derivation_ranks_edges_by_beta_times_strongest_alpha_without_none():
    """A hand-computed table: edges of node 2 (0->2, 1->2) and node 3 (0->3, 1->3, 2->3)."""
    net, method, _ = _pc_net()
    ops = net.primitives                       # none, max_pool, avg_pool, skip, sep3, sep5, dil3, dil5
    alpha = torch.zeros(2, 14, len(ops), dtype=torch.float64)
    beta = torch.zeros(2, 14, dtype=torch.float64)
    sep3, dil5, skip, none = ops.index("sep_conv_3x3"), ops.index("dil_conv_5x5"), ops.index("skip_connect"), 0
    # node 2: edge 0->2 has the strongest alpha (sep3: 3.0), but its beta is low; edge 1->2's
    # strongest op is `none` (excluded), then dil5 at 1.0.
    alpha[0, 0, sep3] = 3.0
    alpha[0, 1, none], alpha[0, 1, dil5] = 5.0, 1.0
    beta[0, 0], beta[0, 1] = 0.0, 5.0
    # node 3: edge 2->3 wins by beta although its best alpha is lower; 0->3 second
    alpha[0, 2, skip] = 2.0
    alpha[0, 3, sep3] = 2.0
    alpha[0, 4, dil5] = 1.5
    beta[0, 2], beta[0, 3], beta[0, 4] = 0.5, -2.0, 1.5
    with torch.no_grad():
        net.alphas.copy_(alpha)
        net.betas.copy_(beta)
    d = method.derive(net)
    # strengths by hand: softmax over the 8 ops of each edge times the node's softmax of betas
    sa = torch.softmax(alpha[0], -1)
    s2 = torch.softmax(torch.tensor([0.0, 5.0], dtype=torch.float64), 0)
    s3 = torch.softmax(torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64), 0)
    scores = d.scores.double()          # tables are kept in float32
    assert torch.allclose(scores[0, 0, sep3], sa[0, sep3] * s2[0], rtol=1e-6)
    assert torch.allclose(scores[0, 4, dil5], sa[4, dil5] * s3[2], rtol=1e-6)
    # node 2: 1->2 (dil5, e^1/(e^5+e^1+6) x 0.993 = 0.017) vs 0->2 (sep3, e^3/(e^3+7) x 0.0067 = 0.005)
    assert sa[1, dil5] * s2[1] > sa[0, sep3] * s2[0]
    assert d.genotype.normal[:2] == (("dil_conv_5x5", 1), ("sep_conv_3x3", 0))
    # node 3: 2->3 (dil5: 0.39 x 0.715 = 0.28), then 0->3 (skip: 0.51 x 0.263 = 0.135); 1->3 (0.51 x 0.022)
    # drops out, though without betas 0->3 and 1->3 would tie ahead of 2->3
    assert d.genotype.normal[2:4] == (("dil_conv_5x5", 2), ("skip_connect", 0))


def test_warm_up_trains_no_architecture_until_arch_start():
    net, method, cfg = _pc_net(arch_start=2, epochs=4)
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1)
    from msrdarts.device import Accel
    from msrdarts.methods.base import SearchContext

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=g), torch.randint(0, 10, (4,), generator=g))]
    method.setup(net, opt, SearchContext(accel=Accel.resolve(torch.device("cpu")), average=None,
                                         valid_batches=lambda seed, start: iter(batches * 10)))
    before = [p.detach().clone() for p in net.arch_parameters()]
    for epoch in (0, 1):
        method.new_epoch(epoch, True)
        assert method.step_hook(0, 0) is None
    method.new_epoch(2, True)
    hook = method.step_hook(0, 0)
    hook(0, *batches[0])
    after = net.arch_parameters()
    assert all(not torch.equal(a, b) for a, b in zip(before, after))   # alphas and betas both step
    assert isinstance(method.architect, Architect) and len(method.architect.alphas) == 2


def test_settings_are_checked_with_one_line():
    with pytest.raises(ConfigError, match="--partial-channels=3: must divide --channels=8"):
        search_config("quick", method="pc-darts", partial_channels=3)
    with pytest.raises(ConfigError, match="--partial-channels=8: must divide --channels=8 into parts of at least 2"):
        search_config("quick", method="pc-darts", partial_channels=8)
    with pytest.raises(ConfigError, match="--arch-start=8: must be below --epochs=8"):
        search_config("quick", method="pc-darts", arch_start=8)
    with pytest.raises(ConfigError, match="no fused forward"):
        search_config("quick", method="pc-darts", impl="fused")
    with pytest.raises(ConfigError, match="--method pc-darts trains without spectral normalisation"):
        search_config("quick", method="pc-darts", spectral_norm=True)


def test_presets_hold_the_published_settings():
    cfg, _ = search_config("pc-darts-cifar10")
    assert (cfg.method, cfg.ops, cfg.layers, cfg.channels, cfg.partial_channels) == ("pc-darts", DARTS_PRIMITIVES, 8,
                                                                                     16, 4)
    assert (cfg.batch_size, cfg.lr, cfg.lr_min, cfg.train_portion, cfg.epochs) == (256, 0.1, 0.0, 0.5, 50)
    assert (cfg.arch_lr, cfg.arch_weight_decay, cfg.arch_start, cfg.order, cfg.spectral_norm) == (6e-4, 1e-3, 15, 1,
                                                                                                  False)
    cfg, _ = search_config("pc-darts-imagenet")
    assert (cfg.dataset, cfg.partial_channels, cfg.batch_size, cfg.lr, cfg.arch_lr, cfg.arch_start) == (
        "imagenet", 2, 1024, 0.5, 6e-3, 35)
    assert (cfg.subset, cfg.subset_valid) == (0.1, 0.025)
    # a switch from PC-DARTS to DARTS resets what only PC-DARTS and DARTS read to the plain defaults
    cfg, origin = search_config("pc-darts-imagenet", method="darts")
    assert (cfg.partial_channels, cfg.arch_start, cfg.arch_lr) == (4, 0, 3e-4)
    assert {"partial_channels", "arch_start", "arch_lr"} <= set(origin["method_defaults"])


def test_weight_steps_leave_the_architecture_alone():
    assert get_method("pc-darts") is PCDARTS
    net, _, _ = _pc_net()
    assert net.impl == "reference"
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    F.cross_entropy(net(x), torch.tensor([0, 1, 2])).backward()
    assert net.alphas.grad is None and net.betas.grad is None     # only the Architect's steps train them
    assert all(p.grad is not None for p in net.weight_parameters() if p.requires_grad)


@pytest.mark.slow   # a real search: about a minute on 2 cores
def test_short_search_on_digits_writes_a_valid_genotype(tmp_path):
    from msrdarts.api import search
    from msrdarts.genotype import read_genotype_file
    from msrdarts.runs import folder as F

    found = search("quick", out=tmp_path / "pc", method="pc-darts", epochs=2, arch_start=1, progress="off",
                   plots=False, tensorboard=False, log=lambda *_: None)
    g = read_genotype_file(tmp_path / "pc" / F.GENOTYPE)
    assert g == found.genotype and len(g.normal) == len(g.reduce) == 8
    assert all(op in MSR_PRIMITIVES for op, _ in g.normal + g.reduce)
    h = F.read_history(tmp_path / "pc")
    assert [r["score_key"] for r in h] == ["strength"] * 2
    # epoch 1 trained the weights only: flagged, and never the genotype's epoch
    assert h[0]["warmup"] is True and "warmup" not in h[1] and found.best_epoch == 2
    for r in h:   # per node the strengths sum to the node's betas' softmax (1) times a probability (<= 1)
        table = torch.tensor(r["strength"]["normal"])
        start = 0
        for j in range(4):
            assert 0 < table[start:start + 2 + j].sum() <= 1 + 1e-5
            start += 2 + j
    for r in h:   # the recorded edge weights: softmax over each node's incoming edges
        for cell in ("normal", "reduce"):
            b = r["beta"][cell]
            assert [round(sum(b[s:s + n]), 5) for s, n in ((0, 2), (2, 3), (5, 4), (9, 5))] == [1.0] * 4
    from msrdarts.views.plots import plot_run

    plot_run(tmp_path / "pc", formats=("svg",))
    svg = (tmp_path / "pc" / "plots" / "betas.svg").read_text()
    assert 'id="beta-normal"' in svg and 'id="beta-reduce"' in svg
    # the architecture took one Adam step per weight step of epoch 2 only: 1,150 search-train digits
    # in batches of 64, the last partial one dropped, make 17 (34 had the warm-up been skipped)
    from msrdarts.runs.checkpoint import load_checkpoint
    ck = load_checkpoint(tmp_path / "pc" / F.CHECKPOINT)
    assert len(ck["arch_optimizer"]["state"]) == 2         # alphas and betas
    assert [float(s["step"]) for s in ck["arch_optimizer"]["state"].values()] == [17.0, 17.0]
