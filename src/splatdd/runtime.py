"""Process settings every entry point shares: torch's CPU thread count and the compute device.

One place checks both, so ``run(config)``, ``splatdd distill/eval`` and the plugins' commands
(``splatdd buffer``, ``splatdd teacher``) refuse the same bad values with the same words::

    from splatdd.runtime import resolve_device, set_threads
    set_threads(2)                  # ValueError above the machine's CPU count
    dev = resolve_device("auto")    # torch.device('cuda') where available, else cpu
"""
from __future__ import annotations

import os

import torch


def set_threads(n: int, *, what: str = "threads") -> None:
    """Set torch's intra-op CPU threads to ``n`` (0 leaves torch's default).

    ``n`` must be between 0 and the machine's CPU count (torch crashes far above it); a
    ``ValueError`` naming ``what`` says so otherwise.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"{what} must be an integer, got {n!r}")
    limit = os.cpu_count() or 1
    if n < 0 or n > limit:
        raise ValueError(f"{what} must be between 1 and this machine's {limit} CPUs "
                         f"(0: torch's default), got {n}")
    if n:
        torch.set_num_threads(n)


def resolve_device(name: str, *, what: str = "device") -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:N`` or ``auto``) as a usable ``torch.device``.

    ``auto`` picks CUDA when available. A ``ValueError`` naming ``what`` refuses an unknown
    device string or CUDA on a machine without it.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{what} {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {name!r}: CUDA is not available in this torch build/machine")
    return dev


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows, for the machine
    line of benchmark results.

    >>> isinstance(cpu_model(), str) and len(cpu_model()) > 0
    True
    """
    import platform
    from pathlib import Path
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
