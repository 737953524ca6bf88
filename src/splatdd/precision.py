"""Opt-in reduced precision for frozen networks (issue 15).

``precision="bf16"`` lets an algorithm run graph-free forward passes of frozen networks (dm's
random embedder on the real batches) in bfloat16 with fp32 accumulation of the results, which is
several times faster where the hardware has native bf16 matrix units (x86 AVX512-BF16 / AMX-BF16,
CUDA devices that report bf16 support) -- and slower than fp32 where it is emulated. So bf16 is
used only where it is native: elsewhere :func:`resolve_precision` falls back to fp32 with a
:class:`RuntimeWarning` naming the reason (a config written on one machine still runs on another).
``"fp32"`` (the default everywhere) is the reference behaviour.

Detection never assumes: on the CPU it reads the kernel's CPU flags (``/proc/cpuinfo``), on CUDA
it asks ``torch.cuda.is_bf16_supported()``.
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

__all__ = ["PRECISIONS", "BF16_CPU_FLAGS", "cpu_flags", "bf16_native", "resolve_precision"]

PRECISIONS = ("fp32", "bf16")
#: CPU flags (Linux names) of native bf16 arithmetic: any one suffices.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (empty where unreadable).

    >>> isinstance(cpu_flags(), frozenset)
    True
    """
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` does bf16 arithmetic natively (not emulated through fp32).

    >>> bf16_native("meta")
    False
    """
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return any(f in cpu_flags() for f in BF16_CPU_FLAGS)
    return False


def resolve_precision(precision: str, device: torch.device | str, *, who: str,
                      native: bool | None = None) -> str:
    """The precision to run at: ``precision`` checked, and ``"bf16"`` demoted to ``"fp32"``
    (with a :class:`RuntimeWarning`) where ``device`` has no native bf16 (``native`` overrides
    the detection, for tests). ``who`` names the caller in messages.

    >>> resolve_precision("fp32", "cpu", who="dm")
    'fp32'
    >>> resolve_precision("bf16", "cpu", who="dm", native=True)
    'bf16'
    """
    if precision not in PRECISIONS:
        raise ValueError(f"{who}: precision must be one of {', '.join(PRECISIONS)}, "
                         f"got {precision!r}")
    if precision == "fp32":
        return precision
    if native is None:
        native = bf16_native(device)
    if not native:
        warnings.warn(f"{who}: precision='bf16' asked for, but {torch.device(device)} has no "
                      f"native bf16 arithmetic (CPU flags {' / '.join(BF16_CPU_FLAGS)}, or a "
                      "CUDA device with bf16); running in fp32", RuntimeWarning, stacklevel=2)
        return "fp32"
    return precision
