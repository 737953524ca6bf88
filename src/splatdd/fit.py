"""Image fitting at equal storage (the GSDD paper's Table 5): ``splatdd fit`` and the one fitting
loop parameterizations use for ``init_from_real``.

Every method gets the same per-image storage budget in bytes (``--floats-per-image`` fp32 values,
963 in the paper: exactly one DDiF field of 3 sine layers of width 20 at 128 px, stored in fp32),
fits the same real images with MSE for the same number of full-batch Adam steps, and is measured
for PSNR, wall time and peak memory (CUDA: ``max_memory_allocated``; CPU: the rise of the process's
peak resident set size, ``VmHWM``, which is reset before each method).

Methods:

* ``pixel`` and ``pixel-fit``, the command's own baselines (not the ``pixel`` plugin, which cannot
  go below one full image): area-downsample to the largest ``h x w`` grid within the budget and
  upsample bilinearly (``pixel``), or optimise those ``h x w`` pixels through the upsampling with
  Adam (``pixel-fit``);
* any installed parameterization, by name (``gaussian``, ``siren``, a third party's): built for one
  class of ``n`` items with the options its
  :meth:`~splatdd.plugin_api.Parameterization.storage_options` gives for the per-image budget (plus
  ``-o NAME:KEY=VALUE``), refused when it exceeds the budget, then fitted by its own
  ``init_from_real``.

The images' source is stated in every output (stdout, the table, ``--json``, the ``--png``
title). The default source, ``auto``, is scikit-image's bundled photographs when scikit-image is
installed (``pip install 'splatdd[photos]'``), else FashionMNIST's test images upsampled, with a
note saying so.

Examples::

    splatdd fit                                    # 8 photographs (or FashionMNIST), 128 px
    splatdd fit --methods pixel,siren,gaussian --images 8 --steps 1000 --floats-per-image 963
    splatdd fit --methods gaussian --lr gaussian=0.01 -o gaussian:ssaa=1 --json out.json
    splatdd fit --images 4 --steps 200 --png fit.png   # targets and fits, titled with the source
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from splatdd.memory import proc_status_kb, reset_peak_rss

__all__ = ["FitResult", "fit_images", "load_images", "fit_method", "psnr", "PeakMemory",
           "pixel_grid", "format_table", "machine_description", "register", "run",
           "SKIMAGE_PHOTOS", "BASELINES", "SKIMAGE_MISSING", "resolve_source", "write_png"]

#: colour photographs bundled with scikit-image (no download needed)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "retina",
                  "immunohistochemistry", "hubble_deep_field")
#: the command's own low-resolution pixel baselines (no plugin)
BASELINES = ("pixel", "pixel-fit")
#: what to do when the photographs are wanted and scikit-image is missing
SKIMAGE_MISSING = ("scikit-image is not installed, so its bundled photographs are not available "
                   "(install them with `pip install 'splatdd[photos]'` or `pip install "
                   "scikit-image`; no download at run time)")


# ---- the fitting loop ----------------------------------------------------------------------------
def fit_images(param: torch.nn.Module, target: torch.Tensor, *, steps: int, lr: float,
               regularize: bool = False, on_step: Callable[[int, float], None] | None = None,
               progress: bool = False, progress_every: int = 100) -> dict[str, float]:
    """Minimise ``MSE(param.decode(), target)`` with Adam (lr ``lr``) on all of ``param``'s
    parameters for ``steps`` full-batch steps, calling ``param.post_step()`` after every step (and
    adding ``param.regularization()`` when ``regularize``). ``on_step(step, loss)`` runs after every
    step. Returns ``{"mse", "mse_start", "steps", "seconds"}``. The loop parameterizations' own
    ``init_from_real`` and ``fit`` run::

        diag = fit_images(param, images, steps=1000, lr=1e-2)     # {"mse": 0.004, ...}
    """
    opt = torch.optim.Adam(param.parameters(), lr=lr)
    mse0 = None
    t0 = time.perf_counter()
    for it in range(int(steps)):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(param.decode(), target)
        if mse0 is None:
            mse0 = float(loss.detach())
        if regularize:
            reg = param.regularization()
            if reg is not None:
                loss = loss + reg
        loss.backward()
        opt.step()
        param.post_step()
        if on_step is not None:
            on_step(it, float(loss.detach()))
        if progress and (it % progress_every == 0 or it == steps - 1):
            print(f"  fit step {it + 1}/{steps}  mse {float(loss.detach()):.5f}", flush=True)
    with torch.no_grad():
        mse = float(F.mse_loss(param.decode(), target)) if steps else float("nan")
    return {"mse": mse, "mse_start": float("nan") if mse0 is None else mse0,
            "steps": float(steps), "seconds": time.perf_counter() - t0}


@dataclass
class FitResult:
    method: str
    psnr: float
    mse: float
    seconds: float
    seconds_per_step: float
    peak_memory_mb: float
    bytes_per_image: float
    budget_bytes_per_image: float
    steps: int
    lr: float | None = None
    detail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- data ----------------------------------------------------------------------------------------
def _resize_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop ``(C, H, W)`` to a square and area-resize it to ``size`` x ``size``."""
    C, H, W = img.shape
    s = min(H, W)
    top, left = (H - s) // 2, (W - s) // 2
    sq = img[:, top:top + s, left:left + s][None]
    return F.interpolate(sq, size=(size, size), mode="area" if s >= size else "bilinear",
                         align_corners=None if s >= size else False)[0]


