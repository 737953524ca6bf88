"""The distilled-dataset file: one ``.safetensors`` holding a parameterization and its provenance.

Layout (format version 2; docs/files.md has the full description and the integrity guarantees):

* tensors: ``labels`` (int64, one per decoded image) and ``param/<key>`` for every tensor of
  :meth:`Parameterization.state_tensors`, in the plugin's own storage dtype (e.g. bf16 for gaussian);
* ``__metadata__`` (strings only): ``format = "splatdd.distilled"``, ``format_version = "2"``,
  ``splatdd`` (a JSON document) and ``splatdd_sha256`` (the sha256 of that JSON text's UTF-8 bytes).
  The JSON holds: splatdd version, parameterization ``{name, distribution, version, config}``,
  algorithm ``{name, distribution, version, config}``, the :class:`DatasetSpec`, resolution, ipc,
  ``num_images``, ``budget_bytes`` and ``num_bytes``, ``learned_lr``, the manifest ``tensors``
  (``{name: {dtype, shape}}``), the sha256 of every tensor's raw bytes and ``extra`` (run settings).

So one digest chain covers everything that defines the file's meaning: ``splatdd_sha256`` -> the
metadata JSON -> every tensor's dtype, shape and sha256 -> the tensor bytes.

:func:`load` checks, in this order and before reading any tensor data: that the path is a regular
file (a FIFO or device is refused without opening it for a blocking read), the header length (at
most :data:`MAX_HEADER_BYTES`), the header JSON (nesting depth at most :data:`MAX_JSON_DEPTH`, no
duplicate keys), every tensor entry (dtype, shape, offsets that tile the data exactly), the file
size against the header, the metadata digest, every metadata field's type and range and their
cross-checks (resolution vs dataset, budget, manifest vs header); then that the tensor data fits in
memory, reads it, checks the sha256s, the labels and that floating tensors are finite; then rebuilds
the parameterization once on PyTorch's ``meta`` device (no memory) to let the plugin check shapes
and to measure what it would allocate, and only then for real. Every problem raises a
:class:`DistilledFileError` (a ``ValueError``) whose message starts with the path and the field.

Files written by format version 1 (no metadata digest, no tensor manifest) are still read, with
every field check above but without the metadata digest: an edit of their metadata that stays
within the valid ranges is not detected. Re-save them (``load`` then ``save``) to upgrade.

Third-party training code can use :func:`export_tensor` (a plain ``torch.save`` file of images and
labels) or :func:`export_png` (an image grid) without splatdd's plugins at training time.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import numpy as np
import torch

from splatdd.budget import budget_bytes
from splatdd.io_utils import atomic_save_with, atomic_torch_save, atomic_write_bytes, tensor_sha256
from splatdd.plugin_api import DatasetSpec, Parameterization
from splatdd.run_folder import translate_write_errors

__all__ = ["FORMAT", "FORMAT_VERSION", "READABLE_VERSIONS", "Distilled", "save", "load",
           "read_metadata", "export_png", "export_tensor", "denormalize", "make_grid", "grid_title",
           "DistilledFileError", "NotADistilledFile", "TruncatedFile", "CorruptFile",
           "UnsupportedVersion", "IntegrityError", "InvalidMetadata", "InvalidTensorData",
           "ImplausibleSize", "metadata_digest", "MAX_HEADER_BYTES", "MAX_JSON_DEPTH"]

FORMAT = "splatdd.distilled"
FORMAT_VERSION = 2
#: Format versions :func:`load` reads (1: no metadata digest, see the module docstring).
READABLE_VERSIONS = (1, 2)
TENSOR_FORMAT = "splatdd.images"

#: Largest safetensors header (JSON incl. metadata) accepted, in bytes.
MAX_HEADER_BYTES = 16 * 2**20
#: Deepest JSON nesting accepted in the header or the metadata document.
MAX_JSON_DEPTH = 64
#: Ranges of the dataset fields (far beyond any published setting; they bound allocations).
MAX_CHANNELS = 256
MAX_SIDE = 8192
MAX_CLASSES = 100_000
MAX_IPC = 100_000
MAX_IMAGES = 100_000_000
MAX_DIMS = 8

_REQUIRED = ("format_version", "parameterization", "dataset", "ipc", "sha256", "resolution",
             "budget_bytes", "num_bytes")
_METADATA_KEYS = {1: {"format", "format_version", "splatdd"},
                  2: {"format", "format_version", "splatdd", "splatdd_sha256"}}
_DATASET_KEYS = {"name", "channels", "height", "width", "num_classes", "mean", "std", "zca"}
_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
    "F32": torch.float32, "F64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_HEX64 = re.compile(r"[0-9a-f]{64}")


# ---- errors ---------------------------------------------------------------------------------------
class DistilledFileError(ValueError):
    """A distilled file that cannot be used. ``path`` and ``field`` (e.g. ``"dataset.height"``,
    ``"tensor param/gaussians"``, ``"header"``) say where; the message starts with both."""

    def __init__(self, path: str, field: str, problem: str) -> None:
        self.path, self.field, self.problem = path, field, problem
        super().__init__(f"{path}: {field}: {problem}")


class NotADistilledFile(DistilledFileError):
    """Missing, not a regular file (FIFO, directory, device) or another format."""


class TruncatedFile(DistilledFileError):
    """The file is shorter than its header says."""


class CorruptFile(DistilledFileError):
    """The header cannot be parsed or is malformed, or there are trailing bytes."""


class UnsupportedVersion(DistilledFileError):
    """Written by a newer splatdd, or a format version that never existed."""


class IntegrityError(DistilledFileError):
    """A digest does not match: the metadata or a tensor changed after the file was written."""


class InvalidMetadata(DistilledFileError):
    """A metadata field has the wrong type, is out of range or contradicts another field."""


class InvalidTensorData(DistilledFileError):
    """Tensor values are invalid (non-finite floats, labels out of range) or the parameterization
    plugin refused the stored state."""


class ImplausibleSize(DistilledFileError):
    """A size limit is exceeded: header, JSON depth, or memory the file would need."""


# ---- small helpers --------------------------------------------------------------------------------
def _splatdd_version() -> str | None:
    try:
        import importlib.metadata as md
        return md.version("splatdd")
    except Exception:  # noqa: BLE001
        return None


def _jsonable(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable with finite numbers: {exc}") from exc


def _finite_json(obj: Any) -> Any:
    """JSON has no NaN/inf: map them to None (for free-form run information only)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def _spec_to_json(spec: DatasetSpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["mean"], d["std"] = list(spec.mean), list(spec.std)
    return d


def metadata_digest(text: str) -> str:
    """The ``splatdd_sha256`` of a metadata JSON text: hex sha256 of its UTF-8 bytes.

    >>> metadata_digest("{}")[:12]
    '44136fa355b3'
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _json_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text (strings skipped), without recursion."""
    bare = re.sub(r'"[^"\\]*(?:\\.[^"\\]*)*"', "", text)
    b = np.frombuffer(bare.encode("utf-8"), dtype=np.uint8)
    if b.size == 0:
        return 0
    step = (np.isin(b, (0x5B, 0x7B)).astype(np.int64) - np.isin(b, (0x5D, 0x7D)).astype(np.int64))
    return int(np.cumsum(step).max(initial=0))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_json(text: str, where: str, what: str, cls: type[DistilledFileError]) -> Any:
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ImplausibleSize(where, what, f"JSON nested {depth} deep; at most {MAX_JSON_DEPTH} "
                                           f"levels are accepted")
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ImplausibleSize(where, what, "JSON nested too deeply") from None
    except ValueError as exc:      # JSONDecodeError and duplicate keys
        raise cls(where, what, f"not valid JSON ({exc})") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _memory_available() -> int:
    """Bytes of memory available to this process (Linux ``MemAvailable``; else physical memory)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 2**62


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
    record the plugins' distribution names and versions. The metadata is validated exactly as
    :func:`load` validates it, so a file this writes always loads (a NaN parameter, a negative
    ``learned_lr`` or ``ipc=0`` raise :class:`DistilledFileError` here). Non-finite numbers in
    ``extra_meta`` are stored as null. A failed write (disk full, read-only folder) raises
    :class:`splatdd.run_folder.WriteFailed` and leaves any previous file untouched. Example::

        save("out/distilled.safetensors", param, spec=train.spec, ipc=1, algorithm="dm")
    """
    from safetensors.torch import save as st_save

    from splatdd import registry as _registry

    reg = registry if registry is not None else _registry.default_registry()
    path = Path(path)
    where = str(path)
    state = param.state_tensors()
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{type(param).__name__}.state_tensors() returned no tensors")
    tensors: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_tensors()[{key!r}] is not a tensor")
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"state_tensors()[{key!r}] has dtype {t.dtype}; a distilled file "
                            f"stores {', '.join(map(str, _DTYPE_NAMES))}")
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
    if isinstance(ipc, bool) or not isinstance(ipc, (int, np.integer)):
        raise InvalidMetadata(where, "ipc", f"must be an int, got {type(ipc).__name__}")
    if learned_lr is not None:
        try:
            learned_lr = float(learned_lr)
        except (TypeError, ValueError):
            raise InvalidMetadata(where, "learned_lr", f"must be a float or None, got "
                                                       f"{learned_lr!r}") from None
    ordered = sorted(tensors.items())
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
        "budget_bytes": budget_bytes(spec, int(ipc)) if int(ipc) >= 1 else 0,
        "num_bytes": int(param.num_bytes()),
        "learned_lr": None if learned_lr is None else float(learned_lr),
        "tensors": {k: {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)} for k, t in ordered},
        "sha256": {k: tensor_sha256(t) for k, t in ordered},
        "extra": _finite_json(_jsonable(_finite_json(dict(extra_meta or {})), "extra_meta")),
    }
    # the same checks load() applies, so that every written file loads
    _check_fields(meta, where, FORMAT_VERSION)
    _check_manifest(meta, {k: (_DTYPE_NAMES[t.dtype], list(t.shape)) for k, t in ordered}, where)
    _check_values(tensors, meta, where)
    text = json.dumps(meta, allow_nan=False)
    data = st_save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                      "splatdd": text, "splatdd_sha256": metadata_digest(text)})
    kept = f"the previous {path}" if path.exists() else "nothing (no earlier file)"
    with translate_write_errors(f"distilled file {path}", kept=kept,
                                hint="free space or fix the folder's permissions and save again "
                                     "(a distillation run: rerun it with --resume)"):
        atomic_write_bytes(path, data)
    return path


