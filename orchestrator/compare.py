"""Paired comparisons of configurations against a baseline, with Student-t intervals and Holm's adjustment.

The one pairing engine of ditsweep: the report's paired table, forest plot and the parent run's
`delta.*` metrics all come from `paired_table`.

Each configuration (a grid point without its pairing axes, e.g. `seed`, `data.shuffle_seed`) is compared
with the baseline configuration at the same other axis values (e.g. `attention.placement: none` at the
same `data.num_images`). Trials are matched on the pairing axes, so every difference removes what the
seed or the training subset alone does to a metric. The differences d_1..d_n give

    mean = (1/n) sum d_i,   95% interval = mean ± t_{0.975, n-1} · s / sqrt(n)

(Student 1908; the paired t interval, as `scipy.stats.ttest_rel(...).confidence_interval()`), its
two-sided p value 2·(1 − F_t(|mean| / (s / sqrt(n)); n − 1)), and a verdict in plain words: "lower" or
"higher" when the interval excludes 0, else "no clear difference". With one matched pair there is no
interval; when every difference is equal (s = 0: the interval has zero width) there is no verdict either,
since the data say nothing about the spread. A pair whose difference is not finite (NaN, inf) is dropped
and counted (`dropped`).

Several comparisons of the primary metric are one family: `holm` adjusts their p values (Holm 1979, the
step-down Bonferroni method, as `statsmodels.stats.multitest.multipletests(method="holm")`), and their
verdicts then read "lower"/"higher" only where the adjusted p value is below 1 − confidence. The
intervals stay per comparison.

Pure functions of plain values: no MLflow, no Ray.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Iterable

from trainer.metric_names import PSNR_GAP

CONFIDENCE = 0.95
PRIMARY_METRIC = PSNR_GAP  # its verdicts across a report's comparisons are Holm-adjusted
LOWER, HIGHER, UNCLEAR = "lower", "higher", "no clear difference"
NEEDS_PAIRS = "needs >= 2 matched pairs"
NO_SPREAD = "no verdict: all differences equal"


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
    p_value: float | None = None  # two-sided paired t test of mean = 0; None without a spread (n < 2 or s = 0)
    dropped: int = 0  # pairs left out because their difference was not finite (NaN, inf)
    adjusted_p: float | None = None  # Holm-adjusted p value, where this is one of a family (`holm_adjusted`)
    family: int = 0  # the number of comparisons in that family

    @property
    def zero_width(self) -> bool:
        return self.low is not None and self.low == self.high

    @property
    def verdict(self) -> str:
        if self.low is None or self.high is None:
            return NEEDS_PAIRS
        if self.zero_width:
            return NO_SPREAD
        if self.adjusted_p is not None:
            decided = self.adjusted_p < 1 - CONFIDENCE
            return UNCLEAR if not decided else LOWER if self.mean < 0 else HIGHER
        if self.high < 0:
            return LOWER
        if self.low > 0:
            return HIGHER
        return UNCLEAR


def paired_difference(differences: list[float], confidence: float = CONFIDENCE) -> PairedDifference:
    """Mean and Student-t interval of paired differences: mean ± t_{(1+confidence)/2, n-1} · s / sqrt(n),
    and the two-sided p value of the paired t test. Non-finite differences are dropped and counted.
    The t quantile and CDF are scipy.special's Student t functions, the ones scipy.stats.t calls
    (scipy.stats itself costs a second or more of imports in every process that reports)."""
    from scipy.special import stdtr, stdtrit

    if not differences:
        raise ValueError("no matched pairs")
    finite = [d for d in differences if math.isfinite(d)]
    dropped = len(differences) - len(finite)
    n = len(finite)
    if n == 0:  # every pair dropped: nothing to estimate
        return PairedDifference(0, math.nan, None, None, dropped=dropped)
    mean = statistics.fmean(finite)
    if n < 2:
        return PairedDifference(n, mean, None, None, dropped=dropped)
    sem = statistics.stdev(finite) / math.sqrt(n)
    if sem == 0:  # every difference equal: a zero-width interval, no p value
        return PairedDifference(n, mean, mean, mean, dropped=dropped)
    half = float(stdtrit(n - 1, 0.5 + confidence / 2)) * sem
    p_value = 2.0 * float(stdtr(n - 1, -abs(mean) / sem))
    return PairedDifference(n, mean, mean - half, mean + half, p_value, dropped)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p values (Holm 1979), in the order given: with p_(1) <= ... <= p_(m),
    adjusted p_(i) = max over j <= i of min(1, (m - j + 1) · p_(j))."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> PairedDifference:
    """Mean and Student-t interval of one configuration's values over its seeds and shuffles (the
    one-sample form of the same formula: mean ± t_{0.975, n-1} · s / sqrt(n)); no interval for n < 2.
    For the PSNR gap each value is a difference of means (train images - the fixed held-out images)."""
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
                 pair_on: list[str], metrics: list[str], primary: str | None = PRIMARY_METRIC) -> list[PairedRow]:
    """Every configuration (grid order) against the baseline at the same other axis values.

    `axes` are the grid's axes; `baseline` fixes some of them (e.g. {"attention.placement": "none"});
    trials are matched on the `pair_on` axes. Empty when no trial is a baseline (or the baseline is
    empty: no paired comparison). The `primary` metric's comparisons that have a p value are one family,
    Holm-adjusted (`holm_adjusted`).
    """
    if not baseline:
        return []
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
    return holm_adjusted(rows, primary) if primary else rows


def holm_adjusted(rows: list[PairedRow], metric: str) -> list[PairedRow]:
    """The rows with `metric`'s differences Holm-adjusted as one family: every comparison of it that has a
    p value (n >= 2 and a spread); the others keep their verdict ("needs >= 2 matched pairs", "no verdict")."""
    members = [(i, row.differences[metric]) for i, row in enumerate(rows)
               if metric in row.differences and row.differences[metric].p_value is not None]
    adjusted = holm([diff.p_value for _, diff in members])
    out = list(rows)
    for (index, diff), p in zip(members, adjusted):
        row = out[index]
        changed = dataclasses.replace(diff, adjusted_p=p, family=len(members))
        out[index] = dataclasses.replace(row, differences={**row.differences, metric: changed})
    return out
