"""Hostile distilled files for the loader: a test parameterization, a registry, a valid file and a
corpus of damaged, edited, oversized and special files, each with the exception class and the
field the loader must name. Used by tests/test_hostile_files.py and benchmarks/robustness.py.

Every case is built from the same small valid file (``valid_file``); ``rewrite`` re-encodes it
with edited metadata/tensors, by default recomputing every digest (a deliberate, well-formed
edit that only field validation can catch); ``refresh=False`` keeps the old digests (a careless
edit or corruption that the integrity check must catch).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from splatdd import distilled_file as F
from splatdd.io_utils import tensor_sha256
from splatdd.plugin_api import DatasetSpec, OptimizerSpec, Parameterization
from splatdd.registry import Registry

SPEC = DatasetSpec("toy", 3, 4, 5, 2, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
IPC = 3


class TinyBF16(Parameterization):
    """Images stored as bf16 values plus an fp32 per-image scale (mixed dtypes). ``config``
    ``cache`` adds a buffer of that many floats (a plugin whose config drives an allocation);
    ``calls`` records the device of every ``from_state`` call."""

    name = "tinybf16"
    calls: list[str] = []

    def __init__(self, spec, ipc, values=None, scale=None, cache=0):
        super().__init__()
        self.spec, self.ipc, self.cache = spec, ipc, int(cache)
        n = spec.num_classes * ipc
        self.values = torch.nn.Parameter(values if values is not None else
                                         torch.zeros(n, spec.channels, spec.height, spec.width))
        self.scale = torch.nn.Parameter(scale if scale is not None else torch.ones(n))
        if self.cache:
            self.register_buffer("_cache", torch.zeros(self.cache))

    @classmethod
    def build(cls, spec, ipc, *, generator=None, **options):
        n = spec.num_classes * ipc
        return cls(spec, ipc, torch.randn(n, spec.channels, spec.height, spec.width,
                                          generator=generator), torch.rand(n, generator=generator))

    def init_from_real(self, images, labels, *, steps=None, progress=False):
        return {}

    @property
    def labels(self):
        return torch.arange(self.spec.num_classes, device=self.values.device).repeat_interleave(
            self.ipc)

    def decode(self, indices=None, *, resolution=None):
        x = self.values.to(torch.bfloat16).float() * self.scale.view(-1, 1, 1, 1)
        return x if indices is None else x[indices]

    def optimizer_spec(self, algorithm, lr=None):
        return OptimizerSpec([{"params": list(self.parameters()), "lr": lr or 0.1}])

    def num_bytes(self):
        return self.values.numel() * 2 + self.scale.numel() * 4

    def state_tensors(self):
        return {"values": self.values.detach().to(torch.bfloat16).clone(),
                "scale": self.scale.detach().clone()}

    def config(self):
        return {"ipc": self.ipc, "note": "tiny", **({"cache": self.cache} if self.cache else {})}

    @classmethod
    def from_state(cls, spec, tensors, config):
        if "values" not in tensors:
            raise ValueError("missing tensor 'values'")
        TinyBF16.calls.append(str(tensors["values"].device))
        obj = cls(spec, int(config["ipc"]), cache=config.get("cache", 0))
        if tuple(tensors["values"].shape) != tuple(obj.values.shape):
            raise ValueError(f"tensor 'values' has shape {tuple(tensors['values'].shape)}, "
                             f"expected {tuple(obj.values.shape)}")
        with torch.no_grad():
            obj.values.copy_(tensors["values"].float())
            obj.scale.copy_(tensors["scale"].float())
        return obj


def registry() -> Registry:
    r = Registry(entry_points=False)
    r.register("parameterization", TinyBF16)
    return r


def valid_file(path: Path, *, seed: int = 0, spec: DatasetSpec = SPEC, ipc: int = IPC,
               reg: Registry | None = None) -> Path:
    p = TinyBF16.build(spec, ipc, generator=torch.Generator().manual_seed(seed))
    return F.save(path, p, spec=spec, ipc=ipc, algorithm="dm", algo_config={"batch_real": 8},
                  learned_lr=0.02, extra_meta={"iterations": 5}, registry=reg or registry())


# ---- low-level encoding ---------------------------------------------------------------------------
def data_start(buf: bytes) -> int:
    return 8 + struct.unpack("<Q", buf[:8])[0]


def split(buf: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header JSON, tensors) of a well-formed safetensors buffer."""
    from safetensors.torch import load
    return json.loads(buf[8:data_start(buf)]), dict(load(buf))


