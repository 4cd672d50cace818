"""The report's paired comparisons as people and MLflow read them, all from `orchestrator.compare`'s rows.

- the compact table of the primary metric (`psnr_gap`): one row per comparison (configuration, N, n,
  Δ [95% interval], verdict), its verdicts Holm-adjusted across the report's comparisons;
- the secondary metrics in one table, each "95% per comparison, unadjusted";
- the full table (`paired.csv`): every metric's mean, interval, n, p values, dropped pairs and verdict;
- the forest plot's series: each configuration's Δ psnr_gap with its interval, grouped by N;
- the parent run's metrics `delta.<metric>.<configuration>[.lo|.hi|.n|.p|.p_holm|.dropped]`.

Pure functions of `PairedRow`s; `orchestrator.report` renders the tables and `orchestrator.plots` draws.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from orchestrator.compare import CONFIDENCE, PRIMARY_METRIC, PairedDifference, PairedRow
from orchestrator.display import UNITS, fixed, metric_name_part, show_value
from orchestrator.spec import axis_label

SIZE_AXES = ("data.num_images", "data.fraction")  # the training-set size: the N of the tables and plots
DELTA_PREFIX = "delta"
HOLM = "Holm"
UNADJUSTED = f"{CONFIDENCE:.0%} per comparison, unadjusted"


def configuration_label(axes: dict[str, Any]) -> str:
    """The configuration without its size, e.g. `head` or `w3-3-3-3-3-3`; `all` when nothing else varies."""
    return "·".join(axis_label(k, v) for k, v in axes.items() if k not in SIZE_AXES) or "all"


def interval_cell(metric: str, diff: PairedDifference) -> str:
    """`+0.123 [-0.050, +0.296]`; the mean alone when there is no interval; empty without a finite pair."""
    if diff.n == 0:
        return ""
    mean = fixed(metric, diff.mean, True)
    if diff.low is None or diff.high is None:
        return mean
    return f"{mean} [{fixed(metric, diff.low, True)}, {fixed(metric, diff.high, True)}]"


def verdict_cell(diff: PairedDifference) -> str:
    """The verdict, with the Holm-adjusted p value where there is one, and the pairs dropped."""
    text = diff.verdict
    if diff.adjusted_p is not None:
        text += f" (p_{HOLM} = {diff.adjusted_p:.3g})"
    if diff.dropped:
        text += f"; {diff.dropped} non-finite pair(s) dropped"
    return text


def compared(rows: list[PairedRow]) -> list[PairedRow]:
    return [row for row in rows if not row.baseline]


def primary_table(rows: list[PairedRow], sizes: list[str]) -> list[list[str]]:
    """One row per comparison of the primary metric: configuration, N, n, Δ [interval], verdict (Holm).
    `sizes` holds each row's N (as text; empty when the sweep has none), aligned with `rows`."""
    metric = PRIMARY_METRIC
    table = [["configuration", "N", "n", f"Δ{metric}{UNITS.get(metric, '')} [{CONFIDENCE:.0%} interval]",
              f"verdict ({HOLM}-adjusted)"]]
    for row, size in zip(rows, sizes):
        if row.baseline:
            continue
        diff = row.differences.get(metric)
        if diff is None:
            table.append([configuration_label(row.axes), size, "0", "", "no matched pair"])
        else:
            table.append([configuration_label(row.axes), size, str(diff.n), interval_cell(metric, diff),
                          verdict_cell(diff)])
    return table


def secondary_table(rows: list[PairedRow], sizes: list[str], metrics: list[str]) -> list[list[str]]:
    """The other metrics, one cell each: `Δ [interval] verdict (n)`, every interval and verdict 95% per
    comparison, unadjusted."""
    others = [m for m in metrics if m != PRIMARY_METRIC]
    table = [["configuration", "N", *(f"Δ{m}{UNITS.get(m, '')}" for m in others)]]
    for row, size in zip(rows, sizes):
        if row.baseline:
            continue
        cells = [configuration_label(row.axes), size]
        for metric in others:
            diff = row.differences.get(metric)
            cells.append("no matched pair" if diff is None else
                         f"{interval_cell(metric, diff)} {verdict_cell(diff)} (n={diff.n})")
        table.append(cells)
    return table


