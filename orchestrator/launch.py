"""Launch and resume: run a plan's trials on Ray Tune (orchestrator.sweep) with every event recorded
in MLflow (orchestrator.progress -> orchestrator.tracking), then rebuild the sweep's report.

Order matters for "nothing started on bad input": the spec, every trial config, the data, the FID
weights, the storage and the tracking store are all checked before a run is created or Ray is started.
"""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from orchestrator.exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from orchestrator.plan import (
    Plan,
    build_plan,
    check_fid_weights,
    check_storage,
    check_storage_is_shared,
    compute_estimate,
    plan_table,
    read_grid,
    read_grid_file,
    trials_manifest,
)
from orchestrator.progress import SweepSink
from orchestrator.resources import Fit, check_trial_fits, this_machine, trial_request
from orchestrator.spec import SweepSpec
from orchestrator.tracking import FINISHED, Tracker, new_sweep_id, sweep_tags

DEFAULT_PENDING_TIMEOUT_S = 600.0  # how long trials may wait for resources with none running


def launch(
    spec_path: str | Path,
    overrides: list[str],
    *,
    tracking_uri: str | None = None,
    storage: str | None = None,
    address: str | None = None,
    force: bool = False,
    pending_timeout_s: float | None = DEFAULT_PENDING_TIMEOUT_S,
) -> int:
    grid = read_grid_file(spec_path, overrides)
    check_fid_weights(grid.trials)
    check_storage(storage)
    fit = check_resources(grid.spec, address)  # joins the cluster: Ray is reached before MLflow is written
    check_storage_is_shared(storage, address, _alive_node_count)
    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment_id(grid.spec.name)
    plan = build_plan(grid, tracker.finished_trials(experiment), force)
    print(plan_table(plan))
    if not plan.to_run:
        print(f"nothing to run: all {len(plan.trials)} trials already have FINISHED runs "
              f"in experiment {plan.spec.name!r} (--force reruns them)")
        return EXIT_OK

    sweep_id = new_sweep_id(plan.spec.name)
    parent = tracker.start_sweep(
        experiment,
        sweep_id,
        name=f"sweep {sweep_id}",
        tags=sweep_tags(spec_name=plan.spec.name, description=plan.spec.description, storage=storage,
                        overrides=list(plan.overrides), force=plan.force, git_commit=_git_commit()),
        params={
            "spec": plan.spec.name,
            "trials": len(plan.trials),
            "trials_cached": len(plan.trials) - len(plan.to_run),
            "max_failures": plan.spec.max_failures,
            "resources.cpu": plan.spec.resources.cpu,
            "resources.gpu": plan.spec.resources.gpu,
        },
        texts={
            "spec.yaml": plan.spec_text,
            "plan.txt": plan_table(plan) + "\n\n" + compute_estimate(plan) + "\n",
            "trials.json": json.dumps(trials_manifest(plan), indent=2),
            "versions.json": json.dumps(_versions(), indent=2),
        },
    )
    print(f"sweep {sweep_id}: {len(plan.to_run)} trials to run, tracking {tracker.uri}")
    if fit.message:
        print(fit.message, flush=True)
    sink = SweepSink(tracker, parent, plan.to_run, existing={})
    sink.console.waiting = fit.message
    return _run(plan, sink, sweep_id, storage, address, restore=False, pending_timeout_s=pending_timeout_s)


