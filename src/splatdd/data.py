"""Real datasets, as distillation algorithms and the evaluation protocol see them.

:func:`load_dataset` returns ``(train, test)`` :class:`~splatdd.plugin_api.RealData` with images as
CPU ``float32`` tensors ``(N, C, H, W)`` normalised per channel with the field's usual statistics
(see :data:`NORMALIZATION`), optionally ZCA-whitened (:mod:`splatdd.zca`).

Supported names:

``"fashion_mnist"`` (default)
    IDX files (``.gz`` or plain). Root: the ``root`` argument, else ``$SPLATDD_FASHION_MNIST``, else
    ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package).
``"mnist"``
    Same IDX reader, from a user ``root``.
``"cifar10"`` / ``"cifar100"``
    The python pickle batches (``data_batch_1..5`` + ``test_batch``, or ``train`` + ``test`` with
    ``fine_labels``) in ``root`` or in its ``cifar-10-batches-py`` / ``cifar-100-python`` subfolder.
    These are pickles: only load files you trust.
``"imagefolder"``
    ``root/train/<class>/*.{png,jpg,jpeg}`` and ``root/val/<class>/...`` (or ``root/test``),
    ImageNette-style. Every image is resized so its shorter side fits ``resolution`` and
    center-cropped (torchvision's ``Resize`` + ``CenterCrop``), RGB, ImageNet statistics.

Nothing is ever downloaded.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .plugin_api import DatasetSpec, RealData

__all__ = ["load_dataset", "read_idx", "NORMALIZATION", "DATASETS", "FASHION_MNIST_ROOT"]

#: Default location of Debian's ``dataset-fashion-mnist`` package.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
#: Environment variable overriding :data:`FASHION_MNIST_ROOT`.
FASHION_MNIST_ENV = "SPLATDD_FASHION_MNIST"

_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

#: Per-dataset (mean, std) per channel, as in the DC/DSA/DM/MTT code bases.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2861,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagefolder": _IMAGENET_STATS,
}

#: How to give a dataset's folder, in every place a user meets the loader.
_ROOT_HINT = "pass --data-root DIR (dataset.root in a config file)"

#: Names accepted by :func:`load_dataset`.
DATASETS = tuple(NORMALIZATION)

_IMAGE_EXTS = (".png", ".jpg", ".jpeg")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# ------------------------------------------------------------------------------------------------
# public entry point
# ------------------------------------------------------------------------------------------------
def load_dataset(name: str = "fashion_mnist", root: str | os.PathLike | None = None, *,
                 resolution: int | Sequence[int] | None = None, zca: bool = False,
                 device: str | torch.device = "cpu", progress: bool = True
                 ) -> tuple[RealData, RealData]:
    """Load a dataset as ``(train, test)`` :class:`RealData`.

    ``resolution`` (``int`` or ``(h, w)``) resizes the images (bilinear, antialiased for the tensor
    datasets; resize-shorter-side + center-crop for ``imagefolder``, where it defaults to 128).
    ``zca=True`` fits ZCA whitening (regularisation 0.1) on the train images and applies it to both
    splits. Images stay on the CPU; ``device`` is where :meth:`RealData.sample` puts its batches.
    """
    key = name.lower().replace("-", "_")
    key = {"fashionmnist": "fashion_mnist", "cifar_10": "cifar10", "cifar_100": "cifar100",
           "image_folder": "imagefolder"}.get(key, key)
    if key not in NORMALIZATION:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    mean, std = NORMALIZATION[key]

    if key == "fashion_mnist":
        xtr, ytr, xte, yte = _load_idx_pair(_fashion_root(root), key)
        num_classes = 10
    elif key == "mnist":
        if root is None:
            raise FileNotFoundError("dataset 'mnist' needs the folder of its IDX files "
                                    "(train-images-idx3-ubyte[.gz], ...): " + _ROOT_HINT)
        xtr, ytr, xte, yte = _load_idx_pair(Path(root), key)
        num_classes = 10
    elif key in ("cifar10", "cifar100"):
        xtr, ytr, xte, yte = _load_cifar(root, key)
        num_classes = 10 if key == "cifar10" else 100
    else:
        classes, (xtr, ytr, xte, yte) = _load_imagefolder(
            root, resolution if resolution is not None else 128, progress=progress)
        num_classes = len(classes)
        resolution = None           # already at the target size

    if resolution is not None:
        size = _as_hw(resolution)
        xtr, xte = _resize(xtr, size), _resize(xte, size)

    # uint8 -> [0, 1] -> normalised, in place on the float copy
    xtr, xte = (_normalize(x, mean, std) for x in (xtr, xte))

    if zca:
        from .zca import ZCA
        whitener = ZCA(regularization=0.1).fit(xtr)
        xtr, xte = whitener.transform(xtr), whitener.transform(xte)

    spec = DatasetSpec(name=key, channels=int(xtr.shape[1]), height=int(xtr.shape[2]),
                       width=int(xtr.shape[3]), num_classes=num_classes, mean=tuple(mean),
                       std=tuple(std), zca=bool(zca))
    dev = torch.device(device)
    return (RealData(spec=spec, images=xtr.contiguous(), labels=ytr, device=dev),
            RealData(spec=spec, images=xte.contiguous(), labels=yte, device=dev))


# ------------------------------------------------------------------------------------------------
# helpers shared by the loaders
# ------------------------------------------------------------------------------------------------
def _as_hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        h = w = resolution
    else:
        h, w = (int(v) for v in resolution)
    if h <= 0 or w <= 0:
        raise ValueError(f"resolution must be positive, got {resolution!r}")
    return h, w


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or [0,1]-float (N, C, H, W) -> normalised float32."""
    if x.dtype == torch.uint8:
        out = x.to(torch.float32).div_(255.0)
    else:
        out = x.to(torch.float32)
    if out.shape[1] != len(mean):
        raise ValueError(f"images have {out.shape[1]} channels but the statistics have {len(mean)}")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return out.sub_(m).div_(s)