def multiplicity_text(rows: list[PairedRow]) -> str:
    """What the verdicts claim: the primary metric's family and its adjustment, the rest unadjusted."""
    family = max((row.differences[PRIMARY_METRIC].family for row in rows if PRIMARY_METRIC in row.differences),
                 default=0)
    return (f"{PRIMARY_METRIC} is the primary metric: its verdicts across the {family} comparison(s) of this report "
            f"that have an interval are {HOLM}-adjusted (Holm 1979, step-down Bonferroni; family-wise error "
            f"{1 - CONFIDENCE:.0%}), so a verdict can stay 'no clear difference' where its own {CONFIDENCE:.0%} "
            f"interval excludes 0. The intervals are {CONFIDENCE:.0%} per comparison. Secondary metrics: "
            f"{UNADJUSTED}. No verdict is given from fewer than 2 pairs or from a zero-width interval "
            f"(all differences equal).")


def paired_csv(rows: list[PairedRow], metrics: list[str]) -> str:
    """Full precision; empty cells where a value does not exist (baseline rows, n = 1 intervals)."""
    axes = list(rows[0].axes) if rows else []
    parts = ("mean", "lo", "hi", "n", "p", "p_holm", "dropped", "verdict")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*axes, "baseline", *(f"{m}_{p}" for m in metrics for p in parts)])
    for row in rows:
        cells = [show_value(row.axes[a]) for a in axes] + [str(row.baseline).lower()]
        for metric in metrics:
            diff = row.differences.get(metric)
            if diff is None:
                cells += [""] * len(parts)
                continue
            numbers = (diff.mean, diff.low, diff.high)
            cells += ["" if v is None else repr(v) for v in numbers] + [str(diff.n)]
            cells += ["" if v is None else repr(v) for v in (diff.p_value, diff.adjusted_p)]
            cells += [str(diff.dropped), diff.verdict]
        writer.writerow(cells)
    return buffer.getvalue()


def forest_series(rows: list[PairedRow], sizes: list[str]) -> dict[str, list[tuple[str, float, float | None,
                                                                                     float | None, str]]]:
    """N label -> [(configuration, Δ psnr_gap, lo, hi, verdict)] in table order; rows without a finite
    difference are left out."""
    groups: dict[str, list] = {}
    for row, size in zip(rows, sizes):
        diff = row.differences.get(PRIMARY_METRIC)
        if row.baseline or diff is None or diff.n == 0:
            continue
        groups.setdefault(f"N = {size}" if size else "all", []).append(
            (configuration_label(row.axes), diff.mean, diff.low, diff.high, diff.verdict))
    return groups


def delta_metrics(rows: list[PairedRow]) -> dict[str, float]:
    """The paired table as the parent run's metrics: delta.<metric>.<configuration> (mean), .lo, .hi, .n, .p,
    .p_holm, .dropped; the configuration named by its axis values, e.g. delta.psnr_gap.head.N4."""
    out: dict[str, float] = {}
    for row in compared(rows):
        label = ".".join(metric_name_part(axis_label(k, v)) for k, v in row.axes.items())
        for metric, diff in row.differences.items():
            name = f"{DELTA_PREFIX}.{metric}.{label}"
            out[f"{name}.n"] = float(diff.n)
            if diff.dropped:
                out[f"{name}.dropped"] = float(diff.dropped)
            if diff.n == 0:
                continue
            out[name] = diff.mean
            optional = {"lo": diff.low, "hi": diff.high, "p": diff.p_value, "p_holm": diff.adjusted_p}
            out.update({f"{name}.{key}": value for key, value in optional.items() if value is not None})
    return out
