"""IDC multi-formation: layout of the decoded sub-images, storage, init, optimiser, round trip."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from splatdd.budget import budget_bytes
from splatdd.plugin_api import DatasetSpec, check_plugin_class
from splatdd.testing import single_thread
from splatdd_idc import DEFAULT_OPTIMIZER, IDCImages

SPEC = DatasetSpec("toy", 1, 4, 4, 2, mean=(0.0,), std=(1.0,))


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def test_contract_and_labels():
    check_plugin_class(IDCImages, "parameterization")
    p = IDCImages.build(SPEC, 2, generator=torch.Generator().manual_seed(0))
    # 2 stored images per class x 4 sub-images each, class-major
    assert p.labels.tolist() == [0] * 8 + [1] * 8
    assert p.decode().shape == (16, 1, 4, 4)
    assert [q.shape for q in p.parameters()] == [(4, 1, 4, 4)]


def test_hand_built_sub_images_in_place():
    """A 4x4 stored image with factor 2 holds the four 2x2 quadrants in row-major order; with factor
    4 every pixel is a sub-image, and a 1x1 image upsampled bilinearly is constant."""
    img = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    spec = DatasetSpec("toy", 1, 4, 4, 1, (0.0,), (1.0,))
    p = IDCImages(spec, 1, 2, img)
    subs = p.sub_images()
    expected = torch.tensor([[[0, 1], [4, 5]], [[2, 3], [6, 7]],
                             [[8, 9], [12, 13]], [[10, 11], [14, 15]]], dtype=torch.float32)
    assert torch.equal(subs[:, 0], expected)
    # the decode of quadrant (1, 0) is the 2x2 block [[8, 9], [12, 13]] upsampled: corners equal the
    # block's values (bilinear, align_corners=False, factor 2: outer pixels replicate the corners)
    dec = p.decode()
    assert dec.shape == (4, 1, 4, 4)
    q = dec[2, 0]
    assert q[0, 0] == 8 and q[0, 3] == 9 and q[3, 0] == 12 and q[3, 3] == 13
    # the interior of the upsampled block, by hand: at output row 1 (input y = 0.25),
    # column 1 (x = 0.25): 8*(.75*.75) + 9*(.75*.25) + 12*(.25*.75) + 13*(.25*.25) = 9.25
    assert torch.isclose(q[1, 1], torch.tensor(9.25))
    p4 = IDCImages(spec, 1, 4, img)
    assert torch.equal(p4.decode(), img.reshape(16, 1, 1, 1).expand(16, 1, 4, 4))


def test_padding_when_factor_does_not_divide():
    spec = DatasetSpec("toy", 1, 5, 5, 1, (0.0,), (1.0,))
    img = torch.arange(25, dtype=torch.float32).reshape(1, 1, 5, 5) + 1
    p = IDCImages(spec, 1, 2, img)
    assert p.sub_size == (3, 3)
    subs = p.sub_images()
    assert torch.equal(subs[0, 0], img[0, 0, :3, :3])
    # bottom-right sub-image: rows/cols 3..4 of the image, padded with zeros (the mean) to 3x3
    br = torch.zeros(3, 3)
    br[:2, :2] = img[0, 0, 3:, 3:]
    assert torch.equal(subs[3, 0], br)


def test_decode_indices_match_full_decode_and_resolution():
    spec = DatasetSpec("toy", 3, 6, 6, 3, (0.0,) * 3, (1.0,) * 3)
    p = IDCImages.build(spec, 2, generator=torch.Generator().manual_seed(1), factor=3)
    full = p.decode()
    assert full.shape == (3 * 2 * 9, 3, 6, 6)
    idx = torch.tensor([53, 0, 17, 9, 9])
    assert torch.allclose(p.decode(idx), full[idx])
    up = p.decode(idx, resolution=(12, 8))
    ref = F.interpolate(p.sub_images(idx), size=(12, 8), mode="bilinear", align_corners=False)
    assert up.shape == (5, 3, 12, 8) and torch.allclose(up, ref)
    with pytest.raises(IndexError, match="indices"):
        p.decode(torch.tensor([54]))


@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 3), h=st.integers(2, 9), w=st.integers(2, 9), n=st.integers(1, 4),
       ipc=st.integers(1, 3), k=st.integers(1, 4))
def test_storage_equals_pixel_budget(c, h, w, n, ipc, k):
    spec = DatasetSpec("toy", c, h, w, n, (0.0,) * c, (1.0,) * c)
    k = min(k, h, w)
    p = IDCImages.build(spec, ipc, factor=k)
    assert p.num_bytes() == budget_bytes(spec, ipc) == n * ipc * c * h * w * 4
    assert sum(t.numel() * t.element_size() for t in p.state_tensors().values()) == p.num_bytes()
    assert len(p.labels) == n * ipc * k * k


def test_init_from_real_tiles_downsampled_images():
    spec = DatasetSpec("toy", 1, 4, 4, 1, (0.0,), (1.0,))
    p = IDCImages.build(spec, 1)
    # four constant real images: their 2x2 downsamples are constant, tiled into the quadrants
    real = torch.stack([torch.full((1, 4, 4), float(v)) for v in (1, 2, 3, 4)])
    diag = p.init_from_real(real, p.labels)
    assert torch.equal(p.images.detach()[0, 0], torch.tensor(
        [[1., 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]))
    assert diag["mse"] == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="one per decoded image"):
        p.init_from_real(real[:1], p.labels[:1])
    with pytest.raises(ValueError, match="labels"):
        p.init_from_real(real, torch.ones(4, dtype=torch.long))


def test_bad_options():
    with pytest.raises(TypeError, match="gpc"):
        IDCImages.build(SPEC, 1, gpc=3)
    for bad in (0, 5, 1.5, "2", True):
        with pytest.raises(ValueError, match="factor"):
            IDCImages.build(SPEC, 1, factor=bad)
    with pytest.raises(ValueError, match="init"):
        IDCImages.build(SPEC, 1, init="real")


def test_optimizer_by_regime():
    p = IDCImages.build(SPEC, 1)
    for regime, (kind, lr, extra) in DEFAULT_OPTIMIZER.items():
        opt = p.optimizer_spec(regime).build()
        assert opt.param_groups[0]["lr"] == lr
        assert isinstance(opt, torch.optim.Adam if kind == "adam" else torch.optim.SGD)
    rec = p.optimizer_spec("recover").build().param_groups[0]
    assert rec["lr"] == 0.25 and tuple(rec["betas"]) == (0.5, 0.9)
    assert p.optimizer_spec("gradient", lr=0.3).build().param_groups[0]["lr"] == 0.3
    with pytest.raises(ValueError, match="regime"):
        p.optimizer_spec("dm")


def test_regimes_cover_the_contract():
    from splatdd.plugin_api import REGIMES
    assert set(REGIMES) == set(DEFAULT_OPTIMIZER)


def test_state_round_trip_and_bad_state():
    p = IDCImages.build(SPEC, 2, generator=torch.Generator().manual_seed(2), factor=2)
    q = IDCImages.from_state(SPEC, p.state_tensors(), p.config())
    assert torch.equal(q.decode(), p.decode().detach()) and q.factor == 2
    with pytest.raises(ValueError, match="factor"):
        IDCImages.from_state(SPEC, p.state_tensors(), {"ipc": 2})
    with pytest.raises(ValueError, match="shape"):
        IDCImages.from_state(SPEC, {"images": torch.zeros(3, 1, 4, 4)}, p.config())
    with pytest.raises(ValueError, match="images"):
        IDCImages.from_state(SPEC, {}, p.config())


def test_gradient_reaches_only_used_sub_image():
    spec = DatasetSpec("toy", 1, 4, 4, 1, (0.0,), (1.0,))
    p = IDCImages.build(spec, 1)
    p.decode(torch.tensor([3])).sum().backward()
    g = p.images.grad[0, 0]
    assert g[2:, 2:].abs().min() > 0 and g[:2].abs().sum() == 0 and g[:, :2].abs().sum() == 0


def test_end_to_end_with_dm(tmp_path):
    """A few dm steps through the core loop: finite losses, the stored images move, the distilled
    file round-trips to the same decoded images, and the budget check passes."""
    import math

    from splatdd.distill import DISTILLED_NAME, distill
    from splatdd.distilled_file import load
    from splatdd.testing import algorithm_class, init_from_real_samples, make_tiny_real

    dm = algorithm_class("dm")
    real = make_tiny_real()
    p = IDCImages.build(real.spec, 1, generator=torch.Generator().manual_seed(0), factor=2)
    diag = init_from_real_samples(p, real)
    assert math.isfinite(diag["mse"])
    before = p.images.detach().clone()
    algo = dm(real, ipc=1, generator=torch.Generator().manual_seed(1), batch_real=8,
              net_width=8, dsa=False)
    losses = []
    distill(p, algo, iterations=3, out_dir=tmp_path, checkpoint_every=0, progress=False,
            plot=False, on_step=lambda step, loss, q, a: losses.append(loss))
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert not torch.equal(p.images.detach(), before)
    loaded = load(tmp_path / DISTILLED_NAME)
    assert loaded.param.name == "idc" and loaded.param.factor == 2
    assert torch.equal(loaded.param.decode(), p.decode().detach())


def test_steps_with_dc():
    """idc under gradient matching: the regime's optimiser, finite losses, the images move."""
    import math

    from splatdd.testing import algorithm_class, init_from_real_samples, make_tiny_real, run_steps

    dc = algorithm_class("dc")
    real = make_tiny_real()
    p = IDCImages.build(real.spec, 1, generator=torch.Generator().manual_seed(0))
    init_from_real_samples(p, real)
    before = p.images.detach().clone()
    algo = dc(real, ipc=1, generator=torch.Generator().manual_seed(1), net_width=8, batch_real=8,
              dsa=False)
    opt = p.optimizer_spec(dc.regime, lr=1.0).build()
    losses = run_steps(algo, p, opt, 2)
    assert all(math.isfinite(v) for v in losses)
    assert not torch.equal(p.images.detach(), before)


