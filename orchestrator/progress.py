"""The driver's view of a running sweep: progress a person can follow, and every trial in MLflow.

`SweepSink` receives trial events from the Ray side (orchestrator.sweep) and is the single writer to
MLflow (through orchestrator.tracking). Nothing here imports Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from orchestrator.spec import Trial
from orchestrator.tracking import FAILED, FINISHED, KILLED, Tracker
from trainer.locality import by_block
from trainer.sampling import GRID_NPY, GRID_PNG
from trainer.train import parse_curve_record

PRINT_EVERY_S = 10.0
LOGGED_METRICS = (
    "loss", "images_per_sec", "psnr_gap", "psnr_train", "psnr_test", "fid", "kid", "kid_std", "resumed_from_step",
)
LOGGED_PREFIXES = ("attn_",)  # per-block attention locality: attn_distance.block_0, attn_local3.block_0, ...
# Files the trainer writes next to each checkpoint, attached to the trial's run when it ends.
CHECKPOINT_ARTIFACTS = (GRID_PNG, GRID_NPY)


def is_logged(key: str) -> bool:
    return key in LOGGED_METRICS or key.startswith(LOGGED_PREFIXES)


@dataclass
class TrialState:
    trial: Trial
    run_id: str | None = None
    status: str = "PENDING"  # PENDING, RUNNING, FINISHED, FAILED, KILLED
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    curve_record: str | None = None
    started_at: float | None = None
    retries: int = 0
    read_checkpoint: Callable[[str], bytes | None] | None = None  # a file of the latest checkpoint, by name
    placement: dict[str, str] | None = None  # where it last reported from: node_id, node_ip, device, ...

    @property
    def progress(self) -> float:
        if self.status == FINISHED:
            return 1.0
        return min(self.step / self.trial.config.train.steps, 1.0) if self.status == "RUNNING" else 0.0


class SweepSink:
    def __init__(self, tracker: Tracker, parent, trials: list[Trial], existing: dict[str, Any]):
        self.tracker = tracker
        self.parent = parent
        self.trials = trials
        self.existing = existing  # trial key -> child run already in MLflow (resume)
        self.states = {t.key: TrialState(t) for t in trials}
        self.start = time.monotonic()
        self.last_print = 0.0

    # -- events from Ray ------------------------------------------------------------------------
    def started(self, key: str) -> None:
        state = self.states[key]
        state.status = "RUNNING"
        state.started_at = state.started_at or time.monotonic()
        self._ensure_run(state)

    def result(self, key: str, metrics: dict[str, Any]) -> None:
        state = self.states[key]
        if state.status == "PENDING":
            self.started(key)
        self._record(state, metrics)
        self.tick()

    def completed(self, key: str) -> None:
        state = self.states[key]
        if state.step < state.trial.config.train.steps:
            return  # stopped early (interrupt): close() marks it KILLED
        self._finish(state, FINISHED)
        elapsed = time.monotonic() - (state.started_at or self.start)
        gap, fid = state.metrics.get("psnr_gap"), state.metrics.get("fid")
        summary = f"psnr_gap={gap:.3f}" if gap is not None else ""
        summary += f" fid={fid:.2f}" if fid is not None else ""
        print(f"  done   {state.trial.name}  {summary}  ({elapsed:.0f}s)", flush=True)
        self.tick(force=True)

    def failed(self, key: str, error: str) -> None:
        state = self.states[key]
        self._ensure_run(state)
        if state.run_id:
            self.tracker.set_tags(state.run_id, {"ditsweep.error": error[:5000]})
        self._finish(state, FAILED)
        print(f"  FAILED {state.trial.name}: {error}", flush=True)
        self.tick(force=True)

    def retrying(self, key: str, error: str) -> None:
        state = self.states[key]
        state.retries += 1
        print(f"  retry  {state.trial.name} (attempt {state.retries + 1}) after: {error}", flush=True)

    def checkpointed(self, key: str, read: Callable[[str], bytes | None]) -> None:
        self.states[key].read_checkpoint = read

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_print < PRINT_EVERY_S:
            return
        self.last_print = now
        print(self.progress_line(), flush=True)

    # -- progress -------------------------------------------------------------------------------
    def progress_line(self) -> str:
        states = list(self.states.values())
        count = {s: sum(1 for t in states if t.status == s) for s in ("RUNNING", FINISHED, FAILED)}
        elapsed = time.monotonic() - self.start
        done = sum(t.progress for t in states if t.status != FAILED) + count[FAILED]
        eta = elapsed * (len(states) - done) / done if done > 0 else float("nan")
        parts = [
            f"[{_clock(elapsed)}] {count[FINISHED]}/{len(states)} done, {count['RUNNING']} running, "
            f"{count[FAILED]} failed, eta {_clock(eta)}"
        ]
        for state in states:
            if state.status == "RUNNING" and state.metrics:
                loss = state.metrics.get("loss")
                parts.append(f"{state.trial.name} step {state.step}" + (f" loss {loss:.4f}" if loss else ""))
        return " | ".join(parts)

    # -- MLflow ---------------------------------------------------------------------------------
    def _ensure_run(self, state: TrialState) -> None:
        if state.run_id is not None:
            return
        from orchestrator.launch import trial_params

        try:
            state.run_id = self.tracker.open_trial(
                self.parent, state.trial.name, state.trial.key, trial_params(state.trial),
                self.existing.get(state.trial.key),
            )
        except Exception as err:  # noqa: BLE001 - server away: try again at the next event
            print(f"[ditsweep] could not open the run of {state.trial.name} yet ({type(err).__name__})", flush=True)

    def _record(self, state: TrialState, metrics: dict[str, Any]) -> None:
        step = int(metrics.get("step", state.step))
        state.step = max(state.step, step)
        values = {k: float(v) for k, v in metrics.items() if is_logged(k)}
        state.metrics.update(values)
        if metrics.get("psnr_curve"):
            state.curve_record = metrics["psnr_curve"]
        self._ensure_run(state)
        if state.run_id and values:
            self.tracker.log_metrics(state.run_id, {**values, "step": step}, step)
        placement = metrics.get("placement")
        if state.run_id and placement and placement != state.placement:  # first report, or moved to another node
            state.placement = placement
            self.tracker.set_tags(state.run_id, {f"ditsweep.{k}": v for k, v in placement.items()})

    def _finish(self, state: TrialState, status: str) -> None:
        state.status = status
        self._ensure_run(state)
        if state.run_id is None:
            return
        texts = {"config.yaml": yaml.safe_dump(state.trial.config.model_dump(mode="json"), sort_keys=False)}
        if state.curve_record:
            from orchestrator.plots import psnr_curve_png

            curve = parse_curve_record(state.curve_record)
            texts["psnr_curve.csv"] = curve.to_csv()
            self.tracker.log_files(state.run_id, {"psnr_curve.png": psnr_curve_png(curve, state.trial.name)})
        self.tracker.log_files(state.run_id, {**self._checkpoint_files(state), **self._locality_plot(state)})
        self.tracker.log_texts(state.run_id, texts)
        self.tracker.end_run(state.run_id, status)

    def _checkpoint_files(self, state: TrialState) -> dict[str, bytes]:
        """The sample grid of the trial's latest checkpoint (absent when sampling is off)."""
        if state.read_checkpoint is None:
            return {}
        files = {}
        for name in CHECKPOINT_ARTIFACTS:
            try:
                payload = state.read_checkpoint(name)
            except Exception as err:  # noqa: BLE001 - a missing picture must not change the trial's outcome
                print(f"[ditsweep] could not read {name} of {state.trial.name}: {type(err).__name__}: {err}", flush=True)
                continue
            if payload is not None:
                files[name] = payload
        return files

    def _locality_plot(self, state: TrialState) -> dict[str, bytes]:
        locality = by_block(state.metrics)
        if not locality:
            return {}
        from orchestrator.plots import attention_locality_png

        return {"attn_locality.png": attention_locality_png(locality, state.trial.config.windows, state.trial.name)}

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
            elif state.step >= state.trial.config.train.steps:
                self._finish(state, FINISHED)
        # Whatever is neither finished nor failed now was stopped (Ctrl-C, or the driver stopping):
        # KILLED, so that `ditsweep resume` continues it from its checkpoint.
        stopped = [s for s in self.states.values() if s.status not in (FINISHED, FAILED)]
        for state in stopped:
            if state.run_id is not None or state.status == "RUNNING":
                self._finish(state, KILLED)
            else:
                state.status = KILLED
        all_finished = all(s.status == FINISHED for s in self.states.values())
        failed = any(s.status == FAILED for s in self.states.values())
        self.tracker.end_run(self.parent.info.run_id, FINISHED if all_finished else (FAILED if failed else KILLED))
        if not self.tracker.flush():
            print("[ditsweep] the tracking server did not come back; `ditsweep resume "
                  f"{self.parent.data.tags['ditsweep.sweep_id']}` writes the results once it does", flush=True)
        states = list(self.states.values())
        print(self.progress_line(), flush=True)
        sweep_id = self.parent.data.tags["ditsweep.sweep_id"]
        if stopped or interrupted:
            print(f"sweep stopped before every trial finished; `ditsweep resume {sweep_id}` continues it", flush=True)
        print(f"sweep {sweep_id}: "
              f"{sum(s.status == FINISHED for s in states)} finished, "
              f"{sum(s.status == FAILED for s in states)} failed, "
              f"{sum(s.status == KILLED for s in states)} killed", flush=True)
        return all_finished


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--:--"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60:02d}:{seconds % 60:02d}"
