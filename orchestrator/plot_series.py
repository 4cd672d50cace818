"""The report's plots as plain series, and the figures drawn from them: each a function of the
configurations' rows, with its file name and caption; `orchestrator.plots` draws them. A metric nobody
logged gives no figure (not an error).

The rows are the report's `ConfigRow`s, read through the `ConfigRow` protocol below: this module sits
below the report (which imports it) and imports nothing of it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Protocol

from trainer.metric_names import ATTENTION_DISTANCE, FID, PSNR_GAP
from trainer.schedule import GLOBAL


class ConfigRow(Protocol):
    """What the series read of a configuration (orchestrator.report.rows.ConfigRow)."""

    mean: dict[str, float]
    std: dict[str, float | None]
    interval: dict[str, Any]  # metric -> PairedDifference (low, high)

    @property
    def finished(self) -> list[Any]: ...  # its finished trials: curve, metrics

    @property
    def schedule(self) -> str: ...

    @property
    def size(self) -> tuple[float, str] | None: ...

    def label(self, without: tuple[str, ...] = ()) -> str: ...

    def label_without_size(self) -> str: ...

FOREST_PNG = "forest_psnr_gap.png"


def gap_vs_size(rows: list[ConfigRow]) -> tuple[str, dict[str, list[tuple[float, float, float | None]]]]:
    """x label and, per configuration without its size, (size, mean gap, half-width of its 95% Student-t
    interval over seeds and shuffles; None with one trial) points."""
    series: dict[str, list] = {}
    xlabel = "training images N"
    for row in rows:
        size = row.size
        if size is None or PSNR_GAP not in row.mean:
            continue
        xlabel = size[1]
        interval = row.interval[PSNR_GAP]
        half = None if interval.high is None else (interval.high - interval.low) / 2
        series.setdefault(row.label_without_size(), []).append((size[0], row.mean[PSNR_GAP], half))
    return xlabel, series


def step_curves(rows: list[ConfigRow]) -> dict[str, dict[str, tuple[list[float], list[float], list[float]]]]:
    """Per data size, per configuration: (timesteps, mean train PSNR, mean held-out PSNR) over seeds."""
    panels: dict[str, dict] = {}
    for row in rows:
        curves = [t.curve for t in row.finished if t.curve]
        if not curves:
            continue
        curves = [c for c in curves if c.timesteps == curves[0].timesteps]  # same eval steps only
        size = row.size
        title = "all trials" if size is None else f"{size[1]} = {size[0]:g}"
        train = [statistics.fmean(values) for values in zip(*(c.train for c in curves))]
        test = [statistics.fmean(values) for values in zip(*(c.test for c in curves))]
        panels.setdefault(title, {})[row.label_without_size()] = (curves[0].timesteps, train, test)
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
        label = row.label(("attention.windows",))
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
            series[row.label()] = [(block, statistics.fmean(v)) for block, v in sorted(per_block.items())]
    return series


@dataclass
class Figure:
    filename: str
    caption: str
    png: bytes


def figures(rows: list[ConfigRow]) -> list[Figure]:
    """The plots whose data exist; a metric nobody logged gives no plot (not an error)."""
    from orchestrator import plots  # matplotlib: only when a report is drawn

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
    windows, series, baselines = metric_by_window(rows, FID)
    if series or baselines:
        out.append(Figure("fid_vs_window.png", "FID against the window size of the local blocks; dashed: "
                          "global attention", plots.metric_vs_window_png(windows, series, baselines, "FID")))
    distances = attention_distances(rows)
    if distances:
        out.append(Figure("attention_distance.png", "Mean attention distance per transformer block",
                          plots.attention_distance_png(distances)))
    return out


def forest_figure(forest: dict[str, list]) -> list[Figure]:
    """The forest plot of the primary metric's paired differences (orchestrator.paired.forest_series),
    when there is one."""
    if not forest:
        return []
    from orchestrator import plots

    return [Figure(FOREST_PNG, "Paired difference in PSNR gap (configuration − baseline) with its 95% interval "
                   "(per comparison), grouped by training images N; red: a Holm-adjusted verdict (lower/higher), grey: no "
                   "clear difference, hollow: one pair (no interval); zero line: no difference",
                   plots.forest_png(forest, "Δ PSNR gap, configuration − baseline (dB)"))]
