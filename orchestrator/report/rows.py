"""The report's records and statistics: each trial as the report reads it (`TrialResult`), the sweep
(`SweepData`), and one `ConfigRow` per configuration with its mean, sample standard deviation and 95%
interval over seeds and shuffles; the disjoint pairs whose samples score reproducibility."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator import paired
from orchestrator.compare import PairedDifference, mean_interval
from orchestrator.spec import Compare, axis_label
from trainer.metric_names import (FID, KID, MEMORIZATION_CLOSER_TO_TRAIN, MEMORIZATION_COPY_FRACTION,
                                  MEMORIZATION_NN_TEST, MEMORIZATION_NN_TRAIN, PSNR_GAP, PSNR_TEST, PSNR_TRAIN)

if TYPE_CHECKING:
    from trainer.records import PsnrCurve
from orchestrator.run_states import FINISHED

SEED_AXES = ("seed", "data.shuffle_seed")  # averaged over, never a configuration of their own
SIZE_PARAMS = paired.SIZE_AXES
METRICS = (PSNR_GAP, MEMORIZATION_COPY_FRACTION, MEMORIZATION_CLOSER_TO_TRAIN, MEMORIZATION_NN_TRAIN, MEMORIZATION_NN_TEST,
           PSNR_TRAIN, PSNR_TEST, FID, KID)
PAIRED_METRICS = (PSNR_GAP, PSNR_TRAIN, PSNR_TEST, MEMORIZATION_COPY_FRACTION, MEMORIZATION_CLOSER_TO_TRAIN, FID)
# Metrics whose per-configuration mean also gets its 95% Student-t interval over seeds and shuffles.
INTERVAL_METRICS = (PSNR_GAP, FID)
MISSING = "MISSING"  # a trial of the manifest without a run (never started, or its run was deleted)


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
    curve: PsnrCurve | None = None  # its psnr_curve.csv
    run_id: str | None = None
    cached: bool = False

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def placement(self) -> str:
        """The attention placement (head, tail, ...) the trial trained with."""
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
    # Run id -> trainer.jacobian.JacobianAnalysis of the trials that saved one (orchestrator.report.jacobian)
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

    def label(self, without: tuple[str, ...] = ()) -> str:
        """The configuration's axis values except `without`, e.g. `head·N1000`; its placement if none left."""
        parts = [axis_label(k, v) for k, v in self.axes.items() if k not in without]
        if parts:
            return "·".join(parts)
        return self.trials[0].placement or "all trials"

    def label_without_size(self) -> str:
        """The label without the training-set size: the configuration as it runs across sizes."""
        return self.label(SIZE_PARAMS)

    @property
    def size(self) -> tuple[float, str] | None:
        """(value, axis label) of the training set size: num_images when set, else the fraction."""
        params = next((t.params for t in self.trials if t.params), {})
        for key, label in (("data.num_images", "training images N"), ("data.fraction", "training fraction of the pool")):
            value = self.axes.get(key, params.get(key))
            if value not in (None, "None", ""):
                return float(value), label
        return None


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
