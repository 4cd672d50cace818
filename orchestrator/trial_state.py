"""Where each trial of a running sweep stands: PENDING -> RUNNING -> FINISHED, FAILED or KILLED.

Plain state, no output and no tracking: the sweep's sink (orchestrator.progress) moves it on Ray's
events, the console (orchestrator.console) shows it, the run artifacts (orchestrator.artifacts) are
built from it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from orchestrator.spec import Trial
from orchestrator.run_states import ENDED, FAILED, FINISHED, KILLED, PENDING, RUNNING
from trainer.metric_names import PSNR_CURVE, STEP
from trainer.records import SPECTRUM_RECORD, is_trial_metric


@dataclass(frozen=True)
class TrialError:
    """One errored attempt of a trial, as the driver learns of it (orchestrator.sweep builds it)."""

    message: str  # the exception's type and the first line of its message, e.g. "DataError: shard 3 ..."
    attempt: int  # which attempt errored, from 1
    attempts: int  # the most attempts the trial gets: the spec's max_failures + 1
    full_text: str  # where the whole traceback is kept: Tune's error.txt in the trial's folder of --storage


@dataclass
class TrialState:
    trial: Trial
    run_id: str | None = None
    status: str = PENDING  # PENDING, RUNNING, FINISHED, FAILED, KILLED
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # the latest value of each trial metric
    curve_record: str | None = None
    spectrum_record: str | None = None  # trainer.jacobian's mean eigenvalues by rank, per timestep
    started_at: float | None = None  # time.monotonic()
    retries: int = 0  # errored attempts that were retried (a resumed trial starts from its run's count)
    last_error: TrialError | None = None
    read_checkpoint: Callable[[str], bytes | None] | None = None  # a file of the latest checkpoint, by name
    location: dict[str, str] | None = None  # where it last reported from: node_id, node_ip, device, ...

    @property
    def progress(self) -> float:
        """Share of the trial's training done: 1 when finished, 0 unless running."""
        if self.status == FINISHED:
            return 1.0
        return min(self.step / self.trial.config.train.steps, 1.0) if self.status == RUNNING else 0.0

    @property
    def trained_all_steps(self) -> bool:
        return self.step >= self.trial.config.train.steps

    def start(self) -> None:
        self.status = RUNNING
        self.started_at = self.started_at or time.monotonic()

    def record(self, reported: dict[str, Any]) -> tuple[int, dict[str, float]]:
        """Take in what the trial reported; returns (its step, the metrics to log)."""
        step = int(reported.get(STEP, self.step))
        self.step = max(self.step, step)
        values = {k: float(v) for k, v in reported.items() if is_trial_metric(k)}
        self.metrics.update(values)
        if reported.get(PSNR_CURVE):
            self.curve_record = reported[PSNR_CURVE]
        if reported.get(SPECTRUM_RECORD):
            self.spectrum_record = reported[SPECTRUM_RECORD]
        return step, values

    def locate(self, location: dict[str, str]) -> bool:
        """Take in where the trial reports from; True when that is new (its first report, or another node)."""
        if location == self.location:
            return False
        self.location = dict(location)
        return True


def sweep_status(states: list[TrialState]) -> str:
    """The sweep's run status once its trials ended: FINISHED if all finished, FAILED if one failed, else KILLED."""
    if all(s.status == FINISHED for s in states):
        return FINISHED
    return FAILED if any(s.status == FAILED for s in states) else KILLED


def counts(states: list[TrialState]) -> dict[str, int]:
    return {status: sum(s.status == status for s in states) for status in (PENDING, RUNNING, *ENDED)}


def retries(states: list[TrialState]) -> int:
    """Errored attempts that were retried, over all trials."""
    return sum(s.retries for s in states)
