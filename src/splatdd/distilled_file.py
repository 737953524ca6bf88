"""The distilled-dataset file: one ``.safetensors`` holding a parameterization and its provenance.

Layout (format version 1):

* tensors: ``labels`` (int64, one per decoded image) and ``param/<key>`` for every tensor of
  :meth:`Parameterization.state_tensors`, in the plugin's own storage dtype (e.g. bf16 for gaussian);
* ``__metadata__``: ``format = "splatdd.distilled"``, ``format_version = "1"`` and ``splatdd``, a JSON
  document with: splatdd version, parameterization ``{name, distribution, version, config}``,
  algorithm ``{name, distribution, version, config}``, the :class:`DatasetSpec`, resolution, ipc,
  ``budget_bytes`` and ``num_bytes``, ``learned_lr``, the sha256 of every tensor's raw bytes and
  ``extra`` (run settings: iterations, seed, final loss, ...).

Files are written atomically (:func:`splatdd.io_utils.atomic_write_bytes`). :func:`load` checks the
format version, the header, every tensor's sha256 and the required keys, then rebuilds the
parameterization with its registered class's ``from_state``; a corrupted or truncated file raises
``ValueError`` saying what is wrong.

Third-party training code can use :func:`export_tensor` (a plain ``torch.save`` file of images and
labels) or :func:`export_png` (an image grid) without splatdd's plugins at training time.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from splatdd.budget import budget_bytes
from splatdd.io_utils import atomic_save_with, atomic_torch_save, atomic_write_bytes, tensor_sha256
from splatdd.plugin_api import DatasetSpec, Parameterization

__all__ = ["FORMAT", "FORMAT_VERSION", "Distilled", "save", "load", "read_metadata", "export_png",
           "export_tensor", "denormalize", "make_grid"]

FORMAT = "splatdd.distilled"
FORMAT_VERSION = 1
TENSOR_FORMAT = "splatdd.images"

_REQUIRED = ("format_version", "parameterization", "dataset", "ipc", "sha256", "resolution",
             "budget_bytes", "num_bytes")


def _splatdd_version() -> str | None:
    try:
        import importlib.metadata as md
        return md.version("splatdd")
    except Exception:  # noqa: BLE001
        return None


def _jsonable(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from exc


def _spec_to_json(spec: DatasetSpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["mean"], d["std"] = list(spec.mean), list(spec.std)
    return d


def _spec_from_json(d: Mapping[str, Any]) -> DatasetSpec:
    try:
        return DatasetSpec(name=str(d["name"]), channels=int(d["channels"]),
                           height=int(d["height"]), width=int(d["width"]),
                           num_classes=int(d["num_classes"]),
                           mean=tuple(float(x) for x in d.get("mean", ())),
                           std=tuple(float(x) for x in d.get("std", ())),
                           zca=bool(d.get("zca", False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"invalid dataset spec in metadata: {exc!r}") from exc


@dataclass
class Distilled:
    """A loaded distilled file."""

    param: Parameterization
    spec: DatasetSpec
    labels: torch.Tensor
    meta: dict[str, Any]
    learned_lr: float | None = None
    path: Path | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def ipc(self) -> int:
        return int(self.meta["ipc"])

    @property
    def algorithm(self) -> str | None:
        algo = self.meta.get("algorithm") or {}
        return algo.get("name")

    @torch.no_grad()
    def images(self, resolution: tuple[int, int] | None = None) -> torch.Tensor:
        """All decoded images ``(N, C, H, W)`` float32, normalised like the real data."""
        return self.param.decode(None, resolution=resolution).detach().float()

    def export_png(self, path: str | os.PathLike, **kw: Any) -> Path:
        return export_png(self, path, **kw)

    def export_tensor(self, path: str | os.PathLike, **kw: Any) -> Path:
        return export_tensor(self, path, **kw)


# ---- writing --------------------------------------------------------------------------------------
def save(path: str | os.PathLike, param: Parameterization, *, spec: DatasetSpec, ipc: int,
         algorithm: str | None = None, algo_config: Mapping[str, Any] | None = None,
         learned_lr: float | None = None, extra_meta: Mapping[str, Any] | None = None,
         registry: Any = None) -> Path:
    """Write ``param`` (its :meth:`state_tensors` and :meth:`config`) with provenance to ``path``.

    ``registry`` (a :class:`splatdd.registry.Registry`, default the process one) is used only to
    record the plugins' distribution names and versions."""
    from safetensors.torch import save as st_save

    from splatdd import registry as _registry

    reg = registry if registry is not None else _registry.default_registry()
    path = Path(path)
    state = param.state_tensors()
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{type(param).__name__}.state_tensors() returned no tensors")
    tensors: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_tensors()[{key!r}] is not a tensor")
        tensors[f"param/{key}"] = t.detach().to("cpu").contiguous()
    tensors["labels"] = param.labels.detach().to("cpu", torch.int64).contiguous()

    def prov(kind: str, name: str | None, obj: Any) -> dict[str, Any]:
        dist = ver = None
        try:
            p = reg.provenance(kind, name)
            dist, ver = p["distribution"], p["version"]
        except Exception:  # noqa: BLE001 - unregistered or test classes
            pass
        if dist is None and obj is not None:
            dist, ver = _registry.distribution_of(obj)
        return {"name": name, "distribution": dist, "version": ver}

    param_info = prov("parameterization", param.name, type(param))
    param_info["config"] = _jsonable(param.config(), f"{type(param).__name__}.config()")
    algo_info = None
    if algorithm is not None:
        algo_cls = None
        try:
            algo_cls = reg.get_algorithm(algorithm)
        except Exception:  # noqa: BLE001
            pass
        algo_info = prov("algorithm", algorithm, algo_cls)
        algo_info["config"] = _jsonable(dict(algo_config or {}), "algorithm config")
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "splatdd_version": _splatdd_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "parameterization": param_info,
        "algorithm": algo_info,
        "dataset": _spec_to_json(spec),
        "resolution": [spec.height, spec.width],
        "ipc": int(ipc),
        "num_images": int(tensors["labels"].numel()),
        "budget_bytes": budget_bytes(spec, ipc),
        "num_bytes": int(param.num_bytes()),
        "learned_lr": None if learned_lr is None else float(learned_lr),
        "sha256": {k: tensor_sha256(t) for k, t in sorted(tensors.items())},
        "extra": _jsonable(dict(extra_meta or {}), "extra_meta"),
    }
    data = st_save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                      "splatdd": json.dumps(meta)})
    atomic_write_bytes(path, data)
    return path


