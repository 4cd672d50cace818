"""The sweep workflow: plan, launch, resume and status, in plain functions the CLI calls.

Order matters for "nothing started on bad input": the spec, every trial config, the data and the
tracking store are all checked before a run is created or Ray is started.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from orchestrator.memory import check_trial_memory, trial_estimates
from orchestrator.spec import SpecError, SweepSpec, Trial, expand, load_spec, parse_spec
from trainer.config import flatten
from trainer.memory import format_bytes

EXIT_OK, EXIT_TRIALS_FAILED = 0, 1


# ---------------------------------------------------------------------------------------------
# Plan


@dataclass
class Plan:
    spec: SweepSpec
    spec_text: str
    overrides: list[str]
    trials: list[Trial]
    cached: dict[str, Any] = field(default_factory=dict)  # trial key -> FINISHED MLflow run
    force: bool = False

    @property
    def to_run(self) -> list[Trial]:
        return [t for t in self.trials if self.force or t.key not in self.cached]


def load_plan(spec_path: str | Path, overrides: list[str]) -> Plan:
    spec = load_spec(spec_path)
    trials = expand(spec, overrides)
    check_trial_memory(trials, device="cuda" if spec.resources.gpu else "cpu")  # before check_data decodes
    check_data(trials)
    return Plan(spec=spec, spec_text=Path(spec_path).read_text(), overrides=list(overrides), trials=trials)


def check_data(trials: list[Trial]) -> None:
    """Load each distinct data source once and check every trial's subset fits it."""
    from trainer.data import load_images, split_subsets

    sizes: dict[tuple[str, int], int] = {}
    for trial in trials:
        data = trial.config.data
        source = (data.source, data.image_size)
        if source not in sizes:
            sizes[source] = len(load_images(data.source, data.image_size))
        split_subsets(
            sizes[source], data.test_images, data.num_images, data.fraction, data.shuffle_seed, disjoint=data.disjoint
        )


def check_fid_weights(trials: list[Trial]) -> None:
    """Trials with FID need the Inception weights: check now that they can be had, not an hour into a trial.

    A local file must exist and have the expected digest; a URI must be cached or answer. On a remote
    Ray cluster the same path or URI must also work on the workers.
    """
    from trainer.inception import WeightsError, fetch_weights, weights_available

    wanted = {(t.config.eval.fid.weights, t.config.eval.fid.weights_sha256) for t in trials if t.config.eval.fid.enabled}
    for weights, sha256_prefix in sorted(wanted):
        ok, explanation = weights_available(weights)
        if not ok:
            raise SpecError(f"eval.fid.enabled=true needs the FID Inception weights (eval.fid.weights): {explanation}")
        if "://" not in weights:  # a local file: its digest is cheap to check here
            try:
                fetch_weights(weights, expected_sha256_prefix=sha256_prefix)
            except WeightsError as err:
                raise SpecError(f"eval.fid.weights: {err}") from None


def plan_table(plan: Plan) -> str:
    axes = list(plan.spec.grid)
    header = ["#", *axes, "schedule", "memory", "key", "state"]
    memory = trial_estimates(plan.trials, device="cuda" if plan.spec.resources.gpu else "cpu")
    rows = []
    for i, trial in enumerate(plan.trials, 1):
        if trial.key in plan.cached and not plan.force:
            state = "cached"
        else:
            state = "rerun" if trial.key in plan.cached else "run"
        values = [_cell(trial.axes[a]) for a in axes]
        rows.append([str(i), *values, trial.config.schedule, format_bytes(memory[trial.key].total), trial.key[:10], state])
    return format_table([header, *rows], rule=True)


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return ",".join("G" if v is None else str(v) for v in value)
    return str(value)


def compute_estimate(plan: Plan) -> str:
    """Training FLOPs (3x forward per image) for the trials that will run, and the time they take
    on this machine: a few training steps of the first model are timed, the rest scaled by FLOPs."""
    from trainer.model import build_dit

    flops_per_image: dict[tuple, float] = {}
    images: dict[tuple, int] = {}
    calibration: tuple[float, float] | None = None  # (seconds per image, FLOPs per image)
    for trial in plan.to_run:
        cfg = trial.config
        shape = (cfg.model.size, cfg.data.image_size, tuple(cfg.windows))
        if shape not in flops_per_image:
            model = build_dit(cfg.model.size, image_size=cfg.data.image_size, in_channels=3, windows=cfg.windows)
            flops_per_image[shape] = 3.0 * model.flops_per_image()
            if calibration is None:
                batch = min(cfg.train.batch_size, 16)
                calibration = (_seconds_per_image(model, cfg.data.image_size, batch), flops_per_image[shape])
        images[shape] = images.get(shape, 0) + cfg.train.steps * cfg.train.batch_size
    flops = sum(flops_per_image[s] * n for s, n in images.items())
    seconds = flops * calibration[0] / calibration[1] if calibration else 0.0
    return (
        f"{len(plan.to_run)} of {len(plan.trials)} trials to run, {flops / 1e12:.2f} TFLOP of training, "
        f"about {_duration(seconds)} of training in one process on this machine (calibrated)"
    )