# ---- reading: the file and its header ---------------------------------------------------------------
@dataclass
class _Entry:
    name: str
    dtype: str
    shape: list[int]
    begin: int
    end: int


@dataclass
class _Header:
    path: str
    size: int
    data_start: int
    entries: list[_Entry]
    raw_meta: Any


def _open_regular(path: Path) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading if and only if it is a regular file (checked with ``os.stat``
    before opening, and again with ``fstat`` on the descriptor, opened non-blocking, so a FIFO
    swapped in between cannot block). Returns the file and its size."""
    where = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotADistilledFile(where, "path", "no such file") from None
    except OSError as exc:
        raise NotADistilledFile(where, "path", f"cannot stat: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else
                "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "a device or special file")
        raise NotADistilledFile(where, "path", f"is {kind}, not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise NotADistilledFile(where, "path", f"cannot open: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotADistilledFile(where, "path", "is not a regular file")
    return os.fdopen(fd, "rb"), int(st.st_size)


def _read_exact(f: BinaryIO, n: int, where: str, what: str) -> bytes:
    buf = f.read(n)
    if len(buf) != n:
        raise TruncatedFile(where, what, f"needs {n} bytes, only {len(buf)} could be read (the "
                                         f"file changed or is truncated)")
    return buf


def _read_header(f: BinaryIO, size: int, where: str) -> _Header:
    if size < 8:
        raise TruncatedFile(where, "header length", f"file has {size} bytes; a safetensors file "
                                                    f"starts with an 8-byte header length")
    (n,) = struct.unpack("<Q", _read_exact(f, 8, where, "header length"))
    # a length beyond the file and no JSON object after it: another format (e.g. a text file,
    # whose first 8 characters read as a length of ~10^18), not a truncated safetensors file
    if n > size - 8 and size > 8 and f.read(1) != b"{":
        raise NotADistilledFile(where, "header", "not a safetensors file (a distilled file is a "
                                "safetensors file: an 8-byte header length, then a JSON header "
                                "starting with '{')")
    f.seek(8)
    if n > MAX_HEADER_BYTES:
        if n > size - 8:
            raise TruncatedFile(where, "header length", f"claims {n} bytes, the file has "
                                                        f"{size - 8} after the length field")
        raise ImplausibleSize(where, "header length", f"{n} bytes; at most {MAX_HEADER_BYTES} "
                                                      f"are accepted")
    if n > size - 8:
        raise TruncatedFile(where, "header length", f"claims {n} bytes, the file has {size - 8} "
                                                    f"after the length field")
    if n < 2:
        raise CorruptFile(where, "header", f"{n}-byte header is not a JSON object")
    raw = _read_exact(f, n, where, "header")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFile(where, "header", f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    header = _parse_json(text, where, "header", CorruptFile)
    if not isinstance(header, dict):
        raise CorruptFile(where, "header", "not a JSON object")
    entries: list[_Entry] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries.append(_entry(name, info, where))
    entries.sort(key=lambda e: (e.begin, e.end))
    pos = 0
    for e in entries:
        if e.begin != pos:
            raise CorruptFile(where, f"tensor {e.name}", f"data_offsets start at {e.begin}, "
                                                        f"expected {pos} (gap or overlap)")
        pos = e.end
    data_len = size - 8 - n
    if pos > data_len:
        raise TruncatedFile(where, "tensor data", f"needs {pos} bytes but only {data_len} are "
                                                  f"present")
    if pos < data_len:
        raise CorruptFile(where, "tensor data", f"{data_len - pos} unexpected trailing bytes after "
                                                f"the tensor data")
    return _Header(where, size, 8 + n, entries, header.get("__metadata__"))


def _entry(name: str, info: Any, where: str) -> _Entry:
    what = f"tensor {name}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CorruptFile(where, what, "header entry must have exactly dtype, shape, data_offsets")
    dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in _DTYPES:
        raise CorruptFile(where, what, f"unsupported dtype {dtype!r}; expected one of "
                                       f"{', '.join(_DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(_is_int(s) and 0 <= s < 2**40 for s in shape)):
        raise CorruptFile(where, what, f"shape {shape!r} is not a list of at most {MAX_DIMS} "
                                       f"non-negative ints")
    if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
            and 0 <= offs[0] <= offs[1]):
        raise CorruptFile(where, what, f"data_offsets {offs!r} are not [begin, end] with "
                                       f"0 <= begin <= end")
    nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
    if offs[1] - offs[0] != nbytes:
        raise CorruptFile(where, what, f"data_offsets span {offs[1] - offs[0]} bytes but "
                                       f"{dtype} {shape} needs {nbytes}")
    return _Entry(name, dtype, list(shape), offs[0], offs[1])


def _decode_metadata(raw_meta: Any, where: str) -> tuple[dict[str, Any], int]:
    """Check ``__metadata__`` (format, version, digest) and parse the metadata JSON."""
    if not isinstance(raw_meta, dict) or raw_meta.get("format") != FORMAT:
        raise NotADistilledFile(where, "__metadata__.format",
                                f"not a splatdd distilled file (no '{FORMAT}' metadata)")
    if not all(isinstance(v, str) for v in raw_meta.values()):
        raise CorruptFile(where, "__metadata__", "safetensors metadata values must be strings")
    vtext = raw_meta.get("format_version", "")
    if not re.fullmatch(r"[0-9]{1,6}", vtext):
        raise UnsupportedVersion(where, "format_version", f"bad value {vtext!r}")
    version = int(vtext)
    if version > FORMAT_VERSION:
        raise UnsupportedVersion(where, "format_version",
                                 f"written in distilled-file format v{version}; this splatdd reads "
                                 f"up to v{FORMAT_VERSION} (upgrade splatdd)")
    if version not in READABLE_VERSIONS:
        raise UnsupportedVersion(where, "format_version", f"bad format_version {version}")
    unknown = sorted(set(raw_meta) - _METADATA_KEYS[version])
    missing = sorted(_METADATA_KEYS[version] - set(raw_meta))
    if unknown:
        raise CorruptFile(where, "__metadata__", f"unknown key(s) {', '.join(unknown)}")
    if missing:
        raise CorruptFile(where, "__metadata__", f"missing key(s) {', '.join(missing)}")
    text = raw_meta["splatdd"]
    if version >= 2 and metadata_digest(text) != raw_meta["splatdd_sha256"]:
        raise IntegrityError(where, "splatdd metadata",
                             "sha256 mismatch: the metadata was changed after the file was written")
    meta = _parse_json(text, where, "splatdd metadata", CorruptFile)
    if not isinstance(meta, dict):
        raise CorruptFile(where, "splatdd metadata", "not a JSON object")
    return meta, version


# ---- reading: metadata fields -----------------------------------------------------------------------
def _int_in(meta: Mapping[str, Any], key: str, where: str, lo: int, hi: int, name: str | None = None
            ) -> int:
    v = meta[key]
    name = name or key
    if not _is_int(v):
        raise InvalidMetadata(where, name, f"must be an integer, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise InvalidMetadata(where, name, f"{v} is out of range [{lo}, {hi}]")
    return v


def _opt_str(d: Mapping[str, Any], key: str, where: str, name: str) -> None:
    if d.get(key) is not None and not isinstance(d[key], str):
        raise InvalidMetadata(where, name, f"must be a string or null, got {json.dumps(d[key])[:40]}")


def _plugin_info(info: Any, where: str, name: str, *, optional: bool) -> None:
    if info is None and optional:
        return
    if not isinstance(info, dict):
        raise InvalidMetadata(where, name, "must be an object with name and config")
    if not isinstance(info.get("name"), str) or not info["name"] or len(info["name"]) > 200:
        raise InvalidMetadata(where, f"{name}.name", "must be a non-empty string")
    if not isinstance(info.get("config"), dict):
        raise InvalidMetadata(where, f"{name}.config", "must be an object")
    _opt_str(info, "distribution", where, f"{name}.distribution")
    _opt_str(info, "version", where, f"{name}.version")


def _spec_from_meta(d: Any, where: str) -> DatasetSpec:
    if not isinstance(d, dict):
        raise InvalidMetadata(where, "dataset", "must be an object")
    missing = sorted({"name", "channels", "height", "width", "num_classes"} - set(d))
    if missing:
        raise InvalidMetadata(where, "dataset", f"lacks {', '.join(missing)}")
    unknown = sorted(set(d) - _DATASET_KEYS)
    if unknown:
        raise InvalidMetadata(where, "dataset", f"unknown key(s) {', '.join(unknown)}")
    if not isinstance(d["name"], str) or not d["name"] or len(d["name"]) > 200:
        raise InvalidMetadata(where, "dataset.name", "must be a non-empty string")
    c = _int_in(d, "channels", where, 1, MAX_CHANNELS, "dataset.channels")
    h = _int_in(d, "height", where, 1, MAX_SIDE, "dataset.height")
    w = _int_in(d, "width", where, 1, MAX_SIDE, "dataset.width")
    k = _int_in(d, "num_classes", where, 1, MAX_CLASSES, "dataset.num_classes")
    stats = {}
    for key in ("mean", "std"):
        v = d.get(key, [])
        if not isinstance(v, list) or not all(_is_num(x) and math.isfinite(x) for x in v):
            raise InvalidMetadata(where, f"dataset.{key}", "must be a list of finite numbers")
        if len(v) not in (0, c):
            raise InvalidMetadata(where, f"dataset.{key}", f"has {len(v)} values for {c} channel(s)")
        stats[key] = tuple(float(x) for x in v)
    if len(stats["mean"]) != len(stats["std"]):
        raise InvalidMetadata(where, "dataset.std", f"has {len(stats['std'])} values but mean has "
                                                    f"{len(stats['mean'])}")
    if not all(s > 0 for s in stats["std"]):
        raise InvalidMetadata(where, "dataset.std", "values must be > 0")
    zca = d.get("zca", False)
    if not isinstance(zca, bool):
        raise InvalidMetadata(where, "dataset.zca", f"must be true or false, got {json.dumps(zca)}")
    return DatasetSpec(name=d["name"], channels=c, height=h, width=w, num_classes=k,
                       mean=stats["mean"], std=stats["std"], zca=zca)


def _check_fields(meta: dict[str, Any], where: str, version: int) -> DatasetSpec:
    """Type, range and cross-checks of every metadata field; returns the dataset spec."""
    missing = [k for k in _REQUIRED if k not in meta]
    if version >= 2:
        missing += [k for k in ("tensors", "num_images") if k not in meta]
    if missing:
        raise InvalidMetadata(where, "metadata", f"lacks required keys: {', '.join(missing)}")
    if meta["format_version"] != version:
        raise InvalidMetadata(where, "format_version", f"{json.dumps(meta['format_version'])} "
                                                       f"disagrees with the header's {version}")
    _opt_str(meta, "splatdd_version", where, "splatdd_version")
    _opt_str(meta, "created", where, "created")
    _plugin_info(meta["parameterization"], where, "parameterization", optional=False)
    _plugin_info(meta.get("algorithm"), where, "algorithm", optional=True)
    spec = _spec_from_meta(meta["dataset"], where)
    res = meta["resolution"]
    if not (isinstance(res, list) and len(res) == 2 and all(_is_int(x) for x in res)):
        raise InvalidMetadata(where, "resolution", f"must be [height, width], got "
                                                   f"{json.dumps(res)[:40]}")
    if res != [spec.height, spec.width]:
        raise InvalidMetadata(where, "resolution", f"{res} disagrees with the dataset's "
                                                   f"{spec.height} x {spec.width}")
    ipc = _int_in(meta, "ipc", where, 1, MAX_IPC)
    if "num_images" in meta:
        _int_in(meta, "num_images", where, 1, MAX_IMAGES)
    want = budget_bytes(spec, ipc)
    if _int_in(meta, "budget_bytes", where, 0, 2**62) != want:
        raise InvalidMetadata(where, "budget_bytes", f"{meta['budget_bytes']} disagrees with "
                                                     f"ipc {ipc} and the dataset ({want})")
    _int_in(meta, "num_bytes", where, 0, 2**62)
    lr = meta.get("learned_lr")
    if lr is not None and not (_is_num(lr) and math.isfinite(lr) and lr > 0):
        raise InvalidMetadata(where, "learned_lr", f"must be a finite number > 0 or null, got "
                                                   f"{json.dumps(lr)}")
    sums = meta["sha256"]
    if not isinstance(sums, dict) or not all(isinstance(v, str) and _HEX64.fullmatch(v)
                                             for v in sums.values()):
        raise InvalidMetadata(where, "sha256", "must map tensor names to hex sha256 digests")
    if "extra" in meta and not isinstance(meta["extra"], dict):
        raise InvalidMetadata(where, "extra", "must be an object")
    if version >= 2:
        man = meta["tensors"]
        if not isinstance(man, dict) or not all(
                isinstance(v, dict) and set(v) == {"dtype", "shape"} for v in man.values()):
            raise InvalidMetadata(where, "tensors", "must map tensor names to {dtype, shape}")
    return spec


def _check_manifest(meta: dict[str, Any], stored: Mapping[str, tuple[str, list[int]]],
                    where: str) -> None:
    """The header's tensors against the metadata (names; v2: dtype and shape too) and labels."""
    names = sorted(stored)
    if sorted(meta["sha256"]) != names:
        raise IntegrityError(where, "sha256", f"tensors {names} do not match the recorded "
                                              f"{sorted(meta['sha256'])}")
    if "tensors" in meta:
        man = meta["tensors"]
        if sorted(man) != names:
            raise IntegrityError(where, "tensors", f"tensors {names} do not match the manifest "
                                                   f"{sorted(man)}")
        for k in names:
            if [man[k]["dtype"], man[k]["shape"]] != [stored[k][0], stored[k][1]]:
                raise IntegrityError(where, f"tensor {k}",
                                     f"header says {stored[k][0]} {stored[k][1]}, the metadata "
                                     f"manifest {man[k]['dtype']} {man[k]['shape']}")
    if "labels" not in stored:
        raise InvalidMetadata(where, "labels", "no 'labels' tensor")
    if not any(k.startswith("param/") for k in names):
        raise InvalidMetadata(where, "tensors", "no parameterization tensors ('param/...')")
    dtype, shape = stored["labels"]
    if dtype != "I64" or len(shape) != 1:
        raise InvalidMetadata(where, "labels", f"must be a 1-D int64 tensor, got {dtype} {shape}")
    if "num_images" in meta and shape[0] != meta["num_images"]:
        raise InvalidMetadata(where, "num_images", f"{meta['num_images']} disagrees with "
                                                   f"{shape[0]} labels")