def encode(tensors: dict[str, torch.Tensor], raw_meta: dict[str, str]) -> bytes:
    from safetensors.torch import save
    return save(tensors, metadata=raw_meta)


def rewrite(path: Path, *, meta: Callable[[dict], Any] | None = None,
            tensors: Callable[[dict], Any] | None = None,
            raw: Callable[[dict], Any] | None = None, refresh: bool = True,
            text: Callable[[str], str] | None = None) -> Path:
    """Re-encode ``path`` after ``meta(json)``, ``tensors(dict)``, ``raw(__metadata__)`` or
    ``text(json_text)`` edits (each in place or returning a replacement); ``refresh`` recomputes
    the tensor sha256s, the manifest and the metadata digest."""
    header, ts = split(path.read_bytes())
    raw_meta = dict(header["__metadata__"])
    j = json.loads(raw_meta["splatdd"])
    if tensors is not None:
        ts = tensors(ts) or ts
    if refresh:
        j["sha256"] = {k: tensor_sha256(t) for k, t in sorted(ts.items())}
        j["tensors"] = {k: {"dtype": F._DTYPE_NAMES[t.dtype], "shape": list(t.shape)}
                        for k, t in sorted(ts.items())}
    if meta is not None:
        j = meta(j) or j
    s = json.dumps(j)
    if text is not None:
        s = text(s)
    raw_meta["splatdd"] = s
    if refresh:
        raw_meta["splatdd_sha256"] = F.metadata_digest(s)
    if raw is not None:
        raw_meta = raw(raw_meta) or raw_meta
    path.write_bytes(encode(ts, raw_meta))
    return path


def raw_file(path: Path, header: Any, data: bytes = b"", *, length: int | None = None) -> Path:
    """A file with an arbitrary JSON header (``str`` used verbatim) and data."""
    text = header if isinstance(header, str) else json.dumps(header)
    hb = text.encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)
    return path


def as_v1(path: Path) -> Path:
    """Re-encode a v2 file the way format version 1 wrote it (no digest, no manifest)."""
    def m(j):
        j["format_version"] = 1
        j.pop("tensors", None)

    def r(rm):
        rm["format_version"] = "1"
        rm.pop("splatdd_sha256", None)
    return rewrite(path, meta=m, raw=r, refresh=False)


# ---- the corpus -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """``make(path)`` damages the valid file at ``path`` (or replaces it); loading must raise
    ``error`` with ``field`` (a regex) in the message."""

    id: str
    category: str
    make: Callable[[Path], Path]
    error: type[Exception]
    field: str


def _flip(offset_of: Callable[[bytes], int]) -> Callable[[Path], Path]:
    def make(p: Path) -> Path:
        b = bytearray(p.read_bytes())
        b[offset_of(bytes(b))] ^= 0xFF
        p.write_bytes(bytes(b))
        return p
    return make


def _truncate(keep: Callable[[int], int]) -> Callable[[Path], Path]:
    def make(p: Path) -> Path:
        b = p.read_bytes()
        p.write_bytes(b[:keep(len(b))])
        return p
    return make


def _set(key: str, value: Any, *, refresh: bool = True) -> Callable[[Path], Path]:
    """Set the metadata field ``key`` (dotted path) to ``value``."""
    def m(j):
        d = j
        parts = key.split(".")
        for k in parts[:-1]:
            d = d[k]
        if value is _DELETE:
            del d[parts[-1]]
        else:
            d[parts[-1]] = value
    return lambda p: rewrite(p, meta=m, refresh=refresh)


_DELETE = object()


def _tensor(name: str, fn: Callable[[torch.Tensor], torch.Tensor], *, refresh: bool = True
            ) -> Callable[[Path], Path]:
    def t(ts):
        ts[name] = fn(ts[name].clone())
    return lambda p: rewrite(p, tensors=t, refresh=refresh)


def _nan(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[3] = float("nan")
    return t


def _fifo(p: Path) -> Path:
    p.unlink()
    os.mkfifo(p)
    return p


def _directory(p: Path) -> Path:
    p.unlink()
    p.mkdir()
    return p


def _sparse_tail(p: Path) -> Path:
    """The valid file followed by a 100 GiB hole (sparse: no disk space used)."""
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size + 100 * 2**30)
    return p


def _sparse_whole(p: Path) -> Path:
    p.unlink()
    with open(p, "wb") as f:
        f.truncate(100 * 2**30)
    return p


def _deep_header(p: Path) -> Path:
    return raw_file(p, "[" * 100_000 + "]" * 100_000)


def _deep_meta(p: Path) -> Path:
    return rewrite(p, text=lambda s: s[:-1] + ', "extra2": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _big_header_len(p: Path) -> Path:
    b = bytearray(p.read_bytes())
    b[:8] = struct.pack("<Q", 2**60)
    p.write_bytes(bytes(b))
    return p


def _big_header(p: Path) -> Path:
    """A 17 MiB header (over the 16 MiB cap) of valid JSON."""
    return raw_file(p, {"__metadata__": {"format": F.FORMAT, "pad": " " * (17 * 2**20)}})


def _dup_key(p: Path) -> Path:
    b = p.read_bytes()
    h = b[8:data_start(b)].decode()
    h2 = '{"__metadata__":{"format":"x"},' + h[1:]
    hb = h2.encode()
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + b[data_start(b):])
    return p


def _labels_u8(p: Path) -> Path:
    """Labels re-typed to uint8 (the "labels dtype byte edited" case with recomputed digests)."""
    return rewrite(p, tensors=lambda ts: ts.update(labels=ts["labels"].to(torch.uint8)))


def _labels_dtype_byte(p: Path) -> Path:
    """The header's labels dtype I64 -> U64... edited in place (digests untouched): I64 -> F64."""
    b = bytearray(p.read_bytes())
    h = bytes(b[8:data_start(bytes(b))])
    i = h.index(b'"labels":{"dtype":"I64"') + len(b'"labels":{"dtype":"')
    b[8 + i] = ord("F")
    p.write_bytes(bytes(b))
    return p


