import pytest
import torch

from splatdd.budget import (BudgetError, budget_bytes, budget_bytes_per_class, check_budget,
                            gaussian_bytes, gaussian_points)
from splatdd.plugin_api import DatasetSpec

CIFAR = DatasetSpec("cifar10", 3, 32, 32, 10)
FMNIST = DatasetSpec("fashion_mnist", 1, 28, 28, 10)


@pytest.mark.parametrize("ipc,gpc,c,h,w,expected", [
    (1, 30, 3, 32, 32, 22),        # GSDD CIFAR-10 IPC 1
    (10, 160, 3, 32, 32, 42),      # IPC 10
    (50, 250, 3, 32, 32, 136),     # IPC 50
    (1, 64, 3, 128, 128, 170),     # ImageNet subsets, 128 px, IPC 1
    (1, 200, 3, 128, 128, 54),     # DM 128 px
])
def test_gaussian_points_paper_numbers(ipc, gpc, c, h, w, expected):
    assert gaussian_points(ipc, gpc, c, h, w) == expected


def test_gaussian_points_fit_in_budget_and_are_maximal():
    for c, h, w in [(1, 28, 28), (3, 32, 32), (3, 64, 64), (4, 16, 16)]:
        for ipc in (1, 10, 50):
            for gpc in (1, 7, 30, 160):
                n = gaussian_points(ipc, gpc, c, h, w)
                per_class = ipc * c * h * w * 4
                assert gpc * gaussian_bytes(n, c) <= per_class
                assert gpc * gaussian_bytes(n + 1, c) > per_class


def test_budget_bytes():
    assert budget_bytes(CIFAR, 1) == 10 * 3 * 32 * 32 * 4 == 122880
    assert budget_bytes(FMNIST, 10) == 10 * 10 * 28 * 28 * 4
    assert budget_bytes_per_class(CIFAR, 50) * 10 == budget_bytes(CIFAR, 50)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_ipc(bad):
    with pytest.raises(ValueError):
        budget_bytes(CIFAR, bad)
    with pytest.raises(ValueError):
        gaussian_points(bad, 10, 3, 32, 32)


class _Fake:
    name = "fake"

    def __init__(self, n):
        self.n = n

    def num_bytes(self):
        return self.n


def test_check_budget():
    allowed = budget_bytes(FMNIST, 1)
    rep = check_budget(_Fake(allowed), FMNIST, 1)
    assert rep.used == rep.allowed == allowed and rep.ratio == 1.0
    with pytest.raises(BudgetError) as e:
        check_budget(_Fake(allowed + 1), FMNIST, 1)
    msg = str(e.value)
    assert "31,361" in msg and "31,360" in msg and "over by 1" in msg
    check_budget(_Fake(int(allowed * 1.05)), FMNIST, 1, tolerance=0.05)
    with pytest.raises(BudgetError):
        check_budget(_Fake(int(allowed * 1.06)), FMNIST, 1, tolerance=0.05)
    assert issubclass(BudgetError, ValueError)