def _skimage_crops(n: int, size: int, seed: int) -> torch.Tensor:
    import numpy as np
    from skimage import data as skdata

    photos = []
    for name in SKIMAGE_PHOTOS:
        arr = getattr(skdata, name)()
        if isinstance(arr, tuple):      # stereo_motorcycle: (left, right, disparity)
            arr = arr[0]
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        photos.append(torch.from_numpy(np.ascontiguousarray(arr[..., :3])).permute(2, 0, 1)
                      .float() / 255.0)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        if i < len(photos):             # first pass: the whole photograph, centre square
            out.append(_resize_square(img, size))
            continue
        C, H, W = img.shape             # later passes: random square crops of half to full size
        s = int(min(H, W) * (0.5 + 0.5 * torch.rand((), generator=gen).item()))
        top = int(torch.randint(0, H - s + 1, (), generator=gen))
        left = int(torch.randint(0, W - s + 1, (), generator=gen))
        out.append(_resize_square(img[:, top:top + s, left:left + s], size))
    return torch.stack(out).clamp(0, 1)


def _fashion_mnist_test_images(root: str | Path | None = None) -> torch.Tensor:
    """FashionMNIST's test images ``(10000, 1, 28, 28)`` uint8, through the core's IDX reader."""
    from splatdd.data import _fashion_root, _find_idx, read_idx
    folder = _fashion_root(root)
    path = _find_idx(folder, "t10k", "images-idx3")
    if path is None:
        raise FileNotFoundError(f"no t10k-images-idx3-ubyte[.gz] in {folder}")
    arr = read_idx(path)
    return torch.from_numpy(arr).unsqueeze(1)


def load_images(source: str, n: int, resolution: int | None, *, seed: int = 0
                ) -> tuple[torch.Tensor, str]:
    """``(images (n, C, H, W) in [0, 1], description)``.

    ``source``: ``"skimage"`` (crops of scikit-image's bundled colour photographs; needs
    scikit-image), ``"fashion_mnist"`` (the first ``n`` test images from the core's FashionMNIST
    location, bilinearly resized to ``resolution`` when it is not 28), ``"auto"`` (skimage if
    importable, else fashion_mnist, with a note in the description that says so and how to get
    the photographs: see :func:`resolve_source`), or a directory of image files (read with Pillow,
    centre-cropped and resized)::

        images, text = load_images("fashion_mnist", 4, 28)
    """
    source, note = resolve_source(source)
    images, desc = _load(source, n, resolution, seed)
    return images, desc + (f" [{note}]" if note else "")


def _skimage_available() -> bool:
    try:
        import skimage  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_source(source: str) -> tuple[str, str | None]:
    """``(source, note)``: ``"auto"`` becomes ``"skimage"`` when scikit-image is importable, else
    ``"fashion_mnist"`` with a note saying so and how to get the photographs; ``"skimage"``
    without scikit-image raises ``ImportError`` saying how to install it::

        resolve_source("auto")     # ('skimage', None) with scikit-image installed
    """
    if source == "auto":
        if _skimage_available():
            return "skimage", None
        return "fashion_mnist", ("fallback: " + SKIMAGE_MISSING + "; FashionMNIST used instead, "
                                 "so the figures are not comparable to the photograph ones")
    if source == "skimage" and not _skimage_available():
        raise ImportError(SKIMAGE_MISSING)
    return source, None