def _check_values(tensors: Mapping[str, torch.Tensor], meta: dict[str, Any], where: str) -> None:
    """Labels within ``[0, num_classes)``; floating tensors finite."""
    k = meta["dataset"]["num_classes"]
    labels = tensors["labels"]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise InvalidTensorData(where, "labels", f"values must be in [0, {k}), got "
                                                 f"[{int(labels.min())}, {int(labels.max())}]")
    for name, t in sorted(tensors.items()):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise InvalidTensorData(where, f"tensor {name}", f"{bad} non-finite (NaN/inf) values")
        if t.dtype == torch.bool and t.numel() and int(t.view(torch.uint8).max()) > 1:
            raise InvalidTensorData(where, f"tensor {name}", "bool bytes other than 0/1")


def _read_tensors(f: BinaryIO, header: _Header) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for e in header.entries:
        dtype = _DTYPES[e.dtype]
        n = e.end - e.begin
        if n == 0:
            out[e.name] = torch.empty(e.shape, dtype=dtype)
            continue
        f.seek(header.data_start + e.begin)
        buf = bytearray(n)
        got = f.readinto(buf)
        if got != n:
            raise TruncatedFile(header.path, f"tensor {e.name}", f"needs {n} bytes, only {got} "
                                                                f"could be read (the file changed)")
        out[e.name] = torch.frombuffer(buf, dtype=dtype).reshape(e.shape)
    return out


