"""Initialisation: fitting real images reduces the MSE; random and warm-up modes; any resolution."""
import pytest
import torch
import torch.nn.functional as F

from splatdd.plugin_api import DatasetSpec
from splatdd_gaussian import GaussianImages

SPEC = DatasetSpec("toy", 3, 12, 12, 2)


def _real(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 3, 3, generator=gen) * 2 - 1     # smooth-ish images
    return F.interpolate(low, size=(12, 12), mode="bilinear", align_corners=False)


def test_init_from_real_reduces_mse():
    g = GaussianImages(SPEC, gpc=2, points=16, generator=torch.Generator().manual_seed(0))
    real = _real(4)
    blank = F.mse_loss(torch.zeros_like(real), real).item()
    diag = g.init_from_real(real, g.labels, steps=40)
    assert diag["mse"] < diag["mse_start"] < blank
    assert diag["mse"] < 0.5 * diag["mse_start"]
    assert F.mse_loss(g.decode(), real).item() == pytest.approx(diag["mse"], rel=1e-5)
    # centres stay inside the clipped square during fitting
    assert g.params[..., :2].abs().max() <= 1 - g.clip_eps


def test_init_is_deterministic_given_generator():
    real = _real(4)
    a = GaussianImages(SPEC, gpc=2, points=8, generator=torch.Generator().manual_seed(7))
    b = GaussianImages(SPEC, gpc=2, points=8, generator=torch.Generator().manual_seed(7))
    a.init_from_real(real, a.labels, steps=3)
    b.init_from_real(real, b.labels, steps=3)
    assert torch.equal(a.params, b.params)


def test_init_checks_shapes_and_labels():
    g = GaussianImages(SPEC, gpc=2, points=4)
    with pytest.raises(ValueError):
        g.init_from_real(_real(3), torch.zeros(3, dtype=torch.long), steps=1)
    with pytest.raises(ValueError):
        g.init_from_real(_real(4), torch.zeros(4, dtype=torch.long), steps=1)


def test_random_and_warmup_modes():
    real = _real(4)
    r = GaussianImages(SPEC, gpc=2, points=8, init="random")
    before = r.params.detach().clone()
    r.init_from_real(real, r.labels, steps=5)
    assert torch.equal(r.params, before)                      # random: nothing fitted
    w = GaussianImages(SPEC, gpc=2, points=8, init="warmup", warmup_color=0.5)
    diag = w.init_from_real(real, w.labels, steps=30)
    assert diag["mse"] < diag["mse_start"]
    solid = torch.full_like(real, 0.5)
    assert F.mse_loss(w.decode(), solid).item() == pytest.approx(diag["mse"], rel=1e-5)
    with pytest.raises(ValueError):
        GaussianImages(SPEC, gpc=1, points=1, init="bogus")


def test_decode_any_resolution_and_subsets():
    g = GaussianImages(SPEC, gpc=2, points=6)
    assert g.decode().shape == (4, 3, 12, 12)
    assert g.decode(resolution=(24, 20)).shape == (4, 3, 24, 20)
    sub = g.decode(torch.tensor([3, 1]))
    assert sub.shape == (2, 3, 12, 12)
    torch.testing.assert_close(sub, g.decode()[[3, 1]])
    assert g.decode(torch.tensor([], dtype=torch.long)).shape == (0, 3, 12, 12)
    # a wide Gaussian image looks the same at 2x resolution after 2x2 average pooling
    big = g.decode(resolution=(24, 24))
    small = g.decode()
    assert F.mse_loss(F.avg_pool2d(big, 2), small).item() < 0.05 * small.pow(2).mean().item() + 1e-6
