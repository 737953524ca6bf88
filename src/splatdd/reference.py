"""Dense pure-PyTorch reference renderer: the oracle of the tests and the benchmarks' baseline.

Exactly the maths of docs/renderer.md (and of cpp/splat_math.h), written the way a user would by
hand: every Gaussian is evaluated at every sample of its image, so memory and time grow with
N * H * W * ssaa**2 per image. Differentiable by autograd; bfloat16 parameters are computed in
float32 (like the compiled backends), float64 in float64.

* :func:`render` -- the renderer with the cut-off kernel ``max(exp(-d2/2) - exp(-8), 0)`` on
  ``d2 <= 16``, identical in meaning to :func:`splatdd.render`.
* :func:`render_untruncated` -- the plain mixture ``exp(-d2/2)`` with no cut-off, to measure the
  cut-off's error.
* :func:`render_window` -- :func:`render` evaluated on a rectangle of pixels only (exactly the same
  values as cropping the full render), so large images can be checked where a Gaussian lands.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .render import _check_common, _check_finite

__all__ = ["render", "render_untruncated", "render_window", "CUTOFF_D2", "TAIL_VALUE", "PREFILTER_VARIANCE", "MIN_VARIANCE"]

CUTOFF_D2 = 16.0                      # (Mahalanobis cut-off radius 4)^2
TAIL_VALUE = 3.3546262790251185e-04   # exp(-8)
PREFILTER_VARIANCE = 1.0 / 12.0       # sample units
MIN_VARIANCE = 1e-4                   # sample units, when prefilter=False


def _render_dense(p: torch.Tensor, H: int, W: int, ssaa: int, prefilter: bool, truncate: bool,
                  window: Optional[Tuple[int, int, int, int]] = None) -> torch.Tensor:
    """p: (B, N, 6 + C) -> (B, C, H, W), or (B, C, h, w) for the pixel window (r0, c0, h, w)."""
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    p = p.to(acc)
    B, N, P = p.shape
    C = P - 6
    Hs, Ws = H * ssaa, W * ssaa
    sx, sy = 0.5 * Ws, 0.5 * Hs
    delta = PREFILTER_VARIANCE if prefilter else MIN_VARIANCE
    u, v, l11, l21, l22 = (p[..., q] for q in range(5))
    col = p[..., 5 : 5 + C]
    alpha = p[..., 5 + C]
    # mean and covariance Sigma = (S L)(S L)^T in sample units, S = diag(Ws/2, Hs/2)
    mx = (u + 1.0) * sx
    my = (v + 1.0) * sy
    a = sx * sx * l11 * l11
    b = sx * sy * l11 * l21
    c = sy * sy * (l21 * l21 + l22 * l22)
    q = sx * sy * l11 * l22
    det = q * q + delta * (a + c) + delta * delta  # det(Sigma + delta I), no cancellation
    A = (c + delta) / det
    Bc = -b / det
    Cc = (a + delta) / det
    r0, c0 = 0, 0
    if window is not None:
        r0, c0, H, W = window
        Hs, Ws = H * ssaa, W * ssaa
    xs = torch.arange(c0 * ssaa, c0 * ssaa + Ws, dtype=acc, device=p.device) + 0.5
    ys = torch.arange(r0 * ssaa, r0 * ssaa + Hs, dtype=acc, device=p.device) + 0.5
    dx = xs.view(1, 1, 1, Ws) - mx[..., None, None]   # (B, N, 1, Ws)
    dy = ys.view(1, 1, Hs, 1) - my[..., None, None]   # (B, N, Hs, 1)
    d2 = (A[..., None, None] * dx * dx + 2.0 * Bc[..., None, None] * dx * dy
          + Cc[..., None, None] * dy * dy)            # (B, N, Hs, Ws)
    e = torch.exp(-0.5 * d2)
    if truncate:
        k = torch.where(d2 <= CUTOFF_D2, torch.relu(e - TAIL_VALUE), torch.zeros((), dtype=acc, device=p.device))
    else:
        k = e
    img = torch.einsum("bnhw,bnc->bchw", k, alpha[..., None] * col)  # (B, C, Hs, Ws)
    if ssaa > 1:
        img = img.reshape(B, C, H, ssaa, W, ssaa).mean(dim=(3, 5))
    return img


def _render(params, H, W, ssaa, prefilter, counts, truncate):
    B, C, counts_list, H, W, ssaa = _check_common(params, H, W, ssaa, prefilter, counts)
    _check_finite(params)
    if counts_list is None:
        return _render_dense(params, H, W, ssaa, prefilter, truncate)
    acc = torch.float64 if params.dtype == torch.float64 else torch.float32
    images = []
    start = 0
    for n in counts_list:
        chunk = params[start : start + n].unsqueeze(0)
        start += n
        images.append(_render_dense(chunk, H, W, ssaa, prefilter, truncate))
    if not images:
        return params.new_zeros((0, C, H, W), dtype=acc)
    return torch.cat(images, dim=0)


def render(
    params: torch.Tensor,
    H: int,
    W: int,
    *,
    ssaa: int = 2,
    prefilter: bool = True,
    counts: Optional[Union[Sequence[int], torch.Tensor]] = None,
) -> torch.Tensor:
    """Dense reference of :func:`splatdd.render` (same arguments, same result, no backend)."""
    return _render(params, H, W, ssaa, prefilter, counts, truncate=True)


def render_untruncated(
    params: torch.Tensor,
    H: int,
    W: int,
    *,
    ssaa: int = 2,
    prefilter: bool = True,
    counts: Optional[Union[Sequence[int], torch.Tensor]] = None,
) -> torch.Tensor:
    """The untruncated mixture ``sum_k alpha_k exp(-d2_k / 2) c_k`` (no cut-off), otherwise as
    :func:`render`. The two differ by at most ``TAIL_VALUE * sum_k |alpha_k| |c_k|`` per pixel."""
    return _render(params, H, W, ssaa, prefilter, counts, truncate=False)


def render_window(
    params: torch.Tensor,
    H: int,
    W: int,
    window: Tuple[int, int, int, int],
    *,
    ssaa: int = 2,
    prefilter: bool = True,
) -> torch.Tensor:
    """:func:`render` of an ``H x W`` image restricted to the pixel rectangle ``window = (r0, c0,
    h, w)`` (rows ``r0 .. r0+h-1``, columns ``c0 .. c0+w-1``): ``(B, C, h, w)``, the same values
    as ``render(params, H, W)[..., r0:r0+h, c0:c0+w]`` at the cost of the window only.

    Example::

        crop = render_window(p.double(), 2048, 2048, (1000, 1000, 16, 16))
    """
    B, C, counts_list, H, W, ssaa = _check_common(params, H, W, ssaa, prefilter, None)
    _check_finite(params)
    if not (isinstance(window, (tuple, list)) and len(window) == 4
            and all(isinstance(x, int) and not isinstance(x, bool) for x in window)):
        raise TypeError(f"window must be a tuple of 4 ints (r0, c0, h, w), got {window!r}")
    r0, c0, h, w = window
    if not (0 <= r0 and 0 <= c0 and h >= 1 and w >= 1 and r0 + h <= H and c0 + w <= W):
        raise ValueError(f"window {window!r} must lie inside the {H} x {W} image and be non-empty")
    return _render_dense(params, H, W, ssaa, prefilter, True, window=(r0, c0, h, w))


def thin_gaussian(theta: float, major: float, ratio: float, u: float, v: float,
                  sign: float = 1.0, colour: float = 1.0, alpha: float = 1.0) -> list[float]:
    """One Gaussian's row ``[u, v, l11, l21, l22, colour, alpha]`` with standard deviations
    ``major`` and ``major * ratio`` (normalised units) along direction ``theta``: the Cholesky
    factor of ``R diag(major^2, (major*ratio)^2) R^T``, its first column times ``sign``. Thin
    (near-singular) Gaussians for the renderer's accuracy checks.

    >>> row = thin_gaussian(0.0, 0.2, 1e-3, 0.0, 0.0)
    >>> [round(x, 6) for x in row[2:5]]
    [0.2, 0.0, 0.0002]
    """
    import math
    c, s = math.cos(theta), math.sin(theta)
    s1, s2 = major, major * ratio
    sxx = c * c * s1 * s1 + s * s * s2 * s2
    sxy = c * s * (s1 * s1 - s2 * s2)
    syy = s * s * s1 * s1 + c * c * s2 * s2
    l11 = math.sqrt(sxx)
    l21 = sxy / l11
    l22 = math.sqrt(max(syy - l21 * l21, 0.0))
    return [u, v, sign * l11, l21, l22, colour, alpha]


def window_around(u: float, v: float, H: int, W: int, size: int = 24) -> Tuple[int, int, int, int]:
    """``(row0, col0, h, w)``: a ``size`` x ``size`` pixel window (clipped to the image) centred on
    the normalised point ``(u, v)``, for :func:`render_window`.

    >>> window_around(0.0, 0.0, 100, 100, size=10)
    (45, 45, 10, 10)
    """
    h, w = min(H, size), min(W, size)
    cx, cy = (float(u) + 1) * W / 2, (float(v) + 1) * H / 2
    return (min(max(int(cy) - h // 2, 0), H - h), min(max(int(cx) - w // 2, 0), W - w), h, w)
