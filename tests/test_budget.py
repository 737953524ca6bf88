import pytest
import torch

import splatdd.budget
from splatdd.budget import BudgetError, budget_bytes, budget_bytes_per_class, check_budget
from splatdd.plugin_api import DatasetSpec

CIFAR = DatasetSpec("cifar10", 3, 32, 32, 10)
FMNIST = DatasetSpec("fashion_mnist", 1, 28, 28, 10)


def test_the_core_keeps_no_parameterization_specific_sizing():
    """How a plugin spends its bytes is the plugin's: the core module names no parameterization."""
    import inspect
    source = inspect.getsource(splatdd.budget).lower()
    for word in ("gaussian", "siren", "ld3m", "points"):
        assert word not in source, word


def test_budget_bytes():
    assert budget_bytes(CIFAR, 1) == 10 * 3 * 32 * 32 * 4 == 122880
    assert budget_bytes(FMNIST, 10) == 10 * 10 * 28 * 28 * 4
    assert budget_bytes_per_class(CIFAR, 50) * 10 == budget_bytes(CIFAR, 50)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_ipc(bad):
    with pytest.raises(ValueError):
        budget_bytes(CIFAR, bad)
    with pytest.raises(ValueError, match="ipc"):
        budget_bytes_per_class(CIFAR, bad)


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
