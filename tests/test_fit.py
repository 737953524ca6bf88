"""`splatdd fit` (src/splatdd/fit.py): the one fitting loop, equal-storage sizing through each
plugin's storage_options, the pixel baselines, measurement helpers and the CLI."""
import argparse
import math

import pytest
import torch

from splatdd.fit import (PeakMemory, fit_images, fit_method, format_table, pixel_grid, psnr,
                         register)
from splatdd.plugin_api import DatasetSpec
from splatdd.testing import TinyPixels, parameterization_class

pytestmark = pytest.mark.usefixtures("one_thread")


class _Halves(TinyPixels):
    """A third-party-style parameterization with storage_options: stores each image at half the
    resolution (decoded by nearest upsampling), so it can hold an image in a quarter of the bytes."""

    name = "halves"

    @classmethod
    def build(cls, spec, ipc, *, generator=None, items=None, **options):
        n = spec.num_classes * (ipc if items is None else items)
        small = DatasetSpec(spec.name, spec.channels, spec.height // 2, spec.width // 2,
                            spec.num_classes)
        p = cls(small, n // spec.num_classes, torch.zeros(n, spec.channels, spec.height // 2,
                                                          spec.width // 2))
        p.full = spec
        return p

    @classmethod
    def storage_options(cls, spec, items_per_class, bytes_per_item):
        return {"items": items_per_class}

    def decode(self, indices=None, *, resolution=None):
        x = super().decode(indices)
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")

    def init_from_real(self, images, labels, *, steps=None, progress=False):
        return fit_images(self, images, steps=steps or 0, lr=0.1)


def test_fit_images_reaches_the_closed_form_optimum():
    """Nearest 2x upsampling: the MSE optimum of each stored pixel is the mean of its 2x2 block."""
    target = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    p = _Halves.build(DatasetSpec("t", 1, 4, 4, 1), 2)
    calls = []
    diag = fit_images(p, target, steps=200, lr=0.03, on_step=lambda i, loss: calls.append(i))
    block_mean = torch.nn.functional.avg_pool2d(target, 2)
    assert torch.allclose(p.images.detach(), block_mean, atol=1e-3)
    assert calls == list(range(200)) and diag["steps"] == 200.0
    assert diag["mse"] < diag["mse_start"]
    best = float(((torch.nn.functional.interpolate(block_mean, scale_factor=2) - target) ** 2)
                 .mean())
    assert diag["mse"] == pytest.approx(best, rel=1e-3)


def test_storage_options_decide_the_size_without_naming_the_plugin():
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    keep = {}
    res = fit_method("halves", x, budget_bytes=8 * 8 * 4 / 4, steps=50,
                     get_class=lambda name: _Halves, keep=keep)
    assert res.bytes_per_image == 16 * 4 and len(keep["param"].labels) == 3
    assert res.extra["mse"] < res.extra["mse_start"] and math.isfinite(res.psnr)
    with pytest.raises(ValueError, match="exceeds the budget"):
        fit_method("halves", x, budget_bytes=16 * 4 - 1, steps=1, get_class=lambda name: _Halves)


def test_a_plugin_without_storage_options_must_be_sized_by_hand():
    x = torch.rand(3, 1, 8, 8)
    with pytest.raises(ValueError, match="storage_options.*-o tinypixels:KEY=VALUE"):
        fit_method("tinypixels", x, budget_bytes=8 * 8 * 4 / 2, steps=1,
                   get_class=lambda name: TinyPixels)


def test_pixel_grid():
    h, w = pixel_grid(963, 3, 128, 128)
    assert h * w * 3 <= 963 and (h, w) in ((16, 20), (17, 18), (18, 17), (20, 16))
    assert pixel_grid(784, 1, 28, 28) == (28, 28)


def test_psnr():
    t = torch.zeros(2, 1, 4, 4)
    assert psnr(t + 0.1, t) == pytest.approx(20.0, rel=1e-5)


def test_pixel_baselines_and_gaussian_at_equal_storage():
    cls = parameterization_class("gaussian")
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    budget = 8 * 8 * 3 * 4 / 4                          # a quarter of the pixels' bytes
    pix = fit_method("pixel", x, budget_bytes=budget, steps=5)
    assert pix.bytes_per_image <= budget and pix.steps == 0
    fitpix = fit_method("pixel-fit", x, budget_bytes=budget, steps=5)
    assert fitpix.bytes_per_image <= budget
    keep = {}
    g = fit_method("gaussian", x, budget_bytes=budget, steps=5, keep=keep)
    assert g.bytes_per_image == (budget // 18) * 18 <= budget
    assert keep["render"].shape == x.shape and math.isfinite(g.psnr)
    assert g.extra["mse"] < g.extra["mse_start"]
    assert "| gaussian |" in format_table([pix, fitpix, g])
    with pytest.raises(ValueError, match="exceeds"):
        fit_method("gaussian", x, budget_bytes=budget, steps=1, options={"points": 100},
                   get_class=lambda name: cls)


def test_siren_storage_options_give_ddif_fields():
    cls = parameterization_class("siren")
    spec = DatasetSpec("fit", 3, 128, 128, 1)
    assert cls.storage_options(spec, 5, 963 * 4) == {"dpc": 5, "layers": 3, "width": 20}


def test_peak_memory_measures_something():
    with PeakMemory("cpu") as mem:
        t = torch.ones(64, 1024, 1024)                  # 256 MB
        t.add_(1)
    del t
    assert math.isnan(mem.mb) or mem.mb > 100


def _parser():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser


def test_cli_parses_and_checks_its_arguments(capsys):
    args = _parser().parse_args(["fit", "--methods", "pixel,gaussian", "--images", "2",
                                 "--steps", "3", "-o", "gaussian:ssaa=1", "--lr",
                                 "gaussian=0.02"])
    assert args.images == 2 and args.steps == 3
    assert args.option == [("gaussian", "ssaa", 1)] and args.lr == [("gaussian", 0.02)]
    for bad in (["--lr", "gaussian"], ["--lr", "gaussian=-1"], ["-o", "gaussian=1"],
                ["--images", "0"]):
        with pytest.raises(SystemExit):
            _parser().parse_args(["fit", *bad])
        err = capsys.readouterr().err
        assert bad[0] in err


def test_splatdd_fit_is_a_core_command():
    from splatdd.cli import build_parser
    args = build_parser(plugin_commands=False).parse_args(["fit", "--images", "1"])
    from splatdd import fit
    assert args.func is fit.run


def test_cli_fit_runs_on_fashion_mnist(tmp_path, capsys):
    from splatdd.data import FASHION_MNIST_ROOT
    from pathlib import Path
    if not any(Path(FASHION_MNIST_ROOT).glob("t10k-images-idx3-ubyte*")):
        pytest.skip("FashionMNIST not installed")
    from splatdd.cli import main
    out = tmp_path / "r.json"
    rc = main(["fit", "--source", "fashion_mnist", "--resolution", "28", "--methods",
               "pixel,gaussian", "--images", "2", "--steps", "3", "--floats-per-image", "100",
               "--json", str(out)])
    assert rc == 0 and out.exists() and "gaussian" in capsys.readouterr().out


def test_cli_fit_unknown_method_is_a_clean_error(capsys):
    from splatdd.data import FASHION_MNIST_ROOT
    from pathlib import Path
    if not any(Path(FASHION_MNIST_ROOT).glob("t10k-images-idx3-ubyte*")):
        pytest.skip("FashionMNIST not installed")
    from splatdd.cli import main
    rc = main(["fit", "--source", "fashion_mnist", "--resolution", "28", "--methods",
               "nosuchplugin", "--images", "1", "--steps", "1"])
    assert rc == 2 and "splatdd: error: fit nosuchplugin" in capsys.readouterr().err