def _seconds_per_image(model, image_size: int, batch: int) -> float:
    """Wall time of one training step per image: best of three steps after two warm-up steps
    (the first steps pay for kernel and thread-pool set-up)."""
    import torch

    from trainer.diffusion import linear_schedule, training_loss

    schedule = linear_schedule()
    optimizer = torch.optim.AdamW(model.parameters())
    x0 = torch.rand(batch, 3, image_size, image_size) * 2 - 1
    best = float("inf")
    for attempt in range(4):
        start = time.perf_counter()
        loss = training_loss(model, schedule, x0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if attempt >= 2:
            best = min(best, time.perf_counter() - start)
    return best / batch


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "unknown"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def show_plan(spec_path: str | Path, overrides: list[str], tracking_uri: str | None, force: bool = False) -> Plan:
    """Print the trial table and the compute estimate; touches nothing (no run, no new store)."""
    from orchestrator.tracking import Tracker, resolve_tracking_uri

    plan = load_plan(spec_path, overrides)
    plan.force = force
    uri = resolve_tracking_uri(tracking_uri)
    if not _store_missing(uri):
        tracker = Tracker(uri)
        experiment = tracker.experiment_id(plan.spec.name, create=False)
        plan.cached = tracker.finished_trials(experiment) if experiment else {}
    print(f"sweep {plan.spec.name!r}: {plan.spec.description.strip()}".rstrip(": "))
    print(plan_table(plan))
    print(compute_estimate(plan))
    return plan


def _store_missing(uri: str) -> bool:
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()


# ---------------------------------------------------------------------------------------------
# Launch and resume


def launch(
    spec_path: str | Path,
    overrides: list[str],
    *,
    tracking_uri: str | None = None,
    storage: str | None = None,
    address: str | None = None,
    force: bool = False,
) -> int:
    from orchestrator.progress import SweepSink
    from orchestrator.tracking import Tracker, new_sweep_id

    plan = load_plan(spec_path, overrides)
    plan.force = force
    check_fid_weights(plan.trials)
    _check_storage(storage)
    tracker = Tracker(tracking_uri)
    experiment = tracker.experiment_id(plan.spec.name)
    plan.cached = tracker.finished_trials(experiment)
    print(plan_table(plan))
    if not plan.to_run:
        print(f"nothing to run: all {len(plan.trials)} trials already have FINISHED runs "
              f"in experiment {plan.spec.name!r} (--force reruns them)")
        return EXIT_OK

    sweep_id = new_sweep_id(plan.spec.name)
    parent_id = tracker.start_sweep(
        experiment,
        sweep_id,
        name=f"sweep {sweep_id}",
        tags=_sweep_tags(plan, storage),
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
            "trials.json": json.dumps(_trials_manifest(plan), indent=2),
            "versions.json": json.dumps(_versions(), indent=2),
        },
    )
    print(f"sweep {sweep_id}: {len(plan.to_run)} trials to run, tracking {tracker.uri}")
    sink = SweepSink(tracker, tracker.client.get_run(parent_id), plan.to_run, existing={})
    return _run(plan, sink, sweep_id, storage, address, restore=False)


def resume(sweep_id: str, *, tracking_uri: str | None = None, address: str | None = None) -> int:
    """Continue a sweep whose driver died: finished trials stay, the rest continue from checkpoints."""
    from orchestrator.progress import SweepSink
    from orchestrator.tracking import FINISHED, RUNNING, TAG_TRIAL_KEY, Tracker

    tracker = Tracker(tracking_uri)
    parent = tracker.find_sweep(sweep_id)
    tags = parent.data.tags
    spec_text = tracker.read_text(parent.info.run_id, "spec.yaml")
    overrides = json.loads(tags.get("ditsweep.overrides", "[]"))
    storage = tags.get("ditsweep.storage") or None
    plan = _plan_from_text(spec_text, overrides)
    plan.force = tags.get("ditsweep.force") == "true"
    check_fid_weights(plan.trials)
    manifest = json.loads(tracker.read_text(parent.info.run_id, "trials.json"))
    wanted = {t["key"] for t in manifest if not t.get("cached_run")}
    children = {run.data.tags[TAG_TRIAL_KEY]: run for run in tracker.sweep_trials(parent)}
    remaining = [t for t in plan.trials if t.key in wanted and
                 (t.key not in children or children[t.key].info.status != FINISHED)]
    print(f"resuming sweep {sweep_id}: {len(wanted) - len(remaining)} finished, {len(remaining)} to continue")
    if not remaining:
        tracker.end_run(parent.info.run_id, FINISHED)
        return EXIT_OK
    tracker.client.update_run(parent.info.run_id, status=RUNNING)
    sink = SweepSink(tracker, parent, remaining, existing=children)
    return _run(plan, sink, sweep_id, storage, address, restore=True)


