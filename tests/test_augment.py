"""DSA: determinism in the seed (siamese), differentiability, and each op's semantics."""
from __future__ import annotations

import math

import pytest
import torch

from splatdd.augment import DEFAULT_STRATEGY, DSA_OPS, DSAParams, dsa

OPS = list(DSA_OPS)


pytestmark = pytest.mark.usefixtures("one_thread")   # see conftest.py


def _x(b=4, c=3, h=16, w=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g, dtype=dtype)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("strategy", OPS + [DEFAULT_STRATEGY])
def test_same_seed_same_output_and_rng_untouched(strategy, per_sample):
    x = _x()
    state = torch.get_rng_state()
    a = dsa(x, strategy, seed=7, per_sample=per_sample)
    b = dsa(x.clone(), strategy, seed=7, per_sample=per_sample)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b)


@pytest.mark.parametrize("strategy", OPS + [DEFAULT_STRATEGY])
def test_different_seeds_differ(strategy):
    x = _x()
    outs = [dsa(x, strategy, seed=s) for s in range(8)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strategy", OPS + [DEFAULT_STRATEGY])
def test_shape_dtype_and_gradient(strategy, dtype):
    for seed in range(3):
        x = _x(c=1 if seed == 2 else 3, h=12, w=10, dtype=dtype).requires_grad_(True)
        y = dsa(x, strategy, seed=seed, per_sample=seed == 1)
        assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
        w = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
        (gx,) = torch.autograd.grad((y * w).sum(), x)
        assert bool(torch.isfinite(gx).all()) and float(gx.abs().sum()) > 0


def test_siamese_batchmode_independent_of_batch_size():
    """Same seed -> the same transform for a real batch and a smaller synthetic batch."""
    x = _x(b=6)
    for strategy in OPS + [DEFAULT_STRATEGY]:
        for seed in range(4):
            full = dsa(x, strategy, seed=seed)
            part = dsa(x[:2], strategy, seed=seed)
            torch.testing.assert_close(part, full[:2])


def test_batchmode_shares_params_per_sample_does_not():
    x = _x(b=1).expand(8, -1, -1, -1).contiguous()       # 8 copies of one image
    for op in ("rotate", "scale", "crop", "cutout", "color"):
        shared = dsa(x, op, seed=3)
        assert all(torch.equal(shared[0], shared[i]) for i in range(8)), op
        indep = dsa(x, op, seed=3, per_sample=True)
        assert any(not torch.equal(indep[0], indep[i]) for i in range(8)), op


def test_strategy_none_and_errors():
    x = _x()
    assert dsa(x, "none", seed=0) is x and dsa(x, "", seed=0) is x
    with pytest.raises(ValueError, match="unknown DSA op"):
        dsa(x, "color_blur", seed=0)
    with pytest.raises(ValueError):
        dsa(x[0], "flip", seed=0)
    with pytest.raises(ValueError):
        dsa(x, "flip", seed=0, params=DSAParams(aug_mode="Q"))


def test_single_mode_applies_one_op_multi_mode_all():
    """'S' picks one op per call: with strategy flip_cutout every output is a pure flip or a
    pure cutout; 'M' applies both."""
    x = _x(b=1, c=1, h=8, w=8).abs() + 1.0                 # no zeros, not symmetric
    seen = set()
    for seed in range(40):
        y = dsa(x, "flip_cutout", seed=seed)
        if torch.equal(y, x) or torch.equal(y, x.flip(3)):
            seen.add("flip")
        else:
            zeros = y == 0
            assert bool(zeros.any()) and torch.equal(y[~zeros], x[~zeros])
            seen.add("cutout")
        m = dsa(x, "flip_cutout", seed=seed, params=DSAParams(aug_mode="M"))
        assert bool((m == 0).any())                        # cutout always applied in 'M'
    assert seen == {"flip", "cutout"}


def test_flip_semantics():
    x = _x()
    outs = [dsa(x, "flip", seed=s) for s in range(30)]
    flipped = sum(torch.equal(o, x.flip(3)) for o in outs)
    kept = sum(torch.equal(o, x) for o in outs)
    assert flipped + kept == 30 and 5 <= flipped <= 25
    assert dsa(x, "flip", seed=0, params=DSAParams(prob_flip=0.0)).equal(x)
    assert dsa(x, "flip", seed=0, params=DSAParams(prob_flip=1.0)).equal(x.flip(3))


def test_crop_is_an_integer_shift_with_zero_fill():
    x = _x(b=1, h=16, w=16).abs() + 1.0
    shifts = set()
    for seed in range(25):
        y = dsa(x, "crop", seed=seed)
        found = None
        for dy in range(-2, 3):                           # 16 * 0.125 = 2 px at most
            for dx in range(-2, 3):
                ref = torch.zeros_like(x)
                ys, yd = (slice(dy, 16), slice(0, 16 - dy)) if dy >= 0 else \
                    (slice(0, 16 + dy), slice(-dy, 16))
                xs, xd = (slice(dx, 16), slice(0, 16 - dx)) if dx >= 0 else \
                    (slice(0, 16 + dx), slice(-dx, 16))
                ref[..., yd, xd] = x[..., ys, xs]
                if torch.equal(ref, y):
                    found = (dy, dx)
        assert found is not None
        shifts.add(found)
    assert len(shifts) > 3


def test_cutout_zeroes_one_clipped_square():
    x = _x(b=2, h=16, w=12).abs() + 1.0
    for seed in range(20):
        y = dsa(x, "cutout", seed=seed, per_sample=True)
        for i in range(2):
            z = (y[i] == 0).all(0)
            assert torch.equal(y[i][:, ~z], x[i][:, ~z])
            rows, cols = z.any(1).nonzero().flatten(), z.any(0).nonzero().flatten()
            assert 1 <= len(rows) <= 8 and 1 <= len(cols) <= 6        # 0.5 H x 0.5 W
            assert int(z.sum()) == len(rows) * len(cols)               # a (clipped) rectangle
            assert torch.equal(rows, torch.arange(int(rows[0]), int(rows[-1]) + 1))


def test_color_semantics():
    # 1 channel: saturation is a no-op, so the result is an affine map a*x + b of the input
    x = _x(b=1, c=1)
    y = dsa(x, "color", seed=5)
    a, b = torch.linalg.lstsq(torch.stack([x.flatten(), torch.ones(x.numel())], 1),
                              y.flatten()[:, None]).solution.flatten()
    torch.testing.assert_close(a * x + b, y, atol=1e-5, rtol=1e-5)
    assert 0.5 - 1e-6 <= float(a) <= 1.5 + 1e-6          # contrast factor in [0.5, 1.5)
    # a constant grey image only gets the brightness shift, uniform in [-0.5, 0.5)
    c = torch.full((1, 3, 4, 4), 0.3)
    shifts = []
    for seed in range(40):
        shift = dsa(c, "color", seed=seed) - c
        assert float(shift.std()) < 1e-6
        shifts.append(float(shift.mean()))
    assert -0.5 <= min(shifts) < -0.25 and 0.25 < max(shifts) < 0.5


def test_scale_and_rotate_geometry():
    x = _x(b=2, h=16, w=16)
    ident = DSAParams(ratio_scale=1.0, ratio_rotate=0.0)
    # identity parameters reproduce the input exactly (align_corners=False pixel centres)
    torch.testing.assert_close(dsa(x, "scale", seed=1, params=ident), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(dsa(x, "rotate", seed=1, params=ident), x, atol=1e-5, rtol=0)
    # a bright dot at the centre stays at the centre under rotation
    dot = torch.zeros(1, 1, 17, 17)
    dot[..., 8, 8] = 1.0
    for seed in range(5):
        y = dsa(dot, "rotate", seed=seed)
        assert float(y[..., 7:10, 7:10].sum()) > 0.9 * float(y.sum()) > 0
    # scaling > 1 in theta samples a larger area: a centred square shrinks, < 1 enlarges
    sqr = torch.zeros(1, 1, 32, 32)
    sqr[..., 8:24, 8:24] = 1.0
    areas = [float(dsa(sqr, "scale", seed=s).sum()) for s in range(20)]
    assert min(areas) < 256 < max(areas)
    assert 256 / 1.2 ** 2 - 20 < min(areas) and max(areas) < 256 * 1.2 ** 2 + 20


def test_same_transform_on_cuda_if_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    x = _x()
    for s in range(5):
        torch.testing.assert_close(dsa(x.cuda(), DEFAULT_STRATEGY, seed=s).cpu(),
                                   dsa(x, DEFAULT_STRATEGY, seed=s), atol=1e-4, rtol=1e-4)


def test_rotate_angle_range():
    # a single bright pixel away from the centre moves along a circle by at most 15 degrees
    img = torch.zeros(1, 1, 33, 33)
    img[..., 16, 28] = 1.0                                 # 12 px right of the centre
    angles = []
    for seed in range(12):
        y = dsa(img, "rotate", seed=seed)[0, 0]
        ii, jj = torch.meshgrid(torch.arange(33.0), torch.arange(33.0), indexing="ij")
        m = y.sum()
        ci, cj = float((y * ii).sum() / m) - 16, float((y * jj).sum() / m) - 16
        assert abs(math.hypot(ci, cj) - 12) < 0.25          # a rotation keeps the radius
        angles.append(math.degrees(math.atan2(ci, cj)))
    assert max(abs(a) for a in angles) <= 15.5
    assert min(angles) < -5 and max(angles) > 5            # both directions
