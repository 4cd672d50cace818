"""A sweep's comparison report: one table row per configuration, plots, and one HTML page.

A configuration is a grid point without its seed-like axes (`seed`, `data.shuffle_seed`): its numbers
are the mean and the sample standard deviation over those seeds and shuffles. Every comparison of a
configuration with its baseline (the spec's `compare:`) comes from one pairing engine,
`orchestrator.compare`, shown by `orchestrator.paired`: the compact primary table, the forest plot, the
full paired.csv and the parent run's `delta.*` metrics.

The table, plot series and pages are pure functions of `SweepData`; `fetch_sweep` reads a sweep from
MLflow (through orchestrator.tracking) and `publish` writes the files and attaches them to the sweep's
parent run, where the MLflow UI shows them.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import itertools
import json
import math
import secrets
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator import paired
from orchestrator.compare import CONFIDENCE, Observation, PairedDifference, PairedRow, mean_interval, paired_table
from orchestrator.display import DASH, UNITS, fixed, metric_name_part, show_value
from orchestrator.spec import Compare, SpecError, axis_label, parse_spec
from orchestrator.tracking import FINISHED, Tracker, TrialRun
from trainer.attention import GLOBAL

SEED_AXES = ("seed", "data.shuffle_seed")  # averaged over, never a configuration of their own
SIZE_PARAMS = paired.SIZE_AXES
METRICS = ("psnr_gap", "mem_copy_fraction", "mem_closer_to_train", "mem_nn_train", "mem_nn_test", "psnr_train",
           "psnr_test", "fid", "kid")
PAIRED_METRICS = ("psnr_gap", "psnr_train", "psnr_test", "mem_copy_fraction", "mem_closer_to_train", "fid")
# Metrics whose per-configuration mean also gets its 95% Student-t interval over seeds and shuffles.
INTERVAL_METRICS = ("psnr_gap", "fid")
ATTENTION_DISTANCE = "attn_distance.block_"  # + block index
FOREST_PNG = "forest_psnr_gap.png"
MISSING = "MISSING"  # a trial of the manifest without a run (never started, or its run was deleted)
REPORT_ARTIFACT_DIR = "report"
REPORTS_DIR = Path("reports")
RUN_TABLE_VIEW = "ditsweep: axes and key metrics"


class ReportError(ValueError):
    """The report cannot be built as asked; the message says what is missing or in the way."""


@dataclass
class TrialResult:
    """One trial of the sweep as MLflow holds it: a child run, or the FINISHED run of an earlier sweep."""

    name: str
    axes: dict[str, Any]  # grid axis -> value, as in the sweep's trials.json
    status: str  # FINISHED, FAILED, KILLED, RUNNING or MISSING
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    curve: dict[str, list[float]] | None = None  # psnr_curve.csv: timestep, psnr_train, psnr_test, psnr_gap
    run_id: str | None = None
    cached: bool = False

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def placement(self) -> str:
        return self.params.get("attention.placement") or str(self.axes.get("attention.placement", ""))


@dataclass
class SampleGrid:
    """The sample grid (and, at the smallest N, the nearest-training pairs) of one configuration's first
    finished trial: `label` names the configuration, `configuration` and `size` place it in the layout."""

    label: str
    configuration: str
    size: str  # e.g. "N = 16", "fraction = 0.05"; empty when the sweep has no size
    files: dict[str, bytes]  # file name -> PNG


@dataclass
class SweepData:
    sweep_id: str
    experiment_id: str
    experiment_name: str
    parent_run_id: str
    status: str
    axes: list[str]  # grid axes in spec order
    trials: list[TrialResult]
    # Reproducibility (Kadkhodaie et al.) of trials trained on disjoint subsets: configuration -> scores
    reproducibility: dict[str, list[float]] = field(default_factory=dict)
    compare: Compare = field(default_factory=Compare)  # the spec's pairing (baseline, pair_on)
    # Sample grids of one trial per configuration
    grids: list[SampleGrid] = field(default_factory=list)
    # Run id -> trainer.jacobian.JacobianAnalysis of the trials that saved one (orchestrator.report_jacobian)
    jacobians: dict[str, Any] = field(default_factory=dict)
    # Run id -> the attention maps of a few query tokens of the trial (trainer.locality.query_maps)
    attention_queries: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConfigRow:
    """One configuration: its non-seed axis values and the statistics over its finished trials."""

    axes: dict[str, Any]
    trials: list[TrialResult]  # all of the configuration's trials, finished or not
    mean: dict[str, float]
    std: dict[str, float | None]  # None with a single finished trial
    interval: dict[str, PairedDifference]  # INTERVAL_METRICS -> mean and 95% interval over the finished trials

    @property
    def finished(self) -> list[TrialResult]:
        return [t for t in self.trials if t.finished]

    @property
    def schedule(self) -> str:
        return next((t.params["attention.schedule"] for t in self.trials if "attention.schedule" in t.params), "")


# ---------------------------------------------------------------------------------------------
# The table


def config_axes(axes: list[str]) -> list[str]:
    return [a for a in axes if a not in SEED_AXES]


def present_metrics(trials: list[TrialResult]) -> list[str]:
    """The summary metrics that at least one finished trial logged, in METRICS order."""
    return [m for m in METRICS if any(m in t.metrics for t in trials if t.finished)]


def configuration_rows(trials: list[TrialResult], axes: list[str]) -> list[ConfigRow]:
    """Group trials by their non-seed axes (in grid order) and summarize each group."""
    groups: dict[tuple, list[TrialResult]] = {}
    for trial in trials:
        groups.setdefault(_axes_key(trial, config_axes(axes)), []).append(trial)
    metrics = present_metrics(trials)
    rows = []
    for members in groups.values():
        done = [t for t in members if t.finished]
        mean: dict[str, float] = {}
        std: dict[str, float | None] = {}
        interval: dict[str, PairedDifference] = {}
        for metric in metrics:  # a non-finite value (NaN) is left out, and `notes` names it
            values = [t.metrics[metric] for t in done if metric in t.metrics and math.isfinite(t.metrics[metric])]
            if values:
                mean[metric] = statistics.fmean(values)
                std[metric] = statistics.stdev(values) if len(values) > 1 else None
                if metric in INTERVAL_METRICS:
                    interval[metric] = mean_interval(values)
        rows.append(ConfigRow({a: members[0].axes.get(a) for a in config_axes(axes)}, members, mean, std, interval))
    return rows


def _axes_key(trial: TrialResult, names: list[str]) -> tuple:
    return tuple(json.dumps(trial.axes.get(name), sort_keys=True) for name in names)


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


# ---------------------------------------------------------------------------------------------
# The paired table: every configuration against its baseline (orchestrator.compare)


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


# ---------------------------------------------------------------------------------------------
# Plot series (plain data; orchestrator.plots draws them)


def row_label(row: ConfigRow, without: tuple[str, ...] = ()) -> str:
    """The configuration's axis values except `without`, e.g. `head·N1000`; its placement if none left."""
    parts = [axis_label(k, v) for k, v in row.axes.items() if k not in without]
    if parts:
        return "·".join(parts)
    return row.trials[0].placement or "all trials"


