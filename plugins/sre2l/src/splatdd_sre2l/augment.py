"""SRe2L's augmentation: random resized crop and horizontal flip, differentiable, generator-driven.

A crop is drawn like torchvision's ``RandomResizedCrop``: an area fraction uniform in ``scale``
(``(0.08, 1)`` by default), an aspect ratio log-uniform in ``ratio`` (``(3/4, 4/3)``), a position
uniform over the places where the crop fits; a crop that would exceed the image is redrawn, up to
10 attempts as torchvision, after which the whole image is used (torchvision's fallback for square
images; for non-square ones it crops the centre to the nearest allowed ratio). The crop
is resampled bilinearly to the output size with ``grid_sample`` (``align_corners=False``), so
gradients flow to the input pixels. The flip has probability 1/2.

``groups`` makes images share parameters: SRe2L's recover applies one crop and one flip to its whole
batch (``transforms.RandomResizedCrop`` on a batch tensor); FKD's relabel draws them per image.

Example::

    g = torch.Generator().manual_seed(0)
    params = sample_crops(8, g)                 # one crop per image
    y = apply_crops(x, params, size=(28, 28))   # (8, C, 28, 28)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["CropParams", "sample_crops", "apply_crops", "expand_groups"]


@dataclass
class CropParams:
    """Per-image crops in normalised coordinates: centre ``(cx, cy)`` in [-1, 1], half-extent
    ``(sx, sy)`` in (0, 1] (1 = the whole side), ``flip`` (bool)."""

    cx: torch.Tensor
    cy: torch.Tensor
    sx: torch.Tensor
    sy: torch.Tensor
    flip: torch.Tensor

    def __len__(self) -> int:
        return len(self.cx)

    def index(self, idx: torch.Tensor) -> "CropParams":
        return CropParams(self.cx[idx], self.cy[idx], self.sx[idx], self.sy[idx], self.flip[idx])


def sample_crops(n: int, generator: torch.Generator, *, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True) -> CropParams:
    """``n`` random resized crops (and flips), drawn from ``generator`` (CPU tensors)."""
    lo, hi = float(scale[0]), float(scale[1])
    if not (0 < lo <= hi <= 1):
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
    attempts = 10
    u = torch.rand(n, attempts, 2, generator=generator, dtype=torch.float64)
    area = lo + (hi - lo) * u[..., 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    r = torch.exp(log_r)
    w_all = torch.sqrt(area * r)                     # fraction of the width, per attempt
    h_all = torch.sqrt(area / r)
    fits = (w_all <= 1) & (h_all <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), 0)
    rows = torch.arange(n)
    ok = fits.any(1)
    w = torch.where(ok, w_all[rows, first], torch.ones(n, dtype=torch.float64))
    h = torch.where(ok, h_all[rows, first], torch.ones(n, dtype=torch.float64))
    v = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    cx = (1 - w) * (2 * v[:, 0] - 1)                 # centre so the crop stays inside
    cy = (1 - h) * (2 * v[:, 1] - 1)
    fl = (v[:, 2] < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    return CropParams(cx.float(), cy.float(), w.float(), h.float(), fl)


def expand_groups(params: CropParams, sizes: Sequence[int]) -> CropParams:
    """Repeat the ``i``-th crop ``sizes[i]`` times (one crop shared by each group)."""
    if len(params) != len(sizes):
        raise ValueError(f"need one crop per group: {len(params)} crops, {len(sizes)} groups")
    rep = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(list(sizes)))
    return params.index(rep)


def apply_crops(x: torch.Tensor, params: CropParams, size: Sequence[int] | None = None
                ) -> torch.Tensor:
    """Crop ``x`` ``(n, C, H, W)`` with ``params`` (one per image) and resample each crop to ``size``
    (default ``(H, W)``), bilinearly; differentiable in ``x``."""
    n = x.shape[0]
    if len(params) != n:
        raise ValueError(f"need one crop per image: {len(params)} crops, {n} images")
    out_h, out_w = (x.shape[-2], x.shape[-1]) if size is None else (int(size[0]), int(size[1]))
    dev, dt = x.device, x.dtype
    sx = params.sx.to(dev, dt) * torch.where(params.flip.to(dev), -1.0, 1.0).to(dt)
    theta = torch.zeros(n, 2, 3, device=dev, dtype=dt)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = params.cx.to(dev, dt)
    theta[:, 1, 1] = params.sy.to(dev, dt)
    theta[:, 1, 2] = params.cy.to(dev, dt)
    grid = F.affine_grid(theta, [n, x.shape[1], out_h, out_w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
