"""Initialising a parameterization from real images: the one place that picks them.

Every parameterization's :meth:`~splatdd.plugin_api.Parameterization.init_from_real` wants one real
image per stored item, in the order of its :attr:`labels` (class-major for the built-in plugins).
:func:`real_images_for` draws them from a :class:`~splatdd.plugin_api.RealData` with an explicit
generator (one :meth:`RealData.sample` call per class, in class order), and :func:`init_from_real`
hands them to the parameterization. The CLI, :func:`splatdd.experiment.run`, the benchmarks and the
test helpers all call these, so the same seed picks the same images everywhere.

Example::

    g = torch.Generator().manual_seed(0)
    diag = init_from_real(param, train, g, steps=200)   # e.g. {"mse": 0.003}
"""
from __future__ import annotations

from typing import Any

import torch

from splatdd.plugin_api import Parameterization, RealData

__all__ = ["real_images_for", "init_from_real"]


def real_images_for(labels: torch.Tensor, real: RealData,
                    generator: torch.Generator | None) -> torch.Tensor:
    """``(len(labels), C, H, W)`` random real images (CPU) whose classes are ``labels``: distinct
    images while a class has enough, then another shuffled pass over the class (a small dataset
    with a large GPC, e.g. GSDD's 640 Gaussian images per class, reuses images)."""
    labels = labels.detach().cpu()
    spec = real.spec
    images = torch.empty((len(labels), spec.channels, spec.height, spec.width))
    for c in range(spec.num_classes):
        idx = torch.nonzero(labels == c).flatten()
        if not len(idx):
            continue
        available = len(real.indices_of(c))
        if available == 0:
            raise ValueError(f"class {c} has no real images to initialise from")
        parts, need = [], len(idx)
        while need > 0:
            take = min(need, available)
            parts.append(real.sample(c, take, generator).cpu())
            need -= take
        images[idx] = torch.cat(parts)
    return images


def init_from_real(param: Parameterization, real: RealData, generator: torch.Generator | None,
                   *, steps: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Initialise ``param`` from random real images of its classes; returns the plugin's
    diagnostics (e.g. ``{"mse": ...}`` for fitted parameterizations)."""
    labels = param.labels.detach().cpu()
    images = real_images_for(labels, real, generator)
    return dict(param.init_from_real(images, labels, steps=steps, progress=progress) or {})
