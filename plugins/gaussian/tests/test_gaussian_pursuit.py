"""init_from_real's matching-pursuit start: the closed-form correlation updates against a dense
pursuit that recomputes every inner product from the explicit residual; the start it gives."""
from __future__ import annotations

import pytest
import torch

from splatdd.plugin_api import DatasetSpec
from splatdd.testing import single_thread
from splatdd_gaussian import GaussianImages
from splatdd_gaussian.pursuit import pursuit, pursuit_scales


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def _dense_pursuit(y: torch.Tensor, points: int, scales):
    """Reference: every atom as a dense H x W image, correlations recomputed each step (fp64)."""
    n, C, H, W = y.shape
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64),
                            torch.arange(W, dtype=torch.float64), indexing="ij")
    atoms, meta = [], []
    for s in scales:
        for qy in range(H):
            for qx in range(W):
                atoms.append(torch.exp(-((xx - qx) ** 2 + (yy - qy) ** 2) / (2 * s * s)))
                meta.append((qx, qy, s))
    A = torch.stack(atoms).flatten(1)                     # (atoms, H*W)
    out = []
    for i in range(n):
        r = y[i].double().flatten(1)                      # (C, H*W)
        picks = []
        for _ in range(points):
            c = r @ A.T                                   # (C, atoms)
            gain = (c * c).sum(0) / (A * A).sum(1)
            j = int(gain.argmax())
            w = c[:, j] / (A[j] * A[j]).sum()
            r = r - w[:, None] * A[j][None]
            picks.append((meta[j], w))
        out.append(picks)
    return out


@pytest.mark.parametrize("channels", [1, 3])
def test_pursuit_matches_dense_reference(channels):
    g = torch.Generator().manual_seed(channels)
    y = torch.randn(3, channels, 7, 9, generator=g)
    scales = [0.7, 1.3, 2.5]
    centres, sigma, weights = pursuit(y, 5, scales, chunk=2)
    ref = _dense_pursuit(y, 5, scales)
    for i in range(3):
        for k, ((qx, qy, s), w) in enumerate(ref[i]):
            assert centres[i, k].tolist() == [qx, qy]
            assert float(sigma[i, k]) == pytest.approx(s)
            torch.testing.assert_close(weights[i, k].double(), w, rtol=1e-4, atol=1e-5)


def test_pursuit_residual_shrinks():
    y = torch.randn(2, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    yy, xx = torch.meshgrid(torch.arange(10.), torch.arange(10.), indexing="ij")
    last = [float((y ** 2).sum())] * 2
    for points in (1, 3, 6):
        c, s, w = pursuit(y, points, [1.0, 2.0])
        for i in range(2):
            rec = sum(w[i, k, 0] * torch.exp(-((xx - c[i, k, 0]) ** 2 + (yy - c[i, k, 1]) ** 2)
                                             / (2 * s[i, k] ** 2)) for k in range(points))
            err = float(((y[i, 0] - rec) ** 2).sum())
            assert err < last[i]
            last[i] = err


def test_pursuit_bad_input():
    y = torch.zeros(1, 1, 4, 4)
    with pytest.raises(ValueError, match="points"):
        pursuit(y, 0, [1.0])
    with pytest.raises(ValueError, match="scales"):
        pursuit(y, 1, [1.0, -2.0])
    with pytest.raises(ValueError, match="scales"):
        pursuit(y, 1, [])
    with pytest.raises(ValueError, match=r"\(n, C, H, W\)"):
        pursuit(torch.zeros(4, 4), 1, [1.0])
    with pytest.raises(ValueError, match="base"):
        pursuit_scales(0.0)
    assert pursuit_scales(2.0) == pytest.approx([2.0 * 2 ** (k / 2) for k in range(-3, 4)])


SPEC = DatasetSpec("toy", 1, 12, 12, 2, mean=(0.0,), std=(1.0,))


def _toy_images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.nn.functional.interpolate(torch.randn(n, 1, 4, 4, generator=g), size=(12, 12),
                                           mode="bilinear", align_corners=False)


def test_init_geometry_option_and_defaults():
    a = GaussianImages(SPEC, gpc=2, points=6)
    b = GaussianImages(SPEC, gpc=2, points=6, init_geometry="grid")
    assert (a.init_geometry, a.init_steps) == ("pursuit", 250)
    assert (b.init_geometry, b.init_steps) == ("grid", 1000)
    assert GaussianImages(SPEC, gpc=2, points=6, init_steps=7).init_steps == 7
    assert a.config()["init_geometry"] == "pursuit"
    with pytest.raises(ValueError, match="init_geometry must be one of pursuit, grid"):
        GaussianImages(SPEC, gpc=2, points=6, init_geometry="kmeans")


def test_pursuit_start_beats_grid_start():
    """Same images, same points: the pursuit start's first-step MSE is below the grid start's,
    and the fit from it stays below after the same number of steps."""
    x = _toy_images(4)
    res = {}
    for geo in ("pursuit", "grid"):
        p = GaussianImages(SPEC, gpc=2, points=6, init_geometry=geo,
                           generator=torch.Generator().manual_seed(0))
        res[geo] = p.init_from_real(x, p.labels, steps=20)
        assert p.params[..., :2].abs().max() <= 1.0 - p.clip_eps + 1e-6
    assert res["pursuit"]["mse_start"] < res["grid"]["mse_start"]
    assert res["pursuit"]["mse"] < res["grid"]["mse"]


def test_large_images_pursued_downsampled_and_mapped_back():
    """A 64 px image (pursued at 32 px): one blob's centre and scale come back in full-size
    pixels, close to the truth; side=None (no downsampling) finds it exactly."""
    yy, xx = torch.meshgrid(torch.arange(64.), torch.arange(64.), indexing="ij")
    y = (2.0 * torch.exp(-((xx - 40) ** 2 + (yy - 21) ** 2) / (2 * 4.0 ** 2)))[None, None]
    c, s, w = pursuit(y, 1, pursuit_scales(4.0))
    assert abs(float(c[0, 0, 0]) - 40) <= 1.0 and abs(float(c[0, 0, 1]) - 21) <= 1.0
    assert 3.0 <= float(s[0, 0]) <= 5.7 and 1.5 <= float(w[0, 0, 0]) <= 2.5
    c, s, w = pursuit(y, 1, pursuit_scales(4.0), side=None)
    assert c[0, 0].tolist() == [40.0, 21.0] and float(s[0, 0]) == pytest.approx(4.0)
    assert float(w[0, 0, 0]) == pytest.approx(2.0, rel=1e-4)
