"""Shared fixtures for the core's tests."""
from __future__ import annotations

import pytest

from splatdd.testing import single_thread


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a whole module (restored afterwards): small tensors gain
    nothing from threads, and on a shared, busy machine their spin-waiting makes tests far slower.
    Opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``; it is not autouse because
    the renderer's tests must keep exercising the multi-threaded CPU backend."""
    with single_thread():
        yield


# ---- tiny stand-ins for the datasets splatdd loads (nothing is downloaded in tests) --------------
def _blobs(n_per_class: int, classes: int, size: int, channels: int, seed: int):
    """uint8 images ``(n, size, size, channels)`` of class-dependent blobs plus noise (learnable)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs, labels = [], []
    for c in range(classes):
        cy, cx = 0.2 + 0.6 * ((c * 7) % classes) / classes, 0.8 - 0.6 * c / classes
        blob = 255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
        for _ in range(n_per_class):
            img = np.clip(blob[..., None] + rng.normal(0, 20, (size, size, channels)), 0, 255)
            imgs.append(img.astype(np.uint8))
            labels.append(c)
    return np.stack(imgs), np.array(labels)


def _write_idx(path, arr):
    import gzip
    import struct

    import numpy as np
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
                + arr.tobytes())


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory):
    """A FashionMNIST-shaped IDX dataset: 20 train / 5 test images per class."""
    root = tmp_path_factory.mktemp("fmnist")
    for split, per, seed in (("train", 20, 0), ("t10k", 5, 1)):
        x, y = _blobs(per, 10, 28, 1, seed)
        _write_idx(root / f"{split}-images-idx3-ubyte.gz", x[..., 0])
        _write_idx(root / f"{split}-labels-idx1-ubyte.gz", y)
    return root


@pytest.fixture(scope="session")
def cifar_roots(tmp_path_factory):
    """``{"cifar10": root, "cifar100": root}``: the python-pickle layouts, 3 / 1 train images per
    class."""
    import pickle
    out = {}
    for key, classes, per, label_key, files in (
            ("cifar10", 10, 3, b"labels", ["data_batch_1", "data_batch_2", "data_batch_3",
                                           "data_batch_4", "data_batch_5"]),
            ("cifar100", 100, 1, b"fine_labels", ["train"])):
        root = tmp_path_factory.mktemp(key)
        x, y = _blobs(per, classes, 32, 3, 0)
        flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)        # CIFAR rows: R plane, G, B
        parts = [list(range(i, len(x), len(files))) for i in range(len(files))]
        for name, idx in zip(files, parts):
            with open(root / name, "wb") as f:
                pickle.dump({b"data": flat[idx], label_key: y[idx].tolist()}, f)
        xt, yt = _blobs(1, classes, 32, 3, 1)
        with open(root / ("test_batch" if key == "cifar10" else "test"), "wb") as f:
            pickle.dump({b"data": xt.transpose(0, 3, 1, 2).reshape(len(xt), -1),
                         label_key: yt.tolist()}, f)
        out[key] = root
    return out


@pytest.fixture(scope="session")
def imagefolder_root(tmp_path_factory):
    """An ImageNette-style folder: ``train/<class>/*.png`` and ``val/<class>/*.png``, 2 classes of
    3 / 1 images at 40 x 48 px (resized by the loader)."""
    from PIL import Image
    root = tmp_path_factory.mktemp("imagefolder")
    for split, per, seed in (("train", 3, 0), ("val", 1, 1)):
        x, y = _blobs(per, 2, 48, 3, seed)
        for i, (img, c) in enumerate(zip(x, y)):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[4:44]).save(d / f"{i}.png")
    return root