def _load(source: str, n: int, resolution: int | None, seed: int) -> tuple[torch.Tensor, str]:
    if source == "skimage":
        size = resolution or 128
        return _skimage_crops(n, size, seed), (
            f"{n} crops ({size}x{size} RGB) of scikit-image's bundled photographs "
            f"({', '.join(SKIMAGE_PHOTOS[:min(n, len(SKIMAGE_PHOTOS))])}; whole centre squares "
            f"first, then random crops)")
    if source in ("fashion_mnist", "fashion-mnist", "fmnist"):
        x = _fashion_mnist_test_images()[:n].float() / 255.0
        desc = f"first {n} FashionMNIST test images (28x28 grey)"
        if resolution and resolution != 28:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear",
                              align_corners=False).clamp(0, 1)
            desc += f", bilinearly upsampled to {resolution}x{resolution}"
        return x, desc
    root = Path(source)
    if not root.is_dir():
        raise ValueError(f"image source {source!r} is not 'skimage', 'fashion_mnist', 'auto' or "
                         f"a directory")
    import numpy as np
    from PIL import Image
    files = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))[:n]
    if len(files) < n:
        raise ValueError(f"{root} holds only {len(files)} images, {n} requested")
    size = resolution or 128
    imgs = [_resize_square(torch.from_numpy(np.asarray(Image.open(p).convert("RGB")))
                           .permute(2, 0, 1).float() / 255.0, size) for p in files]
    return torch.stack(imgs).clamp(0, 1), f"{n} images from {root} ({size}x{size} RGB)"


