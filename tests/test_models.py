"""Networks: shapes for every protocol resolution, functional_call, seeded initialisation."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from splatdd.models import NETWORKS, ConvNet, default_depth, get_network

PROTOCOLS = [(1, 28, 28, 3), (3, 32, 32, 3), (3, 64, 64, 4), (3, 128, 128, 5), (3, 256, 256, 6)]
CROSS = ["AlexNet", "VGG11", "ResNet18", "ViT"]


pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


def _convs(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("c,h,w,depth", PROTOCOLS)
def test_convnet_protocol_shapes(c, h, w, depth):
    net = get_network("ConvNet", c, 10, (h, w), seed=0)
    assert isinstance(net, ConvNet) and default_depth((h, w)) == depth
    convs = _convs(net)
    assert len(convs) == depth
    assert all(cv.out_channels == 128 and cv.kernel_size == (3, 3) for cv in convs)
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == depth and all(n.num_groups == n.num_channels == 128 and n.affine
                                       for n in norms)
    assert sum(isinstance(m, nn.AvgPool2d) for m in net.modules()) == depth
    # every protocol ends on a 4x4 feature map (28 px is padded to 32 by the first conv)
    assert net.feature_shape == (128, 4, 4)
    assert convs[0].padding == ((3, 3) if (c, h) == (1, 28) else (1, 1))
    out = net(torch.randn(1, c, h, w))
    assert out.shape == (1, 10)


def test_convnet_named_depths_and_options():
    for d in (3, 4, 5, 6):
        net = get_network(f"ConvNetD{d}", 3, 7, 128)
        assert len(_convs(net)) == d
        assert net(torch.randn(2, 3, 128, 128)).shape == (2, 7)
    net = get_network("ConvNet", 1, 10, 28, depth=2, width=16, norm="batchnorm",
                      pool="maxpooling")
    assert len(_convs(net)) == 2 and net.feature_shape == (16, 8, 8)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    net = get_network("ConvNet", 3, 10, 16, depth=2, width=8, norm="none", pool="none")
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.AvgPool2d))
                   for m in net.modules())
    assert net.feature_shape == (8, 16, 16) and net(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError):
        get_network("ConvNet", 3, 10, 32, norm="weird")
    with pytest.raises(ValueError):
        get_network("ConvNet", 3, 10, 32, pool="weird")
    with pytest.raises(ValueError, match="unknown network"):
        get_network("LeNet5000", 3, 10, 32)
    with pytest.raises(ValueError, match="too deep"):
        get_network("ConvNetD6", 3, 10, 32)


@pytest.mark.parametrize("name", CROSS)
@pytest.mark.parametrize("c,h", [(1, 28), (3, 32)])
def test_cross_arch_small(name, c, h):
    net = get_network(name, c, 10, h, seed=1)
    out = net(torch.randn(3, c, h, h))
    assert out.shape == (3, 10) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name", CROSS)
def test_cross_arch_128_and_odd_sizes(name):
    net = get_network(name, 3, 5, 128, seed=1)
    assert net(torch.randn(1, 3, 128, 128)).shape == (1, 5)
    net = get_network(name, 1, 4, (48, 40), seed=1)      # in-between, non-square
    assert net(torch.randn(2, 1, 48, 40)).shape == (2, 4)


def test_mnist_padding_in_cross_arch():
    assert _convs(get_network("VGG11", 1, 10, 28))[0].padding == (3, 3)
    assert _convs(get_network("AlexNet", 1, 10, 28))[0].padding == (4, 4)
    assert _convs(get_network("VGG11", 3, 10, 32))[0].padding == (1, 1)


@pytest.mark.parametrize("name", ["ConvNet"] + CROSS)
def test_functional_call_matches_and_differentiates(name):
    net = get_network(name, 3, 10, 32, seed=0)
    x = torch.randn(1, 3, 32, 32)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    out = functional_call(net, params, (x,))
    torch.testing.assert_close(out, net(x))
    loss = nn.functional.cross_entropy(out, torch.tensor([3]))
    grads = torch.autograd.grad(loss, list(params.values()))
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    # other parameter values give other outputs (the call really uses them)
    shifted = {k: v + 0.05 for k, v in params.items()}
    assert not torch.allclose(functional_call(net, shifted, (x,)), out)


def test_functional_call_second_order_convnet():
    """TM/DC differentiate through an SGD step on the network weights."""
    net = get_network("ConvNet", 1, 10, 28, width=16, seed=0)
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    params = {k: v.detach().requires_grad_(True) for k, v in net.named_parameters()}
    loss = nn.functional.cross_entropy(functional_call(net, params, (x,)), torch.arange(4))
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    new = {k: p - 0.1 * g for (k, p), g in zip(params.items(), grads)}
    out = functional_call(net, new, (torch.randn(2, 1, 28, 28),)).square().sum()
    (gx,) = torch.autograd.grad(out, x)
    assert gx.abs().sum() > 0


def test_batchnorm_functional_call_with_buffers():
    net = get_network("ConvNet", 3, 10, 32, norm="batchnorm", width=16, seed=0)
    state = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    out = functional_call(net, state, (torch.randn(4, 3, 32, 32),))
    assert out.shape == (4, 10)


@pytest.mark.parametrize("name", NETWORKS)
def test_seeded_init_is_deterministic_and_leaks_no_rng(name):
    size = 128 if name in ("ConvNetD5", "ConvNetD6") else 28
    before = torch.get_rng_state()
    a = get_network(name, 1, 10, size, seed=123)
    b = get_network(name, 1, 10, size, seed=123)
    assert torch.equal(torch.get_rng_state(), before)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = get_network(name, 1, 10, size, seed=124)
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(),
                                                         c.state_dict().values()))