def data_size(row: ConfigRow) -> tuple[float, str] | None:
    """(value, axis label) of the training set size: num_images when set, else the fraction."""
    params = next((t.params for t in row.trials if t.params), {})
    for key, label in (("data.num_images", "training images N"), ("data.fraction", "training fraction of the pool")):
        value = row.axes.get(key, params.get(key))
        if value not in (None, "None", ""):
            return float(value), label
    return None


def gap_vs_size(rows: list[ConfigRow]) -> tuple[str, dict[str, list[tuple[float, float, float | None]]]]:
    """x label and, per configuration without its size, (size, mean gap, half-width of its 95% Student-t
    interval over seeds and shuffles; None with one trial) points."""
    series: dict[str, list] = {}
    xlabel = "training images N"
    for row in rows:
        size = data_size(row)
        if size is None or "psnr_gap" not in row.mean:
            continue
        xlabel = size[1]
        interval = row.interval["psnr_gap"]
        half = None if interval.high is None else (interval.high - interval.low) / 2
        series.setdefault(row_label(row, SIZE_PARAMS), []).append((size[0], row.mean["psnr_gap"], half))
    return xlabel, series


def step_curves(rows: list[ConfigRow]) -> dict[str, dict[str, tuple[list[float], list[float], list[float]]]]:
    """Per data size, per configuration: (timesteps, mean train PSNR, mean held-out PSNR) over seeds."""
    panels: dict[str, dict] = {}
    for row in rows:
        curves = [t.curve for t in row.finished if t.curve]
        if not curves:
            continue
        curves = [c for c in curves if c["timestep"] == curves[0]["timestep"]]  # same eval steps only
        size = data_size(row)
        title = "all trials" if size is None else f"{size[1]} = {size[0]:g}"
        train = [statistics.fmean(values) for values in zip(*(c["psnr_train"] for c in curves))]
        test = [statistics.fmean(values) for values in zip(*(c["psnr_test"] for c in curves))]
        panels.setdefault(title, {})[row_label(row, SIZE_PARAMS)] = (curves[0]["timestep"], train, test)
    return panels


