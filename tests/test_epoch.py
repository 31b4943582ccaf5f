import pytest
import torch
from torch import nn

from msrdarts.runs.epoch import evaluate, recalibrate_bn, train_one_epoch
from msrdarts.nn.ops import OpConv, record_input_sizes
from msrdarts.nn.spectral import apply_spectral_norm


def _batches(n_batches=3, bs=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 2, 4, 4, generator=g) * (i + 1) + i, torch.randint(0, 3, (bs,), generator=g))
            for i in range(n_batches)]


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(OpConv(2, 2, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(2, affine=False),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    record_input_sizes(m, torch.zeros(1, 2, 4, 4))
    apply_spectral_norm(m)
    return m


def test_recalibrate_bn_is_the_plain_mean_of_batch_statistics():
    m = _model()
    batches = _batches()
    u0 = m[0].parametrizations.weight[0].u.clone()
    m.train()
    recalibrate_bn(m, batches, batches=2)     # only the first two batches count
    assert m.training and m[1].momentum == 0.1                  # mode and settings restored
    with torch.no_grad():
        m.eval()
        feats = [m[0](x) for x, _ in batches[:2]]
    mean_ref = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var_ref = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    bn = m[1]
    torch.testing.assert_close(bn.running_mean, mean_ref)
    torch.testing.assert_close(bn.running_var, var_ref)
    assert torch.equal(m[0].parametrizations.weight[0].u, u0)   # power iteration did not advance


def test_evaluate_matches_direct_computation():
    m = _model()
    batches = _batches()
    out = evaluate(m, batches, torch.device("cpu"), progress=False)
    m.eval()
    with torch.no_grad():
        logits = torch.cat([m(x) for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    assert out["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    assert out["acc"] == pytest.approx(100.0 * (logits.argmax(1) == y).double().mean().item())


def test_train_one_epoch_clips_and_reports():
    m = _model()
    batches = _batches()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    grads = []
    hook = m[4].weight.register_hook(lambda g: grads.append(g))
    out = train_one_epoch(m, batches, opt, torch.device("cpu"), grad_clip=1e-3, progress=False)
    hook.remove()
    assert len(grads) == 3 and out["images_per_s"] > 0
    # after clipping, the total gradient norm of every step is at most the threshold
    total = torch.sqrt(sum(p.grad.square().sum() for p in m.parameters() if p.grad is not None))
    assert total <= 1e-3 * (1 + 1e-4)
    assert 0.0 <= out["acc"] <= 100.0 and out["loss"] > 0
