"""Differentiable Siamese Augmentation (DSA; Zhao & Bilen, ICML 2021), in plain torch.

``dsa(x, "color_crop_cutout_flip_scale_rotate", seed=s)`` applies, differentiably in ``x``:

* ``color``  -- brightness ``x + (r - 0.5) * 1.0``, then saturation
  ``(x - mean_c) * (2 r) + mean_c`` (channel mean; a no-op on 1-channel images, as in DSA), then
  contrast ``(x - mean) * (r + 0.5) + mean`` (mean over C, H, W) -- all three, each its own ``r``;
* ``crop``   -- integer translation by up to ``0.125`` of the size, zero fill;
* ``cutout`` -- zero a ``0.5 H x 0.5 W`` square at a random centre (clipped at the border);
* ``flip``   -- horizontal flip with probability 0.5;
* ``scale``  -- ``affine_grid``/``grid_sample`` with independent x/y scale in ``[1/1.2, 1.2]``;
* ``rotate`` -- ``affine_grid``/``grid_sample`` rotation by up to +-15 degrees.

Semantics follow DSA's reference ``DiffAugment`` (``VICO-UoE/DatasetCondensation``, utils.py) in
its default ``aug_mode='S'``: ONE op is drawn uniformly from the ``'_'``-separated strategy per call
(per batch, not per sample); ``DSAParams(aug_mode="M")`` applies every op in order instead.

Parameter sharing (documented choice). The reference has two modes: with a seed ("siamese", used
by DC/DSA/DM when matching real and synthetic batches) it draws ONE set of random parameters and
applies it to every image in the batch ("batchmode"); without a seed (network training and
evaluation) it draws parameters per sample. We reproduce both: ``per_sample=False`` (default) is
the siamese batch mode -- real and synthetic batches of *any* sizes get the identical transform
when called with the same seed; ``per_sample=True`` draws one parameter set per sample index
(still deterministic in the seed, so two equal-sized batches also get identical per-index
transforms), which :mod:`splatdd.evaluate` uses for training.

All randomness comes from a private CPU ``torch.Generator`` seeded with ``seed``: same seed, same
transform; the global RNG is never touched. Random parameters are drawn on the CPU and moved to
``x``'s device, so CPU and GPU get the same transforms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["dsa", "DSAParams", "DSA_OPS", "DEFAULT_STRATEGY"]

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass(frozen=True)
class DSAParams:
    """Ranges of DSA's random ops (DSA's ``ParamDiffAug`` defaults)."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0        # degrees
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5         # the cut square is 0.5 H x 0.5 W
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    aug_mode: str = "S"               # "S": one op per call; "M": all ops in order


def _rand(g: torch.Generator, n: int, b: int) -> torch.Tensor:
    """``n`` uniform [0, 1) draws (n == 1 batch mode, n == b per sample), as a (b,) tensor."""
    r = torch.rand(n, generator=g, dtype=torch.float64)
    return r.expand(b) if n == 1 else r


def _randint(g: torch.Generator, lo: int, hi: int, n: int, b: int) -> torch.Tensor:
    r = torch.randint(lo, hi, (n,), generator=g)
    return r.expand(b) if n == 1 else r


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _brightness(x, g, n, p: DSAParams):
    r = _rand(g, n, x.shape[0])
    return x + (_col(r, x) - 0.5) * p.brightness


def _saturation(x, g, n, p: DSAParams):
    r = _rand(g, n, x.shape[0])
    m = x.mean(dim=1, keepdim=True)
    return (x - m) * (_col(r, x) * p.saturation) + m


def _contrast(x, g, n, p: DSAParams):
    r = _rand(g, n, x.shape[0])
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - m) * (_col(r, x) + p.contrast) + m


