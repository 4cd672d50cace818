"""Text for the terminal and the report, in one place: the column table of `plan` and `status`, axis
values as the tables show them (windows as 3,5,G), metric values with their column's decimals,
durations, the first line of an error, the count of retried attempts, and the line `launch` prints
once it accepted a sweep.
"""

from __future__ import annotations

import re
from typing import Any

from trainer.metric_names import (FID, KID, MEMORIZATION_CLOSER_TO_TRAIN, MEMORIZATION_COPY_FRACTION,
                                  MEMORIZATION_NN_TEST, MEMORIZATION_NN_TRAIN, PSNR_GAP, PSNR_TEST, PSNR_TRAIN)


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
        from trainer.schedule import schedule_string

        return schedule_string(value)
    return none if value is None else str(value)


# Decimals per metric, one per column so that numbers line up: dB to 3, fractions to 2.
DECIMALS = {PSNR_GAP: 3, PSNR_TRAIN: 3, PSNR_TEST: 3, MEMORIZATION_COPY_FRACTION: 2, MEMORIZATION_NN_TRAIN: 3,
            MEMORIZATION_NN_TEST: 3, MEMORIZATION_CLOSER_TO_TRAIN: 2, FID: 2, KID: 4}
UNITS = {PSNR_GAP: " dB", PSNR_TRAIN: " dB", PSNR_TEST: " dB"}
DASH = "—"


def significant(value: float | None, signed: bool = False) -> str:
    """4 significant digits; empty for None."""
    if value is None:
        return ""
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def fixed(metric: str, value: float | None, signed: bool = False) -> str:
    """A metric's value with its column's decimals (DECIMALS; 4 significant digits otherwise)."""
    if value is None:
        return ""
    digits = DECIMALS.get(metric)
    if digits is None:
        return significant(value, signed)
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return text.replace("-0." + "0" * digits, "0." + "0" * digits) if not signed else text


def metric_name_part(text: str) -> str:
    """A piece of an MLflow metric or file name: letters, digits, _ - . only."""
    return "".join(c if c.isalnum() or c in "_-." else "-" for c in text)


def param_text(value: Any) -> str:
    """A config value as an MLflow param stores it: lists and mappings as JSON, anything else as str."""
    import json

    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def retried_text(errors: int, lead: str) -> str:
    """`lead` + "1 error retried" or "3 errors retried": attempts of trials that errored and were run
    again; "" when none did."""
    return f"{lead}{errors} error{'s' if errors != 1 else ''} retried" if errors else ""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (or its type's name when it has none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _hms(seconds: float, hours: str, minutes: str, not_finite: str) -> str:
    """A duration through a format with h, m, s: `hours` from one hour on, else `minutes`."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return not_finite
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return (hours if h else minutes).format(h=h, m=m, s=s)


def duration(seconds: float) -> str:
    """A long duration for estimates: 2h05m, or 4m07s under an hour; "unknown" when not finite."""
    return _hms(seconds, "{h}h{m:02d}m", "{m}m{s:02d}s", "unknown")


def clock(seconds: float) -> str:
    """Elapsed or remaining time on a progress line: 1:02:03, or 02:03 under an hour; --:-- when not finite."""
    return _hms(seconds, "{h}:{m:02d}:{s:02d}", "{m:02d}:{s:02d}", "--:--")


def accepted_line(sweep_id: str, trials: int, tracking_uri: str) -> str:
    """The line `launch` prints once every check has passed and the sweep's run exists. `ditsweep submit`
    (orchestrator.cluster) watches a job's logs for it with ACCEPTED_LINE, just below: the two change
    together."""
    return f"sweep {sweep_id}: {trials} trials to run, tracking {tracking_uri}"


ACCEPTED_LINE = re.compile(r"^sweep \S+: \d+ trials to run, tracking ", re.MULTILINE)