# ---- measurement ---------------------------------------------------------------------------------
def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over images of ``10 log10(1 / MSE)``, predictions clamped to [0, 1]::

        psnr(torch.full((1, 1, 2, 2), 0.1), torch.zeros(1, 1, 2, 2))     # 20.0
    """
    mse = ((pred.detach().clamp(0, 1) - target) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(1.0 / mse)).mean())


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a block: CUDA ``max_memory_allocated`` minus the allocation at entry, or on
    CPU the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) minus the RSS at
    entry. ``mb`` is NaN where neither can be measured::

        with PeakMemory("cpu") as mem:
            work()
        print(mem.mb)
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.mb = float("nan")
        self.kind = "cuda max_memory_allocated" if self.device.type == "cuda" else "peak RSS rise"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            import gc
            gc.collect()
            _malloc_trim()      # hand freed heap back, so the RSS at entry is what is live
            self._base = proc_status_kb("VmRSS") if reset_peak_rss() else None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._base is not None:
            peak = proc_status_kb("VmHWM")
            if peak is not None:
                self.mb = max(peak - self._base, 0) / 1024.0


# ---- equal storage -------------------------------------------------------------------------------
def pixel_grid(budget_floats: float, channels: int, height: int, width: int) -> tuple[int, int]:
    """The largest ``h x w`` (aspect close to ``height/width``) with ``h*w*C <= budget_floats``::

        pixel_grid(784, 1, 28, 28)       # (28, 28)
    """
    best = (1, 1)
    for h in range(1, height + 1):
        w = int(budget_floats // (channels * h))
        w = min(w, width)
        if w < 1:
            break
        if abs(math.log((h / w) / (height / width))) <= math.log(1.25) and h * w > best[0] * best[1]:
            best = (h, w)
    return best


# ---- fitting -------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_pixels(images: torch.Tensor, budget_bytes: float, *, steps: int, lr: float = 1e-2,
               optimise: bool, device: torch.device, keep: dict | None = None) -> FitResult:
    """The ``pixel`` (``optimise=False``) and ``pixel-fit`` baselines."""
    n, C, H, W = images.shape
    h, w = pixel_grid(budget_bytes / 4, C, H, W)
    target = images.to(device)
    with PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        low = F.interpolate(target, size=(h, w), mode="area")
        if optimise:
            low = low.clone().requires_grad_(True)
            opt = torch.optim.Adam([low], lr=lr)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(F.interpolate(low, size=(H, W), mode="bilinear",
                                                align_corners=False), target)
                loss.backward()
                opt.step()
        with torch.no_grad():
            rec = F.interpolate(low.detach(), size=(H, W), mode="bilinear", align_corners=False)
        _sync(device)
        secs = time.perf_counter() - t0
    used = h * w * C * 4
    if keep is not None:
        keep["param"], keep["render"] = low.detach().cpu(), rec.cpu()
    return FitResult("pixel-fit" if optimise else "pixel", psnr(rec, target),
                     float(F.mse_loss(rec.clamp(0, 1), target)), secs,
                     secs / steps if optimise and steps else float("nan"), mem.mb, used,
                     budget_bytes, steps if optimise else 0, lr if optimise else None,
                     f"{h}x{w}x{C} fp32 pixels, bilinear upsampling"
                     + (", optimised with Adam" if optimise else ", area downsampling only"))


def fit_method(method: str, images: torch.Tensor, *, budget_bytes: float, steps: int,
               lr: float | None = None, options: Mapping[str, Any] | None = None,
               seed: int = 0, device: str | torch.device = "cpu",
               get_class: Callable[[str], type] | None = None,
               keep: dict | None = None) -> FitResult:
    """Fit ``images`` (``(n, C, H, W)`` in [0, 1]) with ``method`` at ``budget_bytes`` per image.

    ``pixel``/``pixel-fit`` are the baselines; any other name is a parameterization looked up in
    the registry (``get_class`` overrides), built for one class holding ``n`` items with its
    ``storage_options`` plus ``options``, refused when it exceeds the budget (``ValueError``), and
    fitted by its own ``init_from_real(images, labels, steps=steps)`` (with ``init_lr=lr`` when
    ``lr`` is given). ``keep`` (a dict) receives the fitted object as ``keep["param"]`` and its
    render as ``keep["render"]``::

        res = fit_method("gaussian", images, budget_bytes=963 * 4, steps=1000)
        print(res.psnr)
    """
    device = torch.device(device)
    if method in BASELINES:
        return fit_pixels(images, budget_bytes, steps=steps, lr=1e-2 if lr is None else lr,
                          optimise=method == "pixel-fit", device=device, keep=keep)
    from splatdd.plugin_api import DatasetSpec
    if get_class is None:
        from splatdd.registry import get_parameterization as get_class
    cls = get_class(method)
    n, C, H, W = images.shape
    spec = DatasetSpec(name="fit", channels=C, height=H, width=W, num_classes=1,
                       mean=(0.0,) * C, std=(1.0,) * C)
    opts = dict(cls.storage_options(spec, n, budget_bytes) or {})
    opts.update(options or {})
    if lr is not None:
        opts["init_lr"] = lr
    # one "class" of n items; the ipc only bounds the plugin's own default sizing
    ipc = max(1, math.ceil(n * budget_bytes / (C * H * W * 4)))
    param = cls.build(spec, ipc, generator=torch.Generator().manual_seed(seed), **opts)
    if len(param.labels) != n:
        raise ValueError(f"{method}: built {len(param.labels)} items for {n} images; it has no "
                         f"storage_options, pass its per-class count with -o {method}:KEY=VALUE")
    per_image = param.num_bytes() / n
    if per_image > budget_bytes + 1e-9:
        raise ValueError(f"{method}: {per_image:.1f} bytes per image exceeds the budget of "
                         f"{budget_bytes:.1f}")
    param = param.to(device)
    target = images.to(device)
    with PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        diag = param.init_from_real(target, param.labels, steps=steps)
        _sync(device)
        secs = time.perf_counter() - t0
    with torch.no_grad():
        rec = param.decode().detach()
    if keep is not None:
        keep["param"], keep["render"] = param, rec.cpu()
    cfg = param.config()
    return FitResult(method, psnr(rec, target), float(F.mse_loss(rec.clamp(0, 1), target)), secs,
                     secs / steps if steps else float("nan"), mem.mb, per_image, budget_bytes,
                     steps, lr if lr is not None else cfg.get("init_lr"),
                     ", ".join(f"{k}={v}" for k, v in opts.items() if k != "init_lr"),
                     {k: float(v) for k, v in (diag or {}).items()})


def machine_description() -> str:
    """CPU model, core count and torch version (plus the GPU name when CUDA is available)."""
    import os

    from splatdd.runtime import cpu_model
    cpu = cpu_model()
    text = (f"{cpu}, {os.cpu_count()} logical cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def format_table(results: Sequence[FitResult], source: str | None = None) -> str:
    """A markdown table of fit results (preceded by ``Images: SOURCE`` when ``source`` is given)."""
    lines = [f"Images: {source}", ""] if source else []
    lines += ["| method | PSNR (dB) | time (s) | s / step | peak memory (MB) | bytes / image "
              "(budget) | lr | configuration |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results:
        sps = "-" if math.isnan(r.seconds_per_step) else f"{r.seconds_per_step:.4f}"
        mem = "n/a" if math.isnan(r.peak_memory_mb) else f"{r.peak_memory_mb:.1f}"
        lr = "-" if r.lr is None else f"{r.lr:g}"
        lines.append(f"| {r.method} | {r.psnr:.2f} | {r.seconds:.2f} | {sps} | {mem} | "
                     f"{r.bytes_per_image:.0f} ({r.budget_bytes_per_image:.0f}) | {lr} | "
                     f"{r.detail} |")
    return "\n".join(lines)


# ---- the command ---------------------------------------------------------------------------------
def _method_kv(text: str) -> tuple[str, str, Any]:
    """``METHOD:KEY=VALUE`` -> (method, key, parsed value); argparse type of ``-o``."""
    method, sep, kv = text.partition(":")
    key, eq, value = kv.partition("=")
    if not (sep and eq and method and key):
        raise argparse.ArgumentTypeError(f"expected METHOD:KEY=VALUE, got {text!r}")
    from splatdd.cli import parse_value
    return method, key, parse_value(value)


def _method_lr(text: str) -> tuple[str, float]:
    """``METHOD=LR`` -> (method, lr > 0); argparse type of ``--lr``."""
    method, eq, value = text.partition("=")
    try:
        lr = float(value)
    except ValueError:
        lr = float("nan")
    if not (eq and method and lr > 0 and math.isfinite(lr)):
        raise argparse.ArgumentTypeError(f"expected METHOD=LR with LR > 0, got {text!r}")
    return method, lr


def _plain(doc: str) -> str:
    """reStructuredText of a docstring as plain text for ``--help``: ````x```` -> x,
    ``:role:`~a.b.c``` -> c, ``::`` -> ``:``."""
    import re
    text = re.sub(r":[a-z]+:`~?([^`]*)`", lambda m: m.group(1).split(".")[-1], doc)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    return re.sub(r"::\n", ":\n", text).replace(" ::", "")


def register(subparsers: Any) -> None:
    """Add ``splatdd fit`` to the CLI (the core registers it; see :func:`splatdd.cli.build_parser`)."""
    from splatdd.cli import nonneg_int, positive_float, positive_int
    p = subparsers.add_parser(
        "fit", help="fit real images with parameterizations at equal storage (PSNR/time/memory)",
        description=_plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="pixel,siren,gaussian",
                   help="comma-separated: 'pixel' (downsample + bilinear up), 'pixel-fit' "
                        "(optimised low-res pixels), or any installed parameterization name "
                        "(default pixel,siren,gaussian)")
    p.add_argument("--source", default="auto",
                   help="'skimage' (scikit-image's bundled photographs; pip install "
                        "'splatdd[photos]'), 'fashion_mnist', a folder of images, or 'auto': "
                        "skimage when scikit-image is installed, else fashion_mnist with a note "
                        "in every output (default auto)")
    p.add_argument("--images", type=positive_int, default=8,
                   help="number of images to fit (default 8)")
    p.add_argument("--resolution", type=positive_int, default=128,
                   help="side of the square images in pixels (default 128)")
    p.add_argument("--steps", type=nonneg_int, default=1000,
                   help="Adam steps, the same for every method (default 1000)")
    p.add_argument("--floats-per-image", type=positive_float, default=963.0,
                   help="storage per image in fp32 floats (bytes = 4 x this; default 963, "
                        "the paper's)")
    p.add_argument("--lr", type=_method_lr, action="append", default=[], metavar="METHOD=LR",
                   help="learning rate per method, repeatable (default: each plugin's init_lr)")
    p.add_argument("-o", "--option", type=_method_kv, action="append", default=[],
                   metavar="METHOD:KEY=VALUE",
                   help="extra build option for a parameterization, repeatable (e.g. "
                        "gaussian:ssaa=1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the crops and the initialisations (default 0)")
    p.add_argument("--threads", type=nonneg_int, default=0,
                   help="torch threads (default 0: as many as torch picks)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the results as JSON here")
    p.add_argument("--png", default=None, metavar="PATH",
                   help="also write a picture here: the images, then each method's fit, titled "
                        "with the image source")
    p.set_defaults(func=run)


def write_png(path: str | Path, images: torch.Tensor, renders: Sequence[tuple[str, torch.Tensor]],
              title: str) -> Path:
    """A PNG with the target ``images`` in the first row and each ``(method, render)`` in the
    following rows (row label above each image), titled ``title`` (which names the image
    source); written atomically::

        write_png("fit.png", images, [("gaussian", rec)], "4 skimage photographs, 128 px")
    """
    from splatdd.grids import annotated_grid
    from splatdd.io_utils import atomic_save_with
    n = images.shape[0]
    rows = [images.detach().cpu()] + [r.detach().cpu().clamp(0, 1) for _, r in renders]
    names = ["target"] + [m for m, _ in renders]
    labels = torch.arange(len(rows)).repeat_interleave(n)
    img = annotated_grid(torch.cat(rows), labels, nrow=n, title=title, class_names=names)
    path = Path(path)
    atomic_save_with(path, lambda f: img.save(f, format="PNG"))
    return path


def run(args: argparse.Namespace) -> int:
    """The ``splatdd fit`` handler: fit, print one line per method and a table; every output
    (stdout, the table, ``--json``, ``--png``) states where the images came from."""
    from splatdd.cli import CLIError, resolve_device, set_threads
    from splatdd.io_utils import atomic_write_json
    from splatdd.registry import PluginLoadError, UnknownPluginError
    set_threads(args.threads)
    device = resolve_device(args.device)
    lrs = dict(args.lr)
    options: dict[str, dict[str, Any]] = {}
    for method, key, value in args.option:
        options.setdefault(method, {})[key] = value
    try:
        source, _ = resolve_source(args.source)
        images, desc = load_images(args.source, args.images, args.resolution, seed=args.seed)
    except (OSError, ValueError, ImportError) as exc:
        raise CLIError(f"--source {args.source!r}: {exc}") from None
    budget = 4.0 * args.floats_per_image
    print(f"images: {desc}")
    print(f"budget: {args.floats_per_image:g} fp32 floats = {budget:.0f} bytes per image; "
          f"{args.steps} steps; machine: {machine_description()}", flush=True)
    results, renders = [], []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        keep: dict[str, Any] = {}
        try:
            res = fit_method(method, images, budget_bytes=budget, steps=args.steps,
                             lr=lrs.get(method), options=options.get(method), seed=args.seed,
                             device=device, keep=keep if args.png else None)
        except (UnknownPluginError, PluginLoadError, ValueError, TypeError) as exc:
            raise CLIError(f"fit {method}: {exc}") from None
        mem = "n/a" if math.isnan(res.peak_memory_mb) else f"{res.peak_memory_mb:.1f} MB"
        print(f"{method}: PSNR {res.psnr:.2f} dB, {res.seconds:.2f} s, peak memory {mem}, "
              f"{res.bytes_per_image:.0f} bytes/image  [{res.detail}]", flush=True)
        results.append(res)
        if args.png:
            renders.append((method, keep["render"]))
    print()
    print(format_table(results, source=desc))
    if args.json:
        atomic_write_json(args.json, {"source": source, "images": desc,
                                      "budget_bytes_per_image": budget, "steps": args.steps,
                                      "results": [r.as_dict() for r in results]})
        print(f"wrote {args.json}")
    if args.png:
        title = (f"images: {desc}. Fits at {budget:.0f} bytes per image, {args.steps} steps: "
                 + ", ".join(f"{r.method} {r.psnr:.2f} dB" for r in results))
        print(f"picture: {write_png(args.png, images, renders, title)}")
    return 0
