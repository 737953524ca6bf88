"""plot_ellipses / plot_centres write PNG files."""
import torch

from splatdd.plugin_api import DatasetSpec
from splatdd_gaussian import GaussianImages, plot_centres, plot_ellipses


def _png(path):
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_ellipses(tmp_path):
    for C in (1, 3):
        spec = DatasetSpec("toy", C, 12, 12, 1, (0.5,) * C, (0.25,) * C)
        g = GaussianImages(spec, gpc=2, points=6, generator=torch.Generator().manual_seed(0))
        p = plot_ellipses(g, 1, tmp_path / f"e{C}.png", target=torch.zeros(C, 12, 12))
        assert _png(p)


def test_plot_centres_param_tensor_and_history(tmp_path):
    spec = DatasetSpec("toy", 3, 12, 12, 1)
    g = GaussianImages(spec, gpc=2, points=6, clip=False, boundary_loss=False)
    hist = []
    g.fit(torch.rand(2, 3, 12, 12), steps=4, history=hist, history_every=2)
    assert len(hist) == 2 and hist[0].shape == (2, 6, 2)
    assert _png(plot_centres(g, tmp_path / "a.png"))
    assert _png(plot_centres(torch.tensor([[0.0, 0.0], [1.5, 0.2]]), tmp_path / "b.png",
                             title="escape"))
    assert _png(plot_centres(hist, tmp_path / "c.png"))
