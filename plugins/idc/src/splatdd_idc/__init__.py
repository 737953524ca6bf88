"""``idc``: IDC multi-formation (Kim et al., "Dataset Condensation via Efficient Synthetic-Data
Parameterization", ICML 2022).

Storage is exactly the pixel budget: ``ipc`` learnable fp32 images of ``C x H x W`` per class,
``num_classes * ipc * C * H * W * 4`` bytes. Each stored image is cut into a ``factor x factor``
grid of sub-images of ``ceil(H / factor) x ceil(W / factor)`` pixels (the image is padded on the
bottom/right with 0 -- the dataset mean in the normalised space -- when ``factor`` does not divide
the size, as IDC's ``decode_zoom`` pads), and every sub-image is decoded by bilinear upsampling
(``align_corners=False``, IDC's default) to ``H x W``. One stored image therefore yields
``factor**2`` training images of its class: the distilled set has ``ipc * factor**2`` decoded images
per class.

Decoded order is class-major and, within a stored image, row-major over the grid: decoded image
``d`` is sub-image ``(i, j) = divmod(d % factor**2, factor)`` of stored image ``d // factor**2``.

``samples = k`` instead of ``factor`` (GSDD appendix B.4's form of the IDC baseline, Tables 18-19:
"each image is spatially down-scaled by a factor of sqrt(k), resulting in k-times more synthetic
samples", k = 20 at IPC 1 and 5 at IPC 10 on ImageNet-1K): every image of the budget becomes ``k``
stored sub-images of ``floor(H / sqrt(k)) x floor(W / sqrt(k))`` pixels, stored side by side
(``ipc * k`` per class, no grid, so ``k`` need not be a square); storage is at most the pixel budget
(``k * h * w <= H * W``; equal when ``sqrt(k)`` divides the size, e.g. ``samples = 4`` is
``factor = 2`` at 28 px). Decoded image ``d`` is stored sub-image ``d``.

Build options: ``factor`` (2, IDC's default), ``samples`` (GSDD's k; excludes ``factor``),
``init`` (``"noise"``: standard normal, the default before :meth:`IDCImages.init_from_real`;
``"zeros"``), ``noise_std`` (1.0).

Optimiser by regime (see :data:`DEFAULT_OPTIMIZER`), ``lr`` overrides the learning rate:

* ``"distribution"``: SGD momentum 0.5, lr 1.0 (DM's pixel setting; IDC publishes none for DM);
* ``"gradient"``: SGD momentum 0.5, lr 5e-3 (IDC's ``condense.py`` defaults ``lr_img``/``mom_img``,
  tuned for IDC's own matching loss: raise it for DC's layer-wise distance if progress is slow);
* ``"trajectory"``: SGD momentum 0.5, lr 100, 1000 on ZCA data (MTT's pixel settings);
* ``"recover"``: Adam lr 0.25, betas (0.5, 0.9) (SRe2L's recover settings).

Example::

    from splatdd_idc import IDCImages
    p = IDCImages.build(spec, ipc=1, factor=2)      # 4 decoded 28x28 images per class
    images = p.decode()                             # (num_classes * 4, C, H, W)
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from splatdd.plugin_api import (PLUGIN_API_VERSION, DatasetSpec, OptimizerSpec, Parameterization,
                                regime_setting, reject_unknown_options)

__all__ = ["IDCImages", "DEFAULT_OPTIMIZER", "sub_image_size", "samples_sub_size"]
__version__ = "0.1.0"

#: ``regime -> (kind, lr, extra)``: the optimiser of the stored images under each regime.
DEFAULT_OPTIMIZER: dict[str, tuple[str, float, dict[str, Any]]] = {
    "distribution": ("sgd", 1.0, {"momentum": 0.5}),
    "gradient": ("sgd", 5e-3, {"momentum": 0.5}),
    "trajectory": ("sgd", 100.0, {"momentum": 0.5}),
    "recover": ("adam", 0.25, {"betas": (0.5, 0.9)}),
}
TRAJECTORY_ZCA_LR = 1000.0
_OPTIONS = ("factor", "samples", "init", "noise_std")


def sub_image_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """Size of one sub-image: ``(ceil(H / factor), ceil(W / factor))``.

    >>> sub_image_size(28, 28, 2), sub_image_size(224, 224, 20)
    ((14, 14), (12, 12))
    """
    return math.ceil(height / factor), math.ceil(width / factor)


def samples_sub_size(height: int, width: int, samples: int) -> tuple[int, int]:
    """Size of one sub-image when one image's budget holds ``samples`` of them (GSDD's k):
    ``(floor(H / sqrt(k)), floor(W / sqrt(k)))``, computed exactly in integers.

    >>> samples_sub_size(224, 224, 20), samples_sub_size(224, 224, 5), samples_sub_size(28, 28, 4)
    ((50, 50), (100, 100), (14, 14))
    """
    return math.isqrt(height * height // samples), math.isqrt(width * width // samples)


def _check_samples(spec: DatasetSpec, samples: Any) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) and not (
            isinstance(samples, float) and samples.is_integer()):
        raise ValueError(f"idc: samples must be a positive integer, got {samples!r}")
    samples = int(samples)
    limit = min(spec.height, spec.width) ** 2
    if samples < 1 or samples > limit:
        raise ValueError(f"idc: samples must be between 1 and min(H, W)^2 = {limit}, got "
                         f"{samples}")
    return samples


def _check_factor(spec: DatasetSpec, factor: Any) -> int:
    if isinstance(factor, bool) or not isinstance(factor, int) and not (
            isinstance(factor, float) and factor.is_integer()):
        raise ValueError(f"idc: factor must be a positive integer, got {factor!r}")
    factor = int(factor)
    if factor < 1 or factor > min(spec.height, spec.width):
        raise ValueError(f"idc: factor must be between 1 and min(H, W) = "
                         f"{min(spec.height, spec.width)}, got {factor}")
    return factor


class IDCImages(Parameterization):
    """``ipc`` stored fp32 images per class, each decoded to ``factor**2`` upsampled sub-images."""

    name = "idc"
    api_version = PLUGIN_API_VERSION

    def __init__(self, spec: DatasetSpec, ipc: int, factor: int | None = 2,
                 images: torch.Tensor | None = None, *, samples: int | None = None) -> None:
        super().__init__()
        if int(ipc) < 1:
            raise ValueError(f"idc: ipc must be >= 1, got {ipc}")
        self.spec = spec
        self.ipc = int(ipc)
        #: GSDD's k (sub-images stored side by side) or None (IDC's factor x factor grid)
        self.samples = None if samples is None else _check_samples(spec, samples)
        self.factor = None if self.samples is not None else _check_factor(spec, factor)
        shape = self._stored_shape(spec, self.ipc, self.samples)
        if images is None:
            images = torch.zeros(shape)
        if tuple(images.shape) != shape:
            raise ValueError(f"idc images must have shape {shape}, got {tuple(images.shape)}")
        self.images = torch.nn.Parameter(images.detach().to(torch.float32).clone())
        per = self.samples if self.samples is not None else self.factor ** 2
        labels = torch.arange(spec.num_classes, dtype=torch.int64).repeat_interleave(self.ipc * per)
        self.register_buffer("_labels", labels, persistent=False)

    @staticmethod
    def _stored_shape(spec: DatasetSpec, ipc: int, samples: int | None) -> tuple[int, ...]:
        if samples is None:
            return (spec.num_classes * ipc, spec.channels, spec.height, spec.width)
        return (spec.num_classes * ipc * samples, spec.channels,
                *samples_sub_size(spec.height, spec.width, samples))

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, spec: DatasetSpec, ipc: int, *, generator: torch.Generator | None = None,
              **options: Any) -> "IDCImages":
        reject_unknown_options("idc", options, _OPTIONS)
        if "samples" in options and "factor" in options:
            raise ValueError("idc: give either factor (IDC's grid) or samples (GSDD's k), not both")
        samples = options.get("samples")
        samples = None if samples is None else _check_samples(spec, samples)
        factor = None if samples is not None else _check_factor(spec, options.get("factor", 2))
        init = options.get("init", "noise")
        noise_std = float(options.get("noise_std", 1.0))
        shape = cls._stored_shape(spec, int(ipc), samples)
        if init == "noise":
            images = torch.randn(shape, generator=generator) * noise_std
        elif init == "zeros":
            images = torch.zeros(shape)
        else:
            raise ValueError(f"idc: init must be 'noise' or 'zeros', got {init!r}")
        return cls(spec, ipc, factor, images, samples=samples)

    @property
    def sub_size(self) -> tuple[int, int]:
        """``(h, w)`` of one stored sub-image."""
        if self.samples is not None:
            return samples_sub_size(self.spec.height, self.spec.width, self.samples)
        return sub_image_size(self.spec.height, self.spec.width, self.factor)

    @torch.no_grad()
    def init_from_real(self, images: torch.Tensor, labels: torch.Tensor, *,
                       steps: int | None = None, progress: bool = False) -> dict[str, float]:
        """Tile ``factor**2`` real images, each downsampled (bilinear, antialiased) to the sub-image
        size, into every stored image (IDC's initialisation; with ``samples`` each stored sub-image
        is one downsampled real image). ``images`` holds one real image per
        decoded image, in label order. Returns the decoded-vs-real ``mse``."""
        n = len(self._labels)
        expect = (n, self.spec.channels, self.spec.height, self.spec.width)
        if tuple(images.shape) != expect:
            raise ValueError(f"idc init_from_real: expected images of shape {expect} (one per "
                             f"decoded image), got {tuple(images.shape)}")
        if not torch.equal(labels.to("cpu", torch.int64), self._labels.cpu()):
            raise ValueError("idc init_from_real: labels must match self.labels (class-major)")
        sh, sw = self.sub_size
        small = F.interpolate(images.to(torch.float32), size=(sh, sw), mode="bilinear",
                              align_corners=False, antialias=True)
        if self.samples is not None:
            self.images.copy_(small.to(self.images.device))
            return {"mse": float(((self.decode() - images.to(self.images.device)) ** 2).mean())}
        k = self.factor
        tiles = small.reshape(-1, k, k, self.spec.channels, sh, sw)       # (stored, i, j, C, h, w)
        full = tiles.permute(0, 3, 1, 4, 2, 5).reshape(-1, self.spec.channels, k * sh, k * sw)
        self.images.copy_(full[:, :, :self.spec.height, :self.spec.width].to(self.images.device))
        mse = float(((self.decode() - images.to(self.images.device)) ** 2).mean())
        return {"mse": mse}

    # ---- decoding -------------------------------------------------------------------------------
    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def sub_images(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The stored sub-images ``(m, C, h, w)`` behind decoded images ``indices`` (all when
        ``None``), before upsampling; differentiable."""
        if self.samples is not None:
            if indices is None:
                return self.images
            indices = indices.to(self.images.device, torch.int64).flatten()
            self._check_indices(indices)
            return self.images[indices]
        k = self.factor
        per = k * k
        sh, sw = self.sub_size
        H, W, C = self.spec.height, self.spec.width, self.spec.channels
        if indices is None:
            stored, pos = self.images, None
        else:
            indices = indices.to(self.images.device, torch.int64).flatten()
            self._check_indices(indices)
            stored, pos = self.images[indices // per], indices % per
        pad_h, pad_w = k * sh - H, k * sw - W
        if pad_h or pad_w:
            stored = F.pad(stored, (0, pad_w, 0, pad_h), value=0.0)
        tiles = stored.reshape(-1, C, k, sh, k, sw).permute(0, 2, 4, 1, 3, 5)  # (m, i, j, C, h, w)
        tiles = tiles.reshape(-1, per, C, sh, sw)
        if pos is None:
            return tiles.reshape(-1, C, sh, sw)
        return tiles[torch.arange(len(pos), device=pos.device), pos]

    def _check_indices(self, indices: torch.Tensor) -> None:
        n = len(self._labels)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise IndexError(f"idc decode: indices must be in [0, {n}), got "
                             f"[{int(indices.min())}, {int(indices.max())}]")

    def decode(self, indices: torch.Tensor | None = None, *,
               resolution: tuple[int, int] | None = None) -> torch.Tensor:
        size = (self.spec.height, self.spec.width) if resolution is None else (
            int(resolution[0]), int(resolution[1]))
        return F.interpolate(self.sub_images(indices), size=size, mode="bilinear",
                             align_corners=False)

    # ---- optimisation ---------------------------------------------------------------------------
    def optimizer_spec(self, regime: str, lr: float | None = None) -> OptimizerSpec:
        """The optimiser of :data:`DEFAULT_OPTIMIZER` for ``regime``; ``lr`` overrides its lr.
        Raises ``ValueError`` for an unknown regime."""
        kind, default_lr, extra = regime_setting(DEFAULT_OPTIMIZER, regime, "idc")
        if lr is None:
            lr = TRAJECTORY_ZCA_LR if regime == "trajectory" and self.spec.zca else default_lr
        params = [{"params": [self.images], "lr": float(lr)}]
        if kind == "adam":
            return OptimizerSpec(params=params, kind="adam", betas=tuple(extra["betas"]))
        return OptimizerSpec(params=params, kind="sgd", momentum=float(extra["momentum"]))

    # ---- storage --------------------------------------------------------------------------------
    def num_bytes(self) -> int:
        return self.images.numel() * 4

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"images": self.images.detach().to("cpu", torch.float32).contiguous().clone()}

    def config(self) -> dict[str, Any]:
        if self.samples is not None:
            return {"ipc": self.ipc, "samples": self.samples}
        return {"ipc": self.ipc, "factor": self.factor}

    @classmethod
    def from_state(cls, spec: DatasetSpec, tensors: Mapping[str, torch.Tensor],
                   config: Mapping[str, Any]) -> "IDCImages":
        if "ipc" not in config:
            raise ValueError("idc config lacks 'ipc'")
        if ("factor" in config) == ("samples" in config):
            raise ValueError("idc config must hold exactly one of 'factor' and 'samples'")
        if "images" not in tensors:
            raise ValueError("idc state lacks the tensor 'images'")
        ipc, images = int(config["ipc"]), tensors["images"]
        samples = None if "samples" not in config else _check_samples(spec, config["samples"])
        shape = cls._stored_shape(spec, ipc, samples)
        if tuple(images.shape) != shape:
            raise ValueError(f"idc tensor 'images' has shape {tuple(images.shape)}, expected "
                             f"{shape}")
        if images.dtype != torch.float32:
            raise ValueError(f"idc tensor 'images' has dtype {images.dtype}, expected float32")
        if samples is not None:
            return cls(spec, ipc, None, images, samples=samples)
        return cls(spec, ipc, int(config["factor"]), images)
