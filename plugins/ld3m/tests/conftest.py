"""Shared fixtures of the ld3m tests: one tiny random LDM per session, no downloads."""
from __future__ import annotations

import os

import pytest
import torch

from splatdd.testing import single_thread


@pytest.fixture(scope="session", autouse=True)
def _ld3m_cache(tmp_path_factory):
    """Auto-built tiny models (model_path='tiny') go to a temporary cache, not ~/.cache."""
    old = os.environ.get("SPLATDD_CACHE_DIR")
    os.environ["SPLATDD_CACHE_DIR"] = str(tmp_path_factory.mktemp("ld3m_cache"))
    yield
    if old is None:
        os.environ.pop("SPLATDD_CACHE_DIR", None)
    else:
        os.environ["SPLATDD_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's ops are far too small for intra-op threads: with 2 cores shared by other jobs,
    OpenMP spin-waiting makes a 2-thread UNet call ~40x slower than a 1-thread one. Restored after."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny class-conditional LDM (VQ-f4, cross-attention UNet, 10 classes + null, 32 px RGB)."""
    from splatdd_ld3m.tiny import build_tiny_ldm

    return build_tiny_ldm(tmp_path_factory.mktemp("ldm") / "tiny", num_classes=10, image_size=32, channels=3)


@pytest.fixture(scope="session")
def spec_gray():
    from splatdd.plugin_api import DatasetSpec

    return DatasetSpec("fashion_mnist", 1, 28, 28, 10, (0.2860,), (0.3530,))


@pytest.fixture(scope="session")
def spec_rgb():
    from splatdd.plugin_api import DatasetSpec

    return DatasetSpec("cifar10", 3, 32, 32, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


@pytest.fixture(scope="session")
def spec_two():
    """Two classes: the cheapest spec for many-step gradient tests."""
    from splatdd.plugin_api import DatasetSpec

    return DatasetSpec("two", 1, 28, 28, 2, (0.5,), (0.5,))
