"""DDiF-style parameterization: every distilled image is a small SIREN neural field.

Each field maps a coordinate ``(x, y)`` in ``[-1, 1]^2`` to ``C`` values:
``h_1 = sin(w0_initial * (W_1 p + b_1))``, ``h_{l+1} = sin(w0 * (W_{l+1} h_l + b_{l+1}))`` for the
``layers - 1`` further sine layers, and a linear output ``y = W_out h + b_out`` -- DDiF's Siren with
``num_layers`` sine layers and an identity final activation (Shin et al., ICLR 2025).

All fields are decoded in one batched pass: the weights of every field are stacked into tensors with
a leading image dimension and each layer is one ``torch.baddbmm`` over the whole batch (no Python
loop over images). The coordinate grid is ``linspace(-1, 1, n)`` per axis, as in DDiF (so any
resolution samples the same continuous field).

Budget (DDiF's rule): a field's cost is its parameter count in fp32 (DDiF stores float32 weights),
``params = (2 + 1) w + (layers - 1)(w + 1) w + (w + 1) C``; the number of fields per class is
``floor(ipc * C * H * W / params)`` unless given (option ``dpc``). ``num_bytes`` is exactly
``n_fields * params * 4``.

Defaults from DDiF's released configuration: 2 sine layers below 128 px, 3 from 128 px; width 6 below
128 px (20 at ipc >= 50) and 20 from 128 px (40 at ipc >= 50); ``w0_initial = 30``; hidden ``w0`` 10
below 128 px and 40 from 128 px; initialisation by fitting one real image per field with Adam, lr
5e-4 (DDiF's ``lr_nf_init``) for 5,000 steps (``epochs_init``); distillation with Adam, lr 1e-4
(``lr_nf``, its ImageNet-subset setting). The weight initialisation is DDiF's/SIREN's: first layer
``U(-1/2, 1/2)`` (``1/fan_in``), the other layers ``U(-sqrt(6/fan_in)/w0, +sqrt(6/fan_in)/w0)``,
biases drawn like the weights of their layer.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F

from splatdd.plugin_api import (PLUGIN_API_VERSION, DatasetSpec, OptimizerSpec, Parameterization,
                                check_regime, reject_unknown_options)

__all__ = ["SirenImages", "siren_param_count", "default_architecture", "coordinate_grid"]

_OPTIONS = ("layers", "width", "dpc", "w0_initial", "w0", "init_steps", "init_lr", "lr")
_TENSORS = ("w_in", "b_in", "w_hidden", "b_hidden", "w_out", "b_out")


def siren_param_count(layers: int, width: int, channels: int, dim_in: int = 2) -> int:
    """Parameters of one field: ``layers`` sine layers of ``width`` and a linear output."""
    return ((dim_in + 1) * width + (layers - 1) * (width + 1) * width + (width + 1) * channels)


def _widest(layers: int, channels: int, floats: float) -> int:
    """The largest width (at least 1) whose field of ``layers`` has at most ``floats`` parameters."""
    width = 1
    while siren_param_count(layers, width + 1, channels) <= floats:
        width += 1
    return width


def default_architecture(spec: DatasetSpec, ipc: int) -> tuple[int, int, float]:
    """``(layers, width, hidden w0)`` from DDiF's defaults by resolution and budget."""
    if max(spec.height, spec.width) >= 128:
        return 3, (40 if ipc >= 50 else 20), 40.0
    return 2, (20 if ipc >= 50 else 6), 10.0


