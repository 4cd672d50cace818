"""MLflow, and only here: experiments, the sweep's parent run, one child run per trial, the
report's artifacts, the experiment's run-table view, and the `mlflow ui` process of `ditsweep ui`.

The driver is the only process that writes. Writes that fail because the tracking server went away
are kept in an outbox and replayed in order once it answers again, so no result is lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

# Fail fast on a dead server instead of MLflow's minutes of backoff: the outbox retries later.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

from orchestrator.display import first_line, param_text  # noqa: E402

if TYPE_CHECKING:
    from mlflow.entities import Run

# MLflow itself (some 2 s to import) is imported where a store is opened, not here: a command refused
# for bad input, or one that finds no store, answers without it.

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow's and alembic's INFO lines ("Creating initial MLflow database tables...", "Context impl
# SQLiteImpl.") are internals: ditsweep prints its own lines. Warnings and errors still show.
_QUIET_LOGGERS = ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils", "mlflow.tracking",
                  "mlflow.store", "mlflow.utils")


def quiet_mlflow() -> None:
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


quiet_mlflow()
DEFAULT_ARTIFACT_ROOT = "mlartifacts"

# Every tag ditsweep writes on a run; nothing outside this module spells them.
TAG_ROLE = "ditsweep.role"  # "sweep" (the parent run) or "trial" (a child run)
TAG_SWEEP_ID = "ditsweep.sweep_id"
TAG_TRIAL_KEY = "ditsweep.trial_key"
TAG_ERROR = "ditsweep.error"  # a failed trial's error
TAG_SPEC_NAME = "ditsweep.spec_name"
TAG_STORAGE = "ditsweep.storage"
TAG_OVERRIDES = "ditsweep.overrides"  # JSON list of --set items
TAG_FORCE = "ditsweep.force"  # "true" or "false"
TAG_GIT_COMMIT = "ditsweep.git_commit"
# Where a trial ran (the last node it reported from): its Ray node, the device, and on CUDA the GPU.
TAG_NODE_ID = "ditsweep.node_id"
TAG_NODE_IP = "ditsweep.node_ip"
TAG_DEVICE = "ditsweep.device"  # "cpu" or "cuda:0"
TAG_GPU_NAME = "ditsweep.gpu_name"
TAG_GPU_MEMORY_GB = "ditsweep.gpu_memory_gb"
PLACEMENT_TAGS = {"node_id": TAG_NODE_ID, "node_ip": TAG_NODE_IP, "device": TAG_DEVICE,
                  "gpu_name": TAG_GPU_NAME, "gpu_memory_gb": TAG_GPU_MEMORY_GB}
TAG_NOTE = "mlflow.note.content"  # the run's description in the MLflow UI
TAG_PARENT = "mlflow.parentRunId"
ERROR_TAG_MAX_CHARS = 5000
# The experiment's saved run-table view (MLflow UI "Views" menu and `?viewStateShareKey=`).
VIEW_KEY = "ditsweep"
TAG_VIEW = f"mlflow.sharedViewState.{VIEW_KEY}"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's "model training" experiment type (its UI's enum)
UI_WORKFLOW = "machine_learning"  # the MLflow 3 UI's "Model training" workspace (query parameter workflowType)

FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"


class TrackingError(ValueError):
    """The tracking store cannot be opened or does not hold what was asked for."""


# ---------------------------------------------------------------------------------------------
# What leaves this module: plain ditsweep records, never MLflow objects.


@dataclass(frozen=True)
class TrialRun:
    """One trial's child run (or a cached run of an earlier sweep)."""

    run_id: str
    name: str
    status: str  # FINISHED, FAILED, KILLED or RUNNING
    trial_key: str
    params: dict[str, str]
    metrics: dict[str, float]  # the latest value of each metric
    tags: dict[str, str]
    start_time: int | None  # ms since the epoch
    end_time: int | None

    @property
    def placement(self) -> dict[str, str]:
        """Where the trial last ran: {"node_id", "node_ip", "device", ...} as far as recorded."""
        return {key: self.tags[tag] for key, tag in PLACEMENT_TAGS.items() if tag in self.tags}