# ---- samples = k: GSDD's form of the baseline (k-times more images, each sqrt(k) smaller) -------
def test_samples_sizes_follow_gsdd_table19():
    """GSDD appendix B.4: down-scaled by sqrt(k), k-times more samples. At 224 px, k = 20 (IPC 1)
    gives 20 images of 50 x 50 per stored image (floor(224 / sqrt 20) = floor(50.09)), k = 5
    (IPC 10) 5 of 100 x 100 (floor(100.17)); both within the budget of one 224 x 224 image."""
    from splatdd_idc import samples_sub_size
    spec = DatasetSpec("imagenet", 3, 224, 224, 2, (0.0,) * 3, (1.0,) * 3)
    for k, ipc, side in ((20, 1, 50), (5, 10, 100)):
        assert samples_sub_size(224, 224, k) == (side, side)
        assert side <= 224 / k ** 0.5 < side + 1                          # the floor, by hand
        p = IDCImages.build(spec, ipc, samples=k, init="zeros")
        assert p.sub_size == (side, side) and p.factor is None
        assert len(p.labels) == 2 * ipc * k
        assert p.num_bytes() == 2 * ipc * k * 3 * side * side * 4 <= budget_bytes(spec, ipc)
        assert p.decode(torch.tensor([0])).shape == (1, 3, 224, 224)