def _resize(x: torch.Tensor, size: tuple[int, int], chunk: int = 4096) -> torch.Tensor:
    """Bilinear antialiased resize of (N, C, H, W) uint8/float images, in chunks; returns [0, 1]
    floats (or the input unchanged if it is already at ``size``)."""
    if tuple(x.shape[-2:]) == size:
        return x
    out = torch.empty((x.shape[0], x.shape[1], *size), dtype=torch.float32)
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk].to(torch.float32)
        if x.dtype == torch.uint8:
            xb = xb / 255.0
        out[i:i + chunk] = F.interpolate(xb, size=size, mode="bilinear", align_corners=False,
                                         antialias=True).clamp_(0.0, 1.0)
    return out


# ------------------------------------------------------------------------------------------------
# IDX (MNIST / FashionMNIST)
# ------------------------------------------------------------------------------------------------
def _fashion_root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get(FASHION_MNIST_ENV)
    return Path(env) if env else Path(FASHION_MNIST_ROOT)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip-compressed or plain), validating its magic number and size."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(data)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise ValueError(f"{path}: bad IDX magic number 0x{int.from_bytes(data[:4], 'big'):08x}")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path}: IDX size mismatch: header says {dims} "
                         f"({expected} bytes) but the file has {len(data)} bytes")
    arr = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(root: Path, split: str, kind: str) -> Path | None:
    """``split`` is "train"/"t10k", ``kind`` "images-idx3"/"labels-idx1"."""
    a, b = kind.split("-")
    for stem in (f"{split}-{kind}-ubyte", f"{split}-{a}.{b}-ubyte"):
        for suffix in (".gz", ""):
            p = root / (stem + suffix)
            if p.is_file():
                return p
    return None


