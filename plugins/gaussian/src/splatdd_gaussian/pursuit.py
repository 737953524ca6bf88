"""Starting geometry for ``init_from_real``: greedy matching pursuit with isotropic Gaussians.

Each image ``y`` (``C x H x W``) is approximated by ``points`` atoms ``w_k g_k`` chosen one at a
time: ``g_k(x) = exp(-|x - q_k|^2 / (2 s_k^2))`` centred on a pixel ``q_k`` with a standard
deviation ``s_k`` from a small set of scales, ``w_k`` (one value per channel) its least-squares
weight against the current residual, and the atom the one that removes the most squared error
(``sum_C <r, g>^2 / <g, g>``). All inner products are exact sums over the pixel grid (the
Gaussians are separable, so every one is a product of two 1-D sums), and after each choice the
correlation maps are updated in closed form instead of being recomputed: one pursuit of 110
FashionMNIST images with 20 atoms costs about 0.2-2 s, a few Adam steps' worth.

Started from this geometry, the MSE fit reaches the 1000-step MSE of the jittered-grid start in
about a quarter of the steps (benchmarks/results/speed.md), so ``init_steps`` defaults lower.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["pursuit", "pursuit_scales", "PURSUIT_SIDE"]

#: Images whose shorter side is at least twice this are pursued on an area-downsampled copy whose
#: shorter side is about this many pixels (by an integer factor), centres and scales mapped back:
#: the pursuit's cost grows with pixels x points, and a coarse start is all the fit needs.
PURSUIT_SIDE = 32


def pursuit_scales(base: float, *, octaves: float = 1.5, per_octave: int = 2) -> list[float]:
    """Scales ``base * 2^(k / per_octave)`` for ``|k| <= octaves * per_octave``.

    >>> [round(s, 2) for s in pursuit_scales(2.0, octaves=1, per_octave=1)]
    [1.0, 2.0, 4.0]
    """
    if not (base > 0 and math.isfinite(base)):
        raise ValueError(f"pursuit_scales: base must be a positive number, got {base!r}")
    k = int(round(octaves * per_octave))
    return [base * 2.0 ** (i / per_octave) for i in range(-k, k + 1)]


def _profiles(centres: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """``exp(-(x - c)^2 / (2 s^2))`` at the pixel indices ``x = 0 .. size-1``: ``(..., size)``."""
    x = torch.arange(size, dtype=centres.dtype, device=centres.device)
    return torch.exp(-(x - centres[..., None]) ** 2 / (2 * sigma[..., None] ** 2))


@torch.no_grad()
def pursuit(images: torch.Tensor, points: int, scales: Sequence[float], *,
            chunk: int = 64, side: int | None = PURSUIT_SIDE
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy matching pursuit of ``images`` ``(n, C, H, W)`` with ``points`` isotropic Gaussian
    atoms per image. Returns ``(centres (n, points, 2) as pixel indices (x, y), sigma (n, points)
    in pixels, weights (n, points, C))``; ``sum_k w_k g_k`` approximates each image.
    ``chunk`` images are processed at a time (memory: ``len(scales) * chunk * C * H * W`` values).
    Images with a shorter side of at least ``2 * side`` are pursued at ``1/f`` of their size,
    ``f = min(H, W) // side`` (area averaging; scales divided by ``f``), and the result mapped
    back to full-resolution pixels; ``side=None`` never downsamples.

    >>> y = torch.zeros(1, 1, 9, 9)
    >>> y[0, 0] = torch.exp(-((torch.arange(9.) - 4)[:, None] ** 2
    ...                       + (torch.arange(9.) - 6)[None, :] ** 2) / 2)
    >>> c, s, w = pursuit(y, 1, [0.5, 1.0, 2.0])
    >>> c.tolist(), s.tolist(), [round(v, 4) for v in w.flatten().tolist()]
    ([[[6.0, 4.0]]], [[1.0]], [1.0])
    """
    if images.dim() != 4:
        raise ValueError(f"pursuit: images must be (n, C, H, W), got {tuple(images.shape)}")
    if int(points) < 1:
        raise ValueError(f"pursuit: points must be >= 1, got {points}")
    if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
        raise ValueError(f"pursuit: scales must be positive numbers, got {list(scales)}")
    n, C, H, W = images.shape
    f = 1 if side is None else max(1, min(H, W) // int(side))
    if f > 1:
        images = torch.nn.functional.avg_pool2d(images, f, ceil_mode=True, count_include_pad=False)
        scales = [s / f for s in scales]
    outs = [_pursuit(images[i:i + chunk], int(points), scales) for i in range(0, n, chunk)]
    centres, sigma, weights = (torch.cat(parts) for parts in zip(*outs))
    if f > 1:
        centres = (centres + 0.5) * f - 0.5
        sigma = sigma * f
    return centres, sigma, weights


def _pursuit(y: torch.Tensor, points: int, scales: Sequence[float]):
    n, C, H, W = y.shape
    dt, dev = torch.float32, y.device
    S = len(scales)
    sc = torch.tensor([float(s) for s in scales], dtype=dt, device=dev)
    px, py = torch.arange(W, dtype=dt, device=dev), torch.arange(H, dtype=dt, device=dev)
    tx = _profiles(px.expand(S, W), sc[:, None].expand(S, W), W)        # (S, qx, x)
    ty = _profiles(py.expand(S, H), sc[:, None].expand(S, H), H)        # (S, qy, y)
    # corr[s, i, c, qy, qx] = <y_ic, g_(s, q)>;  norm[s, qy, qx] = <g_(s, q), g_(s, q)>
    corr = torch.einsum("ncyx,sqx->sncyq", y.to(dt), tx)
    corr = torch.einsum("sncyq,spy->sncpq", corr, ty).contiguous()
    norm = (tx * tx).sum(-1)[:, None, :] * (ty * ty).sum(-1)[:, :, None]
    centres = torch.zeros(n, points, 2, dtype=dt, device=dev)
    sigma = torch.zeros(n, points, dtype=dt, device=dev)
    weights = torch.zeros(n, points, C, dtype=dt, device=dev)
    rows = torch.arange(n, device=dev)
    for k in range(points):
        gain = (corr * corr).sum(2) / norm[:, None]                     # (S, n, H, W)
        best = gain.transpose(0, 1).reshape(n, -1).argmax(1)
        s_i, rest = best // (H * W), best % (H * W)
        qy, qx = rest // W, rest % W
        w = corr[s_i, rows, :, qy, qx] / norm[s_i, qy, qx][:, None]     # (n, C)
        sig = sc[s_i]
        # <g_chosen, g_(s, q)> for every scale and centre: separable, two 1-D sums
        ax = torch.einsum("nx,sqx->snq", _profiles(qx.to(dt), sig, W), tx)
        ay = torch.einsum("ny,spy->snp", _profiles(qy.to(dt), sig, H), ty)
        corr -= w[None, :, :, None, None] * ay[:, :, None, :, None] * ax[:, :, None, None, :]
        centres[:, k, 0], centres[:, k, 1] = qx.to(dt), qy.to(dt)
        sigma[:, k], weights[:, k] = sig, w
    return centres.float(), sigma.float(), weights.float()