def test_samples_hand_built_decode():
    """Decoded image d is stored sub-image d upsampled (bilinear, align_corners=False)."""
    spec = DatasetSpec("toy", 1, 4, 4, 2, (0.0,), (1.0,))
    stored = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(6, 1, 2, 2)   # k=3 -> 2x2 subs
    p = IDCImages(spec, 1, None, stored, samples=3)
    assert p.labels.tolist() == [0, 0, 0, 1, 1, 1]
    dec = p.decode()
    assert dec.shape == (6, 1, 4, 4)
    # sub-image 4 is [[16, 17], [18, 19]]: corners replicate, interior (1, 1) by hand
    # 16*(.75*.75) + 17*(.75*.25) + 18*(.25*.75) + 19*(.25*.25) = 16.75
    q = dec[4, 0]
    assert (q[0, 0], q[0, 3], q[3, 0], q[3, 3]) == (16, 17, 18, 19)
    assert torch.isclose(q[1, 1], torch.tensor(16.75))
    assert torch.equal(p.decode(torch.tensor([4, 1])), dec[[4, 1]])
    with pytest.raises(IndexError, match="indices"):
        p.decode(torch.tensor([6]))
    p.decode(torch.tensor([5])).sum().backward()
    g = p.images.grad
    assert g[5].abs().min() > 0 and g[:5].abs().sum() == 0


