"""How numbers are shown to people: durations, counts, sizes. One spelling each, everywhere."""

from __future__ import annotations

from typing import Optional

GIB = 2**30


def duration(seconds: Optional[float], clock: bool = False) -> str:
    """'45 s', '12 min', '3.5 h' (estimates); with `clock`, 'H:MM:SS' (elapsed times in tables)."""
    if seconds is None:
        return "-"
    if clock:
        s = int(max(0, seconds))
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def count(n: float) -> str:
    """1234567 -> '1.23M' (parameters, tokens)."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(int(n))


def gib(n: Optional[float]) -> str:
    """Bytes in GiB with one decimal ('-' for unknown)."""
    return "-" if n is None else f"{n / GIB:.1f}"
