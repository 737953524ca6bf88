"""Peak resident-memory readings of this process (Linux ``/proc``), for CPU memory reports.

CPU torch has no allocator peak counter, so benchmarks and plugins measure the rise of the
process's peak resident set size: reset the kernel's high-water mark, run, read it::

    if reset_peak_rss():
        before = proc_status_kb("VmRSS")
        work()
        rise_kb = proc_status_kb("VmHWM") - before
"""
from __future__ import annotations

import re
from pathlib import Path


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS counter (``VmHWM``, Linux >= 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_status_kb(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...), or None if unavailable."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{re.escape(field)}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None