# ---- reading --------------------------------------------------------------------------------------
def _parse_header(buf: bytes, where: str) -> dict[str, Any]:
    if len(buf) < 8:
        raise ValueError(f"{where}: truncated file ({len(buf)} bytes; not a safetensors file)")
    (n,) = struct.unpack("<Q", buf[:8])
    if n > len(buf) - 8:
        raise ValueError(f"{where}: truncated or corrupt header (header claims {n} bytes, file has "
                         f"{len(buf) - 8} after the length field)")
    try:
        header = json.loads(buf[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: corrupt safetensors header (not a JSON object)")
    data_len = len(buf) - 8 - n
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise ValueError(f"{where}: corrupt header entry for tensor {key!r}") from None
    if end > data_len:
        raise ValueError(f"{where}: truncated file: tensor data needs {end} bytes but only "
                         f"{data_len} are present")
    if end < data_len:
        raise ValueError(f"{where}: {data_len - end} unexpected trailing bytes after the tensor data")
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a distilled file (header only, no tensor validation)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated file (not a safetensors file)")
        (n,) = struct.unpack("<Q", head)
        if n > os.path.getsize(path) - 8:
            raise ValueError(f"{path}: truncated or corrupt header")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        return _check_meta(header.get("__metadata__"), str(path))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{path}: corrupt safetensors header ({exc})") from None


def _check_meta(raw_meta: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw_meta, dict) or raw_meta.get("format") != FORMAT:
        raise ValueError(f"{where}: not a splatdd distilled file (no '{FORMAT}' metadata)")
    try:
        version = int(raw_meta.get("format_version", "-1"))
    except ValueError:
        raise ValueError(f"{where}: bad format_version {raw_meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{where}: written in distilled-file format v{version}; this splatdd reads "
                         f"up to v{FORMAT_VERSION} (upgrade splatdd)")
    if version < 1:
        raise ValueError(f"{where}: bad format_version {version}")
    try:
        meta = json.loads(raw_meta["splatdd"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: missing or corrupt 'splatdd' metadata ({exc!r})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: 'splatdd' metadata is not a JSON object")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{where}: metadata lacks required keys: {', '.join(missing)}")
    if int(meta["format_version"]) != version:
        raise ValueError(f"{where}: metadata format_version {meta['format_version']} disagrees with "
                         f"header format_version {version}")
    pinfo = meta["parameterization"]
    if not isinstance(pinfo, dict) or not pinfo.get("name") or "config" not in pinfo:
        raise ValueError(f"{where}: metadata 'parameterization' lacks name/config")
    return meta


def load(path: str | os.PathLike, *, registry: Any = None, device: str | torch.device = "cpu"
         ) -> Distilled:
    """Read, validate and rebuild a distilled file.

    Raises ``ValueError`` (saying what is wrong) for a truncated/corrupted/foreign file, and
    :class:`splatdd.registry.UnknownPluginError` / ``PluginLoadError`` if the parameterization plugin
    the file needs is not installed or broken."""
    from safetensors.torch import load as st_load

    from splatdd import registry as _registry

    reg = registry if registry is not None else _registry.default_registry()
    path = Path(path)
    where = str(path)
    buf = path.read_bytes()
    header = _parse_header(buf, where)
    meta = _check_meta(header.get("__metadata__"), where)
    try:
        tensors = st_load(buf)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{where}: cannot read tensors: {exc}") from None

    sums = meta["sha256"]
    if not isinstance(sums, dict):
        raise ValueError(f"{where}: metadata 'sha256' is not a mapping")
    if set(sums) != set(tensors):
        raise ValueError(f"{where}: tensors {sorted(tensors)} do not match the recorded "
                         f"{sorted(sums)}")
    bad = [k for k, t in sorted(tensors.items()) if tensor_sha256(t) != sums[k]]
    if bad:
        raise ValueError(f"{where}: sha256 mismatch (corrupted data) in tensor(s): {', '.join(bad)}")
    if "labels" not in tensors:
        raise ValueError(f"{where}: no 'labels' tensor")
    labels = tensors["labels"]
    spec = _spec_from_json(meta["dataset"])
    state = {k[len("param/"):]: t for k, t in tensors.items() if k.startswith("param/")}
    if not state:
        raise ValueError(f"{where}: no parameterization tensors ('param/...')")

    pinfo = meta["parameterization"]
    pname = pinfo["name"]
    try:
        cls = reg.get_parameterization(pname)
    except _registry.UnknownPluginError as exc:
        need = pinfo.get("distribution") or f"a plugin providing {pname!r}"
        exc.add_note(f"{where} needs parameterization {pname!r} ({need} "
                     f"{pinfo.get('version') or ''}); install it".rstrip())
        raise
    try:
        param = cls.from_state(spec, state, pinfo["config"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{where}: {pname}.from_state rejected the stored state: {exc}") from exc
    if not torch.equal(param.labels.to("cpu", torch.int64), labels):
        raise ValueError(f"{where}: stored labels do not match the labels of the rebuilt "
                         f"{pname} parameterization")
    param = param.to(device)
    lr = meta.get("learned_lr")
    return Distilled(param=param, spec=spec, labels=labels, meta=meta,
                     learned_lr=None if lr is None else float(lr), path=path, tensors=tensors)


# ---- exports --------------------------------------------------------------------------------------
def _resolve(source: Any, spec: DatasetSpec | None, resolution: tuple[int, int] | None
             ) -> tuple[torch.Tensor, torch.Tensor | None, DatasetSpec | None, float | None]:
    """(images normalised float32 CPU, labels or None, spec or None, learned lr or None)."""
    learned_lr = None
    if isinstance(source, Distilled):
        spec = spec or source.spec
        learned_lr = source.learned_lr
        images, labels = source.images(resolution), source.labels
    elif isinstance(source, Parameterization):
        spec = spec or getattr(source, "spec", None)
        with torch.no_grad():
            images = source.decode(None, resolution=resolution).detach()
        labels = source.labels
    elif isinstance(source, torch.Tensor):
        images, labels = source.detach(), None
        if resolution is not None and tuple(images.shape[-2:]) != tuple(resolution):
            images = torch.nn.functional.interpolate(images.float(), size=tuple(resolution),
                                                     mode="bilinear", align_corners=False)
    elif isinstance(source, (str, os.PathLike)):
        return _resolve(load(source), spec, resolution)
    else:
        raise TypeError(f"cannot export {type(source).__name__}; pass a Distilled, a "
                        f"Parameterization, a (N, C, H, W) tensor or a file path")
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    labels = None if labels is None else labels.detach().to("cpu", torch.int64)
    return images.to("cpu", torch.float32), labels, spec, learned_lr


def denormalize(images: torch.Tensor, spec: DatasetSpec | None) -> torch.Tensor:
    """Normalised images -> displayable [0, 1]: ``x * std + mean`` per channel, clamped. Without
    mean/std, or for ZCA-whitened data (not invertible from the spec), each image is min-max
    scaled instead."""
    x = images.detach().to("cpu", torch.float32)
    c = x.shape[1]
    if spec is not None and not spec.zca and len(spec.mean) == c and len(spec.std) == c:
        mean = torch.tensor(spec.mean).view(1, c, 1, 1)
        std = torch.tensor(spec.std).view(1, c, 1, 1)
        return (x * std + mean).clamp(0, 1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


def make_grid(images: torch.Tensor, *, nrow: int | None = None, labels: torch.Tensor | None = None,
              padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile ``(N, C, H, W)`` images into one ``(C, H', W')`` grid.

    ``nrow`` images per row in the given order; when ``nrow`` is None and ``labels`` are given, one
    column per class (images of class ``c`` stacked down column ``c``); else a near-square grid."""
    n, c, h, w = images.shape
    cells: list[tuple[int, int, int]] = []  # (row, col, index)
    if nrow is None and labels is not None and n > 0:
        classes = sorted(set(labels.tolist()))
        for col, k in enumerate(classes):
            idx = torch.nonzero(labels == k).flatten().tolist()
            cells += [(row, col, i) for row, i in enumerate(idx)]
    else:
        per_row = nrow or max(1, math.ceil(math.sqrt(n)))
        cells = [(i // per_row, i % per_row, i) for i in range(n)]
    rows = 1 + max((r for r, _, _ in cells), default=0)
    cols = 1 + max((q for _, q, _ in cells), default=0)
    grid = torch.full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for r, q, i in cells:
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def export_png(source: Any, path: str | os.PathLike, *, spec: DatasetSpec | None = None,
               nrow: int | None = None, resolution: tuple[int, int] | None = None,
               padding: int = 2, scale: int = 1) -> Path:
    """Write a grid PNG of the decoded images (de-normalised with ``spec``'s mean/std).

    ``source``: a :class:`Distilled`, a file path, a :class:`Parameterization` (pass ``spec=``
    unless it has a ``spec`` attribute) or an ``(N, C, H, W)`` tensor. Default layout: one column
    per class. ``scale`` upsamples the grid by pixel replication."""
    from PIL import Image

    images, labels, spec, _ = _resolve(source, spec, resolution)
    grid = make_grid(denormalize(images, spec), nrow=nrow, labels=labels, padding=padding)
    c = grid.shape[0]
    if c == 3:
        arr, mode = grid.permute(1, 2, 0), "RGB"
    elif c == 1:
        arr, mode = grid[0], "L"
    else:
        arr, mode = grid.mean(0), "L"
    if scale > 1:
        arr = arr.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    u8 = (arr * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    img = Image.fromarray(u8)           # 2-D uint8 -> "L", (H, W, 3) uint8 -> "RGB"
    assert img.mode == mode, (img.mode, mode)
    path = Path(path)
    atomic_save_with(path, lambda f: img.save(f, format="PNG"))
    return path


def export_tensor(source: Any, path: str | os.PathLike, *, spec: DatasetSpec | None = None,
                  resolution: tuple[int, int] | None = None) -> Path:
    """Write the decoded dataset as a plain ``torch.save`` file for third-party training code.

    The dict has ``images`` ``(N, C, H, W)`` float32 **in the normalised space** the distillation
    used (what a network is trained on; normalise the test set the same way), ``labels`` ``(N,)``
    int64, ``mean``/``std`` ``(C,)`` float32 (so ``images * std[:, None, None] + mean[:, None,
    None]`` gives [0, 1] pixels, unless ``zca`` is true: then the images are ZCA-whitened),
    ``zca``, ``normalized`` (True), ``dataset``, ``resolution``, ``learned_lr`` and ``format``."""
    images, labels, spec, learned_lr = _resolve(source, spec, resolution)
    c = images.shape[1]
    if spec is not None and len(spec.mean) == c and len(spec.std) == c:
        mean, std = torch.tensor(spec.mean, dtype=torch.float32), torch.tensor(spec.std,
                                                                                 dtype=torch.float32)
    else:
        mean, std = torch.zeros(c), torch.ones(c)
    obj = {
        "format": TENSOR_FORMAT, "format_version": 1,
        "images": images.contiguous(),
        "labels": labels if labels is not None else torch.full((len(images),), -1,
                                                                 dtype=torch.int64),
        "mean": mean, "std": std, "normalized": True,
        "zca": bool(spec.zca) if spec is not None else False,
        "dataset": spec.name if spec is not None else None,
        "num_classes": spec.num_classes if spec is not None else None,
        "resolution": [int(images.shape[-2]), int(images.shape[-1])],
        "learned_lr": learned_lr,
    }
    path = Path(path)
    atomic_torch_save(obj, path)
    return path
