"""Settings for every test, the core's and the plugins'.

Each test starts from the same global random state. torch seeds its default generator from the
operating system at start-up (another stream in every process), and so do Python's and numpy's,
so a test drawing from them without a seed saw other data on every run and could fail only
sometimes (CI-like runs here showed it: gradient checks on random images, one batch in about 150
far off in PyTorch's own float32 too). Tests that want many inputs say so with hypothesis."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _same_global_random_state():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
