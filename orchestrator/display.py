"""Text for the terminal, in one place: the column table of `plan` and `status`, axis values as the
tables show them (windows as 3,5,G), and durations.
"""

from __future__ import annotations

from typing import Any

from trainer.attention import schedule_string


def format_table(rows: list[list[str]], rule: bool = False) -> str:
    """Left-aligned columns; with `rule`, a dashed line under the header row."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def show_value(value: Any, none: str = "") -> str:
    """An axis value as the tables show it: a window list as 3,5,7 with G for global, None as `none`."""
    if isinstance(value, list):
        return schedule_string(value)
    return none if value is None else str(value)


def _hms(seconds: float) -> tuple[int, int, int] | None:
    """(hours, minutes, seconds) of a duration; None when it is not a finite number."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    seconds = int(seconds)
    return seconds // 3600, seconds % 3600 // 60, seconds % 60


def duration(seconds: float) -> str:
    """A long duration for estimates: 2h05m, or 4m07s under an hour; "unknown" when not finite."""
    hms = _hms(seconds)
    if hms is None:
        return "unknown"
    h, m, s = hms
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def clock(seconds: float) -> str:
    """Elapsed or remaining time on a progress line: 1:02:03, or 02:03 under an hour; --:-- when not finite."""
    hms = _hms(seconds)
    if hms is None:
        return "--:--"
    h, m, s = hms
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
