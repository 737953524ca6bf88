"""Pictures of Gaussian images: ellipses over the render (the paper's Figure 9) and centre
positions showing Gaussian escape, or its absence (Figure 8)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["plot_ellipses", "plot_centres", "to_display"]


def to_display(images: torch.Tensor, mean: Sequence[float] = (), std: Sequence[float] = ()
               ) -> torch.Tensor:
    """Undo the per-channel normalisation and clamp to [0, 1]; ``(n, C, H, W)`` -> same shape."""
    x = images.detach().float().cpu()
    C = x.shape[1]
    if mean and std:
        m = torch.tensor(list(mean), dtype=x.dtype).view(1, C, 1, 1)
        s = torch.tensor(list(std), dtype=x.dtype).view(1, C, 1, 1)
        x = x * s + m
    else:   # no statistics: stretch to the image's own range
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    return x.clamp(0, 1)


def _hwc(img: torch.Tensor):
    arr = img.permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr[..., :3]


def plot_ellipses(param, index: int, path: str | Path, *, resolution: tuple[int, int] | None = None,
                  sigmas: float = 2.0, target: torch.Tensor | None = None) -> Path:
    """Save a figure of Gaussian image ``index`` of ``param`` (a ``GaussianImages``): its render and
    every Gaussian drawn as its ``sigmas``-sigma ellipse, filled with its colour with an opacity
    proportional to ``|alpha|`` (like the second row of the paper's Figure 9). ``target``, an
    optional ``(C, H, W)`` real image in the same normalisation, is shown alongside."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    spec = param.spec
    H, W = spec.resolution if resolution is None else resolution
    idx = torch.tensor([int(index)])
    with torch.no_grad():
        img = param.decode(idx, resolution=(H, W))
        g = param.packed(idx)[0].detach().float().cpu()             # (P, 6 + C), as rendered
    C = spec.channels
    rendered = to_display(img, spec.mean, spec.std)[0]
    cols = to_display(g[:, 5:5 + C].T.reshape(1, C, -1, 1), spec.mean, spec.std)[0, :, :, 0].T
    alpha = g[:, 5 + C].abs()
    alpha = (alpha / alpha.max().clamp_min(1e-8)).clamp(0.05, 1.0)

    panels = 3 if target is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4))
    k = 0
    if target is not None:
        axes[0].imshow(_hwc(to_display(target[None], spec.mean, spec.std)[0]),
                       cmap="gray" if C == 1 else None, vmin=0, vmax=1)
        axes[0].set_title("target")
        k = 1
    axes[k].imshow(_hwc(rendered), cmap="gray" if C == 1 else None, vmin=0, vmax=1,
                   interpolation="nearest")
    axes[k].set_title(f"render {H}x{W}")
    ax = axes[k + 1]
    ax.set_facecolor("white")
    for j in range(g.shape[0]):
        u, v, l11, l21, l22 = (float(t) for t in g[j, :5])
        # pixel-space covariance: S L L^T S with S = diag(W/2, H/2); pixel centre of u is (u+1)W/2
        a, b = l11 * W / 2, 0.0
        c, d = l21 * H / 2, l22 * H / 2
        sxx, sxy, syy = a * a + b * b, a * c + b * d, c * c + d * d
        tr, det = sxx + syy, sxx * syy - sxy * sxy
        disc = math.sqrt(max(tr * tr / 4 - det, 0.0))
        e1, e2 = tr / 2 + disc, max(tr / 2 - disc, 0.0)
        angle = 0.5 * math.degrees(math.atan2(2 * sxy, sxx - syy))
        colour = cols[j].tolist()
        if C == 1:
            colour = colour * 3
        ax.add_patch(Ellipse(((u + 1) * W / 2, (v + 1) * H / 2), 2 * sigmas * math.sqrt(e1),
                             2 * sigmas * math.sqrt(e2), angle=angle, facecolor=colour[:3],
                             alpha=float(alpha[j]) * 0.8, edgecolor="k", linewidth=0.3))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_aspect("equal")
    ax.set_title(f"{g.shape[0]} Gaussians ({sigmas:g} sigma)")
    for a_ in axes:
        a_.set_xticks([])
        a_.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_centres(history_or_param, path: str | Path, *, title: str | None = None,
                 max_points: int = 20000) -> Path:
    """Scatter the centres of all Gaussians against the valid square ``[-1, 1]^2``.

    ``history_or_param``: a ``GaussianImages`` (its current centres), a tensor ``(..., 2)`` of
    centres, or a list of such tensors (snapshots over time, e.g. from ``GaussianImages.fit(...,
    history=...)``): then the first snapshot is grey, the last coloured, and each Gaussian's path
    is drawn. The title counts the centres outside the square (escaped, as in the paper's Figure 8).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if hasattr(history_or_param, "params"):
        snaps = [history_or_param.params.detach()[..., :2].cpu()]
    elif isinstance(history_or_param, torch.Tensor):
        snaps = [history_or_param.detach().cpu()]
    else:
        snaps = [torch.as_tensor(s).detach().cpu() for s in history_or_param]
    snaps = [s.reshape(-1, 2).float() for s in snaps]
    n = snaps[-1].shape[0]
    keep = torch.arange(n)
    if n > max_points:
        keep = torch.linspace(0, n - 1, max_points).long()
    fig, ax = plt.subplots(figsize=(4.6, 4.6))
    if len(snaps) > 1:
        path_xy = torch.stack([s[keep] for s in snaps])               # (T, k, 2)
        for j in range(min(path_xy.shape[1], 2000)):
            ax.plot(path_xy[:, j, 0], path_xy[:, j, 1], color="0.75", linewidth=0.3, zorder=1)
        ax.scatter(snaps[0][keep, 0], snaps[0][keep, 1], s=2, color="0.6", label="start", zorder=2)
    last = snaps[-1]
    outside = ((last.abs() > 1.0).any(dim=1)).sum().item()
    ax.scatter(last[keep, 0], last[keep, 1], s=2, color="tab:red", label="end", zorder=3)
    ax.plot([-1, 1, 1, -1, -1], [-1, -1, 1, 1, -1], color="k", linewidth=1)
    lim = max(1.1, float(last.abs().max()) * 1.05) if n else 1.1
    ax.set_xlim(-lim, lim)
    ax.set_ylim(lim, -lim)
    ax.set_aspect("equal")
    ax.set_xlabel("u")
    ax.set_ylabel("v")
    head = title + "\n" if title else ""
    ax.set_title(f"{head}{outside} of {n} centres outside [-1, 1]^2 ({100 * outside / max(n, 1):.1f}%)",
                 fontsize=9)
    if len(snaps) > 1:
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
