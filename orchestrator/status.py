"""`ditsweep status`: the sweeps of a store, or one sweep's trials and how far each got."""

from __future__ import annotations

import time

from orchestrator.display import format_table, retried_text
from orchestrator.tracking import Tracker, TrialRun, resolve_tracking_uri, store_missing
from trainer.metric_names import LOSS, PSNR_GAP, STEP


def status(sweep_id: str | None, tracking_uri: str | None) -> str:
    uri = resolve_tracking_uri(tracking_uri)
    if sweep_id is None and store_missing(uri):
        return f"no sweeps: no tracking store at {uri!r} yet"  # read-only: the store is not created
    tracker = Tracker(uri, create=False)
    if sweep_id is None:
        return sweeps_table(tracker)
    parent = tracker.find_sweep(sweep_id)
    trials = sorted(tracker.sweep_trials(parent), key=lambda r: r.name)
    rows = [["trial", "status", "retried", STEP, LOSS, PSNR_GAP, "node", "key"]]
    for run in trials:
        m = run.metrics
        rows.append([
            run.name,
            run.status,
            str(run.retries),
            str(int(m[STEP])) if STEP in m else "-",
            f"{m[LOSS]:.4f}" if LOSS in m else "-",
            f"{m[PSNR_GAP]:.3f}" if PSNR_GAP in m else "-",
            node_of(run),
            run.trial_key[:10],
        ])
    header = f"sweep {sweep_id} ({parent.status}): {count_states(trials)}"
    return header + "\n" + format_table(rows)


def node_of(run: TrialRun) -> str:
    """Where the trial last ran: its node's IP and the first 8 characters of its Ray node id (nodes
    can share an IP: several on one machine, or pods behind one address); "-" before its first report."""
    location = run.location
    if "node_id" not in location:
        return "-"
    return f"{location.get('node_ip', '?')} {location['node_id'][:8]}"


def sweeps_table(tracker: Tracker) -> str:
    sweeps = tracker.list_sweeps()
    if not sweeps:
        return f"no sweeps in {tracker.uri}"
    rows = [["sweep", "spec", "status", "started", "trials"]]
    for run in sweeps:
        rows.append([
            run.sweep_id,
            run.spec_name,
            run.status,
            time.strftime("%Y-%m-%d %H:%M", time.localtime(run.start_time / 1000)),
            count_states(tracker.sweep_trials(run)),
        ])
    return format_table(rows)


def count_states(runs: list[TrialRun]) -> str:
    """"3 finished, 1 failed", and "; 2 errors retried" when attempts errored and ran again."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"
    return states + retried_text(sum(run.retries for run in runs), "; ")