def _parse(f: BinaryIO, size: int, where: str) -> tuple[_Header, dict[str, Any], DatasetSpec]:
    header = _read_header(f, size, where)
    meta, version = _decode_metadata(header.raw_meta, where)
    spec = _check_fields(meta, where, version)
    _check_manifest(meta, {e.name: (e.dtype, e.shape) for e in header.entries}, where)
    return header, meta, spec


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The validated JSON metadata of a distilled file, reading the header only (the metadata
    digest is checked; tensor data is not read, so tensor sha256s are not)::

        read_metadata("out/distilled.safetensors")["ipc"]
    """
    path = Path(path)
    f, size = _open_regular(path)
    with f:
        return _parse(f, size, str(path))[1]


def _state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) +
               list(module.buffers()))


def _rebuild(cls: Any, spec: DatasetSpec, state: dict[str, torch.Tensor], config: dict[str, Any],
             where: str, pname: str, limit: int, num_bytes: int) -> Parameterization:
    """``cls.from_state`` once on the meta device (shapes checked by the plugin, allocation
    measured, nothing allocated), then for real."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")       # e.g. "copying ... to a meta parameter is a no-op"
            dry = cls.from_state(spec, {k: v.to("meta") for k, v in state.items()}, dict(config))
    except (ValueError, KeyError) as exc:
        raise InvalidTensorData(where, f"parameterization {pname}",
                                f"from_state rejected the stored state: {exc}") from None
    except Exception:  # noqa: BLE001 - the plugin cannot run on the meta device: no dry run
        dry = None
    if isinstance(dry, torch.nn.Module):
        need = _state_bytes(dry)
        if need > limit:
            raise ImplausibleSize(where, "parameterization.config",
                                  f"{pname} would allocate {need:,} bytes for this config "
                                  f"({json.dumps(config)[:120]}); at most {limit:,} available")
        try:
            cost = int(dry.num_bytes())
        except Exception:  # noqa: BLE001 - not computable on the meta device: checked after
            cost = num_bytes
        if cost != num_bytes:
            raise InvalidMetadata(where, "num_bytes", f"{num_bytes} but the stored {pname} "
                                                      f"parameterization costs {cost}")
    try:
        return cls.from_state(spec, state, dict(config))
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise InvalidTensorData(where, f"parameterization {pname}",
                                f"from_state rejected the stored state: {exc}") from exc


