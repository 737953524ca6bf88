"""Image fitting at equal storage (the GSDD paper's Table 5), shared by ``splatdd fit`` and
benchmarks/fit.py.

Every method gets the same per-image storage budget in bytes (``floats_per_image`` fp32 values,
963 in the paper: exactly one DDiF field of 3 sine layers of width 20 at 128 px, stored in fp32),
fits the same real images with MSE for the same number of full-batch Adam steps, and is measured
for PSNR, wall time and peak memory (CUDA: ``max_memory_allocated``; CPU: the rise of the process's
peak resident set size, ``VmHWM``, which is reset before each method).

Methods:

* ``pixel``: area-downsample to the largest ``h x w`` grid within the budget, bilinear upsample back
  (no optimisation);
* ``pixel-fit``: the same ``h x w`` pixels optimised through the bilinear upsampling (Adam);
* any installed parameterization (``gaussian``, ``siren``, third-party ones): built for one class of
  ``n`` items, sized to the per-image budget, then fitted with its own ``init_from_real``.
"""
from __future__ import annotations

import gzip
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from splatdd.memory import proc_status_kb, reset_peak_rss

__all__ = ["FitResult", "load_images", "fit_method", "psnr", "PeakMemory", "equal_storage_options",
           "pixel_grid", "SKIMAGE_PHOTOS"]

#: colour photographs bundled with scikit-image (no download needed)
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle", "retina",
                  "immunohistochemistry", "hubble_deep_field")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


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


def _read_idx_images(path: Path) -> torch.Tensor:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    return torch.frombuffer(bytearray(raw[16:16 + n * h * w]), dtype=torch.uint8).view(n, 1, h, w)


def load_images(source: str, n: int, resolution: int | None, *, seed: int = 0
                ) -> tuple[torch.Tensor, str]:
    """``(images (n, C, H, W) in [0, 1], description)``.

    ``source``: ``"skimage"`` (crops of scikit-image's bundled colour photographs; needs
    scikit-image), ``"fashion_mnist"`` (the first ``n`` test images, bilinearly resized to
    ``resolution`` when it is not 28), ``"auto"`` (skimage if importable, else fashion_mnist), or a
    directory of image files (read with Pillow, centre-cropped and resized)."""
    if source == "auto":
        try:
            import skimage  # noqa: F401
            source = "skimage"
        except ImportError:
            source = "fashion_mnist"
    if source == "skimage":
        size = resolution or 128
        return _skimage_crops(n, size, seed), (
            f"{n} crops ({size}x{size} RGB) of scikit-image's bundled photographs "
            f"({', '.join(SKIMAGE_PHOTOS[:min(n, len(SKIMAGE_PHOTOS))])}; whole centre squares "
            f"first, then random crops)")
    if source in ("fashion_mnist", "fashion-mnist", "fmnist"):
        x = _read_idx_images(FASHION_MNIST / "t10k-images-idx3-ubyte.gz")[:n].float() / 255.0
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
    imgs = [_resize_square(torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                           .float() / 255.0, size) for p in files]
    return torch.stack(imgs).clamp(0, 1), f"{n} images from {root} ({size}x{size} RGB)"


# ---- measurement ---------------------------------------------------------------------------------
def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over images of ``10 log10(1 / MSE)``, predictions clamped to [0, 1]."""
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
    entry. ``mb`` is NaN where neither can be measured."""

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
    """The largest ``h x w`` (aspect close to ``height/width``) with ``h*w*C <= budget_floats``."""
    best = (1, 1)
    for h in range(1, height + 1):
        w = int(budget_floats // (channels * h))
        w = min(w, width)
        if w < 1:
            break
        if abs(math.log((h / w) / (height / width))) <= math.log(1.25) and h * w > best[0] * best[1]:
            best = (h, w)
    return best


def equal_storage_options(name: str, n: int, budget_bytes: float, channels: int,
                          height: int, width: int) -> dict[str, Any]:
    """Options that make parameterization ``name`` hold ``n`` items of at most ``budget_bytes``
    each, for the built-in plugins (``gaussian``, ``siren``). Others get ``{}`` (pass ``-o``)."""
    if name == "gaussian":
        return {"gpc": n, "points": int(budget_bytes // ((6 + channels) * 2))}
    if name == "siren":
        from splatdd_siren import siren_param_count   # only when siren is installed
        layers = 3 if max(height, width) >= 128 else 2
        wdt = 1
        while siren_param_count(layers, wdt + 1, channels) * 4 <= budget_bytes:
            wdt += 1
        return {"dpc": n, "layers": layers, "width": wdt}
    return {}


# ---- fitting -------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_pixels(images: torch.Tensor, budget_bytes: float, *, steps: int, lr: float = 1e-2,
               optimise: bool, device: torch.device, keep: dict | None = None) -> FitResult:
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

    Parameterizations are looked up by name in the registry (``get_class`` overrides), built for
    one class holding ``n`` items (``equal_storage_options`` plus ``options``), refused when they
    exceed the budget, and fitted by their own ``init_from_real(images, labels, steps=steps)`` (with
    ``init_lr=lr`` when ``lr`` is given). ``keep`` (a dict) receives the fitted object as
    ``keep["param"]`` and its render as ``keep["render"]``."""
    device = torch.device(device)
    if method in ("pixel", "pixel-fit"):
        return fit_pixels(images, budget_bytes, steps=steps, lr=1e-2 if lr is None else lr,
                          optimise=method == "pixel-fit", device=device, keep=keep)
    from splatdd.plugin_api import DatasetSpec
    if get_class is None:
        from splatdd.registry import get_parameterization as get_class
    cls = get_class(method)
    n, C, H, W = images.shape
    spec = DatasetSpec(name="fit", channels=C, height=H, width=W, num_classes=1,
                       mean=(0.0,) * C, std=(1.0,) * C)
    opts = equal_storage_options(method, n, budget_bytes, C, H, W)
    opts.update(options or {})
    if lr is not None:
        opts["init_lr"] = lr
    # one "class" of n items; the ipc only bounds the plugin's own default sizing
    ipc = max(1, math.ceil(n * budget_bytes / (C * H * W * 4)))
    param = cls.build(spec, ipc, generator=torch.Generator().manual_seed(seed), **opts)
    if len(param.labels) != n:
        raise ValueError(f"{method}: built {len(param.labels)} items for {n} images; set its "
                         f"per-class count option")
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
        rec = param.decode()
    if keep is not None:
        keep["param"], keep["render"] = param, rec.detach().cpu()
    cfg = param.config() if hasattr(param, "config") else {}
    return FitResult(method, psnr(rec, target), float(F.mse_loss(rec.clamp(0, 1), target)), secs,
                     secs / steps if steps else float("nan"), mem.mb, per_image, budget_bytes,
                     steps, lr if lr is not None else cfg.get("init_lr"),
                     ", ".join(f"{k}={v}" for k, v in opts.items() if k != "init_lr"),
                     {k: float(v) for k, v in (diag or {}).items()})


def machine_description() -> str:
    """CPU model, core count and torch version (plus the GPU name when CUDA is available)."""
    import os
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} logical cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def format_table(results: Sequence[FitResult]) -> str:
    """A markdown table of fit results."""
    lines = ["| method | PSNR (dB) | time (s) | s / step | peak memory (MB) | bytes / image "
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
