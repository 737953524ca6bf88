"""Argument checks shared by the library's functions: one message for each kind of bad value.

>>> positive_int("chunk", 16)
16
>>> positive_int("chunk", None, allow_none=True) is None
True
>>> positive_int("chunk", 0)
Traceback (most recent call last):
    ...
ValueError: chunk must be a positive integer, got 0
"""
from __future__ import annotations

import numbers

__all__ = ["positive_int"]


def positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    """``value`` as an int when it is a positive integer (an int or another integral type such as
    numpy's, never a bool or a float), or None when ``allow_none`` and it is None; else a
    ``ValueError`` naming ``name``."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
    if not ok:
        also = " or None" if allow_none else ""
        raise ValueError(f"{name} must be a positive integer{also}, got {value!r}")
    return int(value)  # type: ignore[arg-type]