def window_label(schedule: str) -> str | None:
    """`3,5,7,G,G` -> "3,5,7"; all blocks one size -> "5"; no local block -> None (global)."""
    local = [w for w in schedule.split(",") if w and w != GLOBAL]
    if not local:
        return None
    return local[0] if len(set(local)) == 1 else ",".join(local)


def metric_by_window(rows: list[ConfigRow], metric: str):
    """Window labels (smallest mean window first), per-configuration (window, mean, std) points of the
    local configurations, and (mean, std) of the global ones."""
    series: dict[str, list] = {}
    baselines: dict[str, tuple[float, float | None]] = {}
    for row in rows:
        if metric not in row.mean:
            continue
        label = row_label(row, ("attention.windows",))
        window = window_label(row.schedule)
        if window is None:
            baselines[label] = (row.mean[metric], row.std[metric])
        else:
            series.setdefault(label, []).append((window, row.mean[metric], row.std[metric]))
    windows = sorted({p[0] for points in series.values() for p in points},
                     key=lambda w: (statistics.fmean(int(v) for v in w.split(",")), w))
    return windows, series, baselines


def attention_distances(rows: list[ConfigRow]) -> dict[str, list[tuple[int, float]]]:
    """Per configuration, (block, mean attention distance over seeds) for each block logged."""
    series = {}
    for row in rows:
        per_block: dict[int, list[float]] = {}
        for trial in row.finished:
            for key, value in trial.metrics.items():
                if key.startswith(ATTENTION_DISTANCE) and key[len(ATTENTION_DISTANCE):].isdigit():
                    per_block.setdefault(int(key[len(ATTENTION_DISTANCE):]), []).append(value)
        if per_block:
            series[row_label(row)] = [(block, statistics.fmean(v)) for block, v in sorted(per_block.items())]
    return series


# ---------------------------------------------------------------------------------------------
# The report's files


@dataclass
class Figure:
    filename: str
    caption: str
    png: bytes


