"""The BN-statistic loss against a hand computation, the hooks' lifetime, and the crops."""
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from splatdd_sre2l.augment import apply_crops, expand_groups, sample_crops, CropParams
from splatdd_sre2l.bn import BNStatistics


def _tiny_bn_net() -> nn.Module:
    """input -> BN(2) -> 1x1 conv (weight 2 on channel 0->0, 1 on 1->1, bias 0) -> BN(2)."""
    conv = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0] = 2.0
        conv.weight[1, 1, 0, 0] = 1.0
    bn1, bn2 = nn.BatchNorm2d(2, affine=False), nn.BatchNorm2d(2, affine=False)
    bn1.running_mean.copy_(torch.tensor([0.5, -1.0]))
    bn1.running_var.copy_(torch.tensor([2.0, 0.25]))
    bn2.running_mean.copy_(torch.tensor([0.0, 1.0]))
    bn2.running_var.copy_(torch.tensor([1.0, 1.0]))
    return nn.Sequential(bn1, conv, bn2).eval()


def _hand_terms(values_by_channel, rmean, rvar):
    """||mean - rmean|| + ||var - rvar|| with plain Python arithmetic (biased variance)."""
    d_mean, d_var = 0.0, 0.0
    for vals, m0, v0 in zip(values_by_channel, rmean, rvar):
        m = sum(vals) / len(vals)
        v = sum((a - m) ** 2 for a in vals) / len(vals)
        d_mean += (m - m0) ** 2
        d_var += (v - v0) ** 2
    return math.sqrt(d_mean) + math.sqrt(d_var)


def test_bn_loss_matches_hand_computation():
    net = _tiny_bn_net()
    # two images of 2 channels, 1x2 pixels
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]],
                      [[[-1.0, 1.0]], [[4.0, -2.0]]]])
    ch0, ch1 = [1.0, 3.0, -1.0, 1.0], [0.0, 2.0, 4.0, -2.0]
    t1 = _hand_terms([ch0, ch1], [0.5, -1.0], [2.0, 0.25])
    # the second BN sees the first BN's output (eval: (x - rm) / sqrt(rv + eps)) scaled by the conv
    eps = 1e-5
    y0 = [2.0 * (a - 0.5) / math.sqrt(2.0 + eps) for a in ch0]
    y1 = [1.0 * (a + 1.0) / math.sqrt(0.25 + eps) for a in ch1]
    t2 = _hand_terms([y0, y1], [0.0, 1.0], [1.0, 1.0])
    with BNStatistics(net, first_bn_multiplier=10.0) as bn:
        net(x)
        got = bn.loss()
    assert got.item() == pytest.approx(10.0 * t1 + t2, rel=1e-5)
    # groups: each image alone, mean over the two groups
    with BNStatistics(net, sizes=[1, 1]) as bn:
        net(x)
        got = bn.loss()
    g = [_hand_terms([ch0[2 * i:2 * i + 2], ch1[2 * i:2 * i + 2]], [0.5, -1.0], [2.0, 0.25])
         + _hand_terms([y0[2 * i:2 * i + 2], y1[2 * i:2 * i + 2]], [0.0, 1.0], [1.0, 1.0])
         for i in range(2)]
    assert got.item() == pytest.approx(sum(g) / 2, rel=1e-5)


def test_bn_loss_gradient_float64():
    net = _tiny_bn_net().double()
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, requires_grad=True)

    def f(inp):
        with BNStatistics(net) as bn:
            net(inp)
            return bn.loss()
    assert torch.autograd.gradcheck(f, (x,))


def test_hooks_exist_only_inside_the_context():
    net = _tiny_bn_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    attrs = [set(vars(m)) for m in net.modules()]
    stats = BNStatistics(net)
    with stats:
        assert all(len(m._forward_hooks) == 1 for m in net.modules()
                   if isinstance(m, nn.BatchNorm2d))
        net(torch.randn(2, 2, 1, 2))
        stats.loss().backward()
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    assert [set(vars(m)) for m in net.modules()] == attrs
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert stats._terms == [] and stats._handles == []
    with pytest.raises(RuntimeError, match="forward"):
        with BNStatistics(net) as bn:
            bn.loss()


def test_no_bn_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="BatchNorm"):
        BNStatistics(nn.Sequential(nn.Conv2d(1, 1, 1)))


def test_full_crop_is_identity_and_flip_mirrors():
    x = torch.randn(2, 3, 5, 7)
    one = torch.ones(2)
    ident = CropParams(torch.zeros(2), torch.zeros(2), one, one, torch.tensor([False, True]))
    y = apply_crops(x, ident)
    assert torch.allclose(y[0], x[0], atol=1e-6)
    assert torch.allclose(y[1], x[1].flip(-1), atol=1e-6)


def test_quarter_crop_picks_the_top_left_block():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    c = CropParams(torch.tensor([-0.5]), torch.tensor([-0.5]), torch.tensor([0.5]),
                   torch.tensor([0.5]), torch.tensor([False]))
    assert torch.allclose(apply_crops(x, c, size=(2, 2)), x[:, :, :2, :2], atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lo=st.floats(0.05, 1.0))
def test_sampled_crops_lie_inside_and_respect_scale(seed, lo):
    p = sample_crops(64, torch.Generator().manual_seed(seed), scale=(lo, 1.0))
    assert bool(((p.cx.abs() + p.sx) <= 1 + 1e-6).all() and ((p.cy.abs() + p.sy) <= 1 + 1e-6).all())
    area = p.sx * p.sy
    fallback = (p.sx == 1) & (p.sy == 1)          # no attempt fitted: the whole image
    assert bool((area[~fallback] >= lo - 1e-5).all() and (area <= 1 + 1e-6).all())


def test_crops_are_seeded_and_shared_per_group():
    a = sample_crops(3, torch.Generator().manual_seed(5))
    b = sample_crops(3, torch.Generator().manual_seed(5))
    assert torch.equal(a.cx, b.cx) and torch.equal(a.flip, b.flip)
    e = expand_groups(a, [2, 1, 3])
    assert e.cx.tolist() == [a.cx[0]] * 2 + [a.cx[1]] + [a.cx[2]] * 3
    with pytest.raises(ValueError, match="one crop per group"):
        expand_groups(a, [1, 1])
    with pytest.raises(ValueError, match="scale"):
        sample_crops(2, torch.Generator(), scale=(0.0, 1.0))
    whole = sample_crops(50, torch.Generator().manual_seed(1), scale=(1.0, 1.0))
    assert bool((whole.sx == 1).all() and (whole.sy == 1).all() and (whole.cx == 0).all())
    with pytest.raises(ValueError, match="one crop per image"):
        apply_crops(torch.zeros(2, 1, 4, 4), a)


def test_crop_is_differentiable():
    x = torch.randn(2, 1, 6, 6, requires_grad=True)
    y = apply_crops(x, sample_crops(2, torch.Generator().manual_seed(0)))
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
