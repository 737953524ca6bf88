"""bf16 straight-through: the renderer sees bf16-rounded values, gradients reach the fp32 master."""
import torch

import splatdd
from splatdd.plugin_api import DatasetSpec
from splatdd_gaussian import GaussianImages, bf16_round_ste

SPEC = DatasetSpec("toy", 3, 8, 8, 2)


def _noisy(g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():   # values that are *not* representable in bf16
        g.params.add_(torch.randn(g.params.shape, generator=gen) * 1e-3)
    return g


def test_ste_forward_rounds_backward_identity():
    x = torch.tensor([1.001, -0.33333, 0.123456], requires_grad=True)
    y = bf16_round_ste(x)
    assert torch.equal(y, x.detach().bfloat16().float())
    assert not torch.equal(y.detach(), x.detach())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_forward_sees_rounded_params():
    g = _noisy(GaussianImages(SPEC, gpc=2, points=5, generator=torch.Generator().manual_seed(1)))
    rounded = g.params.detach().bfloat16().float()
    assert not torch.equal(rounded, g.params.detach())
    assert torch.equal(g.packed().detach(), rounded)
    ref = splatdd.render(rounded, 8, 8, ssaa=2, prefilter=True)
    assert torch.equal(g.decode().detach(), ref)


def test_gradient_reaches_fp32_master():
    g = _noisy(GaussianImages(SPEC, gpc=2, points=5, generator=torch.Generator().manual_seed(2)))
    w = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    (g.decode() * w).sum().backward()
    assert g.params.grad is not None and g.params.grad.dtype == torch.float32
    # straight-through: the master's gradient is the renderer's gradient at the rounded values
    leaf = g.params.detach().bfloat16().float().requires_grad_(True)
    (splatdd.render(leaf, 8, 8, ssaa=2, prefilter=True) * w).sum().backward()
    torch.testing.assert_close(g.params.grad, leaf.grad)
    assert g.params.grad.abs().sum() > 0


def test_bf16_off_renders_master_exactly():
    g = _noisy(GaussianImages(SPEC, gpc=1, points=4, bf16=False,
                              generator=torch.Generator().manual_seed(4)))
    assert torch.equal(g.packed().detach(), g.params.detach())


def test_opacity_off_fixes_alpha_and_gets_no_alpha_gradient():
    g = GaussianImages(SPEC, gpc=1, points=4, opacity=False,
                       generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        g.params[..., -1] = 0.3
    assert torch.all(g.packed()[..., -1] == 1.0)
    g.decode().sum().backward()
    assert torch.all(g.params.grad[..., -1] == 0)
