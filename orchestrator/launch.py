"""Launch and resume: run a plan's trials on Ray Tune (orchestrator.sweep) with every event recorded
in MLflow (orchestrator.progress -> orchestrator.tracking), then rebuild the sweep's report.

Order matters for "nothing started on bad input": the spec, every trial config, the data, the FID
weights and the storage are all checked before Ray is started, and the tracking store before a run is
created. The in-process Ray starts in the background (ray_connect.start_local_ray) while the launch
goes on, as early as it is known to be needed (see `launch`); the sweep waits for it before its first trial.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator import adaptive
from orchestrator.adaptive import StoppingRule
from orchestrator.display import accepted_line
from orchestrator.exit_codes import EXIT_FAILED, EXIT_OK
from orchestrator.interrupt import INTERRUPTED_EXIT_CODES, interrupted_exit_code
from orchestrator.plan import (
    Grid,
    Plan,
    build_plan,
    check_data,
    check_fid_weights,
    check_storage,
    check_storage_is_shared,
    compute_estimate,
    plan_table,
    read_grid,
    read_grid_file,
    trials_manifest,
)
from orchestrator.resources import Fit, check_trial_fits, this_machine, trial_request
from orchestrator.spec import SweepSpec, Trial, expand, new_sweep_id
from orchestrator.run_states import FAILED, FINISHED, KILLED
from orchestrator.tracking import SweepRun, Tracker, is_new_store, sweep_tags

if TYPE_CHECKING:
    from orchestrator.progress import SweepSink

DEFAULT_PENDING_TIMEOUT_S = 600.0  # how long trials may wait for resources with none running
# The compute estimate in a sweep's plan.txt times a few training steps only when they are at most this
# share of the sweep's training (for a sweep of a few steps they cost more than its trials).
ESTIMATE_MAX_SHARE = 0.01


def launch(
    spec_path: str | Path,
    overrides: list[str],
    *,
    tracking_uri: str | None = None,
    storage: str | None = None,
    address: str | None = None,
    force: bool = False,
    pending_timeout_s: float | None = DEFAULT_PENDING_TIMEOUT_S,
    until_confident: StoppingRule | None = None,
) -> int:
    grid = read_grid_file(spec_path, overrides)
    if until_confident is not None:
        adaptive.check_spec(grid.spec)
        if until_confident.max_added_trials is None:
            until_confident = dataclasses.replace(until_confident, max_added_trials=len(grid.trials))
    check_fid_weights(grid.trials)
    check_storage(storage)
    fit = check_resources(grid.spec, address)  # joins the cluster: Ray is reached before MLflow is written
    check_storage_is_shared(storage, address, _alive_node_count)
    # Into a new store every trial runs: the in-process Ray starts now, while MLflow loads and the store is
    # made (what can refuse then, MLflow's own open of the store, ends it again). Otherwise it starts once
    # the plan shows trials to run: a relaunch whose trials are all cached never waits for Ray.
    early = not address and is_new_store(tracking_uri)
    if early:
        _start_ray_meanwhile()
    try:
        tracker = Tracker(tracking_uri)
        experiment = tracker.experiment_id(grid.spec.name)
        plan = build_plan(grid, tracker.finished_trials(experiment), force)
    except BaseException:
        _end_unused_ray(early)
        raise
    print(plan_table(plan))
    if not plan.to_run and until_confident is None:
        _end_unused_ray(early)
        print(f"nothing to run: all {len(plan.trials)} trials already have FINISHED runs "
              f"in experiment {plan.spec.name!r} (--force reruns them)")
        return EXIT_OK

    ray_started = early or bool(plan.to_run and not address)
    if ray_started and not early:
        _start_ray_meanwhile()
    try:
        sweep_id, parent, sink = _open_sweep(tracker, experiment, plan, storage, fit)
    except BaseException:
        _end_unused_ray(ray_started)
        raise
    if until_confident is None:
        return _run(plan, sink, sweep_id, storage, address, restore=False, pending_timeout_s=pending_timeout_s)
    rounds = Rounds(tracker, parent, plan, until_confident, storage, address, pending_timeout_s)
    rounds.save([])  # from the start, so that `resume` after a driver died in the grid continues the rounds
    code = _run(plan, sink, sweep_id, storage, address, restore=False, pending_timeout_s=pending_timeout_s,
                report=False) if plan.to_run else EXIT_OK
    return rounds.run(code, stopped=_stopped(sink))


def resume(sweep_id: str, *, tracking_uri: str | None = None, address: str | None = None,
           pending_timeout_s: float | None = DEFAULT_PENDING_TIMEOUT_S) -> int:
    """Continue a sweep whose driver died: finished trials stay, the rest continue from checkpoints."""
    tracker = Tracker(tracking_uri, create=False)
    parent = tracker.find_sweep(sweep_id)
    spec_text = tracker.read_text(parent.run_id, "spec.yaml")
    grid = read_grid(spec_text, "the sweep's stored spec", parent.overrides)
    state = Rounds.stored_state(tracker, parent)  # a sweep launched with --until-confident
    if state is not None:  # its added shuffles are trials of the sweep too
        spec = adaptive.extended_spec(grid.spec, state[1])
        grid = Grid(spec, spec_text, grid.overrides, tuple(expand(spec, list(grid.overrides))))
    plan = build_plan(grid, force=parent.force)
    check_fid_weights(plan.trials)
    check_storage_is_shared(parent.storage, address, _alive_node_count)
    manifest = json.loads(tracker.read_text(parent.run_id, "trials.json"))
    wanted = {t["key"] for t in manifest if not t.get("cached_run")}
    children = {run.trial_key: run for run in tracker.sweep_trials(parent)}
    remaining = [t for t in plan.trials if t.key in wanted and
                 (t.key not in children or children[t.key].status != FINISHED)]
    print(f"resuming sweep {sweep_id}: {len(wanted) - len(remaining)} finished, {len(remaining)} to continue")
    rounds = None if state is None else Rounds(tracker, parent, plan, state[0], parent.storage, address,
                                               pending_timeout_s, added=state[1], history=state[2])
    if not remaining and rounds is None:
        tracker.end_run(parent.run_id, FINISHED)
        return EXIT_OK
    code, stopped = EXIT_OK, False
    if remaining:
        fit = check_resources(plan.spec, address)
        if not address:
            _start_ray_meanwhile()
        tracker.reopen_run(parent.run_id)
        from orchestrator.progress import SweepSink

        sink = SweepSink(tracker, parent, remaining, existing=children)
        sink.console.waiting = fit.message
        finished = frozenset(key for key, run in children.items() if run.status == FINISHED)
        code = _run(plan, sink, sweep_id, parent.storage, address, restore=True, finished=finished,
                    pending_timeout_s=pending_timeout_s, tune_name=rounds.tune_name if rounds else None,
                    report=rounds is None)
        stopped = _stopped(sink)
    return code if rounds is None else rounds.run(code, stopped=stopped)


def check_resources(spec: SweepSpec, address: str | None) -> Fit:
    """Can one trial ever get its resources? In-process Ray is this machine (Ray is not started for
    this); with `address` the cluster is joined (bounded) and its nodes and autoscaler node types asked.
    Bad input (exit 2) when nothing can ever hold a trial; Fit("after scale-up", message) when only a
    node the autoscaler can add could."""
    request = trial_request(spec.resources)
    if not address:
        return check_trial_fits(request, this_machine(count_gpus="GPU" in request))
    from orchestrator import ray_connect

    ray_connect.init_ray(address)
    return check_trial_fits(request, ray_connect.describe_cluster())


def _run(plan: Plan, sink: SweepSink, sweep_id: str, storage: str | None, address: str | None,
         restore: bool, finished: frozenset[str] = frozenset(), pending_timeout_s: float | None = None,
         tune_name: str | None = None, report: bool = True) -> int:
    """Run the sink's trials as one Tune experiment (`tune_name`, default the sweep id) and close the
    sweep's run; rebuild the report unless told not to (rounds of --until-confident report at the end)."""
    from orchestrator import plots, report, sweep as tune_sweep  # noqa: F401 - plots and report: loaded
    # while the in-process Ray starts, rather than when the first trial finishes and the sweep ends

    records = [tune_sweep.TrialRecord(t.key, t.name, t.config.model_dump(mode="json")) for t in sink.trials]
    interrupted = timed_out = False
    outcome: dict = {}
    try:
        outcome = tune_sweep.run_trials(
            records,
            sweep_id=tune_name or sweep_id,
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
        return interrupted_exit_code()
    if not timed_out and report:
        _refresh_report(sink.tracker, sweep_id)
    return EXIT_OK if all_finished else EXIT_FAILED


def _stopped(sink: SweepSink) -> bool:
    """Were trials of this run stopped unfinished (a pending timeout)? Then no further round starts."""
    return any(state.status == KILLED for state in sink.states.values())


class Rounds:
    """`launch --until-confident`: after the grid, rounds of one more data.shuffle_seed for the comparisons
    still open (orchestrator.adaptive decides), each round a Tune experiment of its own under the same
    sweep id and MLflow parent run. Its trials join the sweep's trials.json (a trial an earlier sweep
    FINISHED is reused, as any cached trial); until_confident.json on the run keeps the rule and the
    rounds so that `ditsweep resume` continues them, and until_confident.md says why each comparison stopped."""

    def __init__(self, tracker: Tracker, parent: SweepRun, plan: Plan, rule: StoppingRule, storage: str | None,
                 address: str | None, pending_timeout_s: float | None, added: list[int] | None = None,
                 history: list[dict] | None = None) -> None:
        self.tracker, self.parent, self.plan, self.rule = tracker, parent, plan, rule
        self.storage, self.address, self.pending_timeout_s = storage, address, pending_timeout_s
        self.added = list(added or [])
        self.history = list(history or [{"shuffle": None, "tune": parent.sweep_id, "trials": len(plan.to_run)}])

    @staticmethod
    def stored_state(tracker: Tracker, parent: SweepRun) -> tuple[StoppingRule, list[int], list[dict]] | None:
        if adaptive.STATE_FILE not in tracker.artifact_names(parent.run_id):
            return None
        return adaptive.read_state(tracker.read_text(parent.run_id, adaptive.STATE_FILE))

    @property
    def tune_name(self) -> str:
        return self.history[-1]["tune"]

    def run(self, code: int, stopped: bool) -> int:
        """Rounds until no comparison is open; the worst exit code of all rounds."""
        worst = code
        while code not in INTERRUPTED_EXIT_CODES and not stopped:
            manifest = json.loads(self.tracker.read_text(self.parent.run_id, "trials.json"))
            decisions = adaptive.decide(adaptive.sweep_observations(self.tracker, self.parent), self.plan.spec,
                                        adaptive.shuffle_counts([e["axes"] for e in manifest], self.plan.spec.compare),
                                        self.rule)
            cached = {} if self.plan.force else self.tracker.finished_trials(self.parent.experiment_id)
            used = sum(r["trials"] for r in self.history[1:])
            shuffle, trials, decisions = adaptive.next_round(
                self.plan.spec, list(self.plan.overrides), self.added, decisions, set(cached),
                self.rule.max_added_trials - used)
            self._log(decisions)
            if not trials:
                break
            from trainer.data import DataError  # the data layer: only once rounds run

            try:
                check_data(trials)
            except DataError as err:
                print(f"no further shuffle: {err}", flush=True)
                break
            code, stopped = self._round(shuffle, trials, cached, manifest, decisions)
            worst = max(worst, code)
        if code in INTERRUPTED_EXIT_CODES:
            return code
        self.tracker.end_run(self.parent.run_id, FINISHED if worst == EXIT_OK and not stopped else FAILED)
        if not stopped:
            _refresh_report(self.tracker, self.parent.sweep_id)
        return EXIT_FAILED if stopped else worst

    def _round(self, shuffle: int, trials: list[Trial], cached: dict, manifest: list[dict],
               decisions: list[adaptive.Decision]) -> tuple[int, bool]:
        to_run = [t for t in trials if t.key not in cached]
        tune_name = f"{self.parent.sweep_id}-shuffle{shuffle}"
        self.added.append(shuffle)
        self.history.append({"shuffle": shuffle, "tune": tune_name, "trials": len(to_run)})
        manifest = manifest + [{"key": t.key, "name": t.name, "axes": t.axes, "schedule": t.config.schedule,
                                "cached_run": cached[t.key].run_id if t.key in cached else None} for t in trials]
        self.save(decisions, {"trials.json": json.dumps(manifest, indent=2)})
        open_count = sum(d.reason == adaptive.OPEN for d in decisions)
        print(f"until confident: data.shuffle_seed {shuffle} for {open_count} open comparison(s): "
              f"{len(to_run)} trial(s) to run, {len(trials) - len(to_run)} cached", flush=True)
        if not to_run:
            return EXIT_OK, False
        self.tracker.reopen_run(self.parent.run_id)
        from orchestrator.progress import SweepSink

        sink = SweepSink(self.tracker, self.parent, to_run, existing={})
        code = _run(self.plan, sink, self.parent.sweep_id, self.storage, self.address, restore=False,
                    pending_timeout_s=self.pending_timeout_s, tune_name=tune_name, report=False)
        return code, _stopped(sink)

    def save(self, decisions: list[adaptive.Decision], texts: dict[str, str] | None = None) -> None:
        state = adaptive.state_json(self.rule, self.added, self.history, decisions)
        self.tracker.log_texts(self.parent.run_id, {**(texts or {}), adaptive.STATE_FILE: state})

    def _log(self, decisions: list[adaptive.Decision]) -> None:
        table = adaptive.decision_table(decisions, self.rule)
        print(f"until confident ({adaptive.PRIMARY}, 95% per comparison):\n{table}", flush=True)
        self.save(decisions, {adaptive.SUMMARY_FILE: f"# Until confident: why each comparison stopped\n\n```\n{table}\n```\n"})


def _open_sweep(tracker: Tracker, experiment: str, plan: Plan, storage: str | None,
                fit: Fit) -> tuple[str, SweepRun, SweepSink]:
    """The sweep's run (its tags, params, spec, plan with the compute estimate, manifest, versions) and
    the sink that records its trials' events."""
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
            "plan.txt": plan_table(plan) + "\n\n" + compute_estimate(plan, max_share=ESTIMATE_MAX_SHARE) + "\n",
            "trials.json": json.dumps(trials_manifest(plan), indent=2),
            "versions.json": json.dumps(_versions(), indent=2),
        },
    )
    print(accepted_line(sweep_id, len(plan.to_run), tracker.uri), flush=True)
    if fit.message:
        print(fit.message, flush=True)
    from orchestrator.progress import SweepSink  # the sink's modules: only once a sweep starts

    sink = SweepSink(tracker, parent, plan.to_run, existing={})
    sink.console.waiting = fit.message
    return sweep_id, parent, sink


def _start_ray_meanwhile() -> None:
    """Start the in-process Ray now, in the background: the sweep's run, the trainer's imports and
    Tune's take about as long as Ray's start, which `sweep.run_trials` then waits for."""
    from orchestrator import ray_connect

    ray_connect.start_local_ray()


def _end_unused_ray(started: bool) -> None:
    """End the in-process Ray `_start_ray_meanwhile` started for trials that will not run here (once it
    is up: Ray ends the whole process when killed under a driver still connecting)."""
    if started:
        from orchestrator import ray_connect

        ray_connect.end_local_ray()


def _alive_node_count(address: str) -> int:
    from orchestrator.ray_connect import alive_node_count

    return alive_node_count(address)


def _refresh_report(tracker: Tracker, sweep_id: str) -> None:
    """Rebuild the sweep's report and attach it to its run. Best effort: never fails the sweep.
    Called once the command's last trials are over: the in-process Ray, if this command started one,
    is ended meanwhile."""
    if "orchestrator.ray_connect" in sys.modules:  # no Ray imported just to find none started
        sys.modules["orchestrator.ray_connect"].end_local_ray_meanwhile()
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