def figures(rows: list[ConfigRow]) -> list[Figure]:
    """The plots whose data exist; a metric nobody logged gives no plot (not an error)."""
    from orchestrator import plots

    out = []
    xlabel, gap_series = gap_vs_size(rows)
    if gap_series:
        out.append(Figure("psnr_gap_vs_images.png", "PSNR gap (train - held-out) against the number of "
                          "training images (log axis), per configuration; error bars: 95% Student-t interval over seeds and "
                          "shuffles (none with one trial)",
                          plots.psnr_gap_vs_images_png(gap_series, xlabel)))
    panels = step_curves(rows)
    if panels:
        out.append(Figure("psnr_per_step.png", "Train (solid) and held-out (dashed) PSNR of the one-step "
                          "denoiser per diffusion step, mean over seeds", plots.psnr_per_step_png(panels)))
    windows, series, baselines = metric_by_window(rows, "fid")
    if series or baselines:
        out.append(Figure("fid_vs_window.png", "FID against the window size of the local blocks; dashed: "
                          "global attention", plots.metric_vs_window_png(windows, series, baselines, "FID")))
    distances = attention_distances(rows)
    if distances:
        out.append(Figure("attention_distance.png", "Mean attention distance per transformer block",
                          plots.attention_distance_png(distances)))
    return out


# ---------------------------------------------------------------------------------------------
# Reproducibility: models trained on disjoint subsets, sampled from the same noise


def disjoint_pairs(trials: list[TrialResult]) -> dict[str, list[tuple[TrialResult, TrialResult]]]:
    """Finished trials with `data.disjoint` that differ only in `data.shuffle_seed`, grouped by the
    configuration they share (labelled by their other axis values)."""
    groups: dict[tuple, list[TrialResult]] = {}
    for trial in trials:
        if trial.finished and trial.params.get("data.disjoint") == "True":
            shared = tuple(sorted((k, v) for k, v in trial.params.items() if k != "data.shuffle_seed"))
            groups.setdefault(shared, []).append(trial)
    pairs = {}
    for members in groups.values():
        if len(members) > 1:
            label = "·".join(axis_label(k, v) for k, v in members[0].axes.items() if k != "data.shuffle_seed")
            pairs[label or "all trials"] = list(itertools.combinations(members, 2))
    return pairs


def reproducibility_lines(data: SweepData) -> list[str]:
    return [
        f"reproducibility {label}: {statistics.fmean(scores):.3f} (mean sample correlation over "
        f"{len(scores)} pair(s) of models trained on disjoint subsets, same noise)"
        for label, scores in data.reproducibility.items()
    ]


def gahb_inputs(data: SweepData, rows: list[ConfigRow]):
    """What orchestrator.report_jacobian reads: the configurations, disjoint pairs and fetched analyses."""
    from orchestrator import report_jacobian

    configurations = [
        report_jacobian.Configuration(
            label=row_label(row), label_without_size=row_label(row, SIZE_PARAMS),
            size=None if data_size(row) is None else data_size(row)[0], trials=row.finished,
            distances=next(iter(attention_distances([row]).values()), []),
        )
        for row in rows
    ]
    return report_jacobian.Inputs(configurations, data.trials, disjoint_pairs(data.trials), data.jacobians,
                                  data.attention_queries)


def notes(data: SweepData) -> list[str]:
    """Trials left out of the statistics, and where cached results came from."""
    from orchestrator import report_jacobian

    rows = configuration_rows(data.trials, data.axes)
    lines = reproducibility_lines(data) + report_jacobian.note_lines(gahb_inputs(data, rows))
    lines += [f"{t.name}: {t.status.lower()}, not in the statistics" for t in data.trials if not t.finished]
    lines += [f"{t.name}: {metric} is {value}, left out of the statistics (its pairs are dropped and counted)"
              for t in data.trials if t.finished for metric, value in t.metrics.items()
              if metric in METRICS and not math.isfinite(value)]
    cached = sum(t.cached for t in data.trials)
    if cached:
        lines.append(f"{cached} trial(s) reuse FINISHED runs of earlier sweeps of experiment {data.experiment_name!r}")
    return lines


def summary_line(data: SweepData) -> str:
    finished = sum(t.finished for t in data.trials)
    return (f"Sweep `{data.sweep_id}` of experiment `{data.experiment_name}` ({data.status}): "
            f"{finished} of {len(data.trials)} trials finished; parent run `{data.parent_run_id}`.")


