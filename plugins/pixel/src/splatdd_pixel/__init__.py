"""``pixel``: a distilled dataset stored as plain fp32 images (the field's classic baseline).

``ipc`` images per class, laid out class-major (all images of class 0, then class 1, ...), each a
learnable ``C x H x W`` fp32 tensor in the dataset's normalised space. Storage is exactly the budget:
``num_classes * ipc * C * H * W * 4`` bytes.

Build options: ``init`` (``"noise"``: standard normal, the default before :meth:`init_from_real`;
``"zeros"``), ``noise_std`` (1.0).

Optimiser by the running algorithm's regime (:data:`splatdd.plugin_api.REGIMES`), each the paper
that tuned pixels for it:

* ``distribution``: SGD lr 1.0, momentum 0.5 (DM, Zhao & Bilen, WACV 2023);
* ``gradient``: SGD lr 0.1, momentum 0.5 (DC/DSA, Zhao et al., ICLR 2021);
* ``trajectory``: SGD momentum 0.5, lr 1000 for ZCA-whitened data (MTT's CIFAR settings) and 100
  otherwise (MTT uses 100-1000 for non-ZCA sets; 100 is the safer choice for FashionMNIST-like
  data) (MTT, Cazenavette et al., CVPR 2022);
* ``recover``: Adam lr 0.25, betas (0.5, 0.9) (SRe2L, Yin et al., NeurIPS 2023, its recover step).

``lr`` overrides the learning rate; an unknown regime raises ``ValueError``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from splatdd.plugin_api import (PLUGIN_API_VERSION, DatasetSpec, OptimizerSpec, Parameterization,
                                regime_setting, reject_unknown_options)

__all__ = ["PixelImages", "REGIME_OPTIMIZERS"]
__version__ = "0.1.0"

MOMENTUM = 0.5
#: Optimiser settings by regime (see the module docstring): ``kind``, ``lr`` and its extras.
REGIME_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "distribution": {"kind": "sgd", "lr": 1.0, "momentum": MOMENTUM},
    "gradient": {"kind": "sgd", "lr": 0.1, "momentum": MOMENTUM},
    "trajectory": {"kind": "sgd", "lr": 100.0, "momentum": MOMENTUM},
    "recover": {"kind": "adam", "lr": 0.25, "betas": (0.5, 0.9)},
}
#: The trajectory regime's lr on ZCA-whitened data (MTT's CIFAR settings).
TRAJECTORY_ZCA_LR = 1000.0


def _class_major_labels(num_classes: int, ipc: int) -> torch.Tensor:
    return torch.arange(num_classes, dtype=torch.int64).repeat_interleave(ipc)


class PixelImages(Parameterization):
    """``ipc`` learnable fp32 images per class."""

    name = "pixel"
    api_version = PLUGIN_API_VERSION

    def __init__(self, spec: DatasetSpec, ipc: int, images: torch.Tensor | None = None) -> None:
        super().__init__()
        if int(ipc) < 1:
            raise ValueError(f"ipc must be >= 1, got {ipc}")
        self.spec = spec
        self.ipc = int(ipc)
        shape = (spec.num_classes * self.ipc, spec.channels, spec.height, spec.width)
        if images is None:
            images = torch.zeros(shape)
        if tuple(images.shape) != shape:
            raise ValueError(f"pixel images must have shape {shape}, got {tuple(images.shape)}")
        self.images = torch.nn.Parameter(images.detach().to(torch.float32).clone())
        self.register_buffer("_labels", _class_major_labels(spec.num_classes, self.ipc),
                             persistent=False)

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def build(cls, spec: DatasetSpec, ipc: int, *, generator: torch.Generator | None = None,
              **options: Any) -> "PixelImages":
        reject_unknown_options("pixel", options, ("init", "noise_std"))
        init = options.pop("init", "noise")
        noise_std = float(options.pop("noise_std", 1.0))
        shape = (spec.num_classes * int(ipc), spec.channels, spec.height, spec.width)
        if init == "noise":
            images = torch.randn(shape, generator=generator) * noise_std
        elif init == "zeros":
            images = torch.zeros(shape)
        else:
            raise ValueError(f"pixel: init must be 'noise' or 'zeros', got {init!r}")
        return cls(spec, ipc, images)

    @torch.no_grad()
    def init_from_real(self, images: torch.Tensor, labels: torch.Tensor, *,
                       steps: int | None = None, progress: bool = False) -> dict[str, float]:
        """Copy the real images (one per stored image, in label order)."""
        if tuple(images.shape) != tuple(self.images.shape):
            raise ValueError(f"init_from_real: expected images of shape "
                             f"{tuple(self.images.shape)}, got {tuple(images.shape)}")
        if not torch.equal(labels.to("cpu", torch.int64), self._labels.cpu()):
            raise ValueError("init_from_real: labels must match self.labels (class-major order)")
        self.images.copy_(images.to(self.images.device, torch.float32))
        return {"mse": 0.0}

    # ---- decoding -------------------------------------------------------------------------------
    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def decode(self, indices: torch.Tensor | None = None, *,
               resolution: tuple[int, int] | None = None) -> torch.Tensor:
        x = self.images if indices is None else self.images[indices.to(self.images.device)]
        if resolution is not None and tuple(resolution) != (self.spec.height, self.spec.width):
            x = F.interpolate(x, size=tuple(int(r) for r in resolution), mode="bilinear",
                              align_corners=False)
        return x

    # ---- optimisation ---------------------------------------------------------------------------
    def optimizer_spec(self, regime: str, lr: float | None = None) -> OptimizerSpec:
        """The paper's optimiser for ``regime`` (module docstring); ``lr`` overrides its lr."""
        setting = dict(regime_setting(REGIME_OPTIMIZERS, regime, "pixel"))
        if lr is None:
            lr = setting["lr"]
            if regime == "trajectory" and self.spec.zca:
                lr = TRAJECTORY_ZCA_LR
        setting.pop("lr")
        return OptimizerSpec(params=[{"params": [self.images], "lr": float(lr)}], **setting)

    # ---- storage --------------------------------------------------------------------------------
    def num_bytes(self) -> int:
        return self.images.numel() * 4

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"images": self.images.detach().to("cpu", torch.float32).contiguous().clone()}

    def config(self) -> dict[str, Any]:
        return {"ipc": self.ipc}

    @classmethod
    def from_state(cls, spec: DatasetSpec, tensors: Mapping[str, torch.Tensor],
                   config: Mapping[str, Any]) -> "PixelImages":
        if "ipc" not in config:
            raise ValueError("pixel config lacks 'ipc'")
        if "images" not in tensors:
            raise ValueError("pixel state lacks the tensor 'images'")
        ipc = int(config["ipc"])
        images = tensors["images"]
        shape = (spec.num_classes * ipc, spec.channels, spec.height, spec.width)
        if tuple(images.shape) != shape:
            raise ValueError(f"pixel tensor 'images' has shape {tuple(images.shape)}, expected "
                             f"{shape}")
        if images.dtype != torch.float32:
            raise ValueError(f"pixel tensor 'images' has dtype {images.dtype}, expected float32")
        return cls(spec, ipc, images)