def load(path: str | os.PathLike, *, registry: Any = None, device: str | torch.device = "cpu",
         max_bytes: int | None = None) -> Distilled:
    """Read, validate and rebuild a distilled file (see the module docstring for the checks)::

        d = load("out/distilled.safetensors"); images = d.images()

    ``max_bytes`` bounds the tensor data plus the rebuilt parameterization's memory (default: the
    memory available now). Raises a :class:`DistilledFileError` subclass (a ``ValueError``) naming
    the field for every invalid, truncated, corrupted, oversized or foreign file, and
    :class:`splatdd.registry.UnknownPluginError` / ``PluginLoadError`` if the parameterization plugin
    the file needs is not installed or broken."""
    from splatdd import registry as _registry

    reg = registry if registry is not None else _registry.default_registry()
    path = Path(path)
    where = str(path)
    limit = _memory_available() if max_bytes is None else int(max_bytes)
    f, size = _open_regular(path)
    with f:
        header, meta, spec = _parse(f, size, where)
        data_len = size - header.data_start
        if data_len > limit:
            raise ImplausibleSize(where, "tensor data", f"{data_len:,} bytes; at most {limit:,} "
                                                        f"available")
        tensors = _read_tensors(f, header)
    sums = meta["sha256"]
    bad = [k for k, t in sorted(tensors.items()) if tensor_sha256(t) != sums[k]]
    if bad:
        raise IntegrityError(where, f"tensor {bad[0]}",
                             f"sha256 mismatch (corrupted data) in tensor(s): {', '.join(bad)}")
    _check_values(tensors, meta, where)
    labels = tensors["labels"]
    state = {k[len("param/"):]: t for k, t in tensors.items() if k.startswith("param/")}

    pinfo = meta["parameterization"]
    pname = pinfo["name"]
    try:
        cls = reg.get_parameterization(pname)
    except _registry.UnknownPluginError as exc:
        need = pinfo.get("distribution") or f"a plugin providing {pname!r}"
        exc.add_note(f"{where} needs parameterization {pname!r} ({need} "
                     f"{pinfo.get('version') or ''}); install it".rstrip())
        raise
    param = _rebuild(cls, spec, state, pinfo["config"], where, pname, max(0, limit - data_len),
                     meta["num_bytes"])
    if not torch.equal(param.labels.to("cpu", torch.int64), labels):
        raise InvalidTensorData(where, "labels", f"stored labels do not match the labels of the "
                                                 f"rebuilt {pname} parameterization")
    if int(param.num_bytes()) != meta["num_bytes"]:
        raise InvalidMetadata(where, "num_bytes", f"{meta['num_bytes']} but the rebuilt {pname} "
                                                  f"parameterization costs {param.num_bytes()}")
    param = param.to(device)
    lr = meta.get("learned_lr")
    return Distilled(param=param, spec=spec, labels=labels, meta=meta,
                     learned_lr=None if lr is None else float(lr), path=path, tensors=tensors)


