"""Centre clipping (Eq. 11) and the boundary loss (Eq. 10) in closed form on small cases."""
import math

import pytest
import torch

from splatdd.plugin_api import DatasetSpec
from splatdd_gaussian import GaussianImages, boundary_loss

SPEC = DatasetSpec("toy", 1, 8, 8, 1)


def _with_centres(centres, **kw):
    g = GaussianImages(SPEC, gpc=1, points=len(centres), **kw)
    with torch.no_grad():
        g.params[0, :, :2] = torch.tensor(centres)
    return g


def test_boundary_loss_closed_form():
    pts = [(0.5, 0.0), (0.9, -0.3), (-0.2, 0.7)]
    g = _with_centres(pts)
    expect = -sum(math.log(1 - x * x) + math.log(1 - y * y) for x, y in pts) / len(pts)
    reg = g.regularization()
    assert reg.item() == pytest.approx(0.1 * expect, rel=1e-6)
    reg.backward()
    # d/dx of -0.1 * mean_k log(1 - x_k^2) = 0.1 * 2 x / (K (1 - x^2))
    grad = g.params.grad[0, :, :2]
    want = torch.tensor([[0.1 * 2 * c / (len(pts) * (1 - c * c)) for c in p] for p in pts])
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    assert torch.all(g.params.grad[..., 2:] == 0)


def test_boundary_loss_uses_clipped_centres_and_weight():
    eps = 1e-3
    c = torch.tensor([[1.5, 0.0], [-3.0, 0.25]])
    x = 1 - eps
    expect = -(math.log(1 - x * x) + 0.0 + math.log(1 - x * x) + math.log(1 - 0.0625)) / 2
    assert boundary_loss(c, eps).item() == pytest.approx(expect, rel=1e-5)
    g = _with_centres([(0.5, 0.5)], boundary_weight=0.7)
    assert g.regularization().item() == pytest.approx(-0.7 * 2 * math.log(0.75), rel=1e-6)
    assert _with_centres([(0.5, 0.5)], boundary_loss=False).regularization() is None


def test_clip_after_step():
    g = _with_centres([(1.5, -2.0), (0.3, 0.9999), (-0.5, 0.2)])
    g.post_step()
    eps = g.clip_eps
    assert eps == 1e-3
    torch.testing.assert_close(g.params[0, :, :2],
                               torch.tensor([[1 - eps, -1 + eps], [0.3, 1 - eps], [-0.5, 0.2]]))
    g2 = _with_centres([(1.5, -2.0)], clip=False, clip_eps=0.1)
    g2.post_step()
    assert g2.params[0, 0, :2].tolist() == [1.5, -2.0]
    g3 = _with_centres([(1.5, -2.0)], clip_eps=0.1)
    g3.post_step()
    torch.testing.assert_close(g3.params[0, 0, :2], torch.tensor([0.9, -0.9]))


def test_clip_only_touches_centres():
    g = _with_centres([(2.0, 2.0)])
    with torch.no_grad():
        g.params[0, 0, 2:] = 5.0
    g.post_step()
    assert torch.all(g.params[0, 0, 2:] == 5.0)
