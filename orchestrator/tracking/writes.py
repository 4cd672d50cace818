"""The write side of the tracking store, every write through one outbox.

The driver is the only process that writes. A write that fails because the tracking server went away
is kept in the outbox and replayed in order once the server answers again, so no result is lost; the
outbox also owns the batching limits of MLflow's `log_batch`.

A trial's run can be opened while the server is away: `open_trial` then hands out a local id
(`PENDING_RUN` + a random suffix), its creation waits in the outbox with the writes that name it, and
each write looks its run id up when it is delivered. Two writes cannot wait: a new experiment and a
new sweep's run (`Outbox.call`), whose ids the caller prints, stores in trials.json and `resume` looks
up; they are delivered after every pending write, and a failure is the caller's error, not a retry.
"""

from __future__ import annotations

import io
import json
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from orchestrator.display import param_text
from orchestrator.run_states import RUNNING
from orchestrator.tracking.records import (ERROR_TAG_MAX_CHARS, EXPERIMENT_KIND, TAG_ERROR, TAG_EXPERIMENT_KIND,
                                           TAG_PARENT, TAG_ROLE, TAG_SWEEP_ID, TAG_TRIAL_KEY, TAG_VIEW, SweepRun,
                                           TrialRun, sweep_run)
from orchestrator.tracking.store import TrackingError, artifact_root, is_local_store

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

PENDING_RUN = "pending-run-"  # a trial run's local id until the outbox has created it in MLflow
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_PER_BATCH = 100


def _now_ms() -> int:
    return int(time.time() * 1000)


def _batches(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


@dataclass
class Outbox:
    """Writes that failed (server away), replayed in order before the next write."""

    pending: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)
    warned: bool = False

    def run(self, what: str, op: Callable[[], Any]) -> Any:
        """Deliver `op` after the pending writes; keep it for later (and return None) if it cannot be."""
        if self.flush():
            try:
                return op()
            except Exception as err:  # noqa: BLE001 - any transport error: keep the write for later
                self._keep(what, op, err)
                return None
        self._keep(what, op, None)
        return None

    def call(self, what: str, op: Callable[[], Any]) -> Any:
        """A write whose answer is needed now: delivered after the pending writes, never kept."""
        if not self.flush():
            raise TrackingError(f"the tracking store does not answer; {len(self.pending)} earlier write(s) are "
                                f"still pending, so {what} cannot be written")
        return op()

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