def _v1_edit(p: Path) -> Path:
    """A v1 file (weaker check) with an out-of-range edit: still refused by field validation."""
    as_v1(p)
    return rewrite(p, meta=lambda j: j.update(ipc=0), raw=lambda rm: rm.pop("splatdd_sha256", None),
                   refresh=False)


def _foreign(p: Path) -> Path:
    p.write_bytes(encode({"a": torch.zeros(3)}, {}))
    return p


def _symlink_fifo(p: Path) -> Path:
    p.unlink()
    fifo = p.with_name(p.name + ".fifo")
    os.mkfifo(fifo)
    p.symlink_to(fifo)
    return p


def corpus() -> list[Case]:
    """Every hostile case, each naming the exception class and the field it must produce."""
    meta_start = lambda b: b.index(b'"splatdd":"') + 40          # noqa: E731 - inside the JSON text
    C = Case
    return [
        # corrupted bytes (integrity)
        C("flip-data-first", "corrupted", _flip(lambda b: data_start(b)), F.IntegrityError,
          "tensor"),
        C("flip-data-last", "corrupted", _flip(lambda b: len(b) - 1), F.IntegrityError, "tensor"),
        C("flip-meta-json", "corrupted", _flip(meta_start), F.DistilledFileError,
          "splatdd metadata|header"),
        C("flip-header-length", "corrupted", _flip(lambda b: 0), F.DistilledFileError,
          "header"),
        C("header-not-utf8", "corrupted", _flip(lambda b: 9), F.CorruptFile, "header"),
        C("labels-dtype-byte", "corrupted", _labels_dtype_byte, F.IntegrityError,
          "tensor labels"),
        C("duplicate-key", "corrupted", _dup_key, F.CorruptFile, "header"),
        C("foreign-safetensors", "corrupted", _foreign, F.NotADistilledFile, "format"),
        C("garbage", "corrupted", lambda p: (p.write_bytes(b"\x07" * 4096), p)[1],
          F.DistilledFileError, "header"),
        # truncations
        C("truncate-empty", "truncated", _truncate(lambda n: 0), F.TruncatedFile,
          "header length"),
        C("truncate-5", "truncated", _truncate(lambda n: 5), F.TruncatedFile, "header length"),
        C("truncate-header", "truncated", _truncate(lambda n: 40), F.TruncatedFile,
          "header length"),
        C("truncate-data", "truncated", _truncate(lambda n: n - 1), F.TruncatedFile,
          "tensor data"),
        C("truncate-half", "truncated", _truncate(lambda n: n - 100), F.TruncatedFile,
          "tensor data"),
        C("trailing-bytes", "truncated", lambda p: (p.write_bytes(p.read_bytes() + b"junk"), p)[1],
          F.CorruptFile, "tensor data"),
        # metadata edits keeping the old digests (careless edits): the digest catches them
        C("edit-config-stale", "metadata", _set("parameterization.config.note", "x", refresh=False),
          F.IntegrityError, "splatdd metadata"),
        C("edit-height-stale", "metadata", _set("dataset.height", 5, refresh=False),
          F.IntegrityError, "splatdd metadata"),
        C("edit-mean-stale", "metadata", _set("dataset.mean", [0.1, 0.4, 0.3], refresh=False),
          F.IntegrityError, "splatdd metadata"),
        C("edit-ipc-stale", "metadata", _set("ipc", 9, refresh=False), F.IntegrityError,
          "splatdd metadata"),
        C("edit-lr-stale", "metadata", _set("learned_lr", 0.5, refresh=False), F.IntegrityError,
          "splatdd metadata"),
        C("edit-extra-stale", "metadata", _set("extra.iterations", 6, refresh=False),
          F.IntegrityError, "splatdd metadata"),
        C("edit-data-stale", "metadata", _tensor("param/scale", lambda t: t * 2, refresh=False),
          F.IntegrityError, "tensor param/scale"),
        # metadata edits with recomputed digests (deliberate): field validation catches them
        C("ipc-zero", "metadata", _set("ipc", 0), F.InvalidMetadata, "ipc"),
        C("ipc-nine", "metadata", _set("ipc", 9), F.InvalidMetadata, "budget_bytes"),
        C("ipc-string", "metadata", _set("ipc", "one"), F.InvalidMetadata, "ipc"),
        C("ipc-bool", "metadata", _set("ipc", True), F.InvalidMetadata, "ipc"),
        C("ipc-float", "metadata", _set("ipc", 3.0), F.InvalidMetadata, "ipc"),
        C("channels-negative", "metadata", _set("dataset.channels", -5), F.InvalidMetadata,
          "dataset.channels"),
        C("height-huge", "metadata", _set("dataset.height", 100000), F.InvalidMetadata,
          "dataset.height"),
        C("height-vs-resolution", "metadata", _set("dataset.height", 5), F.InvalidMetadata,
          "resolution"),
        C("resolution-edit", "metadata", _set("resolution", [4, 6]), F.InvalidMetadata,
          "resolution"),
        C("num-classes-zero", "metadata", _set("dataset.num_classes", 0), F.InvalidMetadata,
          "dataset.num_classes"),
        C("mean-nan", "metadata", _set("dataset.mean", [float("nan"), 0.4, 0.3]),
          F.InvalidMetadata, "dataset.mean"),
        C("mean-short", "metadata", _set("dataset.mean", [0.5]), F.InvalidMetadata,
          "dataset.mean"),
        C("std-empty", "metadata", _set("dataset.std", []), F.InvalidMetadata, "dataset.std"),
        C("std-zero", "metadata", _set("dataset.std", [0.2, 0.0, 0.3]), F.InvalidMetadata,
          "dataset.std"),
        C("std-string", "metadata", _set("dataset.std", "0.2"), F.InvalidMetadata,
          "dataset.std"),
        C("zca-string", "metadata", _set("dataset.zca", "yes"), F.InvalidMetadata,
          "dataset.zca"),
        C("dataset-unknown-key", "metadata", _set("dataset.depth", 3), F.InvalidMetadata,
          "dataset"),
        C("lr-nan", "metadata", _set("learned_lr", float("nan")), F.InvalidMetadata,
          "learned_lr"),
        C("lr-negative", "metadata", _set("learned_lr", -1), F.InvalidMetadata, "learned_lr"),
        C("lr-inf", "metadata", _set("learned_lr", float("inf")), F.InvalidMetadata,
          "learned_lr"),
        C("lr-string", "metadata", _set("learned_lr", "0.02"), F.InvalidMetadata, "learned_lr"),
        C("budget-edit", "metadata", _set("budget_bytes", 1), F.InvalidMetadata, "budget_bytes"),
        C("num-bytes-edit", "metadata", _set("num_bytes", 7), F.InvalidMetadata, "num_bytes"),
        C("num-images-edit", "metadata", _set("num_images", 5), F.InvalidMetadata,
          "num_images"),
        C("missing-ipc", "metadata", _set("ipc", _DELETE), F.InvalidMetadata, "ipc"),
        C("param-name-empty", "metadata", _set("parameterization.name", ""), F.InvalidMetadata,
          "parameterization.name"),
        C("param-config-list", "metadata", _set("parameterization.config", [1]),
          F.InvalidMetadata, "parameterization.config"),
        C("format-version-meta", "metadata", _set("format_version", 1), F.InvalidMetadata,
          "format_version"),
        C("newer-version", "metadata", lambda p: rewrite(
            p, raw=lambda rm: rm.update(format_version="99")), F.UnsupportedVersion,
          "format_version"),
        C("version-garbage", "metadata", lambda p: rewrite(
            p, raw=lambda rm: rm.update(format_version="1e9")), F.UnsupportedVersion,
          "format_version"),
        C("metadata-not-json", "metadata", lambda p: rewrite(p, text=lambda s: "{not json"),
          F.CorruptFile, "splatdd metadata"),
        C("metadata-unknown-key", "metadata", lambda p: rewrite(
            p, raw=lambda rm: rm.update(extra="1")), F.CorruptFile, "__metadata__"),
        C("manifest-shape", "metadata", lambda p: rewrite(
            p, meta=lambda j: j["tensors"]["param/scale"].update(shape=[3, 2])),
          F.IntegrityError, "tensor param/scale"),
        C("sha-not-hex", "metadata", lambda p: rewrite(
            p, meta=lambda j: j["sha256"].update(labels="zz")), F.InvalidMetadata, "sha256"),
        C("v1-out-of-range", "metadata", _v1_edit, F.InvalidMetadata, "ipc"),
        # tensor contents with recomputed digests
        C("nan-in-values", "tensors", _tensor("param/values", _nan), F.InvalidTensorData,
          "tensor param/values"),
        C("inf-in-scale", "tensors", _tensor("param/scale", lambda t: t.fill_(float("inf"))),
          F.InvalidTensorData, "tensor param/scale"),
        C("label-out-of-range", "tensors", _tensor("labels", lambda t: t.fill_(7)),
          F.InvalidTensorData, "labels"),
        C("label-negative", "tensors", _tensor("labels", lambda t: t.fill_(-1)),
          F.InvalidTensorData, "labels"),
        C("labels-wrong-order", "tensors", _tensor("labels", lambda t: t.flip(0)),
          F.InvalidTensorData, "labels"),
        C("labels-uint8", "tensors", _labels_u8, F.InvalidMetadata, "labels"),
        C("values-wrong-shape", "tensors", _tensor("param/values", lambda t: t[:4]),
          F.InvalidTensorData, "parameterization tinybf16"),
        C("missing-param-tensor", "tensors", lambda p: rewrite(
            p, tensors=lambda ts: {k: v for k, v in ts.items() if k != "param/values"}),
          F.InvalidTensorData, "parameterization tinybf16"),
        C("no-labels", "tensors", lambda p: rewrite(
            p, tensors=lambda ts: {k: v for k, v in ts.items() if k != "labels"}),
          F.InvalidMetadata, "labels"),
        # hostile sizes
        C("header-length-2^60", "sizes", _big_header_len, F.TruncatedFile, "header length"),
        C("header-17MiB", "sizes", _big_header, F.ImplausibleSize, "header length"),
        C("deep-header-json", "sizes", _deep_header, F.ImplausibleSize, "header"),
        C("deep-metadata-json", "sizes", _deep_meta, F.ImplausibleSize, "splatdd metadata"),
        C("config-allocates-40TB", "sizes", lambda p: rewrite(
            p, meta=lambda j: j["parameterization"]["config"].update(cache=10**13)),
          F.ImplausibleSize, "parameterization.config"),
        C("config-wrong-ipc", "sizes", lambda p: rewrite(
            p, meta=lambda j: j["parameterization"]["config"].update(ipc=500000)),
          F.InvalidTensorData, "parameterization tinybf16"),
        C("shape-huge", "sizes", lambda p: raw_file(p, {"x": {
            "dtype": "F32", "shape": [2**39, 2**39], "data_offsets": [0, 4]}}), F.CorruptFile,
          "tensor x"),
        C("offsets-overlap", "sizes", lambda p: raw_file(p, {
            "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
            "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}, b"\0" * 6),
          F.CorruptFile, "tensor b"),
        C("sparse-100GiB-tail", "sizes", _sparse_tail, F.CorruptFile, "tensor data"),
        C("sparse-100GiB-zeros", "special", _sparse_whole, F.CorruptFile, "header"),
        # special files
        C("fifo", "special", _fifo, F.NotADistilledFile, "path"),
        C("symlink-to-fifo", "special", _symlink_fifo, F.NotADistilledFile, "path"),
        C("directory", "special", _directory, F.NotADistilledFile, "path"),
        C("missing", "special", lambda p: (p.unlink(), p)[1], F.NotADistilledFile, "path"),
        C("dev-zero", "special", lambda p: Path("/dev/zero"), F.NotADistilledFile, "path"),
    ]
