"""Fixtures for the dc plugin's tests: a tiny real dataset and a tiny pixel parameterization
stand-in (from :mod:`splatdd.testing`), one intra-op thread per test."""
from __future__ import annotations

import pytest

from splatdd.plugin_api import RealData
from splatdd.testing import TinyPixels, make_tiny_real, single_thread


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and on a shared 2-core machine, spin-wait
    contention that makes these tests 100x slower). Restored after each test."""
    with single_thread():
        yield


@pytest.fixture
def real() -> RealData:
    return make_tiny_real()


@pytest.fixture
def tiny_pixels():
    return TinyPixels