def _crop(x, g, n, p: DSAParams):
    b, c, h, w = x.shape
    sh, sw = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    ty = _randint(g, -sh, sh + 1, n, b)
    tx = _randint(g, -sw, sw + 1, n, b)
    xp = F.pad(x, (1, 1, 1, 1))                      # one zero row/column on every side
    rows = (torch.arange(h).view(1, h) + ty.view(b, 1) + 1).clamp(0, h + 1).to(x.device)
    cols = (torch.arange(w).view(1, w) + tx.view(b, 1) + 1).clamp(0, w + 1).to(x.device)
    out = torch.gather(xp, 2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2))
    return torch.gather(out, 3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def _cutout(x, g, n, p: DSAParams):
    b, _, h, w = x.shape
    ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    oy = _randint(g, 0, h + (1 - ch % 2), n, b) - ch // 2
    ox = _randint(g, 0, w + (1 - cw % 2), n, b) - cw // 2
    ar_h, ar_w = torch.arange(h).view(1, h), torch.arange(w).view(1, w)
    in_r = (ar_h >= oy.view(b, 1)) & (ar_h < oy.view(b, 1) + ch)          # (b, h)
    in_c = (ar_w >= ox.view(b, 1)) & (ar_w < ox.view(b, 1) + cw)          # (b, w)
    keep = ~(in_r.view(b, 1, h, 1) & in_c.view(b, 1, 1, w))
    return x * keep.to(device=x.device, dtype=x.dtype)


def _flip(x, g, n, p: DSAParams):
    r = _rand(g, n, x.shape[0])
    do = (r < p.prob_flip).to(x.device).view(-1, 1, 1, 1)
    return torch.where(do, x.flip(3), x)


def _affine(x, theta: torch.Tensor):
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _scale(x, g, n, p: DSAParams):
    b = x.shape[0]
    lo, hi = 1.0 / p.ratio_scale, p.ratio_scale
    sx = _rand(g, n, b) * (hi - lo) + lo
    sy = _rand(g, n, b) * (hi - lo) + lo
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 1, 1] = sx, sy
    return _affine(x, theta)


def _rotate(x, g, n, p: DSAParams):
    b = x.shape[0]
    a = (_rand(g, n, b) - 0.5) * 2 * p.ratio_rotate / 180.0 * math.pi
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    return _affine(x, theta)


#: op name -> the sub-ops it applies, in order (DSA's ``AUGMENT_FNS``).
DSA_OPS = {
    "color": (_brightness, _saturation, _contrast),
    "crop": (_crop,),
    "cutout": (_cutout,),
    "flip": (_flip,),
    "scale": (_scale,),
    "rotate": (_rotate,),
}


def dsa(x: torch.Tensor, strategy: str = DEFAULT_STRATEGY, *, seed: int,
        params: DSAParams = DSAParams(), per_sample: bool = False) -> torch.Tensor:
    """Apply DSA to ``x`` ``(B, C, H, W)``; differentiable in ``x``, same shape/dtype/device.

    ``seed`` fixes every random choice (siamese: call twice with the same seed for the real and
    the synthetic batch). ``per_sample=False`` shares one parameter set across the batch (DSA's
    seeded "batchmode"); ``True`` draws one per sample. ``strategy`` ``"none"``/``""`` returns
    ``x`` unchanged.
    """
    if x.dim() != 4:
        raise ValueError(f"dsa expects (B, C, H, W), got shape {tuple(x.shape)}")
    if not strategy or strategy.lower() == "none":
        return x
    names = strategy.split("_")
    bad = [s for s in names if s not in DSA_OPS]
    if bad:
        raise ValueError(f"unknown DSA op(s) {bad} in strategy {strategy!r}; "
                         f"known: {', '.join(DSA_OPS)}")
    if params.aug_mode not in ("S", "M"):
        raise ValueError(f"DSAParams.aug_mode must be 'S' or 'M', got {params.aug_mode!r}")
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    n = x.shape[0] if per_sample else 1
    if params.aug_mode == "S":
        names = [names[int(torch.randint(len(names), (1,), generator=g))]]
    for name in names:
        for op in DSA_OPS[name]:
            x = op(x, g, n, params)
    return x.contiguous()
