"""Ray Tune, and only here: run resolved trials with per-trial resources, retries and checkpoints.

The caller hands in plain trial records and a `TrialEvents` sink; this module turns Tune's callbacks
into calls on that sink (in the driver process), so MLflow never needs to know about Ray.

This is the one module that imports Ray Tune (the architecture test holds it to that): the trainable,
the callbacks, the resources and retries, restoring and stopping a run. Starting or joining Ray itself
is `orchestrator.ray_connect`'s.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from orchestrator import ray_connect  # first: it sets Ray's environment before Ray is imported

import ray  # noqa: E402
from ray import cloudpickle, tune  # noqa: E402
from ray.air.constants import EXPR_ERROR_FILE  # noqa: E402 - error.txt: a trial's tracebacks, one per errored attempt

from orchestrator.display import first_line  # noqa: E402
from orchestrator.trial_state import TrialError  # noqa: E402
from trainer.metric_names import STEP  # noqa: E402
from trainer.records import reported  # noqa: E402

DEFAULT_STORAGE = "ditsweep_results"
# Where a trial runs (its location: Ray node and device; not the attention placement), sent with every
# report as flat strings (`location_node_id`, ...) and handed to the sink's `located` event as
# {"node_id": ..., "node_ip": ..., "device": ..., ...}.
LOCATION_PREFIX = "location_"
# A fault drill: the trials named here (comma-separated trial names) raise once, at the start of their
# first attempt, and Tune retries them (the spec's max_failures). For tests and for seeing what a sweep
# shows when trials error; unset, nothing happens.
FAULT_DRILL_ENV = "DITSWEEP_FAULT_DRILL"


class PendingTimeout(RuntimeError):
    """The sweep waited `--pending-timeout` seconds with trials pending and none running."""


class TrialEvents(Protocol):
    def started(self, key: str) -> None: ...
    def result(self, key: str, metrics: dict[str, Any]) -> None: ...
    def completed(self, key: str) -> None: ...
    def failed(self, key: str, error: TrialError) -> None: ...
    def retrying(self, key: str, error: TrialError) -> None: ...
    def checkpointed(self, key: str, read: Callable[[str], bytes | None]) -> None: ...
    def located(self, key: str, location: dict[str, str]) -> None: ...
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


def run_trial(param: dict, finished: frozenset[str] = frozenset()) -> None:
    """One Tune trial: resume from Tune's checkpoint if there is one, report as training goes.
    A trial the tracking store already has FINISHED (`finished`, restore after a driver died) ends at once."""
    import torch

    from trainer.config import TrialConfig
    from trainer.train import describe_device, pick_device, train

    # Ray logs every checkpoint upload at INFO; ditsweep's own progress already says where trials are.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    record = param["trial"]
    if record["key"] in finished:
        return
    _fault_drill(record["name"])
    config = TrialConfig.model_validate(record["config"])
    torch.set_num_threads(max(1, int(param["cpus"])))
    device = pick_device()
    location = {f"{LOCATION_PREFIX}{k}": v for k, v in {**_node_location(), **describe_device(device)}.items()}

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report({**metrics, **location}, checkpoint=checkpoint)

    checkpoint = tune.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="ditsweep-trial-") as out:
        if checkpoint is None:
            train(config, report, out_dir=out, device=device)
        else:
            with checkpoint.as_directory() as resume_from:
                train(config, report, out_dir=out, resume_from=resume_from, device=device)


class FaultDrill(RuntimeError):
    """The error a trial named in FAULT_DRILL_ENV raises on its first attempt."""


def _fault_drill(name: str) -> None:
    """Raise FaultDrill on the first attempt of a trial named in FAULT_DRILL_ENV, before it trains; its
    later attempts find the marker that attempt left in the trial's folder of --storage, and run. (The
    worker's own trial folder is made anew for each attempt.)"""
    from pyarrow.fs import FileType

    if name not in os.environ.get(FAULT_DRILL_ENV, "").split(","):
        return
    storage = tune.get_context().get_storage()
    filesystem, marker = storage.storage_filesystem, f"{storage.trial_fs_path}/fault-drill"
    if filesystem.get_file_info(marker).type != FileType.NotFound:
        return
    filesystem.create_dir(storage.trial_fs_path)
    with filesystem.open_output_stream(marker):
        pass
    raise FaultDrill(f"{name} raised on its first attempt, as {FAULT_DRILL_ENV} asks")