def placement_tags(placement: dict[str, str]) -> dict[str, str]:
    """A trial's placement ({"node_id": ..., "device": ...}) as run tags; unknown entries are left out."""
    return {PLACEMENT_TAGS[key]: str(value) for key, value in placement.items() if key in PLACEMENT_TAGS}


@dataclass(frozen=True)
class SweepRun:
    """A sweep's parent run and what its tags say about how it was launched."""

    run_id: str
    experiment_id: str
    sweep_id: str
    name: str
    status: str
    tags: dict[str, str]
    start_time: int | None  # ms since the epoch
    end_time: int | None

    @property
    def spec_name(self) -> str:
        return self.tags.get(TAG_SPEC_NAME, "")

    @property
    def storage(self) -> str | None:
        return self.tags.get(TAG_STORAGE) or None

    @property
    def overrides(self) -> list[str]:
        return json.loads(self.tags.get(TAG_OVERRIDES, "[]"))

    @property
    def force(self) -> bool:
        return self.tags.get(TAG_FORCE) == "true"


def sweep_tags(*, spec_name: str, description: str, storage: str | None, overrides: list[str], force: bool,
               git_commit: str) -> dict[str, str]:
    """The tags of a new sweep's parent run (besides its role and id)."""
    return {
        TAG_SPEC_NAME: spec_name,
        TAG_STORAGE: storage or "",
        TAG_OVERRIDES: json.dumps(overrides),
        TAG_FORCE: "true" if force else "false",
        TAG_GIT_COMMIT: git_commit,
        TAG_NOTE: description,
    }


def _trial_run(run: Run) -> TrialRun:
    return TrialRun(
        run_id=run.info.run_id, name=run.info.run_name or "", status=run.info.status,
        trial_key=run.data.tags.get(TAG_TRIAL_KEY, ""), params=dict(run.data.params),
        metrics=dict(run.data.metrics), tags=dict(run.data.tags),
        start_time=run.info.start_time, end_time=run.info.end_time,
    )


def _sweep_run(run: Run) -> SweepRun:
    return SweepRun(
        run_id=run.info.run_id, experiment_id=run.info.experiment_id,
        sweep_id=run.data.tags.get(TAG_SWEEP_ID, ""), name=run.info.run_name or "", status=run.info.status,
        tags=dict(run.data.tags), start_time=run.info.start_time, end_time=run.info.end_time,
    )


def resolve_tracking_uri(cli_value: str | None = None) -> str:
    return cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def store_missing(uri: str) -> bool:
    """A local sqlite store that does not exist yet (opening it would create it). An empty file counts
    as missing: SQLite reads it as an empty database."""
    path = _sqlite_path(uri)
    return path is not None and not _has_content(path)


def require_store(uri: str | None) -> None:
    """Refuse a local store that does not exist, for commands that read one (before they import more)."""
    uri = resolve_tracking_uri(uri)
    if store_missing(uri):
        raise TrackingError(f"no tracking store at {uri!r} (nothing has been launched here); "
                            "pass --tracking-uri or run from the folder of the sweep")


def _sqlite_path(uri: str) -> Path | None:
    """The file of a local sqlite store, or None for any other store."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return Path(uri.removeprefix("sqlite:///"))


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _store_uri(uri: str) -> str:
    """The URI MLflow is handed: a relative sqlite path made absolute. MLflow keeps one store per URI
    string for the life of the process, so `sqlite:///mlflow.db` would otherwise stay bound to the
    folder it was first opened in (`self.uri` keeps the form the user gave, for messages)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/", ".")) or "://" not in uri


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Outbox:
    """Writes that failed (server away), replayed in order before the next write."""

    pending: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    warned: bool = False

    def run(self, what: str, op: Callable[[], Any]) -> Any:
        if self.flush():
            try:
                return op()
            except Exception as err:  # noqa: BLE001 - any transport error: keep the write for later
                self._keep(what, op, err)
                return None
        self._keep(what, op, None)
        return None

    def flush(self) -> bool:
        while self.pending:
            what, op = self.pending[0]
            try:
                op()
            except Exception:  # noqa: BLE001
                return False
            self.pending.pop(0)
        if self.warned:
            print("[ditsweep] tracking server is back; pending writes delivered", flush=True)
            self.warned = False
        return True

    def _keep(self, what: str, op: Callable[[], Any], err: Exception | None) -> None:
        self.pending.append((what, op))
        if not self.warned:
            reason = f": {type(err).__name__}" if err else ""
            print(f"[ditsweep] tracking write failed ({what}{reason}); keeping results to write later", flush=True)
            self.warned = True


