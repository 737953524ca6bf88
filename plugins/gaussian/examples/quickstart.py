"""Gaussian images from third-party code: no CLI, no distillation loop -- just the plugin.

Builds Gaussian images for a batch of "real" images, fits them, steps an optimiser by hand,
renders at another resolution and saves/loads them. docs/gaussian.md shows this file; the test
plugins/gaussian/tests/test_gaussian_example.py runs it.

    python plugins/gaussian/examples/quickstart.py
"""
import math

import torch
import torch.nn.functional as F

import splatdd
from splatdd.plugin_api import DatasetSpec
from splatdd_gaussian import GaussianImages


def toy_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n smooth RGB test images: a colour gradient with a disc at a random place."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        cx, cy, r = (torch.rand(3, generator=generator) * torch.tensor([1.0, 1.0, 0.4])
                     + torch.tensor([-0.5, -0.5, 0.2])).tolist()
        disc = (((xs - cx) ** 2 + (ys - cy) ** 2) < r * r).float()
        base = torch.stack([0.5 + 0.4 * xs, 0.5 + 0.4 * ys, 0.5 - 0.2 * xs * ys])
        out.append(base * (1 - disc) + torch.tensor([0.9, 0.2, 0.1]).view(3, 1, 1) * disc)
    return torch.stack(out)


def main(n: int = 4, size: int = 32, points: int = 48, steps: int = 60) -> dict:
    gen = torch.Generator().manual_seed(0)
    real = toy_images(n, size, gen)                       # (n, 3, size, size), your data here

    # One "class" holding n Gaussian images of `points` Gaussians each (bf16 storage).
    spec = DatasetSpec("toy", channels=3, height=size, width=size, num_classes=1)
    gauss = GaussianImages(spec, gpc=n, points=points, generator=gen)
    print(gauss, "->", gauss.num_bytes(), "bytes")

    # 1) Initialise by fitting the real images (MSE, Adam lr 1e-2, one renderer call per step).
    diag = gauss.init_from_real(real, gauss.labels, steps=steps)
    print(f"init fit: mse {diag['mse_start']:.4f} -> {diag['mse']:.4f}")

    # 2) Or drive the optimisation yourself, e.g. with your own loss.
    opt = gauss.optimizer_spec("custom").build()          # Adam, lr 1e-2
    for _ in range(steps):
        opt.zero_grad()
        images = gauss.decode()                           # differentiable, (n, 3, size, size)
        loss = F.mse_loss(images, real) + gauss.regularization()   # + boundary loss (Eq. 10)
        loss.backward()
        opt.step()
        gauss.post_step()                                 # clip centres (Eq. 11)
    mse = F.mse_loss(gauss.decode(), real).item()
    print(f"after {steps} more steps: mse {mse:.4f}, PSNR {10 * math.log10(1 / mse):.2f} dB")

    # 3) Render at any resolution, or call the renderer directly on the packed parameters.
    big = gauss.decode(resolution=(4 * size, 4 * size))
    raw = splatdd.render(gauss.packed().detach(), size, size, ssaa=2, prefilter=True)

    # 4) Save and load (bf16 tensors + a JSON-able config).
    tensors, config = gauss.state_tensors(), gauss.config()
    again = GaussianImages.from_state(spec, tensors, config)
    same = torch.equal(again.decode(), gauss.decode())
    print("reloaded renders identical:", same)
    return {"mse_start": diag["mse_start"], "mse": mse, "big_shape": tuple(big.shape),
            "raw_equal": torch.allclose(raw, gauss.decode().detach()), "reload_identical": same}


if __name__ == "__main__":
    main()
