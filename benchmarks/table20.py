"""The GSDD paper's Table 20 task on this machine: fit 1,000 images at 128 px with 21, 170, 682 and
2,730 Gaussians per image for 1,000 Adam steps, and report seconds and peak GPU memory beside the
paper's A100 / RTX 4090 / RTX 5090 rows.

Task (one fit per Gaussian count, all images in one renderer call per step): Gaussians on a
regular grid (standard deviation half the grid spacing, colour sampled from the target at the
centre, opacity 1, fp32), then full-batch Adam (lr 1e-2) on the MSE between ``splatdd.render`` and
the targets, ``C = 3`` channels, ``ssaa`` 2 and the prefilter on (the gaussian plugin's defaults).
Timed: the Adam steps only (render, loss, backward, step), after two untimed warm-up steps on a
copy; not the image loading or the initialisation.

Images: the paper uses 1,000 ImageNet images (10 classes x 100). ImageNet is not available where
this runs, so: FashionMNIST test images (bilinearly upsampled to 128 px, the grey value copied to
three channels, so the renderer does the work of an RGB image) when an IDX directory is found
(``--fmnist DIR``, ``$SPLATDD_FMNIST_DIR`` or /usr/share/datasets/fashion-mnist), otherwise
procedurally generated RGB images (smooth gradients and soft ellipses, seeded). The output names
which. Image content changes PSNR, not the renderer's work much (that depends on the Gaussians'
coverage, which the initialisation fixes).

Time budget: ``--budget-s`` bounds the whole run. When the measured step time says a size cannot
finish its steps in its share of the remaining budget, the fit stops early and the full-task time
is extrapolated from the measured seconds per step; the row says so (``steps_run < steps``).

    python benchmarks/table20.py --device cuda --json out.json            # the full task
    python benchmarks/table20.py --device cpu --images 4 --resolution 32 --steps 20 --sizes 4,16
"""
from __future__ import annotations

import argparse
import gzip
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

#: GSDD paper, Table 20 (appendix C.3): seconds to fit 1,000 ImageNet images (10 classes x 100),
#: by Gaussians per image, three runs averaged, PyTorch 2.5.1, CUDA <= 12.0. Memory (GB) and PSNR
#: (dB) are the paper's too (memory identical on every GPU it lists).
PAPER_SOURCE = "GSDD paper, Table 20"
PAPER_SIZES = (21, 170, 682, 2730)
PAPER_SECONDS = {
    "A100": (10.45, 12.87, 19.09, 41.53),
    "RTX 4090": (7.60, 9.38, 14.06, 31.00),
    "RTX 5090": (7.13, 6.99, 9.54, 21.79),
}
PAPER_MEMORY_GB = (1.66, 1.70, 1.81, 2.28)
PAPER_PSNR_A100 = (20.24, 26.03, 31.06, 36.08)

DEFAULT_FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = ("t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz")
WARMUP_STEPS = 2


@dataclass
class FitRow:
    """One Gaussian count's result. ``seconds`` is for ``steps`` steps: measured when
    ``steps_run == steps``, else extrapolated from ``seconds_per_step``."""

    gaussians: int
    steps: int
    steps_run: int
    seconds: float
    seconds_measured: float
    seconds_per_step: float
    extrapolated: bool
    peak_memory_gb: float | None
    peak_reserved_gb: float | None
    psnr_init: float
    psnr: float

    def as_dict(self) -> dict:
        return asdict(self)


# ---- images --------------------------------------------------------------------------------------
def read_idx_images(path: Path, n: int) -> torch.Tensor:
    """The first ``n`` images of a gzipped IDX file as ``(n, 1, H, W)`` uint8.

    >>> read_idx_images(Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"), 2).shape
    torch.Size([2, 1, 28, 28])
    """
    with gzip.open(path, "rb") as fh:
        head = fh.read(16)
        if len(head) != 16 or int.from_bytes(head[:4], "big") != 0x803:
            raise ValueError(f"{path} is not an IDX image file (magic {head[:4].hex()})")
        count, h, w = (int.from_bytes(head[i:i + 4], "big") for i in (4, 8, 12))
        if n > count:
            raise ValueError(f"{path} holds {count} images, {n} requested")
        raw = fh.read(n * h * w)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(n, 1, h, w)


