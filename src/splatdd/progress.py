"""Progress for every long loop of splatdd and its plugins: a tqdm bar on a terminal, plain-text
lines elsewhere.

A tqdm bar written into a log file (``splatdd distill ... 2> log``, a batch job, a pipe) becomes
one line of carriage returns and escape codes; :func:`progress_bar` therefore returns a tqdm bar
only when its stream is a terminal and otherwise a :class:`PlainProgress` that prints a whole
line, with elapsed time and ETA, every ``every`` percent and at least every ``interval`` seconds
(at most one line per update)::

    from splatdd.progress import progress_bar

    with progress_bar(total=1000, desc="dm", unit="it") as bar:
        for step in range(1000):
            ...
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

In a log file this gives lines like ``dm: 100/1000 it (10%), 0:12 elapsed, ETA 1:48, 8.3 it/s,
loss=0.42``. ``SPLATDD_PROGRESS=plain`` (or ``bar``) forces one style.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

__all__ = ["progress_bar", "PlainProgress", "format_seconds", "MODE_ENV"]

#: Environment variable forcing the style: ``plain`` or ``bar`` (default: by the stream).
MODE_ENV = "SPLATDD_PROGRESS"


def format_seconds(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour); ``?`` when unknown::

        format_seconds(3725.2)        # '1:02:05'
    """
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):     # no isatty, or a closed stream
        return False


class PlainProgress:
    """A tqdm-like progress reporter that prints whole ASCII lines (for logs and pipes).

    Supports the part of tqdm's interface splatdd uses: ``update``, ``set_postfix``,
    ``set_description``, ``write``, ``close``, ``n``, ``total`` and ``with``. A line is printed at
    the start, whenever the count crosses a multiple of ``every`` percent, whenever ``interval``
    seconds passed since the last line, and at ``close`` (when ``leave``). With ``leave=False``
    (inner loops) only the time-based lines are printed, so nested loops do not flood the log."""

    def __init__(self, total: int | None, *, desc: str = "", unit: str = "it", initial: int = 0,
                 leave: bool = True, file: TextIO | None = None, every: float = 10.0,
                 interval: float = 60.0, clock: Any = time.monotonic) -> None:
        self.total = None if total is None else int(total)
        self.n = self._start = int(initial)
        self.desc, self.unit, self.leave = desc, unit, leave
        self.file = file if file is not None else sys.stderr
        self.every, self.interval, self._clock = float(every), float(interval), clock
        self._t0 = self._last = clock()
        self._postfix = ""
        self._next_pct = self._pct_step(self.n)
        self._closed = False
        self._last_printed = -1
        if leave:
            self._line()

    # ---- tqdm's interface ---------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += int(n)
        now = self._clock()
        crossed = (self.leave and self.total and self.every > 0
                   and 100.0 * self.n / self.total >= self._next_pct)
        if crossed or now - self._last >= self.interval:
            self._next_pct = self._pct_step(self.n)
            self._line(now)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = str(s)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def write(self, s: str, file: TextIO | None = None, end: str = "\n") -> None:
        print(s, file=file or self.file, end=end, flush=True)

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.leave and self._last_printed != self.n:
            self._line()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the line -----------------------------------------------------------------------------
    def _pct_step(self, n: int) -> float:
        """The next percentage (a multiple of ``every``) above ``n``'s."""
        if not self.total or self.every <= 0:
            return float("inf")
        pct = 100.0 * n / self.total
        return (int(pct // self.every) + 1) * self.every

    def text(self, now: float | None = None) -> str:
        """The current line, e.g. ``dm: 100/1000 it (10%), 0:12 elapsed, ETA 1:48, 8.3 it/s``."""
        now = self._clock() if now is None else now
        elapsed = now - self._t0
        done = self.n - self._start
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        parts.append(f"{format_seconds(elapsed)} elapsed")
        if self.total and self.n < self.total:
            parts.append("ETA " + (format_seconds((self.total - self.n) / rate) if rate else "?"))
        if rate:
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else
                         f"{1 / rate:.3g} s/{self.unit}")
        if self._postfix:
            parts.append(self._postfix)
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _line(self, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        print(self.text(now), file=self.file, flush=True)
        self._last, self._last_printed = now, self.n


def progress_bar(total: int | None, *, desc: str = "", unit: str = "it", initial: int = 0,
                 leave: bool = True, file: TextIO | None = None, every: float = 10.0,
                 interval: float = 60.0) -> Any:
    """A progress reporter for ``total`` steps: a tqdm bar (with ETA) when ``file`` (default
    stderr) is a terminal, else a :class:`PlainProgress` printing whole lines. Both have
    ``update``, ``set_postfix``, ``set_description``, ``write`` and ``close``::

        bar = progress_bar(total=20, desc="experts", unit="epoch")
        bar.update(1); bar.close()

    ``SPLATDD_PROGRESS=plain`` or ``=bar`` overrides the choice by stream."""
    stream = file if file is not None else sys.stderr
    mode = os.environ.get(MODE_ENV, "").strip().lower()
    tty = mode == "bar" or (mode != "plain" and _is_terminal(stream))
    if not tty:
        return PlainProgress(total, desc=desc, unit=unit, initial=initial, leave=leave,
                             file=stream, every=every, interval=interval)
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=stream,
                dynamic_ncols=True, mininterval=0.5)