class Tracker:
    """A handle on one tracking store."""

    def __init__(self, uri: str | None = None, create: bool = True):
        """`create=False` for read-only commands: a local store that does not exist is an error, not made."""
        self.uri = resolve_tracking_uri(uri)
        if not create:
            require_store(self.uri)
        self._check_reachable()
        self._store = _store_uri(self.uri)  # what MLflow is handed
        if (path := _sqlite_path(self._store)) is not None:
            prepare_sqlite_store(path)
        from mlflow.tracking import MlflowClient

        try:
            self._client = MlflowClient(tracking_uri=self._store)
            self._client.search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001
            raise _cannot_open(self._store, err) from None
        self.outbox = Outbox()

    def _check_reachable(self) -> None:
        if self.uri.startswith(("http://", "https://")):
            try:
                urllib.request.urlopen(self.uri.rstrip("/") + "/health", timeout=5).read()
            except (urllib.error.URLError, OSError) as err:
                raise TrackingError(
                    f"cannot reach tracking server {self.uri!r} ({err}); start it or pass --tracking-uri"
                ) from None
        elif self.uri.startswith("sqlite:///"):
            path = Path(self.uri.removeprefix("sqlite:///"))
            if not path.parent.exists() and str(path.parent) != "":
                raise TrackingError(f"cannot open tracking store {self.uri!r}: folder '{path.parent}' does not exist")
        elif "://" in self.uri and not self.uri.startswith(("file://", "databricks")):
            scheme = self.uri.split("://", 1)[0]
            if scheme not in ("postgresql", "mysql", "mssql"):
                raise TrackingError(f"unsupported tracking URI scheme {scheme!r} in {self.uri!r}")

    # -- experiments and sweeps -----------------------------------------------------------------
    def experiment_id(self, name: str, create: bool = True) -> str | None:
        import mlflow

        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        if not create:
            return None
        location = artifact_root() if _is_local_store(self.uri) else None
        try:
            # Model training from the start, so the MLflow UI never opens a sweep's experiment as a GenAI one.
            return self._client.create_experiment(name, artifact_location=location,
                                                  tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            # Another sweep of the same spec, started at the same moment, created it first.
            return self._client.get_experiment_by_name(name).experiment_id

    def finished_trials(self, experiment_id: str) -> dict[str, TrialRun]:
        """trial key -> its FINISHED run, across every sweep of the experiment (the cache)."""
        runs = self._search(
            [experiment_id], f"tags.`{TAG_ROLE}` = 'trial' and attributes.status = 'FINISHED'"
        )
        return {run.data.tags[TAG_TRIAL_KEY]: _trial_run(run) for run in runs if TAG_TRIAL_KEY in run.data.tags}

    def start_sweep(self, experiment_id: str, sweep_id: str, *, name: str, tags: dict, params: dict,
                    texts: dict[str, str]) -> SweepRun:
        from mlflow.entities import Param

        run = self._client.create_run(
            experiment_id,
            run_name=name,
            tags={TAG_ROLE: "sweep", TAG_SWEEP_ID: sweep_id, **tags},
        )
        run_id = run.info.run_id
        self._client.log_batch(run_id, params=[Param(k, param_text(v)) for k, v in params.items()])
        for filename, text in texts.items():
            self._client.log_text(run_id, text, filename)
        return _sweep_run(run)

    def find_sweep(self, sweep_id: str) -> SweepRun:
        experiments = [e.experiment_id for e in self._client.search_experiments()]
        runs = self._search(experiments, f"tags.`{TAG_SWEEP_ID}` = '{sweep_id}' and tags.`{TAG_ROLE}` = 'sweep'")
        if not runs:
            raise TrackingError(f"no sweep with id {sweep_id!r} in {self.uri}; `ditsweep status` lists them")
        return _sweep_run(runs[0])

    def list_sweeps(self) -> list[SweepRun]:
        experiments = [e.experiment_id for e in self._client.search_experiments()]
        if not experiments:
            return []
        runs = self._search(experiments, f"tags.`{TAG_ROLE}` = 'sweep'", order_by=["attributes.start_time DESC"])
        return [_sweep_run(run) for run in runs]

    def sweep_trials(self, sweep: SweepRun) -> list[TrialRun]:
        runs = self._search(
            [sweep.experiment_id], f"tags.`{TAG_SWEEP_ID}` = '{sweep.sweep_id}' and tags.`{TAG_ROLE}` = 'trial'"
        )
        return [_trial_run(run) for run in runs]

    def read_bytes(self, run_id: str, path: str) -> bytes:
        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=self._store
            )
            return Path(local).read_bytes()

    def read_text(self, run_id: str, path: str) -> str:
        return self.read_bytes(run_id, path).decode()

    def find_run(self, run_id: str) -> TrialRun | None:
        """The run, or None when the store no longer has it (deleted)."""
        import mlflow

        try:
            run = self._client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            return None
        return None if run.info.lifecycle_stage == "deleted" else _trial_run(run)

    def experiment_name(self, experiment_id: str) -> str:
        return self._client.get_experiment(experiment_id).name

    def artifact_names(self, run_id: str, folder: str | None = None) -> set[str]:
        """Paths of the artifacts directly under `folder` (the run's root by default)."""
        return {item.path for item in self._client.list_artifacts(run_id, folder)}

    def log_folder(self, run_id: str, folder: Path, artifact_path: str) -> None:
        """Upload every file of a local folder under `artifact_path` (existing files are replaced)."""
        self._client.log_artifacts(run_id, str(folder), artifact_path)

    def set_run_table_view(self, experiment_id: str, name: str, params: list[str], metrics: list[str],
                           more_params: list[str] = ()) -> None:
        """Make the MLflow UI run table show the trials (not the collapsed sweep rows) with these params,
        then these metrics, then `more_params` as the first columns: a saved view that the UI lists under
        "Views" and opens from `runs_page_url`. Marks the experiment as model training (MLflow 3's
        `mlflow.experimentKind`) so the UI does not open it as a GenAI experiment."""
        columns = ([f"params.`{key}`" for key in params] + [f"metrics.`{key}`" for key in metrics]
                   + [f"params.`{key}`" for key in more_params])
        # Ordered by run name (not by start time, which nests the trials under collapsed sweep rows).
        state = {"selectedColumns": columns, "columnOrder": columns, "orderByKey": "tags.`mlflow.runName`",
                 "orderByAsc": True, "searchFilter": f"tags.`{TAG_ROLE}` = 'trial'"}
        now = _now_ms()
        envelope = {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
        self._client.set_experiment_tag(experiment_id, TAG_VIEW, json.dumps(envelope))
        self._client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)

    def experiments_with_view(self) -> list[tuple[str, str]]:
        """(experiment id, name) of the experiments that have the ditsweep run-table view."""
        return [(e.experiment_id, e.name) for e in self._client.search_experiments() if TAG_VIEW in e.tags]

    def reopen_run(self, run_id: str) -> None:
        """Mark a run RUNNING again (a resumed sweep)."""
        self._client.update_run(run_id, status=RUNNING)

    def end_run(self, run_id: str, status: str) -> None:
        self.outbox.run(f"end run {run_id}", lambda: self._client.set_terminated(run_id, status, _now_ms()))

    # -- trials ---------------------------------------------------------------------------------
    def open_trial(self, sweep: SweepRun, trial_name: str, trial_key: str, params: dict,
                   existing: TrialRun | None) -> str:
        """The trial's child run: the existing one when resuming (never a second run), else a new one."""
        from mlflow.entities import Param

        if existing is not None:
            run_id = existing.run_id
            self.outbox.run(f"reopen {trial_name}", lambda: self._client.update_run(run_id, status=RUNNING))
            return run_id
        run = self._client.create_run(
            sweep.experiment_id,
            run_name=trial_name,
            tags={
                TAG_PARENT: sweep.run_id,
                TAG_ROLE: "trial",
                TAG_SWEEP_ID: sweep.sweep_id,
                TAG_TRIAL_KEY: trial_key,
            },
        )
        params_list = [Param(k, param_text(v)) for k, v in params.items()]
        for start in range(0, len(params_list), 100):  # log_batch takes at most 100 params a call
            self._client.log_batch(run.info.run_id, params=params_list[start : start + 100])
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.outbox.run(f"metrics step {step}", lambda: self._client.log_batch(run_id, metrics=batch))

    def log_texts(self, run_id: str, texts: dict[str, str]) -> None:
        for filename, text in texts.items():
            self.outbox.run(f"artifact {filename}", lambda t=text, f=filename: self._client.log_text(run_id, t, f))

    def log_files(self, run_id: str, files: dict[str, bytes]) -> None:
        """Binary artifacts (PNG plots), written from memory through a temporary folder."""
        def upload(name: str, payload: bytes) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / name
                path.write_bytes(payload)
                self._client.log_artifact(run_id, str(path))

        for name, payload in files.items():
            self.outbox.run(f"artifact {name}", lambda n=name, p=payload: upload(n, p))

    def log_series(self, run_id: str, series: dict[str, list[tuple[int, float]]]) -> None:
        """Metric series whose step is not a training step (e.g. PSNR per diffusion timestep): MLflow's
        chart view plots them against their step and overlays the selected runs."""
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [Metric(key, float(value), now, int(step)) for key, points in series.items() for step, value in points]
        for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics a batch
            part = batch[start : start + 1000]
            self.outbox.run("metric series", lambda p=part: self._client.log_batch(run_id, metrics=p))

    def log_images(self, run_id: str, images: dict[str, bytes], step: int) -> None:
        """PNG pictures as MLflow images under `key` (the UI's image grid, compared across runs). A
        picture that does not decode is skipped with a message (it is still a plain artifact)."""
        from PIL import Image, UnidentifiedImageError

        for key, payload in images.items():
            try:
                with Image.open(io.BytesIO(payload)) as opened:
                    picture = opened.convert("RGB")
            except (UnidentifiedImageError, OSError) as err:
                print(f"[ditsweep] {key} is not a readable picture, not logged as an MLflow image: {err}", flush=True)
                continue
            self.outbox.run(f"image {key}", lambda k=key, p=picture: self._client.log_image(run_id, p, key=k, step=step))

    def set_error(self, run_id: str, error: str) -> None:
        """Keep a failed trial's error on its run (the MLflow UI shows it in the run's tags)."""
        self.set_tags(run_id, {TAG_ERROR: error[:ERROR_TAG_MAX_CHARS]})

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self.outbox.run("tags", lambda: self._client.log_batch(run_id, tags=batch))

    def flush(self, timeout_s: float = 120.0) -> bool:
        """Deliver pending writes, waiting up to `timeout_s` for the server to come back."""
        deadline = time.monotonic() + timeout_s
        while not self.outbox.flush():
            if time.monotonic() > deadline:
                return False
            time.sleep(2.0)
        return True

    # -- helpers --------------------------------------------------------------------------------
    def _search(self, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None) -> list[Run]:
        runs: list[Run] = []
        token = None
        while True:
            page = self._client.search_runs(
                experiment_ids, filter_string, max_results=1000, order_by=order_by, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs


# ---------------------------------------------------------------------------------------------
# A local sqlite store: created whole or not at all, opened only when it is one


_SQLITE_HEADER = b"SQLite format 3\x00"


STORE_LOCK_TIMEOUT_S = 120.0  # the longest a command waits for another to finish creating the store


def prepare_sqlite_store(path: Path, lock_timeout_s: float = STORE_LOCK_TIMEOUT_S) -> None:
    """Make `path` a complete MLflow store, or raise TrackingError naming it and changing nothing.

    MLflow creates a new store by running some 60 schema migrations in place: two processes doing that
    at once (two `launch` started together), or one interrupted half-way, leave a file no later command
    can open. So a new store is built under a lock on its folder, in a temporary file moved into place
    when complete; a file that is there already is checked before MLflow is let near it."""
    if not _has_content(path):
        with _folder_lock(path.parent, lock_timeout_s):
            if not _has_content(path):  # another process may have created it while this one waited
                _create_store(path)
    _check_store(path)


@contextlib.contextmanager
def _folder_lock(folder: Path, timeout_s: float):
    """An exclusive lock on the folder itself (flock on its descriptor): no lock file is left behind,
    and a process that dies holding it releases it. Creating a store takes seconds; a lock held far
    longer is a stuck process, named rather than waited on."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingError(
                        f"another process has been creating the tracking store in '{folder}' for over "
                        f"{timeout_s:.0f} s; wait for it, or stop it if it is stuck") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _create_store(path: Path, template: bool = False) -> None:
    """Build the store in a temporary file moved into place when complete (the caller holds the folder's
    lock). From a copy of the migrated empty store in the user cache, where MLflow then only adds its
    Default experiment (with this folder's artifact root); `template`: build that copy itself."""
    import shutil
    import sqlite3

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    building = path.with_name(f".{path.name}.creating")
    for leftover in path.parent.glob(f"{building.name}*"):  # a creation that was killed (the lock is ours)
        leftover.unlink()
    try:
        if not template and (empty := _empty_store()) is not None:
            shutil.copyfile(empty, building)
        store = SqlAlchemyStore(f"sqlite:///{building}", artifact_root())
        store.engine.dispose()
        if template:  # no experiment: the copy's Default experiment is made where the copy is opened
            with contextlib.closing(sqlite3.connect(building)) as db, db:
                db.execute("DELETE FROM experiments WHERE experiment_id = 0")
        os.replace(building, path)
    finally:
        for leftover in path.parent.glob(f"{building.name}*"):
            leftover.unlink()


def _empty_store() -> Path | None:
    """The installed MLflow's schema as an empty store, migrated once per MLflow version into the user
    cache (`$DITSWEEP_CACHE`): copying it saves every new store MLflow's 60 migrations (some 2-4 s).
    None (migrate in place) when the cache cannot be written or its copy is not a complete store."""
    import mlflow

    from trainer.data import default_cache_dir

    folder = default_cache_dir() / "mlflow-stores"
    empty = folder / f"empty-{mlflow.__version__}.db"
    try:
        if not _has_content(empty):
            folder.mkdir(parents=True, exist_ok=True)
            with _folder_lock(folder, STORE_LOCK_TIMEOUT_S):
                if not _has_content(empty):  # another process may have made it while this one waited
                    _create_store(empty, template=True)
        _check_store(empty)
    except (OSError, TrackingError):
        return None
    return empty


def _check_store(path: Path) -> None:
    """Refuse, reading only, a file that is not a complete MLflow store (MLflow would try to migrate
    it in place). A complete store of another schema version is left to MLflow's own check."""
    with open(path, "rb") as file:
        header = file.read(len(_SQLITE_HEADER))
    if header != _SQLITE_HEADER:
        raise TrackingError(f"'{path}' is not an MLflow tracking store (not an SQLite database); move it away "
                            "or pass --tracking-uri with another store")
    import sqlite3

    from mlflow.store.db.base_sql_model import Base
    from mlflow.store.tracking import dbmodels  # noqa: F401 - registers the tables on Base

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            revision = (db.execute("SELECT version_num FROM alembic_version").fetchone() or ("none",))[0] \
                if "alembic_version" in tables else None
    except sqlite3.DatabaseError as err:
        raise TrackingError(f"'{path}' is not a readable MLflow tracking store ({err}); move it away or pass "
                            "--tracking-uri with another store") from None
    if revision is None:
        raise TrackingError(f"'{path}' is an SQLite database but not an MLflow tracking store; move it away "
                            "or pass --tracking-uri with another store")
    if not set(Base.metadata.tables) <= tables:
        raise TrackingError(
            f"'{path}' is an incomplete MLflow tracking store (schema revision {revision}, tables missing: its "
            "creation was interrupted, or it was made by another MLflow version); move it away, or back it up "
            f"and run `mlflow db upgrade sqlite:///{path}` if it holds runs you need")


def _cannot_open(uri: str, err: Exception) -> TrackingError:
    """Why MLflow would not open a store, and what to do. MLflow checks a complete store's schema
    revision itself, reading only, and tells to upgrade whatever it found; a revision it does not know
    comes from a newer MLflow, which an upgrade cannot help."""
    import mlflow

    path = _sqlite_path(uri)
    revision = _store_revision(path) if path is not None else None
    if revision is not None and revision not in _schema_revisions():
        return TrackingError(
            f"'{path}' was written by a newer MLflow (schema revision {revision} is unknown to the installed "
            f"MLflow {mlflow.__version__}); open it with that MLflow version, or pass --tracking-uri with another store")
    return TrackingError(f"cannot open tracking store {uri!r}: {first_line(err)}")


def _store_revision(path: Path) -> str | None:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _schema_revisions() -> set[str]:
    """Every schema revision the installed MLflow knows (its alembic migration scripts)."""
    import mlflow
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(Path(mlflow.__file__).parent / "store" / "db_migrations"))
    return {script.revision for script in scripts.walk_revisions()}


def artifact_root() -> str:
    """Where runs of a local store keep their artifacts: ./mlartifacts unless DITSWEEP_ARTIFACT_ROOT."""
    root = os.environ.get("DITSWEEP_ARTIFACT_ROOT") or str(Path(DEFAULT_ARTIFACT_ROOT).resolve())
    return root if "://" in root else Path(root).as_uri()


def runs_page_url(base_url: str, experiment_id: str) -> str:
    """The experiment's run table in the MLflow UI, opened on the ditsweep view."""
    # workflowType: MLflow 3's UI opens in its GenAI workspace unless the link (or the browser's last
    # choice) says model training; the query parameter wins over the browser's memory.
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
            f"&workflowType={UI_WORKFLOW}")