def test_samples_square_equals_factor_grid():
    """samples = f^2 with f dividing the size is IDC's factor-f grid: same sub-images, same
    decoded images from the same real initialisation, same storage."""
    from splatdd.testing import make_tiny_real
    real = make_tiny_real()
    spec = real.spec
    grid = IDCImages.build(spec, 1, factor=2, init="zeros")
    flat = IDCImages.build(spec, 1, samples=4, init="zeros")
    assert torch.equal(grid.labels, flat.labels) and grid.num_bytes() == flat.num_bytes()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(grid.labels), spec.channels, spec.height, spec.width, generator=g)
    grid.init_from_real(x, grid.labels)
    flat.init_from_real(x, flat.labels)
    assert torch.allclose(flat.sub_images(), grid.sub_images(), atol=1e-6)
    assert torch.allclose(flat.decode(), grid.decode(), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 3), h=st.integers(2, 12), w=st.integers(2, 12), n=st.integers(1, 3),
       ipc=st.integers(1, 3), k=st.integers(1, 30))
def test_samples_storage_within_budget(c, h, w, n, ipc, k):
    spec = DatasetSpec("toy", c, h, w, n, (0.0,) * c, (1.0,) * c)
    k = min(k, min(h, w) ** 2)
    p = IDCImages.build(spec, ipc, samples=k, init="zeros")
    sh, sw = p.sub_size
    assert sh >= 1 and sw >= 1 and sh * sh * k <= h * h and sw * sw * k <= w * w
    assert (sh + 1) ** 2 * k > h * h and (sw + 1) ** 2 * k > w * w       # the largest that fits
    assert p.num_bytes() <= budget_bytes(spec, ipc)
    assert len(p.labels) == n * ipc * k


def test_samples_bad_options_and_round_trip():
    with pytest.raises(ValueError, match="not both"):
        IDCImages.build(SPEC, 1, factor=2, samples=4)
    for bad in (0, 17, 2.5, "4", True):                   # 4x4 images: at most 16 samples
        with pytest.raises(ValueError, match="samples"):
            IDCImages.build(SPEC, 1, samples=bad)
    p = IDCImages.build(SPEC, 2, generator=torch.Generator().manual_seed(3), samples=3)
    assert p.config() == {"ipc": 2, "samples": 3}
    q = IDCImages.from_state(SPEC, p.state_tensors(), p.config())
    assert q.samples == 3 and torch.equal(q.decode(), p.decode().detach())
    with pytest.raises(ValueError, match="exactly one"):
        IDCImages.from_state(SPEC, p.state_tensors(), {"ipc": 2, "samples": 3, "factor": 2})
    with pytest.raises(ValueError, match="shape"):
        IDCImages.from_state(SPEC, p.state_tensors(), {"ipc": 2, "samples": 2})