def _run(plan: Plan, sink, sweep_id: str, storage: str | None, address: str | None, restore: bool) -> int:
    from orchestrator import sweep as tune_sweep

    records = [tune_sweep.TrialRecord(t.key, t.name, t.config.model_dump(mode="json")) for t in sink.trials]
    interrupted = False
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
        )
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: marking unfinished trials KILLED; `ditsweep resume "
              f"{sweep_id}` continues them", flush=True)
    finally:
        all_finished = sink.close(outcome, interrupted=interrupted)
    if not interrupted:
        _refresh_report(sink.tracker, sweep_id)
    return EXIT_OK if all_finished else EXIT_TRIALS_FAILED


def _refresh_report(tracker, sweep_id: str) -> None:
    """Rebuild the sweep's report and attach it to its run. Best effort: never fails the sweep."""
    try:
        from orchestrator.report import publish

        folder, _ = publish(tracker, sweep_id)
        print(f"report: {folder / 'report.html'} (also on the sweep's run under report/)", flush=True)
    except Exception as err:  # noqa: BLE001 - a report problem must not change the sweep's outcome
        print(f"[ditsweep] warning: could not build the report of sweep {sweep_id}: "
              f"{type(err).__name__}: {err}; `ditsweep report {sweep_id}` retries", flush=True)


def _plan_from_text(spec_text: str, overrides: list[str]) -> Plan:
    spec = parse_spec(spec_text, "the sweep's stored spec")
    return Plan(spec=spec, spec_text=spec_text, overrides=overrides, trials=expand(spec, overrides))


def _check_storage(storage: str | None) -> None:
    """An s3:// storage must be reachable before anything starts."""
    if not storage or not storage.startswith("s3://"):
        return
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(storage)
        fs.ls(path.split("/", 1)[0])
    except Exception as err:  # noqa: BLE001 - any client error means the sweep cannot store results
        raise SpecError(f"storage {storage!r} is not reachable: {type(err).__name__}: {err}") from None


def _sweep_tags(plan: Plan, storage: str | None) -> dict[str, str]:
    return {
        "ditsweep.spec_name": plan.spec.name,
        "ditsweep.storage": storage or "",
        "ditsweep.overrides": json.dumps(plan.overrides),
        "ditsweep.force": "true" if plan.force else "false",
        "ditsweep.git_commit": _git_commit(),
        "mlflow.note.content": plan.spec.description,
    }


def _trials_manifest(plan: Plan) -> list[dict]:
    to_run = {t.key for t in plan.to_run}
    return [
        {
            "key": t.key,
            "name": t.name,
            "axes": t.axes,
            "schedule": t.config.schedule,
            "cached_run": None if t.key in to_run else plan.cached[t.key].info.run_id,
        }
        for t in plan.trials
    ]


def trial_params(trial: Trial) -> dict[str, Any]:
    return {**flatten(trial.config), "attention.schedule": trial.config.schedule}


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


# ---------------------------------------------------------------------------------------------
# Status


def status(sweep_id: str | None, tracking_uri: str | None) -> str:
    from orchestrator.tracking import TAG_SWEEP_ID, Tracker

    tracker = Tracker(tracking_uri)
    if sweep_id is None:
        sweeps = tracker.list_sweeps()
        if not sweeps:
            return f"no sweeps in {tracker.uri}"
        rows = [["sweep", "spec", "status", "started", "trials"]]
        for run in sweeps:
            trials = tracker.sweep_trials(run)
            counts = _count_states(trials)
            rows.append([
                run.data.tags[TAG_SWEEP_ID],
                run.data.tags.get("ditsweep.spec_name", ""),
                run.info.status,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000)),
                counts,
            ])
        return format_table(rows)
    parent = tracker.find_sweep(sweep_id)
    trials = sorted(tracker.sweep_trials(parent), key=lambda r: r.info.run_name or "")
    rows = [["trial", "status", "step", "loss", "psnr_gap", "key"]]
    for run in trials:
        m = run.data.metrics
        rows.append([
            run.info.run_name or "",
            run.info.status,
            str(int(m["step"])) if "step" in m else "-",
            f"{m['loss']:.4f}" if "loss" in m else "-",
            f"{m['psnr_gap']:.3f}" if "psnr_gap" in m else "-",
            run.data.tags.get("ditsweep.trial_key", "")[:10],
        ])
    header = f"sweep {sweep_id} ({parent.info.status}): {_count_states(trials)}"
    return header + "\n" + format_table(rows)


def _count_states(runs: list) -> str:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.info.status] = counts.get(run.info.status, 0) + 1
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "no trials"


def format_table(rows: list[list[str]], rule: bool = False) -> str:
    """Left-aligned columns; with `rule`, a dashed line under the header row."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
