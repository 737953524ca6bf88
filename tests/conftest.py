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
