"""A sweep read back from MLflow (through orchestrator.tracking) as `SweepData`: the trials of its
trials.json (its own child runs and the cached runs it reused), their PSNR curves, the spec's pairing,
one sample grid per configuration, reproducibility scores and the Jacobian section's analyses."""

from __future__ import annotations

import io
import json
from typing import Any

from orchestrator.report.jacobian import fetch as fetch_analyses
from orchestrator.report.rows import (MISSING, SEED_AXES, SIZE_PARAMS, ReportError, SampleGrid, SweepData,
                                      TrialResult, configuration_rows, disjoint_pairs)
from orchestrator.spec import Compare, SpecError, parse_spec
from orchestrator.run_states import FINISHED
from orchestrator.tracking import Tracker, TrialRun
from trainer.records import PSNR_CURVE_CSV, PsnrCurve


def fetch_sweep(tracker: Tracker, sweep_id: str) -> SweepData:
    """The sweep's trials from its trials.json: its own child runs and the cached runs it reused."""
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
        **fetch_analyses(tracker, trials),
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
    from trainer.records import GRID_PNG

    rows = configuration_rows(trials, axes)
    sizes = [row.size[0] for row in rows if row.size is not None]
    smallest = min(sizes) if sizes else None
    grids = []
    for row in rows:
        first = next((t for t in row.finished if t.run_id), None)
        if first is None:
            continue
        names = tracker.artifact_names(first.run_id)
        size = row.size
        wanted = [GRID_PNG] + ([PAIRS_PNG] if size is not None and size[0] == smallest else [])
        files = {name: tracker.read_bytes(first.run_id, name) for name in wanted if name in names}
        if files:
            size_text = "" if size is None else f"{'N' if size[1].endswith('N') else 'fraction'} = {size[0]:g}"
            grids.append(SampleGrid(row.label(), row.label(SIZE_PARAMS + SEED_AXES), size_text, files))
    return grids


def _reproducibility(tracker: Tracker, trials: list[TrialResult]) -> dict[str, list[float]]:
    """Scores from the `samples.npy` grids (same fixed noise in every trial) of disjoint pairs."""
    by_label = disjoint_pairs(trials)
    if not by_label:  # most sweeps: no need for torch (trainer.metrics) in the report
        return {}
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
    for label, pairs in by_label.items():
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
    if run.status == FINISHED and PSNR_CURVE_CSV in tracker.artifact_names(run_id):
        curve = PsnrCurve.from_csv(tracker.read_text(run_id, PSNR_CURVE_CSV))
    return TrialResult(
        name=entry["name"], axes=entry["axes"], status=run.status, params=dict(run.params),
        metrics=dict(run.metrics), curve=curve, run_id=run_id, cached=cached,
    )