# ---- exports --------------------------------------------------------------------------------------
def _export_errors(path: Path) -> Any:
    """Write failures of an export as :class:`splatdd.run_folder.WriteFailed`."""
    return translate_write_errors(f"{path}", kept=f"the previous {path}" if path.exists() else None,
                                  hint="free space or choose another --out")


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
    from splatdd.grids import grid_cells
    n, c, h, w = images.shape
    cells = grid_cells(n, labels, nrow)               # (row, col, index)
    rows = 1 + max((r for r, _, _ in cells), default=0)
    cols = 1 + max((q for _, q, _ in cells), default=0)
    grid = torch.full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for r, q, i in cells:
        y, x = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, y:y + h, x:x + w] = images[i]
    return grid


def grid_title(source: Any, images: torch.Tensor, spec: DatasetSpec | None,
               labels: torch.Tensor | None) -> str | None:
    """The title :func:`export_png` gives ``source``'s grid: parameterization (+ algorithm),
    dataset, budget IPC, GPC (images per class), points per image where the parameterization has
    them, resolution. ``None`` for a bare tensor without a spec::

        grid_title(d, d.images(), d.spec, d.labels)   # 'gaussian + dm, fashion_mnist (budget ...
    """
    from splatdd.grids import title_for

    param = source.param if isinstance(source, Distilled) else source
    is_param = isinstance(param, Parameterization)
    if not is_param and spec is None:
        return None
    if spec is not None:
        k = spec.num_classes
    else:
        k = len(set(labels.tolist())) if labels is not None else 0
    config = None
    if is_param:
        try:
            config = param.config()
        except Exception:  # noqa: BLE001 - a title must not fail an export
            config = None
    return title_for(parameterization=param.name if is_param else None,
                     algorithm=source.algorithm if isinstance(source, Distilled) else None,
                     dataset=spec.name if spec is not None else None,
                     ipc=source.ipc if isinstance(source, Distilled) else None,
                     num_images=int(images.shape[0]), num_classes=k,
                     height=int(images.shape[-2]), width=int(images.shape[-1]), config=config)


