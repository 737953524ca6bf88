"""Gaussian images from your own code: no CLI, no splatdd distillation loop -- just the plugin and
a few core helpers. docs/own_code.md and docs/gaussian.md walk through this file; the test
plugins/gaussian/tests/test_gaussian_example.py runs it.

1. size a distilled set to the storage of IPC pixel images per class with ``build(spec, ipc)``
   (IPC 1 on FashionMNIST becomes GPC = 11 Gaussian images per class of 20 Gaussians);
2. initialise it from real images (one real image per *stored* image, class-major);
3. optimise it with your own loss, with the optimiser ``optimizer_spec(regime)`` gives;
4. render at any resolution; save and load it as a distilled file.

    python plugins/gaussian/examples/quickstart.py
"""
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import splatdd
from splatdd import distilled_file
from splatdd.budget import check_budget
from splatdd.initialise import init_from_real
from splatdd.plugin_api import DatasetSpec, RealData
from splatdd_gaussian import GaussianImages

#: FashionMNIST's shape and normalisation (swap in your dataset's).
SPEC = DatasetSpec("fashion_mnist", channels=1, height=28, width=28, num_classes=10,
                   mean=(0.2861,), std=(0.3530,))


def toy_real(spec: DatasetSpec, per_class: int, generator: torch.Generator) -> RealData:
    """Stand-in real data (normalised): class ``c`` is a bright disc at a class-dependent place."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, spec.height), torch.linspace(-1, 1, spec.width),
                            indexing="ij")
    images, labels = [], []
    for c in range(spec.num_classes):
        angle = 2 * math.pi * c / spec.num_classes
        for _ in range(per_class):
            cx, cy = 0.5 * math.cos(angle), 0.5 * math.sin(angle)
            r = 0.25 + 0.1 * float(torch.rand((), generator=generator))
            disc = (((xs - cx) ** 2 + (ys - cy) ** 2) < r * r).float()
            images.append(disc.expand(spec.channels, -1, -1))
            labels.append(c)
    x = (torch.stack(images) - spec.mean[0]) / spec.std[0]
    return RealData(spec, x, torch.tensor(labels))


def my_loss(images: torch.Tensor, labels: torch.Tensor, real: RealData,
            generator: torch.Generator) -> torch.Tensor:
    """Your objective. Here a DM-like one: match each class's mean image to a real batch's."""
    loss = images.new_zeros(())
    for c in range(real.spec.num_classes):
        batch = real.sample(c, 8, generator)
        loss = loss + ((images[labels == c].mean(0) - batch.mean(0)) ** 2).sum()
    return loss


def main(spec: DatasetSpec = SPEC, ipc: int = 1, init_steps: int = 60, steps: int = 60,
         out_dir: str | None = None) -> dict:
    gen = torch.Generator().manual_seed(0)
    real = toy_real(spec, per_class=20, generator=gen)

    # 1) Equal storage: build(spec, ipc) spends the budget of `ipc` fp32 images per class on
    #    gpc Gaussian images per class (FashionMNIST IPC 1: gpc 11, 20 Gaussians each).
    gauss = GaussianImages.build(spec, ipc, generator=gen)
    report = check_budget(gauss, spec, ipc)              # raises BudgetError when over budget
    print(f"gpc {gauss.gpc} x {gauss.points} Gaussians, {len(gauss.labels)} images: {report}")

    # 2) Initialise: one real image per STORED image (len(gauss.labels), not ipc per class), in
    #    the order of gauss.labels (class-major). init_from_real draws them and fits them:
    #    `init_steps` full-batch Adam steps over all stored images.
    diag = init_from_real(gauss, real, torch.Generator().manual_seed(1), steps=init_steps)
    print(f"init fit: mse {diag['mse_start']:.4f} -> {diag['mse']:.4f}")

    # 3) Your own loop. optimizer_spec takes the optimisation regime of your objective
    #    ("distribution" for DM-like, "gradient", "trajectory", "recover"); the gaussian plugin
    #    uses Adam lr 1e-2 for all of them (GSDD appendix A.4).
    opt = gauss.optimizer_spec("distribution").build()
    labels = gauss.labels
    losses = []
    for _ in range(steps):
        images = gauss.decode()                           # differentiable, (n, C, H, W)
        loss = my_loss(images, labels, real, gen)
        reg = gauss.regularization()                      # boundary loss (Eq. 10)
        total = loss if reg is None else loss + reg
        opt.zero_grad()
        total.backward()
        opt.step()
        gauss.post_step()                                 # clips the centres (Eq. 11) ...
        losses.append(float(loss.detach()))
    images = gauss.decode().detach()                      # ... so decode AGAIN after post_step

    # 4) Render at any resolution, or call the renderer directly on the packed parameters.
    big = gauss.decode(resolution=(4 * spec.height, 4 * spec.width))
    raw = splatdd.render(gauss.packed().detach(), spec.height, spec.width, ssaa=2,
                         prefilter=True)

    # 5) Save as a distilled file (bf16 Gaussians + config + provenance) and load it back.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out_dir or tmp) / "distilled.safetensors"
        distilled_file.save(path, gauss, spec=spec, ipc=ipc, algorithm="my-dm-like-loss")
        loaded = distilled_file.load(path)
        same = torch.equal(loaded.param.decode(), images)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; reloaded renders identical: {same}")
    return {"gpc": gauss.gpc, "points": gauss.points, "num_images": len(labels),
            "bytes": gauss.num_bytes(), "budget": report.allowed, "mse_start": diag["mse_start"],
            "mse": diag["mse"], "losses": losses, "big_shape": tuple(big.shape),
            "raw_equal": torch.allclose(raw, images), "reload_identical": same}


if __name__ == "__main__":
    main()