def coordinate_grid(H: int, W: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(H * W, 2)`` coordinates ``(x, y)`` in ``[-1, 1]``, row-major (y outer)."""
    ys = torch.linspace(-1.0, 1.0, H, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, W, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=-1)


class SirenImages(Parameterization):
    """``dpc`` SIREN fields per class (DDiF). Every field is ``layers`` sine layers of ``width``."""

    name: ClassVar[str] = "siren"
    api_version: ClassVar[int] = PLUGIN_API_VERSION

    def __init__(self, spec: DatasetSpec, dpc: int, *, layers: int = 2, width: int = 6,
                 w0_initial: float = 30.0, w0: float = 10.0, init_steps: int = 5000,
                 init_lr: float = 5e-4, lr: float = 1e-4,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if int(dpc) < 1 or int(layers) < 1 or int(width) < 1:
            raise ValueError(f"siren: dpc, layers and width must be >= 1, got {dpc}, {layers}, "
                             f"{width}")
        self.spec = spec
        self.dpc, self.layers, self.width = int(dpc), int(layers), int(width)
        self.w0_initial, self.w0 = float(w0_initial), float(w0)
        self.init_steps, self.init_lr, self.lr = int(init_steps), float(init_lr), float(lr)
        n, w, C, L = spec.num_classes * self.dpc, self.width, spec.channels, self.layers
        self.register_buffer("_labels", torch.arange(spec.num_classes).repeat_interleave(self.dpc))
        self.w_in = torch.nn.Parameter(torch.empty(n, 2, w))
        self.b_in = torch.nn.Parameter(torch.empty(n, 1, w))
        self.w_hidden = torch.nn.Parameter(torch.empty(n, L - 1, w, w))
        self.b_hidden = torch.nn.Parameter(torch.empty(n, L - 1, 1, w))
        self.w_out = torch.nn.Parameter(torch.empty(n, w, C))
        self.b_out = torch.nn.Parameter(torch.empty(n, 1, C))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """SIREN initialisation (as DDiF): first layer ``U(+-1/fan_in)``, others
        ``U(+-sqrt(6/fan_in)/w0)``; biases like their layer's weights."""
        if generator is None:
            generator = torch.Generator().manual_seed(0)

        def uni(t: torch.Tensor, bound: float) -> None:
            t.copy_((torch.rand(t.shape, generator=generator) * 2 - 1) * bound)

        uni(self.w_in, 1.0 / 2)
        uni(self.b_in, 1.0 / 2)
        bound = math.sqrt(6.0 / self.width) / self.w0
        for t in (self.w_hidden, self.b_hidden, self.w_out, self.b_out):
            uni(t, bound)

    @classmethod
    def build(cls, spec: DatasetSpec, ipc: int, *, generator: torch.Generator | None = None,
              **options: Any) -> "SirenImages":
        reject_unknown_options("siren", options, _OPTIONS)
        layers, width, w0 = default_architecture(spec, ipc)
        layers = int(options.pop("layers", layers))
        width = int(options.pop("width", width))
        options.setdefault("w0", w0)
        dpc = options.pop("dpc", None)
        if dpc is None:
            per_field = siren_param_count(layers, width, spec.channels)
            dpc = (ipc * spec.channels * spec.height * spec.width) // per_field
            if dpc < 1:
                raise ValueError(f"siren: one field of {layers} layers x width {width} "
                                 f"({per_field} floats) exceeds the budget of ipc={ipc}; "
                                 f"choose a smaller width")
        return cls(spec, int(dpc), layers=layers, width=width, generator=generator, **options)

    @classmethod
    def storage_options(cls, spec: DatasetSpec, items_per_class: int,
                        bytes_per_item: float) -> dict[str, Any]:
        """``dpc = items_per_class`` fields of DDiF's depth for the resolution (3 sine layers from
        128 px, else 2) and the widest width whose fp32 parameters fit ``bytes_per_item``
        (``splatdd fit``'s equal-storage sizing; 963 floats at 128 px RGB give 3 x 20, DDiF's)."""
        layers = default_architecture(spec, 1)[0]
        return {"dpc": int(items_per_class), "layers": layers,
                "width": _widest(layers, spec.channels, bytes_per_item / 4)}

    @classmethod
    def quick_options(cls, spec: DatasetSpec, ipc: int, workdir: Any = None) -> dict[str, Any]:
        """2 sine layers, at most width 6 and within one image's floats per field, 20 init steps."""
        per_image = spec.channels * spec.height * spec.width
        return {"layers": 2, "width": min(6, _widest(2, spec.channels, per_image)),
                "init_steps": 20}

    @property
    def num_images(self) -> int:
        return self.w_in.shape[0]

    @property
    def params_per_field(self) -> int:
        return siren_param_count(self.layers, self.width, self.spec.channels)

    # ---- decoding -------------------------------------------------------------------------------
    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def forward_fields(self, coords: torch.Tensor, indices: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Evaluate the selected fields at ``coords`` ``(M, 2)``: ``(k, M, C)``, one batched
        ``baddbmm`` per layer over all fields."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t if indices is None else t[indices.to(t.device)]

        w_in, b_in = pick(self.w_in), pick(self.b_in)
        k = w_in.shape[0]
        x = coords.to(w_in.dtype).unsqueeze(0).expand(k, -1, -1)
        h = torch.sin(self.w0_initial * torch.baddbmm(b_in, x, w_in))
        w_h, b_h = pick(self.w_hidden), pick(self.b_hidden)
        for layer in range(self.layers - 1):
            h = torch.sin(self.w0 * torch.baddbmm(b_h[:, layer], h, w_h[:, layer]))
        return torch.baddbmm(pick(self.b_out), h, pick(self.w_out))

    def decode(self, indices: torch.Tensor | None = None, *,
               resolution: tuple[int, int] | None = None) -> torch.Tensor:
        H, W = self.spec.resolution if resolution is None else (int(resolution[0]),
                                                                  int(resolution[1]))
        coords = coordinate_grid(H, W, device=self.w_in.device)
        out = self.forward_fields(coords, indices)                       # (k, H*W, C)
        return out.transpose(1, 2).reshape(out.shape[0], self.spec.channels, H, W)

    # ---- initialisation -------------------------------------------------------------------------
    def init_from_real(self, images: torch.Tensor, labels: torch.Tensor, *,
                       steps: int | None = None, progress: bool = False) -> dict[str, float]:
        """Fit field ``i`` to real image ``i`` (MSE, Adam lr ``init_lr``), all fields at once."""
        n = self.num_images
        want = (n, self.spec.channels, self.spec.height, self.spec.width)
        if tuple(images.shape) != want:
            raise ValueError(f"siren.init_from_real: expected images of shape {want}, "
                             f"got {tuple(images.shape)}")
        if labels is not None and not torch.equal(labels.cpu().long(), self._labels.cpu()):
            raise ValueError("siren.init_from_real: labels must equal self.labels")
        target = images.detach().to(self.w_in.device, torch.float32)
        return self.fit(target, steps=self.init_steps if steps is None else steps,
                        lr=self.init_lr, progress=progress)

    def fit(self, target: torch.Tensor, *, steps: int, lr: float | None = None,
            progress: bool = False) -> dict[str, float]:
        """Minimise ``MSE(decode(), target)`` with Adam for ``steps`` full-batch steps (the core's
        loop :func:`splatdd.fit.fit_images`)."""
        # DDiF sums per-field MSE losses (one optimiser per field); with Adam's per-element
        # normalisation one joint optimiser on the mean MSE takes the same steps.
        from splatdd.fit import fit_images
        return fit_images(self, target, steps=steps, lr=self.init_lr if lr is None else lr,
                          progress=progress, progress_every=500)

    # ---- optimisation ---------------------------------------------------------------------------
    def optimizer_spec(self, regime: str, lr: float | None = None) -> OptimizerSpec:
        """Adam, lr ``self.lr`` (1e-4, DDiF's ``lr_nf``), for every regime of :data:`REGIMES`
        (DDiF uses one field lr with DM, DC and TM); an unknown regime raises ``ValueError``."""
        check_regime(regime, what="siren: regime")
        return OptimizerSpec(params=[{"params": list(self.parameters()),
                                      "lr": self.lr if lr is None else lr}], kind="adam")

    # ---- storage --------------------------------------------------------------------------------
    def num_bytes(self) -> int:
        return self.num_images * self.params_per_field * 4

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().to("cpu", torch.float32).contiguous()
                for name in _TENSORS}

    def config(self) -> dict[str, Any]:
        return {"dpc": self.dpc, "layers": self.layers, "width": self.width,
                "w0_initial": self.w0_initial, "w0": self.w0, "init_steps": self.init_steps,
                "init_lr": self.init_lr, "lr": self.lr}

    @classmethod
    def from_state(cls, spec: DatasetSpec, tensors: Mapping[str, torch.Tensor],
                   config: Mapping[str, Any]) -> "SirenImages":
        for key in ("dpc", "layers", "width"):
            if key not in config:
                raise ValueError(f"siren.from_state: config is missing {key!r}")
        unknown = sorted(set(config) - set(_OPTIONS))
        if unknown:
            raise ValueError(f"siren.from_state: unknown config key(s) {', '.join(unknown)}")
        obj = cls(spec, **dict(config))
        with torch.no_grad():
            for name in _TENSORS:
                if name not in tensors:
                    raise ValueError(f"siren.from_state: tensor {name!r} is missing")
                p = getattr(obj, name)
                t = tensors[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"siren.from_state: tensor {name!r} has shape "
                                     f"{tuple(t.shape)}, expected {tuple(p.shape)}")
                p.copy_(t.float())
        return obj

    def extra_repr(self) -> str:
        return (f"fields={self.num_images}, dpc={self.dpc}, layers={self.layers}, "
                f"width={self.width}, params/field={self.params_per_field}, "
                f"bytes={self.num_bytes()}")
