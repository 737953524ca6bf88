"""ConvNet's CPU fast paths (the fused first block, Winograd for the wider convolutions, the fused
norm blocks) against the same network run module by module (nn.Conv2d, GroupNorm, ReLU,
AvgPool2d: PyTorch's own kernels), including the Winograd filter cache across weight changes."""
from __future__ import annotations

import copy

import pytest
import torch

from splatdd.models import first_order, get_network
from splatdd.render import _C
from splatdd.winograd import MIN_CHANNELS

pytestmark = pytest.mark.skipif(
    not all(hasattr(_C(), op) for op in ("conv_norm_act_pool_backward", "winograd_input_transform")),
    reason="splatdd._C lacks the fused ops (an old build): rebuild with pip install -e .")


def _modules(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The logits through the modules one by one (no fused op, no Winograd)."""
    return net.classifier(net.features(x).flatten(1))


@pytest.mark.parametrize("channels, size, width", [(1, 28, 128), (3, 32, 64), (1, 16, MIN_CHANNELS)])
def test_inference_equals_the_modules(channels, size, width):
    net = get_network("ConvNet", channels, 10, size, width=width, seed=0).eval()
    x = torch.rand(6, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _modules(net, x)
        got = net(x)
    assert len(net._winograd_cache) == len(net.features) // 4 - 1   # every block but the first
    # Winograd F(4x4, 3x3)'s fp32 rounding, divided by the instance norms' standard deviations
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_winograd_filters_follow_weight_changes():
    """An in-place update (an optimiser step), load_state_dict and a deep copy all give the new
    weights' logits: the cached transformed filters follow the weight's values."""
    net = get_network("ConvNet", 1, 10, 28, seed=0)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    with first_order(net):
        net(x).square().sum().backward()
    with torch.no_grad():
        before = net(x)
    opt.step()                                           # in place: same storage, new version
    with torch.no_grad():
        after, want = net(x), _modules(net, x)
    assert not torch.allclose(after, before, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    other = get_network("ConvNet", 1, 10, 28, seed=5)
    net.load_state_dict(other.state_dict())
    twin = copy.deepcopy(net)
    with torch.no_grad():
        want = _modules(other, x)
        for m in (net, twin):
            torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_winograd_filters_follow_updates_the_version_counter_misses():
    """Writes through ``.data`` and torch's fused SGD change a weight without bumping its version
    (a cache keyed on storage and version went stale): the logits still follow the weights."""
    net = get_network("ConvNet", 1, 10, 28, width=32, seed=0)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        net(x)                                           # fills the cache
    v = net.features[4].weight._version
    net.features[4].weight.data.mul_(-2.0)
    assert net.features[4].weight._version == v
    with torch.no_grad():
        got, want = net(x), _modules(net, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    try:
        opt = torch.optim.SGD(net.parameters(), lr=0.5, fused=True)
    except (RuntimeError, TypeError, ValueError):       # a torch without fused CPU SGD
        return
    opt.step()
    with torch.no_grad():
        got, want = net(x), _modules(net, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_copies_leave_out_buffers_and_train_the_same():
    """copy.deepcopy and pickling drop the filter cache and the per-thread buffers a training
    pass leaves behind (they are rebuilt), and the copy's gradients equal the original's bits."""
    import pickle
    net = get_network("ConvNet", 1, 10, 28, seed=0)
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    with first_order(net):
        net(x).square().sum().backward()
    assert net._workspaces and net._winograd_cache
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert not (twin._workspaces or twin._winograd_cache or twin._scratch_bufs)
        assert net._workspaces                      # the original keeps its own
        for m in (net, twin):
            m.zero_grad()
            with first_order(m):
                m(x).square().sum().backward()
        for (name, p), q in zip(net.named_parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad), name


def test_training_gradients_equal_the_modules():
    """Inside first_order (the fused first block's backward, the norm blocks', Winograd's
    forward, input gradient and filter gradient) the parameter gradients equal the
    modules' up to rounding; outside it a graph runs the modules (second derivatives work)."""
    net = get_network("ConvNet", 1, 10, 28, seed=0)
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    _modules(net, x).square().sum().backward()
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    with first_order(net):
        net(x).square().sum().backward()
    for name, p in net.named_parameters():
        if name in ("features.0.bias", "features.4.bias", "features.8.bias"):
            # a conv bias before instance norm has a zero gradient: compare on its weight's scale
            scale = float(want[name.replace("bias", "weight")].abs().max())
        else:
            scale = float(want[name].abs().max())
        torch.testing.assert_close(p.grad, want[name], rtol=0, atol=2e-4 * scale)
    x2 = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(net(x2).sum(), x2, create_graph=True)
    g.square().sum().backward()                      # through the modules: no error
    assert x2.grad is not None and torch.isfinite(x2.grad).all()


def test_first_order_input_gradient_equals_the_modules():
    """dm's synthetic images: the gradient of the embedding w.r.t. the input pixels."""
    net = get_network("ConvNet", 1, 10, 28, seed=1)
    net.requires_grad_(False)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    net.features(xa).flatten(1).square().sum().backward()
    with first_order(net):
        net.embed(xb).square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=2e-4 * float(xa.grad.abs().max()))



def test_reused_conv_buffers_are_per_thread_and_bounded():
    """Graph-free passes reuse each layer's conv output buffer: two threads running one net at
    once get the logits of running alone; a pass above SCRATCH_MAX_VALUES keeps no buffer."""
    import threading
    from splatdd.models import SCRATCH_MAX_VALUES
    net = get_network("ConvNet", 1, 10, 28, seed=0).eval()
    xs = [torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(s)) for s in (6, 7)]
    with torch.no_grad():
        alone = [net(x) for x in xs]
    got = [[], []]

    def work(k):
        with torch.no_grad():
            for _ in range(20):
                got[k].append(net(xs[k]))
    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in (0, 1):
        assert all(torch.equal(y, alone[k]) for y in got[k])
    n_big = SCRATCH_MAX_VALUES // (128 * 16 * 16) + 1
    net._scratch_bufs.clear()
    big = torch.rand(n_big, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        y = net(big)
    layers = {i for _, i in net._scratch_bufs}
    assert 4 not in layers and 8 in layers            # 16 x 16 output too large; 8 x 8 kept
    assert all(b.numel() <= SCRATCH_MAX_VALUES for b in net._scratch_bufs.values())
    torch.testing.assert_close(y[:16], net(big[:16]).detach(), rtol=1e-5, atol=1e-5)
