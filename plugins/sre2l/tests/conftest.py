"""Fixtures for the sre2l plugin's tests: one intra-op thread per test and a session-wide tiny
BatchNorm teacher on the tiny dataset of :mod:`splatdd.testing` (1x8x8, 3 classes)."""
from __future__ import annotations

import pytest

from splatdd.testing import make_tiny_real, single_thread
from splatdd.testing_fixtures import one_thread  # noqa: F401

#: The tiny teacher's settings: ConvNet depth 2 (8x8 -> 2x2), width 8, BatchNorm.
TEACHER_KW = dict(model="ConvNetD2", width=8, epochs=6, lr=0.05, batch_size=32, seed=0)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Directory of a tiny teacher trained for 6 epochs on ``make_tiny_real(40)``."""
    from splatdd_sre2l.teacher import train_teacher

    out = tmp_path_factory.mktemp("teacher")
    with single_thread():
        train_teacher(make_tiny_real(40), make_tiny_real(20, seed=1), out, progress=False,
                      **TEACHER_KW)
    return out