def grid_filename(label: str, name: str) -> str:
    return f"grid_{metric_name_part(label)}_{name}"


MEMORIZATION_NOTE = (
    "mem_copy_fraction: the share of samples whose nearest training image is much closer than the second "
    "nearest (d1/d2 < 1/3; Yoon et al. 2023, Gu et al. 2023); mem_closer_to_train: the share of samples nearer "
    "to a training image than to any of as many held-out images (size-matched references: 0.5 = no "
    "preference, 1 = every sample nearer to the training set); mem_nn_train, mem_nn_test: mean RMS distance to "
    "the nearest training image and to the nearest of the size-matched held-out images.")


def markdown_page(data: SweepData, table: list[list[str]], figs: list[Figure],
                  compared: PairedTables | None = None) -> str:
    parts = [f"# Sweep {data.sweep_id}", "", summary_line(data), "",
             "Mean ± sample std over seeds and shuffles; the 95% intervals are Student-t intervals of the mean "
             f"over them (scipy.stats.t). {MEMORIZATION_NOTE}", "", table_markdown(table)]
    if compared:
        parts += [compared.markdown(data)]
    parts += [f"![{fig.caption}]({fig.filename})\n" for fig in figs]
    for grid in data.grids:
        parts += [f"![{grid.label}: {name}]({grid_filename(grid.label, name)})\n" for name in grid.files]
    parts += [f"- {line}" for line in notes(data)]
    return "\n".join(parts).rstrip() + "\n"


def _img(grid: "SampleGrid", name: str, css: str) -> str:
    e = html.escape
    payload = base64.b64encode(grid.files[name]).decode()
    return (f'<img class="{css}" alt="{e(grid.label)} {e(name)}" title="{e(name)}" '
            f'src="data:image/png;base64,{payload}">')


def grids_html(data: SweepData) -> str:
    """The sample grids at one size in a configuration x N layout, each labelled; below them, at the
    smallest N, each sample beside its nearest training image."""
    from trainer.memorization import PAIRS_PNG
    from trainer.sampling import GRID_PNG

    e = html.escape
    if not data.grids:
        return ""
    sizes = list(dict.fromkeys(g.size for g in data.grids))
    configurations = list(dict.fromkeys(g.configuration for g in data.grids))
    cell = {(g.configuration, g.size): g for g in data.grids}
    head = "".join(f"<th>{e(size or 'samples')}</th>" for size in sizes)
    body = []
    for configuration in configurations:
        cells = []
        for size in sizes:
            grid = cell.get((configuration, size))
            cells.append("<td></td>" if grid is None or GRID_PNG not in grid.files else
                         f"<td><figure>{_img(grid, GRID_PNG, 'grid')}<figcaption>{e(grid.label)}</figcaption>"
                         "</figure></td>")
        body.append(f"<tr><th>{e(configuration)}</th>{''.join(cells)}</tr>")
    pairs = "".join(f"<figure>{_img(g, PAIRS_PNG, 'pairs')}<figcaption>{e(g.label)}: each sample (left) beside its "
                    "nearest training image</figcaption></figure>" for g in data.grids if PAIRS_PNG in g.files)
    return ("<h2>Samples</h2>\n<p>One sample grid per configuration (its first seed and shuffle, the same fixed "
            "noise everywhere), rows: configuration, columns: training images N.</p>\n"
            f'<table class="grids"><thead><tr><th>configuration</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>\n" + (f"<h3>Nearest training images (smallest N)</h3>\n{pairs}"
                                                             if pairs else ""))


