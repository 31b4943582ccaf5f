"""Op facts (msrdarts.primitives): one home for what the code knows about each op."""

import pytest
import torch

from msrdarts import primitives as P
from msrdarts.errors import ConfigError
from msrdarts.nn import ops
from msrdarts.nn.ops import OpConv, get_op, list_ops, register_op


def test_every_built_op_has_facts_and_every_space_op_is_built():
    assert set(list_ops()) == set(P.list_primitives())
    for space, names in P.SPACES.items():
        assert set(names) <= set(list_ops()), space
    assert P.space_ops("darts") == tuple(n for n in P.DARTS_PRIMITIVES if n != "none")


@pytest.mark.parametrize("name", P.DARTS_PRIMITIVES)
def test_the_facts_match_the_modules(name):
    """'conv': the op ends in an op conv (``last_conv``); 'search_bn': the DARTS pools."""
    fact = P.get_primitive(name)
    module = get_op(name)(4, 1, False)
    has_conv = any(isinstance(m, OpConv) for m in module.modules())
    assert fact.conv == has_conv == hasattr(module, "last_conv")
    assert fact.search_bn == name.endswith("pool_3x3")
    assert fact.fusable == fact.conv   # the fused path covers exactly the sep and dil convs
    assert len({P.short_name(n) for n in P.DARTS_PRIMITIVES}) == len(P.DARTS_PRIMITIVES)
    assert P.colour(name).startswith("#") and P.colour("someone_elses_op") == "#444444"


def test_helpers():
    assert P.can_fuse(P.MSR_PRIMITIVES) and not P.can_fuse(P.DARTS_PRIMITIVES)
    assert P.convless(P.DARTS_PRIMITIVES) == ["none", "max_pool_3x3", "avg_pool_3x3", "skip_connect"]
    with pytest.raises(ConfigError, match="unknown op 'conv_9x9'; known ops: none, "):
        P.get_primitive("conv_9x9")
    with pytest.raises(ConfigError, match="--space='nb201': unknown; allowed: msr, darts"):
        P.space_ops("nb201")


def test_a_new_op_brings_its_facts_to_every_view(monkeypatch):
    monkeypatch.setattr(ops, "_OPS", dict(ops._OPS))
    monkeypatch.setattr(P, "_PRIMITIVES", dict(P._PRIMITIVES))

    @register_op("conv_1x1", P.Primitive("conv_1x1", "c1", "#123456", conv=True))
    def _conv1(C, stride, affine):
        return torch.nn.Conv2d(C, C, 1, stride=stride, bias=False)

    assert P.short_name("conv_1x1") == "c1" and P.colour("conv_1x1") == "#123456"
    assert P.convless(("conv_1x1",)) == [] and not P.can_fuse(("conv_1x1",))
