"""Ray Tune, and only here: run resolved trials with per-trial resources, retries and checkpoints.

The caller hands in plain trial records and a `TrialEvents` sink; this module turns Tune's callbacks
into calls on that sink (in the driver process), so MLflow never needs to know about Ray.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

# Quieter Ray: ditsweep prints its own progress instead of Tune's tables.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "60")

import ray  # noqa: E402
from ray import tune  # noqa: E402

from trainer.train import STEP, reported  # noqa: E402

DEFAULT_STORAGE = "ditsweep_results"


class TrialEvents(Protocol):
    def started(self, key: str) -> None: ...
    def result(self, key: str, metrics: dict[str, Any]) -> None: ...
    def completed(self, key: str) -> None: ...
    def failed(self, key: str, error: str) -> None: ...
    def retrying(self, key: str, error: str) -> None: ...
    def checkpointed(self, key: str, read: Callable[[str], bytes | None]) -> None: ...
    def tick(self) -> None: ...


@dataclass(frozen=True)
class TrialOutcome:
    status: str  # "TERMINATED" (finished) or "ERROR"
    metrics: dict[str, Any]  # the trial's last reported metrics


@dataclass(frozen=True)
class TrialRecord:
    key: str
    name: str
    config: dict  # TrialConfig.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Storage


def resolve_storage(uri: str | None) -> tuple[str, Any]:
    """(storage path, pyarrow filesystem or None) for Ray. s3:// goes through s3fs.

    Ray's own s3:// client does not honour custom endpoints the way s3fs does (it failed against a
    local S3 API), so remote storage is s3fs wrapped as a pyarrow filesystem.
    """
    uri = uri or DEFAULT_STORAGE
    if "://" not in uri:
        return str(Path(uri).resolve()), None
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(uri)
    return path.rstrip("/"), PyFileSystem(FSSpecHandler(fs))


# ---------------------------------------------------------------------------------------------
# The trainable: runs on a worker.


def run_trial(param: dict) -> None:
    """One Tune trial: resume from Tune's checkpoint if there is one, report as training goes."""
    import torch

    from trainer.config import TrialConfig
    from trainer.train import train

    # Ray logs every checkpoint upload at INFO; ditsweep's own progress already says where trials are.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    record = param["trial"]
    config = TrialConfig.model_validate(record["config"])
    torch.set_num_threads(max(1, int(param["cpus"])))

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="ditsweep-trial-") as out:
        if checkpoint is None:
            train(config, report, out_dir=out)
        else:
            with checkpoint.as_directory() as resume_from:
                train(config, report, out_dir=out, resume_from=resume_from)


# ---------------------------------------------------------------------------------------------
# Driver side


_EVENTS: TrialEvents | None = None


class _EventBridge(tune.Callback):
    """Stateless, so it survives Tune pickling it into the experiment state: events go to the sink
    of the driver process that is running now, never to one restored from a dead driver."""

    @staticmethod
    def _key(trial) -> str:
        return trial.config["trial"]["key"]

    def on_trial_start(self, iteration, trials, trial, **info):
        _EVENTS.started(self._key(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = reported(result)  # everything else in a Tune result is Tune's own bookkeeping
        metrics[STEP] = result.get(STEP, result.get("training_iteration", 0))
        _EVENTS.result(self._key(trial), metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        _EVENTS.completed(self._key(trial))

    def on_trial_recover(self, iteration, trials, trial, **info):
        _EVENTS.retrying(self._key(trial), _error_text(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        _EVENTS.failed(self._key(trial), _error_text(trial))

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        _EVENTS.checkpointed(self._key(trial), _checkpoint_reader(checkpoint))

    def on_step_end(self, iteration, trials, **info):
        _EVENTS.tick()


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path and os.path.exists(path):
        lines = Path(path).read_text().strip().splitlines()
        return lines[-1] if lines else "error"
    return "error (no details from Ray)"


def _checkpoint_reader(checkpoint: tune.Checkpoint) -> Callable[[str], bytes | None]:
    """Reads one file of a persisted checkpoint by name, wherever the storage is; None when it is absent."""
    filesystem, folder = checkpoint.filesystem, checkpoint.path

    def read(name: str) -> bytes | None:
        try:
            with filesystem.open_input_stream(f"{folder}/{name}") as stream:
                return stream.read()
        except OSError:  # FileNotFoundError, or the storage is away
            return None

    return read


def init_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    logging.getLogger("ray").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="ray")
    if address:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True)


def _dirname(trial) -> str:
    record = trial.config["trial"]
    safe = "".join(c if c.isalnum() or c in "-_=" else "_" for c in record["name"])
    return f"{safe}-{record['key'][:10]}"


def run_trials(
    trials: list[TrialRecord],
    *,
    sweep_id: str,
    cpu: float,
    gpu: float,
    max_failures: int,
    storage: str | None,
    address: str | None,
    events: TrialEvents,
    restore: bool = False,
) -> dict[str, TrialOutcome]:
    """Run (or with `restore`, continue) the sweep's trials; returns trial key -> outcome."""
    global _EVENTS
    _EVENTS = events
    init_ray(address)
    storage_path, fs = resolve_storage(storage)
    trainable = tune.with_resources(run_trial, {"cpu": cpu, "gpu": gpu})
    path = f"{storage_path}/{sweep_id}"
    if restore and tune.Tuner.can_restore(path, storage_filesystem=fs):
        tuner = tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    else:
        space = {
            "trial": tune.grid_search([t.__dict__ for t in trials]),
            "cpus": cpu,
        }
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(reuse_actors=True, trial_dirname_creator=_dirname),
            run_config=tune.RunConfig(
                name=sweep_id,
                storage_path=storage_path,
                storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[_EventBridge()],
                verbose=0,
            ),
        )
    grid = tuner.fit()
    outcome: dict[str, TrialOutcome] = {}
    for result in grid:
        if not result.config:
            continue
        metrics = reported(result.metrics or {})
        status = "ERROR" if result.error else "TERMINATED"
        outcome[result.config["trial"]["key"]] = TrialOutcome(status, metrics)
    return outcome
