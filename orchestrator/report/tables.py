"""The report's tables: the per-configuration table as CSV (full precision) and for people (Markdown,
HTML), and the paired comparison against the baseline (`orchestrator.compare`, shown by
`orchestrator.paired`)."""

from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import dataclass

from orchestrator import paired
from orchestrator.compare import CONFIDENCE, Observation, PairedDifference, PairedRow, paired_table
from orchestrator.display import UNITS, fixed, show_value
from orchestrator.report.rows import (INTERVAL_METRICS, PAIRED_METRICS, SIZE_PARAMS, ConfigRow, SweepData,
                                      config_axes)
from orchestrator.spec import Compare


def csv_header(axes: list[str], metrics: list[str]) -> list[str]:
    columns = [*config_axes(axes), "schedule", "finished", "trials"]
    for metric in metrics:
        columns += [f"{metric}_mean", f"{metric}_std"]
        if metric in INTERVAL_METRICS:
            columns += [f"{metric}_ci95_low", f"{metric}_ci95_high"]
    return columns


def table_csv(rows: list[ConfigRow], axes: list[str], metrics: list[str]) -> str:
    """Full-precision numbers (repr), empty cells where a value does not exist."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(csv_header(axes, metrics))
    for row in rows:
        cells = [show_value(row.axes[a]) for a in config_axes(axes)]
        cells += [row.schedule, str(len(row.finished)), str(len(row.trials))]
        for metric in metrics:
            values = [row.mean.get(metric), row.std.get(metric)]
            if metric in INTERVAL_METRICS:
                interval = row.interval.get(metric)
                values += [interval.low, interval.high] if interval else [None, None]
            cells += ["" if value is None else repr(value) for value in values]
        writer.writerow(cells)
    return buffer.getvalue()


def display_table(rows: list[ConfigRow], axes: list[str], metrics: list[str]) -> list[list[str]]:
    """Header and rows for people: `mean ± std` per metric, each column with its own decimals (the
    paired changes against the baseline are in the paired table)."""
    header = [*config_axes(axes), "schedule", "finished"]
    for metric in metrics:
        header.append(f"{metric}{UNITS.get(metric, '')}")
        if metric in INTERVAL_METRICS:
            header.append(f"{metric} {CONFIDENCE:.0%} interval")
    table = [header]
    for row in rows:
        cells = [show_value(row.axes[a]) for a in config_axes(axes)]
        cells += [row.schedule, f"{len(row.finished)}/{len(row.trials)}"]
        for metric in metrics:
            mean, std = row.mean.get(metric), row.std.get(metric)
            cells.append(fixed(metric, mean) + (f" ± {fixed(metric, std)}" if mean is not None and std is not None else ""))
            if metric in INTERVAL_METRICS:
                cells.append(interval_text(metric, row.interval.get(metric)))
        table.append(cells)
    return table


def interval_text(metric: str, interval: PairedDifference | None) -> str:
    """'[a, b]' in the metric's decimals; 'needs >= 2 trials' where there is one."""
    if interval is None:
        return ""
    if interval.low is None or interval.high is None:
        return "needs >= 2 trials"
    return f"[{fixed(metric, interval.low)}, {fixed(metric, interval.high)}]"


def paired_rows(data: SweepData) -> list[PairedRow]:
    """Every configuration against the spec's baseline (orchestrator.compare): the one pairing of the report."""
    observations = [Observation(t.axes, t.metrics) for t in data.trials if t.finished]
    return paired_table(observations, data.axes, data.compare.baseline, data.compare.pair_on, paired_metrics(data))


def paired_metrics(data: SweepData) -> list[str]:
    return [m for m in PAIRED_METRICS if any(m in t.metrics for t in data.trials if t.finished)]


def paired_sizes(data: SweepData, rows: list[PairedRow]) -> list[str]:
    """Each paired row's training-set size as text: its size axis, else the param of a trial it holds."""
    sizes = []
    for row in rows:
        size = next((row.axes[a] for a in SIZE_PARAMS if row.axes.get(a) is not None), None)
        if size is None:
            trial = next((t for t in data.trials if t.params and all(
                json.dumps(t.axes.get(k), sort_keys=True) == json.dumps(v, sort_keys=True) for k, v in row.axes.items())),
                None)
            size = next((trial.params[a] for a in SIZE_PARAMS if trial and trial.params.get(a) not in (None, "None", "")),
                        None)
        sizes.append("" if size is None else show_value(size))
    return sizes


def baseline_text(compare: Compare, axes: list[str] | None = None) -> str:
    fixed_axes = ", ".join(f"{k} = {show_value(v)}" for k, v in compare.baseline.items())
    matched = [a for a in compare.pair_on if axes is None or a in axes] or ["nothing (one trial per configuration)"]
    return (f"paired difference (configuration − baseline: {fixed_axes}, at the same other axis values), "
            f"matched on {', '.join(matched)}; mean and {CONFIDENCE:.0%} interval from Student's t "
            f"on the paired differences (scipy.stats.t)")


@dataclass
class PairedTables:
    """The paired comparison as the report shows it (orchestrator.paired)."""

    rows: list[PairedRow]
    primary: list[list[str]]  # one row per comparison of psnr_gap, Holm-adjusted verdicts
    secondary: list[list[str]] | None  # the other metrics, 95% per comparison, unadjusted
    forest: dict[str, list]  # N label -> (configuration, mean, lo, hi, verdict)

    def markdown(self, data: SweepData) -> str:
        parts = [f"Paired table: {baseline_text(data.compare, data.axes)}.", "", paired.multiplicity_text(self.rows),
                 "", table_markdown(self.primary)]
        if self.secondary:
            parts += [f"Secondary metrics ({paired.UNADJUSTED}):", "", table_markdown(self.secondary)]
        return "\n".join(parts).rstrip() + "\n"


def paired_tables(data: SweepData) -> PairedTables | None:
    rows = paired_rows(data)
    if not rows:
        return None
    sizes = paired_sizes(data, rows)
    metrics = paired_metrics(data)
    secondary = paired.secondary_table(rows, sizes, metrics) if len(metrics) > 1 else None
    return PairedTables(rows, paired.primary_table(rows, sizes), secondary, paired.forest_series(rows, sizes))


def table_markdown(table: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") or " " for c in cells) + " |"

    return "\n".join([line(table[0]), "|" + "---|" * len(table[0]), *map(line, table[1:])]) + "\n"


def table_html(table: list[list[str]]) -> str:
    """The table with line-break chances where a narrow column may wrap without splitting a number:
    after `_` and `.` in the header (metric and axis names), after `,` in the cells (window schedules)."""
    def breakable(text: str, after: str) -> str:
        escaped = html.escape(text)
        for char in after:
            escaped = escaped.replace(char, f"{char}<wbr>")
        return escaped

    head = "".join(f"<th>{breakable(c, '_.')}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{breakable(c, ',')}</td>" for c in row) + "</tr>" for row in table[1:])
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{body}</tbody>\n</table>"
