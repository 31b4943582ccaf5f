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
