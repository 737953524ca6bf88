import pytest
import torch

from splatdd.plugin_api import DatasetSpec, check_plugin_class
from splatdd.testing import single_thread
from splatdd_pixel import PixelImages

SPEC = DatasetSpec("toy", 3, 8, 6, 4, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads only add synchronisation cost on a busy machine."""
    with single_thread():
        yield


def test_contract_and_layout():
    check_plugin_class(PixelImages, "parameterization")
    p = PixelImages.build(SPEC, 2, generator=torch.Generator().manual_seed(0))
    assert p.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert p.class_indices(2).tolist() == [4, 5]
    assert p.decode().shape == (8, 3, 8, 6)
    assert p.num_bytes() == 8 * 3 * 8 * 6 * 4
    assert [q.shape for q in p.parameters()] == [(8, 3, 8, 6)]


def test_build_is_seeded_and_rejects_unknown_options():
    a = PixelImages.build(SPEC, 1, generator=torch.Generator().manual_seed(3))
    b = PixelImages.build(SPEC, 1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.images, b.images)
    assert torch.count_nonzero(PixelImages.build(SPEC, 1, init="zeros").images) == 0
    with pytest.raises(TypeError, match="gpc"):
        PixelImages.build(SPEC, 1, gpc=3)


def test_init_from_real_and_decode_indices():
    p = PixelImages.build(SPEC, 2)
    real = torch.randn(8, 3, 8, 6)
    assert p.init_from_real(real, p.labels) == {"mse": 0.0}
    assert torch.equal(p.decode(), real)
    assert torch.equal(p.decode(torch.tensor([5, 1])), real[[5, 1]])
    with pytest.raises(ValueError):
        p.init_from_real(real[:4], p.labels[:4])
    with pytest.raises(ValueError):
        p.init_from_real(real, p.labels.flip(0))


def test_resolution_bilinear_and_differentiable():
    p = PixelImages.build(SPEC, 1)
    up = p.decode(resolution=(16, 12))
    assert up.shape == (4, 3, 16, 12)
    ref = torch.nn.functional.interpolate(p.images.detach(), size=(16, 12), mode="bilinear",
                                          align_corners=False)
    assert torch.allclose(up, ref)
    up.sum().backward()
    assert p.images.grad is not None and p.images.grad.abs().sum() > 0
    assert p.decode(resolution=(8, 6)) is p.images or torch.equal(p.decode(resolution=(8, 6)),
                                                                 p.images)


def test_optimizer_spec_lrs():
    """The papers' settings per regime (DM, DC, MTT: SGD momentum 0.5; SRe2L: Adam (0.5, 0.9))."""
    p = PixelImages.build(SPEC, 1)
    for regime, lr in [("distribution", 1.0), ("gradient", 0.1), ("trajectory", 100.0)]:
        spec = p.optimizer_spec(regime)
        assert spec.kind == "sgd" and spec.momentum == 0.5 and spec.params[0]["lr"] == lr
    rec = p.optimizer_spec("recover")
    assert rec.kind == "adam" and rec.betas == (0.5, 0.9) and rec.params[0]["lr"] == 0.25
    opt = rec.build()
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert p.optimizer_spec("distribution", lr=3.0).params[0]["lr"] == 3.0
    zca = PixelImages.build(DatasetSpec("c", 3, 8, 6, 4, zca=True), 1)
    assert zca.optimizer_spec("trajectory").params[0]["lr"] == 1000.0
    assert zca.optimizer_spec("distribution").params[0]["lr"] == 1.0
    opt = p.optimizer_spec("distribution").build()
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.5


@pytest.mark.parametrize("regime", ["dm", "other", ""])
def test_optimizer_spec_unknown_regime(regime):
    """An algorithm name or unknown regime is refused, naming it and the valid regimes."""
    p = PixelImages.build(SPEC, 1)
    with pytest.raises(ValueError, match=f"unknown regime '{regime}'.*distribution"):
        p.optimizer_spec(regime)


def test_state_round_trip_and_validation():
    p = PixelImages.build(SPEC, 3, generator=torch.Generator().manual_seed(1))
    t, cfg = p.state_tensors(), p.config()
    assert t["images"].dtype == torch.float32 and t["images"].device.type == "cpu"
    q = PixelImages.from_state(SPEC, t, cfg)
    assert torch.equal(q.decode(), p.decode()) and torch.equal(q.labels, p.labels)
    with pytest.raises(ValueError, match="images"):
        PixelImages.from_state(SPEC, {}, cfg)
    with pytest.raises(ValueError, match="shape"):
        PixelImages.from_state(SPEC, {"images": t["images"][:-1]}, cfg)
    with pytest.raises(ValueError, match="ipc"):
        PixelImages.from_state(SPEC, t, {})
    with pytest.raises(ValueError, match="dtype"):
        PixelImages.from_state(SPEC, {"images": t["images"].double()}, cfg)