def resume(sweep_id: str, *, tracking_uri: str | None = None, address: str | None = None,
           pending_timeout_s: float | None = DEFAULT_PENDING_TIMEOUT_S) -> int:
    """Continue a sweep whose driver died: finished trials stay, the rest continue from checkpoints."""
    tracker = Tracker(tracking_uri, create=False)
    parent = tracker.find_sweep(sweep_id)
    spec_text = tracker.read_text(parent.run_id, "spec.yaml")
    plan = build_plan(read_grid(spec_text, "the sweep's stored spec", parent.overrides), force=parent.force)
    check_fid_weights(plan.trials)
    check_storage_is_shared(parent.storage, address, _alive_node_count)
    manifest = json.loads(tracker.read_text(parent.run_id, "trials.json"))
    wanted = {t["key"] for t in manifest if not t.get("cached_run")}
    children = {run.trial_key: run for run in tracker.sweep_trials(parent)}
    remaining = [t for t in plan.trials if t.key in wanted and
                 (t.key not in children or children[t.key].status != FINISHED)]
    print(f"resuming sweep {sweep_id}: {len(wanted) - len(remaining)} finished, {len(remaining)} to continue")
    if not remaining:
        tracker.end_run(parent.run_id, FINISHED)
        return EXIT_OK
    fit = check_resources(plan.spec, address)
    tracker.reopen_run(parent.run_id)
    sink = SweepSink(tracker, parent, remaining, existing=children)
    sink.console.waiting = fit.message
    finished = frozenset(key for key, run in children.items() if run.status == FINISHED)
    return _run(plan, sink, sweep_id, parent.storage, address, restore=True, finished=finished,
                pending_timeout_s=pending_timeout_s)


def check_resources(spec: SweepSpec, address: str | None) -> Fit:
    """Can one trial ever get its resources? In-process Ray is this machine (Ray is not started for
    this); with `address` the cluster is joined (bounded) and its nodes and autoscaler node types asked.
    Bad input (exit 2) when nothing can ever hold a trial; Fit("after scale-up", message) when only a
    node the autoscaler can add could."""
    request = trial_request(spec.resources)
    if not address:
        return check_trial_fits(request, this_machine())
    from orchestrator import sweep as tune_sweep

    tune_sweep.init_ray(address)
    return check_trial_fits(request, tune_sweep.describe_cluster())


def _run(plan: Plan, sink: SweepSink, sweep_id: str, storage: str | None, address: str | None,
         restore: bool, finished: frozenset[str] = frozenset(), pending_timeout_s: float | None = None) -> int:
    from orchestrator import sweep as tune_sweep

    records = [tune_sweep.TrialRecord(t.key, t.name, t.config.model_dump(mode="json")) for t in sink.trials]
    interrupted = timed_out = False
    outcome: dict = {}
    try:
        outcome = tune_sweep.run_trials(
            records,
            sweep_id=sweep_id,
            cpu=plan.spec.resources.cpu,
            gpu=plan.spec.resources.gpu,
            max_failures=plan.spec.max_failures,
            storage=storage,
            address=address,
            events=sink,
            restore=restore,
            finished=finished,
            pending_timeout_s=pending_timeout_s,
        )
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: marking unfinished trials KILLED; `ditsweep resume "
              f"{sweep_id}` continues them", flush=True)
    except tune_sweep.PendingTimeout as err:
        timed_out = True
        print(f"\nstopped: {err} (--pending-timeout {pending_timeout_s:g}); unfinished trials are KILLED "
              f"and `ditsweep resume {sweep_id}` continues them once the cluster has the resources", flush=True)
    finally:
        all_finished = sink.close(outcome, interrupted=interrupted or timed_out)
    if interrupted:
        return EXIT_INTERRUPTED
    if not timed_out:
        _refresh_report(sink.tracker, sweep_id)
    return EXIT_OK if all_finished else EXIT_FAILED


def _alive_node_count(address: str) -> int:
    from orchestrator.sweep import alive_node_count

    return alive_node_count(address)


def _refresh_report(tracker: Tracker, sweep_id: str) -> None:
    """Rebuild the sweep's report and attach it to its run. Best effort: never fails the sweep."""
    try:
        from orchestrator.report import publish

        folder, _ = publish(tracker, sweep_id)
        print(f"report: {folder / 'report.html'} (also on the sweep's run under report/)", flush=True)
    except Exception as err:  # noqa: BLE001 - a report problem must not change the sweep's outcome
        print(f"[ditsweep] warning: could not build the report of sweep {sweep_id}: "
              f"{type(err).__name__}: {err}; `ditsweep report {sweep_id}` retries", flush=True)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("ditsweep", "torch", "ray", "mlflow", "pydantic", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
