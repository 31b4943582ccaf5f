"""The DARTS baseline's architecture gradients (msrdarts.methods.darts) against autograd, in float64."""

import pytest
import torch
import torch.nn.functional as F

from msrdarts.methods.darts import Architect, add_alphas, alpha_genotype
from msrdarts.primitives import DARTS_PRIMITIVES
from msrdarts.nn.supernet import SuperNet


def _setup(primitives=DARTS_PRIMITIVES, impl="auto"):
    torch.manual_seed(0)
    net = add_alphas(SuperNet(3, 3, 4, 8, in_channels=1, primitives=primitives, spectral_norm=False,
                              impl=impl)).double()
    with torch.no_grad():
        net.alphas.normal_(0, 0.5)        # away from uniform, so the gradients are not degenerate
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9, weight_decay=3e-4)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
               for _ in range(3)]
    x0, y0 = batches[0]
    F.cross_entropy(net(x0), y0).backward()   # one real weight step: momentum buffers exist
    opt.step()
    opt.zero_grad(set_to_none=True)
    net.alphas.grad = None
    return net, opt, batches[1], batches[2]


def test_first_order_gradient_is_the_validation_loss_gradient():
    net, opt, (xt, yt), (xv, yv) = _setup()
    arch = Architect(net, opt, order=1)
    ours = arch.gradient(xt, yt, xv, yv)[0]
    reference = torch.autograd.grad(F.cross_entropy(net(xv), yv), net.alphas)[0]
    assert torch.allclose(ours, reference, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("primitives,impl", [(DARTS_PRIMITIVES, "reference"),
                                             (("sep_conv_3x3", "dil_conv_3x3"), "fused")])
def test_second_order_estimate_matches_the_exact_hypergradient(primitives, impl):
    net, opt, (xt, yt), (xv, yv) = _setup(primitives, impl)
    # A small finite-difference step: the check is of the implementation. DARTS's own 0.01 / ||g||
    # adds its approximation error, large on a network this tiny (ReLU kinks within the step).
    arch = Architect(net, opt, order=2, fd_scale=1e-6)
    names, weights = arch._weights()
    xi = opt.param_groups[0]["lr"]
    # Exact: differentiate L_val(w'(alpha), alpha) through the virtual step (double backward).
    virtual = arch.virtual_step(names, weights, xt, yt, xi, create_graph=True)
    exact = torch.autograd.grad(arch._loss(names, virtual, xv, yv), net.alphas)[0]
    estimate = arch.gradient(xt, yt, xv, yv)[0]
    first = Architect(net, opt, order=1).gradient(xt, yt, xv, yv)[0]
    assert (exact - first).norm() > 1e-3 * exact.norm()         # the second-order term matters here
    assert torch.allclose(estimate, exact, rtol=1e-5, atol=1e-7 * exact.abs().max())


def test_step_moves_only_the_alphas_with_adam():
    net, opt, (xt, yt), (xv, yv) = _setup()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    arch = Architect(net, opt, lr=3e-4, weight_decay=1e-3, order=2)
    g = arch.gradient(xt, yt, xv, yv)[0] + 1e-3 * net.alphas.detach()
    arch.step(xt, yt, xv, yv)
    # Adam's first step is lr * sign(g) (up to its epsilon).
    expected = before["alphas"] - 3e-4 * g / (g.abs() + 1e-8)
    assert torch.allclose(net.alphas.detach(), expected, atol=1e-9)
    for n, p in net.named_parameters():
        if n != "alphas":
            assert torch.equal(p, before[n]), n
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert net.alphas.grad is None


def test_alpha_derivation_uses_the_shared_routine_without_none():
    net, *_ = _setup()
    with torch.no_grad():
        net.alphas.zero_()
        net.alphas[:, :, DARTS_PRIMITIVES.index("none")] = 10.0          # none dominates everywhere...
        net.alphas[0, :, DARTS_PRIMITIVES.index("sep_conv_3x3")] = 1.0  # ...but is never chosen
        net.alphas[0, 0, DARTS_PRIMITIVES.index("skip_connect")] = 2.0  # edge (0 -> 2) prefers skip
    geno = alpha_genotype(net)
    assert "none" not in geno.ops()
    assert geno.normal[0] == ("skip_connect", 0) and all(op == "sep_conv_3x3" for op, _ in geno.normal[1:])