def _node_location() -> dict[str, str]:
    """The Ray node this trial runs on: its id and IP address."""
    node_id = ray.get_runtime_context().get_node_id()
    # The address the node joined the cluster with (`ray start --node-ip-address`), not a guess from
    # this process's network interfaces.
    ips = [node["NodeManagerAddress"] for node in ray.nodes() if node["NodeID"] == node_id]
    return {"node_id": node_id, "node_ip": ips[0] if ips else ray.util.get_node_ip_address()}


def location_of(result: dict) -> dict[str, str]:
    """{"node_id": ..., "device": ...} from a Tune result's `location_*` entries ({} when absent)."""
    return {k[len(LOCATION_PREFIX):]: str(v) for k, v in result.items() if k.startswith(LOCATION_PREFIX)}


# ---------------------------------------------------------------------------------------------
# Driver side


_EVENTS: TrialEvents | None = None
# The trials this driver runs. A restored experiment can hold more: Tune's state in remote storage is
# synced every few seconds, so after the driver dies it may still list a trial as running that had
# already finished (and is FINISHED in the tracking store); Tune runs such a trial again, but its
# events are not the sink's.
_WANTED: frozenset[str] = frozenset()
_STORAGE_SHOWN = DEFAULT_STORAGE  # --storage as the user wrote it: where an error's full text is, in messages