def export_png(source: Any, path: str | os.PathLike, *, spec: DatasetSpec | None = None,
               nrow: int | None = None, resolution: tuple[int, int] | None = None,
               padding: int = 2, scale: int | None = None, annotate: bool = False,
               title: str | None = None) -> Path:
    """Write a grid PNG of the decoded images (de-normalised with ``spec``'s mean/std).

    ``source``: a :class:`Distilled`, a file path, a :class:`Parameterization` (pass ``spec=``
    unless it has a ``spec`` attribute) or an ``(N, C, H, W)`` tensor. Default layout: one column
    per class. With ``annotate=True`` (what ``splatdd render`` and ``splatdd distill`` write) the
    grid gets a title (``title``, default :func:`grid_title`: parameterization, GPC, points,
    resolution) and each column its class name (:func:`splatdd.grids.class_names`); the default
    writes the bare grid. ``scale`` upsamples by pixel replication (default:
    :func:`splatdd.grids.readable_scale` when annotating, e.g. 3x for 28 px images; 1 for a bare
    grid)::

        export_png("runs/fm/distilled.safetensors", "grid.png", annotate=True)
    """
    from splatdd.grids import annotated_grid, class_names

    if isinstance(source, (str, os.PathLike)):
        source = load(source)
    images, labels, spec, _ = _resolve(source, spec, resolution)
    if annotate and title is None:
        title = grid_title(source, images, spec, labels)
    img = annotated_grid(denormalize(images, spec), labels, nrow=nrow, padding=padding,
                         scale=scale if (scale is not None or annotate) else 1,
                         title=title if annotate else None, captions=annotate,
                         class_names=class_names(spec) if spec is not None else None)
    path = Path(path)
    with _export_errors(path):
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
    with _export_errors(path):
        atomic_torch_save(obj, path)
    return path
