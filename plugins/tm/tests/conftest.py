"""Fixtures for the tm plugin's tests: a tiny real dataset, a tiny pixel parameterization stand-in,
and (until/unless the core provides them) stand-ins for splatdd.models / splatdd.augment."""
from __future__ import annotations

import importlib
from typing import Any, Mapping

import pytest
import torch
import torch.nn as nn

from splatdd.plugin_api import (PLUGIN_API_VERSION, DatasetSpec, OptimizerSpec, Parameterization,
                                RealData)

import splatdd_tm._core as tm_core

TINY_SPEC = DatasetSpec(name="tiny", channels=1, height=8, width=8, num_classes=3,
                        mean=(0.0,), std=(1.0,))


def make_real(n_per_class: int = 20, seed: int = 0, spec: DatasetSpec = TINY_SPEC) -> RealData:
    """Class-dependent blobs plus noise: class c is bright in a different region."""
    g = torch.Generator().manual_seed(seed)
    imgs, labs = [], []
    for c in range(spec.num_classes):
        base = torch.zeros(spec.channels, spec.height, spec.width)
        base[:, :, c * spec.width // spec.num_classes:(c + 1) * spec.width // spec.num_classes] = 1.5
        x = base + 0.5 * torch.randn(n_per_class, spec.channels, spec.height, spec.width,
                                     generator=g)
        imgs.append(x)
        labs.append(torch.full((n_per_class,), c, dtype=torch.long))
    return RealData(spec=spec, images=torch.cat(imgs).float(), labels=torch.cat(labs))


class TinyPixels(Parameterization):
    """Minimal pixel parameterization (a stand-in for plugins/pixel in unit tests)."""

    name = "tinypixels"
    api_version = PLUGIN_API_VERSION

    def __init__(self, spec: DatasetSpec, ipc: int, images: torch.Tensor) -> None:
        super().__init__()
        self.spec, self.ipc = spec, ipc
        self.images = nn.Parameter(images)
        self.register_buffer("_labels", torch.arange(spec.num_classes).repeat_interleave(ipc))

    @classmethod
    def build(cls, spec, ipc, *, generator=None, **options):
        if options:
            raise TypeError(f"unknown options {sorted(options)}")
        x = torch.randn(spec.num_classes * ipc, spec.channels, spec.height, spec.width,
                        generator=generator)
        return cls(spec, ipc, x)

    def init_from_real(self, images, labels, *, steps=None, progress=False):
        with torch.no_grad():
            self.images.copy_(images)
        return {"mse": 0.0}

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def decode(self, indices=None, *, resolution=None):
        return self.images if indices is None else self.images[indices]

    def optimizer_spec(self, algorithm, lr=None):
        return OptimizerSpec([{"params": [self.images], "lr": lr if lr is not None else 0.1}],
                             kind="sgd", momentum=0.5)

    def num_bytes(self) -> int:
        return self.images.numel() * 4

    def state_tensors(self):
        return {"images": self.images.detach().cpu()}

    def config(self):
        return {"ipc": self.ipc}

    @classmethod
    def from_state(cls, spec, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]):
        return cls(spec, int(config["ipc"]), tensors["images"].clone())


class _TinyConvNet(nn.Module):
    """Stand-in for splatdd.models.get_network (used only if the core's models are missing)."""

    def __init__(self, channels, num_classes, im_size, width):
        super().__init__()
        h, w = im_size
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.norm = nn.GroupNorm(width, width, affine=True)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(width * (h // 2) * (w // 2), num_classes)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.norm(self.conv(x)))).flatten(1))


def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def _standin_get_network(model, channels, num_classes, im_size, *, width, depth, seed):
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))
        return _TinyConvNet(channels, num_classes, im_size, width)


def _standin_dsa(x, strategy, seed, per_sample):
    """Differentiable, seed-determined flip + brightness (siamese when per_sample=False)."""
    g = torch.Generator().manual_seed(int(seed))
    n = x.shape[0] if per_sample else 1
    flip = (torch.rand(n, generator=g) < 0.5).to(x.device).view(-1, 1, 1, 1)
    shift = (torch.rand(n, generator=g) - 0.5).to(x.device, x.dtype).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x) + shift


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny tensors: intra-op threads only add overhead (and on a shared 2-core machine, spin-wait
    contention that makes these tests 100x slower). Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def core_standins(monkeypatch):
    """Use the core's networks / DSA when present; tiny stand-ins otherwise."""
    if not _has("splatdd.models"):
        monkeypatch.setattr(tm_core, "get_network", _standin_get_network)
    if not _has("splatdd.augment"):
        monkeypatch.setattr(tm_core, "dsa", _standin_dsa)
    yield


@pytest.fixture
def real() -> RealData:
    return make_real()


@pytest.fixture
def tiny_pixels():
    return TinyPixels


@pytest.fixture(name="make_real")
def make_real_fixture():
    """The tiny-dataset factory (tests cannot import conftest under --import-mode=importlib)."""
    return make_real


def _apply_standins(mp: pytest.MonkeyPatch) -> None:
    if not _has("splatdd.models"):
        mp.setattr(tm_core, "get_network", _standin_get_network)
    if not _has("splatdd.augment"):
        mp.setattr(tm_core, "dsa", _standin_dsa)


#: The tiny experts' settings: ConvNet width 4, depth 2 (8x8 -> 2x2), 4 epochs.
BUFFER_KW = dict(model="ConvNet", width=4, depth=2, epochs=4, lr=0.01, batch_size=16, seed=3)


@pytest.fixture(scope="session")
def tiny_buffer(tmp_path_factory):
    """A buffer of 2 tiny experts (4 epochs) on the tiny dataset, made once per session."""
    from splatdd_tm.buffer import train_experts

    out = tmp_path_factory.mktemp("buffer")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            _apply_standins(mp)
            train_experts(make_real(), out, experts=2, test=make_real(5, seed=1),
                          progress=False, **BUFFER_KW)
    finally:
        torch.set_num_threads(n)
    return out


@pytest.fixture
def buffer_kw():
    return dict(BUFFER_KW)