class Writes:
    """Writes to one store, each through `outbox`; `Tracker` opens the client (`_client`) and the URI,
    and brings the read side (`find_experiment`, from `Queries`)."""

    uri: str
    _client: MlflowClient
    outbox: Outbox
    _created: dict[str, str]  # local id of a trial run -> its MLflow run id, once created

    def _id(self, run_id: str) -> str:
        """The MLflow id of a run (a local id from `open_trial` resolved once the outbox created it)."""
        return self._created.get(run_id, run_id)

    # -- experiments and sweeps -----------------------------------------------------------------
    def experiment_id(self, name: str, create: bool = True) -> str | None:
        found = self.find_experiment(name)
        if found is not None or not create:
            return found
        return self.outbox.call(f"experiment {name}", lambda: self._create_experiment(name))

    def _create_experiment(self, name: str) -> str:
        import mlflow

        location = artifact_root() if is_local_store(self.uri) else None
        try:
            # Model training from the start, so the MLflow UI never opens a sweep's experiment as a GenAI one.
            return self._client.create_experiment(name, artifact_location=location,
                                                  tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            # Another sweep of the same spec, started at the same moment, created it first.
            return self._client.get_experiment_by_name(name).experiment_id

    def start_sweep(self, experiment_id: str, sweep_id: str, *, name: str, tags: dict, params: dict,
                    texts: dict[str, str]) -> SweepRun:
        run = self.outbox.call(f"the run of sweep {sweep_id}", lambda: self._client.create_run(
            experiment_id, run_name=name, tags={TAG_ROLE: "sweep", TAG_SWEEP_ID: sweep_id, **tags}))
        self._log_params(run.info.run_id, params)
        self.log_texts(run.info.run_id, texts)
        return sweep_run(run)

    def reopen_run(self, run_id: str) -> None:
        """Mark a run RUNNING again (a resumed sweep or trial)."""
        self.outbox.run(f"reopen run {run_id}", lambda: self._client.update_run(self._id(run_id), status=RUNNING))

    def end_run(self, run_id: str, status: str) -> None:
        self.outbox.run(f"end run {run_id}", lambda: self._client.set_terminated(self._id(run_id), status, _now_ms()))

    # -- trials ---------------------------------------------------------------------------------
    def open_trial(self, sweep: SweepRun, trial_name: str, trial_key: str, params: dict,
                   existing: TrialRun | None) -> str:
        """The trial's child run: the existing one when resuming (never a second run), else a new one
        (its local id while the server is away; see the module's note)."""
        if existing is not None:
            self.reopen_run(existing.run_id)
            return existing.run_id
        local = f"{PENDING_RUN}{secrets.token_hex(8)}"
        tags = {TAG_PARENT: sweep.run_id, TAG_ROLE: "trial", TAG_SWEEP_ID: sweep.sweep_id, TAG_TRIAL_KEY: trial_key}

        def create() -> str:
            if local not in self._created:  # a replay after the run was created but its params were not
                run = self._client.create_run(sweep.experiment_id, run_name=trial_name,
                                              tags={**tags, TAG_PARENT: self._id(sweep.run_id)})
                self._created[local] = run.info.run_id
            return self._created[local]

        created = self.outbox.run(f"run of {trial_name}", create)
        self._log_params(local, params)
        return created or local

    def _log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        for part in _batches([Param(k, param_text(v)) for k, v in params.items()], MAX_PARAMS_PER_BATCH):
            self.outbox.run("params", lambda p=part: self._client.log_batch(self._id(run_id), params=p))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        for part in _batches([Metric(k, float(v), now, step) for k, v in metrics.items()], MAX_METRICS_PER_BATCH):
            self.outbox.run(f"metrics step {step}", lambda p=part: self._client.log_batch(self._id(run_id), metrics=p))

    def log_series(self, run_id: str, series: dict[str, list[tuple[int, float]]]) -> None:
        """Metric series whose step is not a training step (e.g. PSNR per diffusion timestep): MLflow's
        chart view plots them against their step and overlays the selected runs."""
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [Metric(key, float(value), now, int(step)) for key, points in series.items() for step, value in points]
        for part in _batches(batch, MAX_METRICS_PER_BATCH):
            self.outbox.run("metric series", lambda p=part: self._client.log_batch(self._id(run_id), metrics=p))

    def log_texts(self, run_id: str, texts: dict[str, str]) -> None:
        for filename, text in texts.items():
            self.outbox.run(f"artifact {filename}",
                            lambda t=text, f=filename: self._client.log_text(self._id(run_id), t, f))

    def log_files(self, run_id: str, files: dict[str, bytes]) -> None:
        """Binary artifacts (PNG plots), written from memory through a temporary folder."""
        def upload(name: str, payload: bytes) -> None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / name
                path.write_bytes(payload)
                self._client.log_artifact(self._id(run_id), str(path))

        for name, payload in files.items():
            self.outbox.run(f"artifact {name}", lambda n=name, p=payload: upload(n, p))

    def log_folder(self, run_id: str, folder: Path, artifact_path: str) -> None:
        """Upload every file of a local folder under `artifact_path` (existing files are replaced). The
        folder is read when the write is delivered: it must stay until `flush`."""
        self.outbox.run(f"folder {artifact_path}",
                        lambda: self._client.log_artifacts(self._id(run_id), str(folder), artifact_path))

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
            self.outbox.run(f"image {key}",
                            lambda k=key, p=picture: self._client.log_image(self._id(run_id), p, key=k, step=step))

    def set_error(self, run_id: str, error: str) -> None:
        """Keep a failed trial's error on its run (the MLflow UI shows it in the run's tags)."""
        self.set_tags(run_id, {TAG_ERROR: error[:ERROR_TAG_MAX_CHARS]})

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        self.outbox.run("tags", lambda: self._client.log_batch(self._id(run_id), tags=batch))

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
        for key, value in ((TAG_VIEW, json.dumps(envelope)), (TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)):
            self.outbox.run(f"experiment tag {key}",
                            lambda k=key, v=value: self._client.set_experiment_tag(experiment_id, k, v))

    def flush(self, timeout_s: float = 120.0) -> bool:
        """Deliver pending writes, waiting up to `timeout_s` for the server to come back."""
        deadline = time.monotonic() + timeout_s
        while not self.outbox.flush():
            if time.monotonic() > deadline:
                return False
            time.sleep(2.0)
        return True
