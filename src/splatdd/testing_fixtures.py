"""pytest fixtures for plugin authors' tests, built on :mod:`splatdd.testing`.

Import the ones a test folder needs into its ``conftest.py`` (pytest collects fixtures from the
conftest's namespace)::

    from splatdd.testing_fixtures import one_thread, quick_workdir, real, tiny_pixels  # noqa: F401

``one_thread`` is autouse: every test of that folder runs with one intra-op torch thread.
This module imports pytest; :mod:`splatdd.testing` itself does not.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from splatdd.plugin_api import RealData
from splatdd.testing import TinyPixels, make_tiny_real, single_thread

__all__ = ["one_thread", "quick_workdir", "real", "tiny_pixels"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: intra-op threads only add overhead (and on a shared 2-core machine, spin-wait
    contention that makes small tests 100x slower). Restored after each test."""
    with single_thread():
        yield


@pytest.fixture
def real() -> RealData:
    """:func:`splatdd.testing.make_tiny_real` with its defaults."""
    return make_tiny_real()


@pytest.fixture
def tiny_pixels() -> type[TinyPixels]:
    """The :class:`splatdd.testing.TinyPixels` parameterization class."""
    return TinyPixels


@pytest.fixture(scope="session")
def quick_workdir(tmp_path_factory) -> Path:
    """One temporary folder per test session for the files plugins' ``quick_options`` make (a tiny
    expert buffer, teacher or model), so each is built once (:func:`splatdd.testing.build_quick`,
    :func:`splatdd.testing.make_quick`)."""
    return tmp_path_factory.mktemp("quick_options")