# ---------------------------------------------------------------------------------------------
# The MLflow UI


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow ui` over a local store, with the artifact root `launch` uses for new experiments."""
    if uri.startswith(("http://", "https://")):
        raise TrackingError(f"{uri} is a tracking server: its UI is at that address already")
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise TrackingError(f"no tracking store at '{path}': launch a sweep here first or pass --tracking-uri")
    command = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port),
               "--backend-store-uri", uri, "--workers", "1"]
    if _is_local_store(uri):
        command += ["--default-artifact-root", artifact_root()]
    return command


def server_environment() -> dict[str, str]:
    """The environment for an `mlflow ui` or `mlflow server` that tracks sweeps. It needs no background
    job workers (GenAI judges, trace jobs): MLflow starts seven, a process and some 2.4 s of CPU each,
    for nothing a sweep uses. MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings them back."""
    key = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
    return {**os.environ, key: os.environ.get(key, "false")}


def serve_ui(uri: str | None, host: str, port: int, startup_timeout_s: float = 120.0) -> int:
    """Run the MLflow UI in the foreground until Ctrl-C; print its address once it answers."""
    uri = resolve_tracking_uri(uri)
    command = ui_command(uri, host, port)
    experiments = Tracker(uri, create=False).experiments_with_view()
    check_port_free(host, port)
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops the server too, like Ctrl-C
    # Its own process group: the server, its uvicorn worker and job runner are stopped together.
    server = subprocess.Popen(command, start_new_session=True, env=server_environment())
    try:
        if not _wait_healthy(server, base_url, startup_timeout_s):
            return (server.wait() or 1) if server.poll() is not None else _stop(server, 1)
        print(f"MLflow UI: {base_url}", flush=True)
        for experiment_id, name in experiments:
            print(f"  {name}: {runs_page_url(base_url, experiment_id)}", flush=True)
        print("Ctrl-C stops it.", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return _stop(server, 0)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on: the server would fail to bind it after seconds of
    start-up (its error buried in log lines), and another server answering there would be taken for it."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as err:
        raise TrackingError(f"cannot listen on {host}:{port} ({err.strerror or err}); another process has "
                            "the port: pass --port with a free one") from None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _wait_healthy(server: subprocess.Popen, base_url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while server.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base_url + "/health", timeout=2).read()
            return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    if server.poll() is None:
        print(f"[ditsweep] the MLflow UI did not answer at {base_url} within {timeout_s:.0f}s", flush=True)
    return False


def _stop(server: subprocess.Popen, code: int) -> int:
    """Stop the server's whole process group: SIGTERM (uvicorn shuts down gracefully), SIGKILL if it lingers."""
    for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    return code