def procedural_images(n: int, resolution: int, *, seed: int = 0,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n, 3, R, R)`` images in [0, 1]: a colour gradient plus six soft ellipses each, seeded
    (the random numbers are drawn on the CPU, the pixels computed on ``device``).

    >>> procedural_images(2, 16).shape
    torch.Size([2, 3, 16, 16])
    """
    if n < 1 or resolution < 1:
        raise ValueError(f"n and resolution must be >= 1, got n={n}, resolution={resolution}")
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(device)

    t = ((torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 - 1).to(device)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    c0, c1 = rand(n, 3, 1, 1), rand(n, 3, 1, 1)
    ang = rand(n, 1, 1) * 2 * math.pi
    ramp = (xx * torch.cos(ang) + yy * torch.sin(ang)).unsqueeze(1) * 0.5 + 0.5   # (n, 1, R, R)
    img = c0 + (c1 - c0) * ramp
    for _ in range(6):
        cx, cy = (rand(n, 1, 1) * 1.6 - 0.8 for _ in range(2))
        ax, ay = (0.08 + rand(n, 1, 1) * 0.45 for _ in range(2))
        th = rand(n, 1, 1) * math.pi
        dx, dy = xx - cx, yy - cy
        u = (dx * torch.cos(th) + dy * torch.sin(th)) / ax
        v = (-dx * torch.sin(th) + dy * torch.cos(th)) / ay
        mask = torch.sigmoid((1 - (u * u + v * v)) * 12).unsqueeze(1)
        img = img * (1 - mask) + rand(n, 3, 1, 1) * mask
    return img.clamp(0, 1)


def find_fmnist(explicit: str | None = None) -> Path | None:
    """The FashionMNIST IDX directory: ``explicit``, else ``$SPLATDD_FMNIST_DIR``, else the
    system copy; None when none holds an image file. An explicit directory that holds none is an
    error."""
    candidates = [explicit] if explicit else [os.environ.get("SPLATDD_FMNIST_DIR"), str(DEFAULT_FMNIST)]
    for c in candidates:
        if c and any((Path(c) / f).is_file() for f in FMNIST_FILES):
            return Path(c)
    if explicit:
        raise ValueError(f"--fmnist {explicit}: no {' or '.join(FMNIST_FILES)} there")
    return None


def load_task_images(n: int, resolution: int, *, fmnist: str | None = None,
                     procedural: bool = False, seed: int = 0,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, str]:
    """``(images (n, 3, R, R) in [0, 1] on device, description)``: upsampled FashionMNIST when
    found (and ``procedural`` is False), else :func:`procedural_images`."""
    root = None if procedural else find_fmnist(fmnist)
    if root is not None:
        name = next(f for f in FMNIST_FILES if (root / f).is_file())
        x = read_idx_images(root / name, n).to(device).float() / 255.0
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        return x.clamp(0, 1).expand(n, 3, resolution, resolution).contiguous(), (
            f"first {n} FashionMNIST images of {root / name} (28 px grey), bilinearly upsampled "
            f"to {resolution} px, grey copied to 3 channels (ImageNet is not available here)")
    why = "requested" if procedural else "no FashionMNIST directory found"
    return procedural_images(n, resolution, seed=seed, device=device), (
        f"{n} procedurally generated {resolution} px RGB images (gradient + 6 soft ellipses, seed "
        f"{seed}; {why}; ImageNet is not available here)")


# ---- fitting -------------------------------------------------------------------------------------
def grid_init(images: torch.Tensor, n_gaussians: int) -> torch.Tensor:
    """``(B, N, 6 + C)`` fp32 parameters: the first N cells of a ceil(sqrt N)-wide grid, standard
    deviation half the spacing, colour = the target at the centre divided by the kernels'
    coverage (pi / 2), opacity 1.

    >>> grid_init(torch.zeros(1, 3, 8, 8), 5).shape
    torch.Size([1, 5, 9])
    """
    if n_gaussians < 1:
        raise ValueError(f"n_gaussians must be >= 1, got {n_gaussians}")
    B, C = images.shape[:2]
    gx = math.ceil(math.sqrt(n_gaussians))
    gy = math.ceil(n_gaussians / gx)
    k = torch.arange(n_gaussians)
    u = ((k % gx).float() + 0.5) / gx * 2 - 1
    v = ((k // gx).float() + 0.5) / gy * 2 - 1
    p = torch.zeros(B, n_gaussians, 6 + C, device=images.device)
    p[..., 0], p[..., 1] = u.to(images.device), v.to(images.device)
    p[..., 2], p[..., 4] = 1.0 / gx, 1.0 / gy          # std = half the spacing 2 / g
    coverage = math.pi / 2                              # 2 pi std^2 / cell area
    grid = torch.stack([u, v], -1).to(images.device).expand(B, n_gaussians, 2).unsqueeze(2)
    col = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=False)  # (B, C, N, 1)
    p[..., 5:5 + C] = col[..., 0].permute(0, 2, 1) / coverage
    p[..., 5 + C] = 1.0
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE), predictions clamped to [0, 1]."""
    mse = ((pred.detach().clamp(0, 1) - target) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def fit_images(images: torch.Tensor, n_gaussians: int, *, steps: int, lr: float = 1e-2,
               ssaa: int = 2, budget_s: float | None = None) -> FitRow:
    """Fit ``images`` (on their device) with ``n_gaussians`` each for ``steps`` Adam steps, or
    fewer when ``budget_s`` would be exceeded (then ``seconds`` is extrapolated).

    >>> row = fit_images(procedural_images(2, 16), 4, steps=3)
    >>> (row.steps_run, row.extrapolated)
    (3, False)
    """
    import splatdd

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = images.device
    B, C, H, W = images.shape
    target = images.float()
    init = grid_init(target, n_gaussians)

    def run(params: torch.Tensor, n: int, deadline: float | None) -> int:
        opt = torch.optim.Adam([params], lr=lr)
        done = 0
        t0 = time.perf_counter()
        for i in range(n):
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(splatdd.render(params, H, W, ssaa=ssaa), target)
            loss.backward()
            opt.step()
            done = i + 1
            # check the clock every few steps (each check syncs the device)
            if deadline is not None and (done in (1, 2, 5) or done % 10 == 0):
                _sync(device)
                per = (time.perf_counter() - t0) / done
                if time.perf_counter() + per * min(10, n - done) > deadline:
                    break
        return done

    with torch.no_grad():
        psnr0 = psnr(splatdd.render(init, H, W, ssaa=ssaa), target)
    run(init.clone().requires_grad_(True), min(WARMUP_STEPS, steps), None)   # untimed warm-up
    params = init.clone().requires_grad_(True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    done = run(params, steps, None if budget_s is None else t0 + budget_s)
    _sync(device)
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None
    reserved = torch.cuda.max_memory_reserved(device) / 1e9 if cuda else None
    with torch.no_grad():
        psnr1 = psnr(splatdd.render(params, H, W, ssaa=ssaa), target)
    per = secs / done
    return FitRow(n_gaussians, steps, done, per * steps if done < steps else secs, secs, per,
                  done < steps, peak, reserved, psnr0, psnr1)


def run_task(images: torch.Tensor, sizes: Sequence[int], *, steps: int, lr: float = 1e-2,
             ssaa: int = 2, budget_s: float | None = None, log=print,
             on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """:func:`fit_images` for each size (as dicts); the budget left is shared equally by the sizes
    left. A size that raises (e.g. out of memory) gives ``{"gaussians": n, "error": ...}`` and the
    next size still runs. ``on_row`` gets the rows so far after each size."""
    rows: list[dict] = []
    start = time.perf_counter()
    for i, n in enumerate(sizes):
        share = None
        if budget_s is not None:
            share = max(0.0, budget_s - (time.perf_counter() - start)) / (len(sizes) - i)
        try:
            row = fit_images(images, n, steps=steps, lr=lr, ssaa=ssaa, budget_s=share)
        except (RuntimeError, ValueError) as err:      # torch.cuda.OutOfMemoryError is a RuntimeError
            rows.append({"gaussians": n, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            log(f"  {n:5d} Gaussians: FAILED {rows[-1]['error']}")
            if images.device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            rows.append(row.as_dict())
            log(f"  {n:5d} Gaussians: {row.steps_run}/{row.steps} steps in {row.seconds_measured:.2f} s"
                f" ({row.seconds_per_step * 1e3:.2f} ms/step) -> {row.seconds:.2f} s"
                f"{' (extrapolated)' if row.extrapolated else ''}, PSNR {row.psnr_init:.2f} -> "
                f"{row.psnr:.2f} dB" + ("" if row.peak_memory_gb is None else
                                        f", peak {row.peak_memory_gb:.2f} GB"))
        if on_row is not None:
            on_row(rows)
    return rows


def paper_rows() -> list[dict]:
    """The paper's rows as dicts (gpu, seconds by size, memory by size, source)."""
    out = [{"gpu": g, "seconds": dict(zip(PAPER_SIZES, s)), "source": PAPER_SOURCE}
           for g, s in PAPER_SECONDS.items()]
    out.append({"gpu": "memory (GB), every GPU", "memory_gb": dict(zip(PAPER_SIZES, PAPER_MEMORY_GB)),
                "source": PAPER_SOURCE})
    return out


def comparison_table(rows: Sequence[dict], gpu_name: str, sizes: Sequence[int] = PAPER_SIZES) -> list[str]:
    """Markdown table: the paper's A100 / RTX 4090 / RTX 5090 seconds and memory beside ours.
    ``rows`` are :class:`FitRow` dicts (empty: our row says "not run")."""
    by = {r["gaussians"]: r for r in rows}
    head = "| GPU | " + " | ".join(str(s) for s in sizes) + " | source |"
    out = [head, "|" + "---|" * (len(sizes) + 2)]
    for g, secs in PAPER_SECONDS.items():
        vals = dict(zip(PAPER_SIZES, secs))
        out.append(f"| {g} (s) | " + " | ".join(f"{vals[s]:.2f}" if s in vals else "-" for s in sizes)
                   + f" | {PAPER_SOURCE} |")
    mem = dict(zip(PAPER_SIZES, PAPER_MEMORY_GB))
    out.append("| paper memory (GB) | " + " | ".join(f"{mem[s]:.2f}" if s in mem else "-" for s in sizes)
               + f" | {PAPER_SOURCE} |")

    def cell(s: int, key: str, fmt: str) -> str:
        r = by.get(s)
        if r is None:
            return "not run"
        if "error" in r:
            return "error"
        if r.get(key) is None:
            return "n/a"
        mark = "*" if key == "seconds" and r.get("extrapolated") else ""
        return format(r[key], fmt) + mark

    out.append(f"| ours, {gpu_name} (s) | " + " | ".join(cell(s, "seconds", ".2f") for s in sizes)
               + " | measured here |")
    out.append(f"| ours, {gpu_name}, peak allocated (GB) | "
               + " | ".join(cell(s, "peak_memory_gb", ".2f") for s in sizes) + " | measured here |")
    out.append("| ours, PSNR (dB) | " + " | ".join(cell(s, "psnr", ".2f") for s in sizes)
               + " | measured here (other images than the paper's) |")
    return out


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes must be comma-separated ints, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes must be ints >= 1, got {text!r}")
    return sizes


def _positive(kind):
    def conv(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return v
    return conv


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--images", type=_positive(int), default=1000)
    ap.add_argument("--resolution", type=_positive(int), default=128)
    ap.add_argument("--steps", type=_positive(int), default=1000)
    ap.add_argument("--sizes", type=_parse_sizes, default=list(PAPER_SIZES))
    ap.add_argument("--ssaa", type=int, choices=(1, 2, 4), default=2)
    ap.add_argument("--lr", type=_positive(float), default=1e-2)
    ap.add_argument("--budget-s", type=_positive(float), default=None,
                    help="wall-clock budget for all fits; sizes that would overrun are extrapolated")
    ap.add_argument("--fmnist", default=None, help="FashionMNIST IDX directory (default: search)")
    ap.add_argument("--procedural", action="store_true", help="use procedural images")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("table20: error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    t_load = time.perf_counter()
    images, desc = load_task_images(args.images, args.resolution, fmnist=args.fmnist,
                                    procedural=args.procedural, device=device)
    t_load = time.perf_counter() - t_load
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"table20: {args.images} images x {args.resolution} px, {args.steps} Adam steps, sizes "
          f"{args.sizes}, ssaa {args.ssaa}, on {gpu}; budget "
          f"{'none' if args.budget_s is None else f'{args.budget_s:.0f} s'}\n  images: {desc}", flush=True)
    budget = None if args.budget_s is None else max(1.0, args.budget_s - t_load)
    task = {"images": args.images, "resolution": args.resolution, "steps": args.steps,
            "sizes": args.sizes, "ssaa": args.ssaa, "lr": args.lr, "channels": 3,
            "budget_s": args.budget_s, "image_source": desc, "device": gpu,
            "timed": "Adam steps only (render, MSE, backward, step), after "
                     f"{WARMUP_STEPS} warm-up steps; no loading or initialisation"}
    all_sizes = sorted(set(PAPER_SIZES) | set(args.sizes))

    def write(rows: list[dict]) -> None:
        """The JSON after every size, so a run stopped by its time box keeps what it measured."""
        if args.json is None:
            return
        from splatdd.io_utils import atomic_write_json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, {"task": task, "rows": rows, "paper": paper_rows(),
                                      "table_md": comparison_table(rows, gpu, all_sizes)})

    rows = run_task(images, args.sizes, steps=args.steps, lr=args.lr, ssaa=args.ssaa,
                    budget_s=budget, on_row=write)
    print("\n".join(comparison_table(rows, gpu, all_sizes)))
    if any(r.get("extrapolated") for r in rows):
        print("* extrapolated from the measured seconds per step (budget reached)")
    if any("error" in r for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
