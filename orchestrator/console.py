"""What a person watching a sweep reads: a progress line every few seconds, a line per trial that
ends, fails or retries, and a closing summary. Reads trial states; changes nothing.

"failed" counts trials that failed for good; an attempt that errored and was retried is counted apart
("2 errors retried"), on the progress line and in the summary, and gets a line of its own when it happens."""

from __future__ import annotations

import time

from orchestrator.display import clock, retried_text
from orchestrator.run_states import FAILED, FINISHED, KILLED, RUNNING
from orchestrator.trial_state import TrialState, counts, retries
from trainer.metric_names import FID, LOSS, PSNR_GAP

PRINT_EVERY_S = 10.0


class ConsoleProgress:
    def __init__(self, states: list[TrialState], print_every_s: float = PRINT_EVERY_S):
        self.states = states
        self.print_every_s = print_every_s
        self.start = time.monotonic()
        self.last_print = 0.0
        self.waiting = ""  # what the sweep waits for while no trial runs, e.g. the cluster scaling up

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_print < self.print_every_s:
            return
        self.last_print = now
        print(self.line(), flush=True)

    def line(self) -> str:
        count = counts(self.states)
        elapsed = time.monotonic() - self.start
        done = sum(t.progress for t in self.states if t.status != FAILED) + count[FAILED]
        eta = elapsed * (len(self.states) - done) / done if done > 0 else float("nan")
        parts = [
            f"[{clock(elapsed)}] {count[FINISHED]}/{len(self.states)} done, {count[RUNNING]} running, "
            f"{count[FAILED]} failed{retried_text(retries(self.states), ', ')}, eta {clock(eta)}"
        ]
        if self.waiting and count[RUNNING] == 0 and count[FINISHED] + count[FAILED] < len(self.states):
            parts.append(self.waiting)
        for state in self.states:
            if state.status == RUNNING and state.metrics:
                loss = state.metrics.get(LOSS)
                parts.append(f"{state.trial.name} step {state.step}" + (f" loss {loss:.4f}" if loss else ""))
        return " | ".join(parts)

    def finished(self, state: TrialState) -> None:
        elapsed = time.monotonic() - (state.started_at or self.start)
        gap, fid = state.metrics.get(PSNR_GAP), state.metrics.get(FID)
        summary = f"psnr_gap={gap:.3f}" if gap is not None else ""
        summary += f" fid={fid:.2f}" if fid is not None else ""
        print(f"  done   {state.trial.name}  {summary}  ({elapsed:.0f}s)", flush=True)
        self.tick(force=True)

    def failed(self, state: TrialState) -> None:
        print(f"  FAILED {state.trial.name}: {errored_attempt(state)}", flush=True)
        self.tick(force=True)

    def retrying(self, state: TrialState) -> None:
        print(f"  retry  {state.trial.name}: {errored_attempt(state)}", flush=True)
        self.tick(force=True)

    def closed(self, sweep_id: str, stopped: bool, delivered: bool) -> None:
        """The closing lines: where every trial ended, and how to continue a sweep that stopped."""
        if not delivered:
            print("[ditsweep] the tracking server did not come back; `ditsweep resume "
                  f"{sweep_id}` writes the results once it does", flush=True)
        print(self.line(), flush=True)
        if stopped:
            print(f"sweep stopped before every trial finished; `ditsweep resume {sweep_id}` continues it", flush=True)
        count = counts(self.states)
        print(f"sweep {sweep_id}: {count[FINISHED]} finished, {count[FAILED]} failed, {count[KILLED]} killed"
              f"{retried_text(retries(self.states), '; ')}", flush=True)


def errored_attempt(state: TrialState) -> str:
    """The trial's last errored attempt in a line: which of how many, what it raised, where the rest is."""
    error = state.last_error
    if error is None:
        return "errored (no details)"
    return f"attempt {error.attempt} of {error.attempts} errored: {error.message}; full text in {error.full_text}"