class _EventBridge(tune.Callback):
    """Stateless, so it survives Tune pickling it into the experiment state: events go to the sink
    of the driver process that is running now, never to one restored from a dead driver."""

    @staticmethod
    def _key(trial) -> str | None:
        key = trial.config["trial"]["key"]
        return key if key in _WANTED else None

    def on_trial_start(self, iteration, trials, trial, **info):
        if key := self._key(trial):
            _EVENTS.started(key)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not (key := self._key(trial)):
            return
        metrics = reported(result)  # everything else in a Tune result is Tune's own bookkeeping
        metrics[STEP] = result.get(STEP, result.get("training_iteration", 0))
        _EVENTS.result(key, metrics)
        if location := location_of(result):
            _EVENTS.located(key, location)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if key := self._key(trial):
            _EVENTS.completed(key)

    def on_trial_recover(self, iteration, trials, trial, **info):
        if key := self._key(trial):
            _EVENTS.retrying(key, _trial_error(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        if key := self._key(trial):
            _EVENTS.failed(key, _trial_error(trial))

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        if key := self._key(trial):
            _EVENTS.checkpointed(key, _checkpoint_reader(checkpoint))

    def on_step_end(self, iteration, trials, **info):
        _EVENTS.tick()


def _trial_error(trial) -> TrialError:
    """The attempt that just errored: its exception's first line, which attempt of how many, and where
    Tune keeps the whole traceback (error.txt in the trial's folder, copied to --storage with the
    experiment's state)."""
    folder = f"{_STORAGE_SHOWN.rstrip('/')}/{trial.storage.experiment_dir_name}/{trial.storage.trial_dir_name}"
    return TrialError(message=_error_message(trial), attempt=trial.run_metadata.num_failures,
                      attempts=trial.max_failures + 1, full_text=f"{folder}/{EXPR_ERROR_FILE}")


def _error_message(trial) -> str:
    """"Type: first line" of what the trial raised (Tune pickles it next to error.txt, on the driver)."""
    path = trial.pickled_error_file
    try:
        with open(path, "rb") as stream:
            error = cloudpickle.load(stream)
    except Exception:  # noqa: BLE001 - missing, or cannot be unpickled here: the text file's last line
        return _error_file_last_line(trial)
    cause = getattr(error, "cause", None) or error  # a RayTaskError wraps what the trial raised
    return f"{type(cause).__name__}: {first_line(cause)}"


def _error_file_last_line(trial) -> str:
    path = trial.error_file
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


# Pending trials with none running, seen from Tune's loop in the driver (module state, like _EVENTS:
# Tune pickles callbacks and stoppers into its experiment state).
_PENDING = {"timeout_s": None, "since": None, "expired": False}


class _PendingWatch(tune.Callback):
    def on_step_end(self, iteration, trials, **info):
        timeout_s = _PENDING["timeout_s"]
        if timeout_s is None:
            return
        running = any(t.status == "RUNNING" for t in trials)
        pending = any(t.status == "PENDING" for t in trials)
        if running or not pending:
            _PENDING["since"] = None
        elif _PENDING["since"] is None:
            _PENDING["since"] = time.monotonic()
        elif time.monotonic() - _PENDING["since"] > timeout_s:
            _PENDING["expired"] = True


class _StopWhenPendingTooLong(tune.Stopper):
    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return bool(_PENDING["expired"])


def _fit(tuner: tune.Tuner):
    """tuner.fit(), raising KeyboardInterrupt after Tune's own graceful stop on Ctrl-C.

    Tune catches the first SIGINT itself (it saves its state and returns normally) and only then puts
    back the handler it found; the handler in place after fit tells whether that happened."""
    in_main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if in_main else None
    grid = tuner.fit()
    if not in_main:
        return grid
    tune_catches = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"
    interrupted = tune_catches and signal.getsignal(signal.SIGINT) is before
    signal.signal(signal.SIGINT, before)
    if interrupted:
        raise KeyboardInterrupt
    return grid


def _dirname(trial) -> str:
    record = trial.config["trial"]
    # A file name: ASCII only and short (at most 255 bytes), whatever the grid's values.
    safe = "".join(c if (c.isascii() and c.isalnum()) or c in "-_=" else "_" for c in record["name"][:100])
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
    finished: frozenset[str] = frozenset(),
    pending_timeout_s: float | None = None,
) -> dict[str, TrialOutcome]:
    """Run (or with `restore`, continue) the sweep's trials; returns trial key -> outcome.

    `finished`: trial keys the tracking store already has FINISHED (Tune's saved state can lag it when
    the driver died): a restored trial with such a key ends at once instead of training again.
    `pending_timeout_s`: raise PendingTimeout once trials have waited that long with none running.
    """
    global _EVENTS, _WANTED, _STORAGE_SHOWN
    _EVENTS, _WANTED, _STORAGE_SHOWN = events, frozenset(t.key for t in trials), storage or DEFAULT_STORAGE
    _PENDING.update(timeout_s=pending_timeout_s, since=None, expired=False)
    ray_connect.init_ray(address)
    storage_path, fs = resolve_storage(storage)
    trainable = tune.with_resources(tune.with_parameters(run_trial, finished=frozenset(finished)),
                                    {"cpu": cpu, "gpu": gpu})
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
                callbacks=[_EventBridge(), _PendingWatch()],
                stop=_StopWhenPendingTooLong(),
                verbose=0,
            ),
        )
    grid = _fit(tuner)
    if _PENDING["expired"]:
        raise PendingTimeout(f"trials waited {pending_timeout_s:g} s for resources with none running")
    outcome: dict[str, TrialOutcome] = {}
    for result in grid:
        if not result.config:
            continue
        metrics = reported(result.metrics or {})
        status = "ERROR" if result.error else "TERMINATED"
        outcome[result.config["trial"]["key"]] = TrialOutcome(status, metrics)
    return outcome
