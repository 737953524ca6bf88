"""Data loading (IDX / CIFAR pickles / image folders), normalisation, and ZCA whitening."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from splatdd.data import FASHION_MNIST_ROOT, NORMALIZATION, load_dataset, read_idx
from splatdd.zca import ZCA

FM_MEAN, FM_STD = 0.2861, 0.3530


# ------------------------------------------------------------------------------------------------
# fixture writers
# ------------------------------------------------------------------------------------------------
def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    return struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) \
        + arr.tobytes()


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    data = _idx_bytes(arr)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def _make_idx_dataset(root: Path, *, gz: bool = True, n_train: int = 20, n_test: int = 10,
                      size: int = 28, seed: int = 0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(root / f"{split}-images-idx3-ubyte", x, gz)
        _write_idx(root / f"{split}-labels-idx1-ubyte", y, gz)
        out[split] = (x, y)
    return out


def _cifar_batch(n: int, num_classes: int, key: bytes, seed: int):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    return {b"batch_label": b"fixture", key: labels, b"data": data}


def _write_pickle(path: Path, obj) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


# ------------------------------------------------------------------------------------------------
# IDX
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_loader_and_normalisation(tmp_path, gz):
    raw = _make_idx_dataset(tmp_path, gz=gz)
    train, test = load_dataset("fashion_mnist", root=tmp_path)
    assert train.images.shape == (20, 1, 28, 28) and test.images.shape == (10, 1, 28, 28)
    assert train.images.dtype == torch.float32 and train.images.device.type == "cpu"
    assert train.labels.dtype == torch.int64
    spec = train.spec
    assert spec is test.spec or spec == test.spec
    assert (spec.name, spec.channels, spec.height, spec.width, spec.num_classes) == \
        ("fashion_mnist", 1, 28, 28, 10)
    assert spec.mean == (FM_MEAN,) and spec.std == (FM_STD,) and spec.zca is False
    expected = (torch.from_numpy(raw["train"][0]).float() / 255 - FM_MEAN) / FM_STD
    torch.testing.assert_close(train.images[:, 0], expected)
    assert train.labels.tolist() == raw["train"][1].tolist()
    assert test.labels.tolist() == raw["t10k"][1].tolist()


def test_fashion_mnist_env_override(tmp_path, monkeypatch):
    _make_idx_dataset(tmp_path / "fm", n_train=12, n_test=4)
    monkeypatch.setenv("SPLATDD_FASHION_MNIST", str(tmp_path / "fm"))
    train, test = load_dataset()
    assert len(train.labels) == 12 and len(test.labels) == 4


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLATDD_FASHION_MNIST", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("fashion_mnist")
    msg = str(e.value)
    assert "apt-get update && apt-get install -y dataset-fashion-mnist" in msg
    assert str(tmp_path / "nowhere") in msg


def test_mnist_needs_root_and_uses_its_stats(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset("mnist")
    raw = _make_idx_dataset(tmp_path, gz=False, n_train=10, n_test=10)
    train, _ = load_dataset("mnist", root=tmp_path)
    assert train.spec.name == "mnist" and train.spec.mean == NORMALIZATION["mnist"][0]
    expected = (torch.from_numpy(raw["train"][0]).float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(train.images[:, 0], expected)


def test_idx_validation(tmp_path):
    good = np.zeros((3, 4, 5), np.uint8)
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(_idx_bytes(good))
    assert read_idx(p).shape == (3, 4, 5)
    p.write_bytes(_idx_bytes(good)[:-1])                       # truncated payload
    with pytest.raises(ValueError, match="size mismatch"):
        read_idx(p)
    p.write_bytes(b"\x01\x02" + _idx_bytes(good)[2:])          # bad magic
    with pytest.raises(ValueError, match="magic"):
        read_idx(p)
    with gzip.open(tmp_path / "y.gz", "wb") as fh:
        fh.write(_idx_bytes(good) + b"\x00")                   # trailing garbage
    with pytest.raises(ValueError, match="size mismatch"):
        read_idx(tmp_path / "y.gz")


def test_idx_images_labels_count_mismatch(tmp_path):
    _make_idx_dataset(tmp_path, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8), gz=False)
    with pytest.raises(ValueError, match="labels"):
        load_dataset("fashion_mnist", root=tmp_path)


def test_resolution_resizes(tmp_path):
    _make_idx_dataset(tmp_path, n_train=10, n_test=10)
    # constant images stay constant through an antialiased bilinear resize
    x = np.full((10, 28, 28), 200, np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", x, gz=True)
    train, test = load_dataset("fashion_mnist", root=tmp_path, resolution=(32, 20))
    assert train.images.shape == (10, 1, 32, 20) and test.images.shape == (10, 1, 32, 20)
    assert train.spec.resolution == (32, 20)
    torch.testing.assert_close(train.images, torch.full_like(train.images,
                                                             (200 / 255 - FM_MEAN) / FM_STD))


def test_realdata_sample_is_by_class(tmp_path):
    _make_idx_dataset(tmp_path, n_train=30)
    train, _ = load_dataset("fashion_mnist", root=tmp_path)
    g = torch.Generator().manual_seed(0)
    s = train.sample(3, 2, g)
    assert s.shape == (2, 1, 28, 28)
    ref = train.images[train.labels == 3]
    assert all(any(torch.equal(a, b) for b in ref) for a in s)


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").exists(),
                    reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_if_installed(monkeypatch):
    monkeypatch.delenv("SPLATDD_FASHION_MNIST", raising=False)
    train, test = load_dataset()
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    # the dataset's own statistics are the ones we normalise with
    assert abs(float(train.images.mean())) < 0.01
    assert abs(float(train.images.std()) - 1.0) < 0.01
    assert torch.bincount(test.labels).tolist() == [1000] * 10


# ------------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------------
def test_cifar10_pickles(tmp_path):
    batches = [_cifar_batch(2, 10, b"labels", seed=i) for i in range(5)]
    for i, b in enumerate(batches, 1):
        _write_pickle(tmp_path / f"data_batch_{i}", b)
    tb = _cifar_batch(3, 10, b"labels", seed=9)
    _write_pickle(tmp_path / "test_batch", tb)
    train, test = load_dataset("cifar10", root=tmp_path)
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    s = train.spec
    assert (s.name, s.channels, s.num_classes, s.mean, s.std) == \
        ("cifar10", 3, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    raw = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    mean = torch.tensor(s.mean).view(1, 3, 1, 1)
    std = torch.tensor(s.std).view(1, 3, 1, 1)
    torch.testing.assert_close(train.images, (torch.from_numpy(raw).float() / 255 - mean) / std)
    assert train.labels.tolist() == sum((b[b"labels"] for b in batches), [])
    assert test.labels.tolist() == tb[b"labels"]


def test_cifar100_pickles_in_subfolder(tmp_path):
    sub = tmp_path / "cifar-100-python"
    sub.mkdir()
    tr = _cifar_batch(40, 100, b"fine_labels", seed=1)
    tr[b"coarse_labels"] = [0] * 40
    _write_pickle(sub / "train", tr)
    _write_pickle(sub / "test", _cifar_batch(5, 100, b"fine_labels", seed=2))
    train, test = load_dataset("cifar100", root=tmp_path)
    assert train.spec.num_classes == 100 and train.spec.mean == (0.5071, 0.4866, 0.4409)
    assert train.labels.tolist() == tr[b"fine_labels"]
    assert len(test.labels) == 5


def test_load_dataset_zca_fits_on_train_applies_to_both(tmp_path):
    # (8 x 8 keeps the eigendecomposition tiny; CIFAR's 3072 features work the same way)
    _make_idx_dataset(tmp_path, n_train=200, n_test=30)
    train, test = load_dataset("fashion_mnist", root=tmp_path, resolution=8)
    ztrain, ztest = load_dataset("fashion_mnist", root=tmp_path, resolution=8, zca=True)
    assert ztrain.spec.zca and ztest.spec.zca and not train.spec.zca
    assert ztrain.images.shape == train.images.shape == (200, 1, 8, 8)
    z = ZCA(0.1).fit(train.images)
    torch.testing.assert_close(ztrain.images, z.transform(train.images), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ztest.images, z.transform(test.images), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ztest.images, test.images, atol=0.1)


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="root"):
        load_dataset("cifar10")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_dataset("cifar10", root=tmp_path)
    _write_pickle(tmp_path / "train", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    _write_pickle(tmp_path / "test", {b"data": np.zeros((2, 3072), np.uint8),
                                      b"fine_labels": [0, 1]})
    with pytest.raises(ValueError, match="fine_labels"):
        load_dataset("cifar100", root=tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("svhn", root=tmp_path)


# ------------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------------
def _make_folder(root: Path, test_name: str = "val", size=(16, 16)):
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 3), (test_name, 2)):
        for c, ext in (("n01_dog", ".png"), ("n02_cat", ".png")):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"img{i}{ext}")
                arrays[(split, c, i)] = a
    (root / "train" / "n01_dog" / "notes.txt").write_text("not an image")
    return arrays


def test_imagefolder_at_target_resolution_is_exact(tmp_path):
    arrays = _make_folder(tmp_path)
    train, test = load_dataset("imagefolder", root=tmp_path, resolution=16)
    assert train.images.shape == (6, 3, 16, 16) and test.images.shape == (4, 3, 16, 16)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and test.labels.tolist() == [0, 0, 1, 1]
    s = train.spec
    assert (s.name, s.channels, s.num_classes) == ("imagefolder", 3, 2)
    assert s.mean == (0.485, 0.456, 0.406) and s.std == (0.229, 0.224, 0.225)
    a = torch.from_numpy(arrays[("train", "n02_cat", 1)]).permute(2, 0, 1).float() / 255
    mean = torch.tensor(s.mean).view(3, 1, 1)
    std = torch.tensor(s.std).view(3, 1, 1)
    torch.testing.assert_close(train.images[4], (a - mean) / std)


def test_imagefolder_resize_center_crop_and_test_dir(tmp_path):
    from PIL import Image

    _make_folder(tmp_path, test_name="test")
    # a 12x24 (h x w) image: left third red, middle third green, right third blue
    a = np.zeros((12, 24, 3), np.uint8)
    a[:, :8, 0] = a[:, 8:16, 1] = a[:, 16:, 2] = 255
    Image.fromarray(a).save(tmp_path / "train" / "n01_dog" / "wide.png")
    # .jpg / .jpeg (any case) count too; grey so JPEG chroma subsampling does not matter
    Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(tmp_path / "train" / "n02_cat"
                                                                / "z.JPG")
    train, test = load_dataset("imagefolder", root=tmp_path, resolution=(6, 6))
    assert train.images.shape == (8, 3, 6, 6) and len(test.labels) == 4
    assert train.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    idx = 3                                   # img0, img1, img2, wide (sorted names)
    img = train.images[idx] * torch.tensor(train.spec.std).view(3, 1, 1) \
        + torch.tensor(train.spec.mean).view(3, 1, 1)
    # shorter side 12 -> 6 makes it 6x12; the center crop keeps columns 3..8 of 12: mostly green
    assert img[1, :, 2:4].mean() > 0.8 and img[0, :, 2:4].mean() < 0.2
    assert img[1].mean() > img[0].mean() and img[1].mean() > img[2].mean()
    grey = train.images[7] * torch.tensor(train.spec.std).view(3, 1, 1) \
        + torch.tensor(train.spec.mean).view(3, 1, 1)
    torch.testing.assert_close(grey, torch.full_like(grey, 128 / 255), atol=3 / 255, rtol=0)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset("imagefolder")
    with pytest.raises(FileNotFoundError, match="train"):
        load_dataset("imagefolder", root=tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val"):
        load_dataset("imagefolder", root=tmp_path)


# ------------------------------------------------------------------------------------------------
# ZCA
# ------------------------------------------------------------------------------------------------
def _correlated(n=400, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    scales = torch.logspace(-1.5, 1, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ (a * scales) + 3.0
    return x.float().reshape(n, 3, 2, 2)


def test_zca_whitened_covariance_closed_form():
    x = _correlated()
    for eps in (0.1, 0.0):
        z = ZCA(regularization=eps).fit(x)
        y = z.transform(x).reshape(len(x), -1).double()
        yc = y - y.mean(0)
        cov = yc.T @ yc / (len(x) - 1)
        s, u = z.eigvals, z.eigvecs
        expected = (u * (s / (s + eps))) @ u.T            # U diag(s / (s + eps)) U^T
        torch.testing.assert_close(cov, expected, atol=2e-4, rtol=1e-3)
        if eps == 0.0:
            torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=2e-4,
                                       rtol=0)
        # the matrix is symmetric (ZCA, not PCA whitening) and the mean is removed
        torch.testing.assert_close(z.matrix, z.matrix.T)
        assert float(y.mean(0).abs().max()) < 1e-3
    # regularisation shrinks low-variance directions: whitened variances < 1, ordered like s
    z = ZCA(0.1).fit(x)
    var = torch.diagonal(z.eigvecs.T @ torch.cov(z.transform(x).reshape(400, -1).double().T)
                         @ z.eigvecs)
    assert float(var.max()) < 1.0 and float(var[0]) < float(var[-1])


def test_zca_inverse_round_trip_and_grad():
    x = _correlated(seed=1)
    z = ZCA().fit(x)
    y = z.transform(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(z.inverse_transform(y), x, atol=1e-4, rtol=1e-4)
    xr = x[:5].clone().requires_grad_(True)
    z.transform(xr).square().sum().backward()
    assert xr.grad is not None and bool(torch.isfinite(xr.grad).all())
    z2 = ZCA.from_state_dict(z.state_dict())
    torch.testing.assert_close(z2.transform(x), y)


def test_zca_errors():
    with pytest.raises(RuntimeError):
        ZCA().transform(torch.zeros(2, 3))
    z = ZCA().fit(_correlated())
    with pytest.raises(ValueError):
        z.transform(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="max_features"):
        ZCA(max_features=4).fit(_correlated())
    with pytest.raises(ValueError, match="singular"):
        ZCA(0.0).fit(torch.zeros(10, 4))
