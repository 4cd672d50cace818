"""The read side of the tracking store: experiments, sweeps, trials and artifacts looked up and returned
as plain records (orchestrator.tracking.records). Nothing here writes; `Tracker` combines it with the
outboxed write side (orchestrator.tracking.writes) over one MLflow client."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.tracking.records import (TAG_ROLE, TAG_SWEEP_ID, TAG_TRIAL_KEY, TAG_VIEW, SweepRun, TrialRun,
                                           sweep_run, trial_run)
from orchestrator.tracking.store import TrackingError

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient


class Queries:
    """Reads of one store; `Tracker` opens the client (`_client`, `_store`) and the store's URI (`uri`)."""

    uri: str
    _store: str
    _client: MlflowClient

    def find_experiment(self, name: str) -> str | None:
        """The id of the experiment called `name`, or None."""
        experiment = self._client.get_experiment_by_name(name)
        return None if experiment is None else experiment.experiment_id

    def experiment_name(self, experiment_id: str) -> str:
        return self._client.get_experiment(experiment_id).name

    def experiments_with_view(self) -> list[tuple[str, str]]:
        """(experiment id, name) of the experiments that have the ditsweep run-table view."""
        return [(e.experiment_id, e.name) for e in self._client.search_experiments() if TAG_VIEW in e.tags]

    def finished_trials(self, experiment_id: str) -> dict[str, TrialRun]:
        """trial key -> its FINISHED run, across every sweep of the experiment (the cache)."""
        runs = self._search(
            [experiment_id], f"tags.`{TAG_ROLE}` = 'trial' and attributes.status = 'FINISHED'"
        )
        return {run.data.tags[TAG_TRIAL_KEY]: trial_run(run) for run in runs if TAG_TRIAL_KEY in run.data.tags}

    def find_sweep(self, sweep_id: str) -> SweepRun:
        experiments = [e.experiment_id for e in self._client.search_experiments()]
        runs = self._search(experiments, f"tags.`{TAG_SWEEP_ID}` = '{sweep_id}' and tags.`{TAG_ROLE}` = 'sweep'")
        if not runs:
            raise TrackingError(f"no sweep with id {sweep_id!r} in {self.uri}; `ditsweep status` lists them")
        return sweep_run(runs[0])

    def list_sweeps(self) -> list[SweepRun]:
        experiments = [e.experiment_id for e in self._client.search_experiments()]
        if not experiments:
            return []
        runs = self._search(experiments, f"tags.`{TAG_ROLE}` = 'sweep'", order_by=["attributes.start_time DESC"])
        return [sweep_run(run) for run in runs]

    def sweep_trials(self, sweep: SweepRun) -> list[TrialRun]:
        runs = self._search(
            [sweep.experiment_id], f"tags.`{TAG_SWEEP_ID}` = '{sweep.sweep_id}' and tags.`{TAG_ROLE}` = 'trial'"
        )
        return [trial_run(run) for run in runs]

    def find_run(self, run_id: str) -> TrialRun | None:
        """The run, or None when the store no longer has it (deleted)."""
        import mlflow

        try:
            run = self._client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            return None
        return None if run.info.lifecycle_stage == "deleted" else trial_run(run)

    def artifact_names(self, run_id: str, folder: str | None = None) -> set[str]:
        """Paths of the artifacts directly under `folder` (the run's root by default)."""
        return {item.path for item in self._client.list_artifacts(run_id, folder)}

    def read_bytes(self, run_id: str, path: str) -> bytes:
        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=self._store
            )
            return Path(local).read_bytes()

    def read_text(self, run_id: str, path: str) -> str:
        return self.read_bytes(run_id, path).decode()

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