def _load_idx_pair(root: Path, key: str):
    wanted = [(s, k) for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
    found = {sk: _find_idx(root, *sk) for sk in wanted}
    missing = [f"{s}-{k}-ubyte[.gz]" for (s, k), p in found.items() if p is None]
    if missing:
        if key == "fashion_mnist":
            hint = ("FashionMNIST is packaged by Debian/Ubuntu; install it with\n"
                    "    apt-get update && apt-get install -y dataset-fashion-mnist\n"
                    f"or point ${FASHION_MNIST_ENV} (or --data-root / dataset.root) at a folder holding the IDX files.")
        else:
            hint = "pass --data-root DIR (dataset.root in a config file): a folder holding the MNIST IDX files."
        raise FileNotFoundError(f"{key}: looked in {root} and did not find "
                                f"{', '.join(missing)}.\n{hint}")
    arrays = {sk: read_idx(p) for sk, p in found.items()}
    out = []
    for split in ("train", "t10k"):
        x, y = arrays[(split, "images-idx3")], arrays[(split, "labels-idx1")]
        if x.ndim != 3 or y.ndim != 1 or x.dtype != np.uint8:
            raise ValueError(f"{root}: {split} images must be (N, H, W) uint8 and labels (N,), got "
                             f"{x.shape} {x.dtype} and {y.shape}")
        if len(x) != len(y):
            raise ValueError(f"{root}: {split} has {len(x)} images but {len(y)} labels")
        if len(y) and (int(y.max()) > 9):
            raise ValueError(f"{root}: {split} labels must be in 0..9, found {int(y.max())}")
        out += [torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64))]
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python pickles
# ------------------------------------------------------------------------------------------------
def _load_cifar(root, key: str):
    if root is None:
        raise FileNotFoundError(f"dataset {key!r} needs the folder of its python batches "
                                f"({'data_batch_1..5, test_batch' if key == 'cifar10' else 'train, test'}): "
                                + _ROOT_HINT + "; nothing is downloaded")
    root = Path(root)
    if key == "cifar10":
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files = ["test_batch"]
        sub, label_key = "cifar-10-batches-py", b"labels"
    else:
        train_files, test_files = ["train"], ["test"]
        sub, label_key = "cifar-100-python", b"fine_labels"
    base = root
    if not all((base / f).is_file() for f in train_files + test_files) and (root / sub).is_dir():
        base = root / sub
    missing = [f for f in train_files + test_files if not (base / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{key}: looked in {base} and did not find {', '.join(missing)} "
                                "(the python-pickle version of the dataset); nothing is downloaded")
    num_classes = 10 if key == "cifar10" else 100

    def read(files):
        xs, ys = [], []
        for f in files:
            with open(base / f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")
            if not isinstance(d, dict) or b"data" not in d:
                raise ValueError(f"{base / f}: not a CIFAR batch (no b'data' key)")
            labels = d.get(label_key, d.get(label_key.decode()))
            if labels is None:
                raise ValueError(f"{base / f}: no {label_key!r} key")
            data = np.asarray(d[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{base / f}: b'data' must be (N, 3072) uint8, got {data.shape}")
            labels = np.asarray(labels, dtype=np.int64)
            if len(labels) != len(data):
                raise ValueError(f"{base / f}: {len(data)} images but {len(labels)} labels")
            if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"{base / f}: labels outside 0..{num_classes - 1}")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(labels)
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    return (*read(train_files), *read(test_files))


# ------------------------------------------------------------------------------------------------
# image folders (ImageNette-style)
# ------------------------------------------------------------------------------------------------
def _list_split(split_dir: Path, classes: list[str] | None):
    if classes is None:
        classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        if not classes:
            raise FileNotFoundError(f"imagefolder: {split_dir} has no class sub-folders")
    else:
        extra = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and d.name not in classes)
        if extra:
            raise ValueError(f"imagefolder: {split_dir} has classes not in train: {extra}")
    files: list[tuple[Path, int]] = []
    for ci, c in enumerate(classes):
        cdir = split_dir / c
        if not cdir.is_dir():
            continue
        files += [(p, ci) for p in sorted(cdir.iterdir())
                  if p.is_file() and p.suffix.lower() in _IMAGE_EXTS]
    if not files:
        raise FileNotFoundError(f"imagefolder: no .png/.jpg/.jpeg images under {split_dir}")
    return classes, files


def _load_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Resize shorter side to cover ``size`` then center-crop; (3, h, w) uint8."""
    from PIL import Image

    h, w = size
    with Image.open(path) as im:
        im = im.convert("RGB")
        w0, h0 = im.size
        scale = max(h / h0, w / w0)
        nw, nh = max(w, round(w0 * scale)), max(h, round(h0 * scale))
        if (nw, nh) != (w0, h0):
            im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
        left, top = (nw - w) // 2, (nh - h) // 2
        im = im.crop((left, top, left + w, top + h))
        arr = np.array(im, dtype=np.uint8)        # a writable copy
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _read_files(files, size, desc: str, progress: bool):
    n = len(files)
    x = torch.empty((n, 3, *size), dtype=torch.uint8)
    y = torch.empty(n, dtype=torch.int64)
    bar = None
    if progress and n >= 1000:
        from splatdd.progress import progress_bar
        bar = progress_bar(total=n, desc=desc, unit="img")
    try:
        for i, (p, c) in enumerate(files):   # files are grouped class by class
            x[i] = torch.from_numpy(_load_image(p, size))
            y[i] = c
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return x, y


def _load_imagefolder(root, resolution, *, progress: bool):
    if root is None:
        raise FileNotFoundError("dataset 'imagefolder' needs a folder with train/<class>/*.png and "
                                "val/<class>/... (or test/): " + _ROOT_HINT)
    root = Path(root)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"imagefolder: {root / 'train'} does not exist")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if test_dir is None:
        raise FileNotFoundError(f"imagefolder: neither {root / 'val'} nor {root / 'test'} exists")
    size = _as_hw(resolution)
    classes, train_files = _list_split(root / "train", None)
    _, test_files = _list_split(test_dir, classes)
    xtr, ytr = _read_files(train_files, size, f"{root.name}/train", progress)
    xte, yte = _read_files(test_files, size, f"{root.name}/{test_dir.name}", progress)
    return classes, (xtr, ytr, xte, yte)
