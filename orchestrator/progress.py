"""The driver's view of a running sweep: Ray's trial events in, trial states moved on, progress
printed, and every trial recorded in MLflow.

`SweepSink` receives trial events from the Ray side (orchestrator.sweep) and is the single writer to
MLflow (through orchestrator.tracking). The trial state machine (orchestrator.trial_state), the
console lines (orchestrator.console) and the run artifacts (orchestrator.artifacts) are each their
own module; this one only wires them. Nothing here imports Ray.
"""

from __future__ import annotations

from typing import Any, Callable

from orchestrator.artifacts import trial_artifacts
from orchestrator.console import ConsoleProgress
from orchestrator.spec import Trial
from orchestrator.run_states import FAILED, FINISHED, KILLED, PENDING, RUNNING
from orchestrator.tracking import SweepRun, Tracker, TrialRun, location_tags, retries_tags
from orchestrator.trial_state import TrialError, TrialState, sweep_status
from trainer.metric_names import STEP


class SweepSink:
    def __init__(self, tracker: Tracker, parent: SweepRun, trials: list[Trial], existing: dict[str, TrialRun]):
        self.tracker = tracker
        self.parent = parent
        self.trials = trials
        self.existing = existing  # trial key -> child run already in MLflow (resume)
        self.states = {t.key: TrialState(t) for t in trials}
        for key, run in existing.items():  # a resumed trial's run keeps counting its retries
            if key in self.states:
                self.states[key].retries = run.retries
        self.console = ConsoleProgress(list(self.states.values()))

    # -- events from Ray ------------------------------------------------------------------------
    def started(self, key: str) -> None:
        state = self.states.get(key)
        if state is None:
            return  # a trial Tune restored that this sweep does not run (the store has it FINISHED)
        state.start()
        self._ensure_run(state)

    def result(self, key: str, metrics: dict[str, Any]) -> None:
        state = self.states.get(key)
        if state is None:
            return
        if state.status == PENDING:
            self.started(key)
        self._record(state, metrics)
        self.tick()

    def completed(self, key: str) -> None:
        state = self.states.get(key)
        if state is None or not state.trained_all_steps:
            return  # stopped early (interrupt): close() marks it KILLED
        self._finish(state, FINISHED)
        self.console.finished(state)

    def failed(self, key: str, error: TrialError) -> None:
        state = self.states.get(key)
        if state is None:
            return
        state.last_error = error
        self._ensure_run(state)
        if state.run_id:
            self.tracker.set_error(state.run_id, f"{error.message} (full text: {error.full_text})")
        self._finish(state, FAILED)
        self.console.failed(state)

    def retrying(self, key: str, error: TrialError) -> None:
        """An attempt errored and Tune starts the trial again (from its last checkpoint)."""
        state = self.states.get(key)
        if state is None:
            return
        state.retries += 1
        state.last_error = error
        self._ensure_run(state)
        if state.run_id:
            self.tracker.set_tags(state.run_id, retries_tags(state.retries))
        self.console.retrying(state)

    def checkpointed(self, key: str, read: Callable[[str], bytes | None]) -> None:
        if key in self.states:
            self.states[key].read_checkpoint = read

    def located(self, key: str, location: dict[str, str]) -> None:
        """Where the trial reports from; its run's tags follow it when it moves to another node."""
        state = self.states[key]
        self._ensure_run(state)
        if state.run_id and state.locate(location):
            self.tracker.set_tags(state.run_id, location_tags(location))

    def tick(self, force: bool = False) -> None:
        self.console.tick(force)

    def progress_line(self) -> str:
        return self.console.line()

    # -- MLflow ---------------------------------------------------------------------------------
    def _ensure_run(self, state: TrialState) -> None:
        if state.run_id is not None:
            return
        try:
            state.run_id = self.tracker.open_trial(
                self.parent, state.trial.name, state.trial.key, state.trial.params,
                self.existing.get(state.trial.key),
            )
        except Exception as err:  # noqa: BLE001 - server away: try again at the next event
            print(f"[ditsweep] could not open the run of {state.trial.name} yet ({type(err).__name__})", flush=True)

    def _record(self, state: TrialState, metrics: dict[str, Any]) -> None:
        step, values = state.record(metrics)
        self._ensure_run(state)
        if state.run_id and values:
            self.tracker.log_metrics(state.run_id, {**values, STEP: step}, step)

    def _finish(self, state: TrialState, status: str) -> None:
        state.status = status
        self._ensure_run(state)
        if state.run_id is None:
            return
        artifacts = trial_artifacts(state)
        self.tracker.log_files(state.run_id, artifacts.files)
        self.tracker.log_texts(state.run_id, artifacts.texts)
        self.tracker.log_series(state.run_id, artifacts.series)
        self.tracker.log_images(state.run_id, artifacts.images, step=state.step)
        self.tracker.end_run(state.run_id, status)

    def close(self, outcome: dict[str, Any], interrupted: bool) -> bool:
        """Reconcile with Tune's final results, end every run, flush; True when all trials finished."""
        for key, state in self.states.items():
            result = outcome.get(key)
            if state.status in (FINISHED, FAILED) or result is None:
                continue
            if result.metrics:
                self._record(state, result.metrics)
            if result.status == "ERROR":
                self._finish(state, FAILED)
            elif state.trained_all_steps:
                self._finish(state, FINISHED)
        # Whatever is neither finished nor failed now was stopped (Ctrl-C, or the driver stopping):
        # KILLED, so that `ditsweep resume` continues it from its checkpoint.
        stopped = [s for s in self.states.values() if s.status not in (FINISHED, FAILED)]
        for state in stopped:
            if state.run_id is not None or state.status == RUNNING:
                self._finish(state, KILLED)
            else:
                state.status = KILLED
        states = list(self.states.values())
        status = sweep_status(states)
        self.tracker.end_run(self.parent.run_id, status)
        delivered = self.tracker.flush()
        self.console.closed(self.parent.sweep_id, stopped=bool(stopped) or interrupted, delivered=delivered)
        return status == FINISHED
