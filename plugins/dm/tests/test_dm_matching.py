import pytest
import torch

from splatdd.plugin_api import DatasetSpec, RealData, check_plugin_class
from splatdd.testing import single_thread
from splatdd_dm import DistributionMatching

pixel = pytest.importorskip("splatdd_pixel")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads only add synchronisation cost on a busy machine."""
    with single_thread():
        yield


def toy_real(num_classes=3, per_class=12, c=1, h=12, w=12, seed=0):
    """Smooth class prototypes (upsampled 3x3 noise) plus a little pixel noise."""
    g = torch.Generator().manual_seed(seed)
    protos = 2 * torch.nn.functional.interpolate(torch.randn(num_classes, c, 3, 3, generator=g),
                                                 size=(h, w), mode="bilinear")
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = protos[labels] + 0.1 * torch.randn(len(labels), c, h, w, generator=g)
    spec = DatasetSpec("toy", c, h, w, num_classes, mean=(0.0,) * c, std=(1.0,) * c)
    return RealData(spec=spec, images=images, labels=labels)


class LinearDM(DistributionMatching):
    """DM with a fixed linear embedder: loss has a closed form."""
    W = None

    def make_embedder(self, seed, device):
        return lambda x: x.flatten(1) @ self.W


def test_contract_and_options():
    check_plugin_class(DistributionMatching, "algorithm")
    assert DistributionMatching.default_iterations == 20000
    real = toy_real()
    algo = DistributionMatching(real, ipc=1, generator=torch.Generator())
    assert algo.config()["batch_real"] == 256 and algo.config()["dsa"] is True
    with pytest.raises(TypeError, match="bogus"):
        DistributionMatching(real, ipc=1, generator=torch.Generator(), bogus=1)


@pytest.mark.parametrize("ipc", [1, 2])
def test_zero_loss_when_means_match_closed_form(ipc):
    real = toy_real()
    LinearDM.W = torch.randn(144, 5, generator=torch.Generator().manual_seed(1))
    # batch_real >= class size: the real batch is the whole class, so its mean is exact
    algo = LinearDM(real, ipc=ipc, generator=torch.Generator().manual_seed(0), batch_real=1000,
                    dsa=False)
    p = pixel.PixelImages.build(real.spec, ipc)
    means = torch.stack([real.images[real.labels == c].mean(0) for c in range(3)])
    imgs = means.repeat_interleave(ipc, 0).clone()
    if ipc == 2:  # symmetric perturbation keeps the class mean
        d = torch.randn(3, 1, 12, 12)
        imgs[0::2] += d
        imgs[1::2] -= d
    p.init_from_real(imgs, p.labels)
    assert algo.loss(p, 0).item() == pytest.approx(0.0, abs=1e-8)
    # shifting one class's synthetic mean by delta costs exactly ||delta_flat @ W||^2
    delta = torch.randn(1, 12, 12)
    with torch.no_grad():
        p.images[p.class_indices(1)] += delta
    expected = ((delta.flatten() @ LinearDM.W) ** 2).sum()
    assert algo.loss(p, 1).item() == pytest.approx(expected.item(), rel=1e-4)


def test_zero_loss_with_real_network_and_siamese_dsa():
    """syn == the whole real class and the same DSA seed on both: identical embedding means."""
    real = toy_real(per_class=4)
    algo = DistributionMatching(real, ipc=4, generator=torch.Generator().manual_seed(0),
                                batch_real=4, dsa=True, net_width=8, net_depth=2)
    p = pixel.PixelImages.build(real.spec, 4)
    p.init_from_real(real.images.clone(), real.labels)
    for step in range(3):
        assert algo.loss(p, step).item() < 1e-8


def test_same_generator_state_same_loss():
    real = toy_real()
    p = pixel.PixelImages.build(real.spec, 1, generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(2):
        algo = DistributionMatching(real, ipc=1, generator=torch.Generator().manual_seed(5),
                                    batch_real=8, net_width=8, net_depth=2)
        losses.append([algo.loss(p, s).item() for s in range(2)])
    assert losses[0] == losses[1]


def test_tiny_run_decreases_loss():
    torch.manual_seed(0)
    real = toy_real()
    g = torch.Generator().manual_seed(0)
    p = pixel.PixelImages.build(real.spec, 1, generator=g)
    algo = DistributionMatching(real, ipc=1, generator=g, batch_real=12, net_width=16, net_depth=2,
                                dsa=True)
    opt = p.optimizer_spec(algo.regime).build()   # pixels: the paper's SGD lr 1.0, momentum 0.5
    losses = []
    for step in range(30):
        loss = algo.loss(p, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.2 * first, (first, last)
