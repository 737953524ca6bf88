"""`splatdd fit` helpers: equal-storage sizing, pixel baseline, generic fitting, CLI registration."""
import argparse
import math

import pytest
import torch

from splatdd_gaussian import GaussianImages
from splatdd_gaussian.fitting import (PeakMemory, equal_storage_options, fit_method, format_table,
                                      pixel_grid, psnr)


def test_equal_storage_sizes():
    # the paper's budget: 963 fp32 floats per 128 px RGB image
    opts = equal_storage_options("gaussian", 5, 963 * 4, 3, 128, 128)
    assert opts == {"gpc": 5, "points": 214}
    assert 214 * 9 * 2 <= 963 * 4 < 215 * 9 * 2
    pytest.importorskip("splatdd_siren")
    assert equal_storage_options("siren", 5, 963 * 4, 3, 128, 128) == {"dpc": 5, "layers": 3,
                                                                       "width": 20}
    assert equal_storage_options("other", 5, 100, 3, 8, 8) == {}


def test_pixel_grid():
    h, w = pixel_grid(963, 3, 128, 128)
    assert h * w * 3 <= 963 and (h, w) in ((16, 20), (17, 18), (18, 17), (20, 16))
    assert pixel_grid(784, 1, 28, 28) == (28, 28)


def test_psnr():
    t = torch.zeros(2, 1, 4, 4)
    assert psnr(t + 0.1, t) == pytest.approx(20.0, rel=1e-5)


def test_fit_methods_tiny():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    budget = 8 * 8 * 3 * 4 / 4                          # a quarter of the pixels' bytes
    pix = fit_method("pixel", x, budget_bytes=budget, steps=5)
    assert pix.bytes_per_image <= budget and pix.steps == 0
    fitpix = fit_method("pixel-fit", x, budget_bytes=budget, steps=5)
    assert fitpix.bytes_per_image <= budget
    keep = {}
    g = fit_method("gaussian", x, budget_bytes=budget, steps=5,
                   get_class=lambda name: GaussianImages, keep=keep)
    assert g.bytes_per_image == (budget // 18) * 18 <= budget
    assert keep["render"].shape == x.shape and math.isfinite(g.psnr)
    assert g.extra["mse"] < g.extra["mse_start"]
    assert "| gaussian |" in format_table([pix, fitpix, g])
    with pytest.raises(ValueError, match="exceeds"):
        fit_method("gaussian", x, budget_bytes=budget, steps=1, options={"points": 100},
                   get_class=lambda name: GaussianImages)


def test_peak_memory_measures_something():
    with PeakMemory("cpu") as mem:
        t = torch.ones(64, 1024, 1024)                  # 256 MB
        t.add_(1)
    del t
    assert math.isnan(mem.mb) or mem.mb > 100


def test_cli_registers_fit_command():
    from splatdd_gaussian.cli import register, run
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["fit", "--methods", "pixel,gaussian", "--images", "2",
                              "--steps", "3", "-o", "gaussian:ssaa=1", "--lr", "gaussian=0.02"])
    assert args.func is run and args.images == 2 and args.steps == 3


def test_cli_fit_runs_on_fashion_mnist(tmp_path, capsys):
    from pathlib import Path
    if not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("FashionMNIST not installed")
    from splatdd_gaussian.cli import register
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "r.json"
    args = parser.parse_args(["fit", "--source", "fashion_mnist", "--resolution", "28",
                              "--methods", "pixel,gaussian", "--images", "2", "--steps", "3",
                              "--floats-per-image", "100", "--json", str(out)])
    assert args.func(args) == 0
    assert out.exists() and "gaussian" in capsys.readouterr().out