def html_page(data: SweepData, table: list[list[str]], figs: list[Figure],
              compared: PairedTables | None = None) -> str:
    """One self-contained page that reads at 1400 px without sideways scrolling: the plots are embedded
    as base64 PNG, table cells wrap."""
    e = html.escape
    paired_html = ""
    if compared:
        paired_html = (f"<h2>Paired differences against the baseline</h2>\n<p>{e(baseline_text(data.compare, data.axes))}."
                       f"</p>\n<p>{e(paired.multiplicity_text(compared.rows))}</p>\n{table_html(compared.primary)}")
        if compared.secondary:
            paired_html += (f"\n<h3>Secondary metrics ({e(paired.UNADJUSTED)})</h3>\n{table_html(compared.secondary)}"
                            "\n<p>Every metric with its p values and dropped pairs: paired.csv.</p>")
    images = "\n".join(
        f'<figure><img alt="{e(fig.caption)}" src="data:image/png;base64,{base64.b64encode(fig.png).decode()}">'
        f"<figcaption>{e(fig.caption)}</figcaption></figure>"
        for fig in figs
    )
    note_items = "".join(f"<li>{e(line)}</li>" for line in notes(data))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{e(f"ditsweep report {data.sweep_id}")}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1360px; }}
table {{ border-collapse: collapse; font-size: 0.85em; max-width: 100%; margin: 0.5em 0 1em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; overflow-wrap: break-word; }}
th {{ background: #f3f3f3; }}
td:first-child, th:first-child {{ text-align: left; }}
figure {{ display: inline-block; margin: 0.5em 1em 0 0; vertical-align: top; }}
figcaption {{ font-size: 0.85em; max-width: 640px; }}
img {{ max-width: 100%; }}
img.grid {{ image-rendering: pixelated; width: 160px; }}
img.pairs {{ image-rendering: pixelated; width: 320px; }}
table.grids td {{ text-align: center; }}
table.grids figure {{ margin: 0; }}
</style>
</head>
<body>
<h1>{e(f"Sweep {data.sweep_id}")}</h1>
<p>{e(summary_line(data).replace("`", ""))}</p>
<p>Mean ± sample standard deviation over seeds and shuffles; the 95% intervals are Student-t intervals
of the mean over them (scipy.stats.t). {e(MEMORIZATION_NOTE)} Generated
{e(datetime.now().strftime("%Y-%m-%d %H:%M"))}.</p>
{table_html(table)}
{paired_html}
<ul>{note_items}</ul>
{images}
{grids_html(data)}
</body>
</html>
"""


def forest_figure(compared: PairedTables | None) -> list[Figure]:
    """The forest plot of the primary metric's paired differences, when there is one."""
    if not compared or not compared.forest:
        return []
    from orchestrator import plots

    return [Figure(FOREST_PNG, "Paired difference in PSNR gap (configuration − baseline) with its 95% interval "
                   "(per comparison), grouped by training images N; red: a Holm-adjusted verdict (lower/higher), grey: no "
                   "clear difference, hollow: one pair (no interval); zero line: no difference",
                   plots.forest_png(compared.forest, "Δ PSNR gap, configuration − baseline (dB)"))]


def build_report(data: SweepData) -> dict[str, bytes]:
    """File name -> contents: report.md, report.csv, report.html, paired.csv/.md and the PNG plots."""
    from orchestrator import report_jacobian

    rows = configuration_rows(data.trials, data.axes)
    metrics = present_metrics(data.trials)
    table = display_table(rows, data.axes, metrics)
    compared = paired_tables(data)
    extra = report_jacobian.section(gahb_inputs(data, rows))  # Jacobian eigenbases; attention locality
    figs = forest_figure(compared) + figures(rows) + [Figure(*figure) for figure in extra.figures]
    files = {
        "report.md": markdown_page(data, table, figs, compared).encode(),
        "report.csv": table_csv(rows, data.axes, metrics).encode(),
        "report.html": html_page(data, table, figs, compared).encode(),
    }
    if compared:
        files["paired.csv"] = paired.paired_csv(compared.rows, paired_metrics(data)).encode()
        files["paired.md"] = compared.markdown(data).encode()
    files.update({fig.filename: fig.png for fig in figs})
    files.update(extra.files)
    for grid in data.grids:
        files.update({grid_filename(grid.label, name): png for name, png in grid.files.items()})
    return files


REPORT_FILES = ("report.md", "report.csv", "report.html", "paired.csv", "paired.md")


def is_report_file(path: Path) -> bool:
    from orchestrator.report_jacobian import FILES as JACOBIAN_FILES

    return path.is_file() and (path.name in REPORT_FILES + JACOBIAN_FILES or path.suffix == ".png")


def write_report(files: dict[str, bytes], out: Path) -> Path:
    """Write into a staging folder beside `out`, then swap it in: a failure leaves no half report.
    An existing `out` is replaced only when it holds nothing but an earlier report's files."""
    target = Path(out).resolve()
    if target.exists() and not target.is_dir():
        raise ReportError(f"--out {out} is a file; give a folder")
    if target.is_dir() and not all(is_report_file(p) for p in target.iterdir()):
        raise ReportError(f"--out {out} holds files that are not a ditsweep report; give a new or empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; a report is for sharing
        for name, payload in files.items():
            (staging / name).write_bytes(payload)
        if target.exists():
            previous = target.with_name(f".{target.name}.old-{secrets.token_hex(3)}")
            target.rename(previous)
            staging.rename(target)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Path(out)


# ---------------------------------------------------------------------------------------------
# MLflow


def fetch_sweep(tracker: Tracker, sweep_id: str) -> SweepData:
    """The sweep's trials from its trials.json: its own child runs and the cached runs it reused."""
    from orchestrator import report_jacobian

    parent = tracker.find_sweep(sweep_id)
    parent_id = parent.run_id
    if "trials.json" not in tracker.artifact_names(parent_id):
        raise ReportError(f"sweep {sweep_id} has no trials.json on its run {parent_id}; it cannot be reported")
    manifest = json.loads(tracker.read_text(parent_id, "trials.json"))
    children = {run.trial_key: run for run in tracker.sweep_trials(parent)}
    trials = []
    for entry in manifest:
        cached = bool(entry.get("cached_run"))
        run = tracker.find_run(entry["cached_run"]) if cached else children.get(entry["key"])
        trials.append(_trial_result(tracker, entry, run, cached))
    return SweepData(
        sweep_id=sweep_id,
        experiment_id=parent.experiment_id,
        experiment_name=tracker.experiment_name(parent.experiment_id),
        parent_run_id=parent_id,
        status=parent.status,
        axes=list(manifest[0]["axes"]) if manifest else [],
        trials=trials,
        reproducibility=_reproducibility(tracker, trials),
        compare=_compare_of(tracker, parent_id),
        grids=_sample_grids(tracker, trials, list(manifest[0]["axes"]) if manifest else []),
        **report_jacobian.fetch(tracker, trials),
    )


def _compare_of(tracker: Tracker, parent_id: str) -> Compare:
    """The pairing the sweep's spec asked for (its stored spec.yaml); the default when it has none."""
    if "spec.yaml" not in tracker.artifact_names(parent_id):
        return Compare()
    try:
        return parse_spec(tracker.read_text(parent_id, "spec.yaml"), "the sweep's spec.yaml").compare
    except SpecError:
        return Compare()


def _sample_grids(tracker: Tracker, trials: list[TrialResult], axes: list[str]) -> list[SampleGrid]:
    """The sample grid of each configuration's first finished trial, with the nearest-training grid too
    at the smallest data size."""
    from trainer.memorization import PAIRS_PNG
    from trainer.sampling import GRID_PNG

    rows = configuration_rows(trials, axes)
    sizes = [size[0] for row in rows if (size := data_size(row)) is not None]
    smallest = min(sizes) if sizes else None
    grids = []
    for row in rows:
        first = next((t for t in row.finished if t.run_id), None)
        if first is None:
            continue
        names = tracker.artifact_names(first.run_id)
        size = data_size(row)
        wanted = [GRID_PNG] + ([PAIRS_PNG] if size is not None and size[0] == smallest else [])
        files = {name: tracker.read_bytes(first.run_id, name) for name in wanted if name in names}
        if files:
            size_text = "" if size is None else f"{'N' if size[1].endswith('N') else 'fraction'} = {size[0]:g}"
            grids.append(SampleGrid(row_label(row), row_label(row, SIZE_PARAMS + SEED_AXES), size_text, files))
    return grids


def _reproducibility(tracker: Tracker, trials: list[TrialResult]) -> dict[str, list[float]]:
    """Scores from the `samples.npy` grids (same fixed noise in every trial) of disjoint pairs."""
    import numpy as np

    from trainer.metrics import reproducibility

    samples: dict[str, Any] = {}

    def grid(trial: TrialResult):
        if trial.run_id not in samples:
            names = tracker.artifact_names(trial.run_id)
            payload = tracker.read_bytes(trial.run_id, "samples.npy") if "samples.npy" in names else None
            samples[trial.run_id] = np.load(io.BytesIO(payload)) if payload else None
        return samples[trial.run_id]

    scores: dict[str, list[float]] = {}
    for label, pairs in disjoint_pairs(trials).items():
        values = [reproducibility(grid(a), grid(b)) for a, b in pairs
                  if grid(a) is not None and grid(b) is not None and grid(a).shape == grid(b).shape]
        if values:
            scores[label] = values
    return scores


def _trial_result(tracker: Tracker, entry: dict, run: TrialRun | None, cached: bool) -> TrialResult:
    if run is None:
        return TrialResult(name=entry["name"], axes=entry["axes"], status=MISSING, cached=cached)
    run_id = run.run_id
    curve = None
    if run.status == FINISHED and "psnr_curve.csv" in tracker.artifact_names(run_id):
        curve = parse_curve_csv(tracker.read_text(run_id, "psnr_curve.csv"))
    return TrialResult(
        name=entry["name"], axes=entry["axes"], status=run.status, params=dict(run.params),
        metrics=dict(run.metrics), curve=curve, run_id=run_id, cached=cached,
    )


def parse_curve_csv(text: str) -> dict[str, list[float]]:
    columns: dict[str, list[float]] = {}
    for record in csv.DictReader(io.StringIO(text)):
        for key, value in record.items():
            columns.setdefault(key, []).append(float(value))
    return columns


def publish(tracker: Tracker, sweep_id: str, out: Path | None = None) -> tuple[Path, SweepData]:
    """Build the report, write it to `out` (default reports/SWEEP_ID), attach it to the sweep's run
    under report/, and point the experiment's MLflow run table at the sweep's axes and metrics."""
    data = fetch_sweep(tracker, sweep_id)
    folder = write_report(build_report(data), out or REPORTS_DIR / sweep_id)
    tracker.log_folder(data.parent_run_id, folder, REPORT_ARTIFACT_DIR)
    compared = paired_tables(data)
    if compared:
        deltas = list(paired.delta_metrics(compared.rows).items())
        for start in range(0, len(deltas), 500):  # MLflow takes at most 1000 metrics a batch
            tracker.log_metrics(data.parent_run_id, dict(deltas[start : start + 500]), step=0)
    tracker.set_run_table_view(data.experiment_id, RUN_TABLE_VIEW, data.axes, present_metrics(data.trials),
                               ["attention.schedule"])
    return folder, data


def report(sweep_id: str, out: Path | None, tracking_uri: str | None) -> str:
    """`ditsweep report`: what was written, for the terminal."""
    tracker = Tracker(tracking_uri, create=False)
    folder, data = publish(tracker, sweep_id, out)
    names = sorted(p.name for p in folder.iterdir())
    return (f"report of sweep {sweep_id} in {folder}/: {', '.join(names)}\n"
            f"attached to run {data.parent_run_id} under {REPORT_ARTIFACT_DIR}/; open {folder / 'report.html'}")
