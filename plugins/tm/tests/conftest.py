"""Fixtures for the tm plugin's tests: a tiny real dataset and a tiny pixel parameterization
stand-in (from :mod:`splatdd.testing`), one intra-op thread per test, and a session-wide buffer of
tiny experts. test_tm_buffer.py also loads this file as a module for ``make_real`` and
``BUFFER_KW``."""
from __future__ import annotations

import pytest

from splatdd.testing import make_tiny_real as make_real
from splatdd.testing import single_thread
from splatdd.testing_fixtures import one_thread, quick_workdir, real, tiny_pixels  # noqa: F401


@pytest.fixture(name="make_real")
def make_real_fixture():
    """The tiny-dataset factory (tests cannot import conftest under --import-mode=importlib)."""
    return make_real


#: The tiny experts' settings: ConvNet width 4, depth 2 (8x8 -> 2x2), 4 epochs.
BUFFER_KW = dict(model="ConvNet", net_width=4, net_depth=2, epochs=4, lr=0.01, batch_size=16, seed=3)


@pytest.fixture(scope="session")
def tiny_buffer(tmp_path_factory):
    """A buffer of 2 tiny experts (4 epochs) on the tiny dataset, made once per session."""
    from splatdd_tm.buffer import train_experts

    out = tmp_path_factory.mktemp("buffer")
    with single_thread():
        train_experts(make_real(), out, experts=2, test=make_real(5, seed=1),
                      progress=False, **BUFFER_KW)
    return out


@pytest.fixture
def buffer_kw():
    return dict(BUFFER_KW)
