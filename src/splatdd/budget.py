"""Storage budgets: what a distilled dataset may cost, and the check that it does not cost more.

The field's convention (and GSDD's) is that a distilled set with ``ipc`` images per class may use as
many bytes as ``ipc`` fp32 pixel images per class: ``ipc * C * H * W * 4`` bytes per class, so
``num_classes * ipc * C * H * W * 4`` bytes for the whole set. Fixed labels are not counted (they
are implied by the layout), nor is a learned evaluation learning rate.

How a parameterization spends its budget is the plugin's own business; the core only computes the
budget and checks ``num_bytes()`` against it::

    check_budget(param, spec, ipc)        # BudgetError when param.num_bytes() > budget_bytes(...)
"""
from __future__ import annotations

from dataclasses import dataclass

from splatdd.checks import positive_int
from splatdd.plugin_api import DatasetSpec, Parameterization

__all__ = ["BudgetError", "BudgetReport", "FP32_BYTES", "BF16_BYTES", "budget_bytes",
           "budget_bytes_per_class", "check_budget"]

FP32_BYTES = 4
BF16_BYTES = 2


class BudgetError(ValueError):
    """A parameterization costs more bytes than its storage budget allows."""


def budget_bytes_per_class(spec: DatasetSpec, ipc: int) -> int:
    """Bytes one class may use: ``ipc`` fp32 images of ``C x H x W``."""
    ipc = positive_int("ipc", ipc)
    return ipc * spec.channels * spec.height * spec.width * FP32_BYTES


def budget_bytes(spec: DatasetSpec, ipc: int) -> int:
    """Bytes the whole distilled set may use: ``num_classes * ipc * C * H * W * 4``."""
    return spec.num_classes * budget_bytes_per_class(spec, ipc)


@dataclass(frozen=True)
class BudgetReport:
    used: int
    allowed: int
    overridden: bool = False      # over budget, allowed by the parameterization's budget_override

    @property
    def ratio(self) -> float:
        return self.used / self.allowed

    def __str__(self) -> str:
        text = f"{self.used:,} of {self.allowed:,} bytes ({100 * self.ratio:.2f}% of budget)"
        return text + (" -- OVER BUDGET (budget_override)" if self.overridden else "")


def check_budget(param: Parameterization, spec: DatasetSpec, ipc: int, tolerance: float = 0.0
                 ) -> BudgetReport:
    """Raise :class:`BudgetError` if ``param.num_bytes()`` exceeds the budget of ``ipc`` images per
    class by more than the fraction ``tolerance`` (``0.0``: not a single byte over), unless the
    parameterization has ``budget_override is True`` (an explicit user option): then the report says
    ``overridden=True`` and its text "OVER BUDGET"."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    used = int(param.num_bytes())
    allowed = budget_bytes(spec, ipc)
    limit = allowed * (1.0 + tolerance)
    if used > limit and getattr(param, "budget_override", False) is True:
        # the parameterization was explicitly told to exceed the budget: allowed, reported as such
        return BudgetReport(used, allowed, overridden=True)
    if used > limit:
        name = getattr(param, "name", type(param).__name__)
        raise BudgetError(
            f"parameterization {name!r} uses {used:,} bytes but the budget for ipc={ipc} on "
            f"{spec.name} ({spec.num_classes} classes x {ipc} x {spec.channels}x{spec.height}x"
            f"{spec.width} fp32) is {allowed:,} bytes"
            + (f" (+{tolerance:.1%} tolerance = {int(limit):,})" if tolerance else "")
            + f": over by {used - allowed:,} bytes ({used / allowed:.3f}x)")
    return BudgetReport(used, allowed)
