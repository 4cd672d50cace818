"""Paired comparisons of configurations against a baseline, with Student-t intervals.

Each configuration (a grid point without its pairing axes, e.g. `seed`, `data.shuffle_seed`) is compared
with the baseline configuration at the same other axis values (e.g. `attention.placement: none` at the
same `data.num_images`). Trials are matched on the pairing axes, so every difference removes what the
seed or the training subset alone does to a metric. The differences d_1..d_n give

    mean = (1/n) sum d_i,   95% interval = mean ± t_{0.975, n-1} · s / sqrt(n)

(Student 1908; the paired t interval, as `scipy.stats.ttest_rel(...).confidence_interval()`), and a
verdict in plain words: "lower" or "higher" when the interval excludes 0, else "no clear difference".
With one matched pair there is no interval.

Pure functions of plain values: no MLflow, no Ray.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable

CONFIDENCE = 0.95
LOWER, HIGHER, UNCLEAR = "lower", "higher", "no clear difference"
NEEDS_PAIRS = "needs >= 2 matched pairs"


@dataclass(frozen=True)
class Observation:
    """One trial as the comparison sees it: its axis values and its final metrics."""

    axes: dict[str, Any]
    metrics: dict[str, float]


@dataclass(frozen=True)
class PairedDifference:
    """The paired difference (configuration - baseline) of one metric over n matched pairs."""

    n: int
    mean: float
    low: float | None  # the interval's bounds; None with fewer than 2 pairs
    high: float | None

    @property
    def verdict(self) -> str:
        if self.low is None or self.high is None:
            return NEEDS_PAIRS
        if self.high < 0:
            return LOWER
        if self.low > 0:
            return HIGHER
        return UNCLEAR


def paired_difference(differences: list[float], confidence: float = CONFIDENCE) -> PairedDifference:
    """Mean and Student-t interval of paired differences: mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n).
    The t quantile is scipy.special's inverse Student t CDF, the function scipy.stats.t.ppf calls
    (scipy.stats itself costs a second or more of imports in every process that reports)."""
    from scipy.special import stdtrit

    n = len(differences)
    if n == 0:
        raise ValueError("no matched pairs")
    mean = statistics.fmean(differences)
    if n < 2:
        return PairedDifference(n, mean, None, None)
    half = float(stdtrit(n - 1, 0.5 + confidence / 2)) * statistics.stdev(differences) / math.sqrt(n)
    return PairedDifference(n, mean, mean - half, mean + half)


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> PairedDifference:
    """Mean and Student-t interval of one configuration's values over its seeds and shuffles (the
    one-sample form of the same formula: mean ± t_{0.975, n-1} · s / sqrt(n)); no interval for n < 2.
    For the PSNR gap each value is itself a paired difference (train - held-out, same noise)."""
    return paired_difference(values, confidence)


@dataclass(frozen=True)
class PairedRow:
    """One configuration of the paired table; `baseline` rows carry no differences."""

    axes: dict[str, Any]  # the configuration's axis values (pairing axes left out)
    baseline: bool
    differences: dict[str, PairedDifference]  # metric -> paired difference (absent: no matched pair)


def _key(axes: dict[str, Any], names: Iterable[str]) -> tuple:
    return tuple(json.dumps(axes.get(name), sort_keys=True) for name in names)


def is_baseline(axes: dict[str, Any], baseline: dict[str, Any]) -> bool:
    return all(json.dumps(axes.get(k), sort_keys=True) == json.dumps(v, sort_keys=True) for k, v in baseline.items())


def paired_table(observations: list[Observation], axes: list[str], baseline: dict[str, Any],
                 pair_on: list[str], metrics: list[str]) -> list[PairedRow]:
    """Every configuration (grid order) against the baseline at the same other axis values.

    `axes` are the grid's axes; `baseline` fixes some of them (e.g. {"attention.placement": "none"});
    trials are matched on the `pair_on` axes. Empty when no trial is a baseline.
    """
    config_axes = [a for a in axes if a not in pair_on]
    context_axes = [a for a in config_axes if a not in baseline]
    pair_axes = [a for a in axes if a in pair_on]
    reference = {
        (_key(o.axes, context_axes), _key(o.axes, pair_axes)): o for o in observations if is_baseline(o.axes, baseline)
    }
    if not reference:
        return []
    groups: dict[tuple, list[Observation]] = {}
    for observation in observations:
        groups.setdefault(_key(observation.axes, config_axes), []).append(observation)
    rows = []
    for members in groups.values():
        config = {a: members[0].axes.get(a) for a in config_axes}
        if is_baseline(config, baseline):
            rows.append(PairedRow(config, True, {}))
            continue
        differences = {}
        for metric in metrics:
            values = []
            for trial in members:
                match = reference.get((_key(trial.axes, context_axes), _key(trial.axes, pair_axes)))
                if match is not None and metric in trial.metrics and metric in match.metrics:
                    values.append(trial.metrics[metric] - match.metrics[metric])
            if values:
                differences[metric] = paired_difference(values)
        rows.append(PairedRow(config, False, differences))
    return rows
