"""What leaves the tracking package: every tag name ditsweep writes, and plain records of runs
(`TrialRun`, `SweepRun`), never MLflow objects. Nothing here imports MLflow (its `Run` only for typing)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities import Run

# Every tag ditsweep writes on a run; nothing outside this module spells them.
TAG_ROLE = "ditsweep.role"  # "sweep" (the parent run) or "trial" (a child run)
TAG_SWEEP_ID = "ditsweep.sweep_id"
TAG_TRIAL_KEY = "ditsweep.trial_key"
TAG_ERROR = "ditsweep.error"  # a failed trial's error
TAG_RETRIES = "ditsweep.retries"  # how many errored attempts of a trial were retried
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
LOCATION_TAGS = {"node_id": TAG_NODE_ID, "node_ip": TAG_NODE_IP, "device": TAG_DEVICE,
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
    def location(self) -> dict[str, str]:
        """Where the trial last ran: {"node_id", "node_ip", "device", ...} as far as recorded."""
        return {key: self.tags[tag] for key, tag in LOCATION_TAGS.items() if tag in self.tags}

    @property
    def retries(self) -> int:
        """How many of its attempts errored and were retried (0 when none, or before this was recorded)."""
        return int(self.tags.get(TAG_RETRIES, 0))


def retries_tags(retries: int) -> dict[str, str]:
    """A trial's count of retried attempts as its run's tag."""
    return {TAG_RETRIES: str(retries)}


def location_tags(location: dict[str, str]) -> dict[str, str]:
    """Where a trial runs ({"node_id": ..., "device": ...}) as run tags; unknown entries are left out."""
    return {LOCATION_TAGS[key]: str(value) for key, value in location.items() if key in LOCATION_TAGS}


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


def trial_run(run: Run) -> TrialRun:
    return TrialRun(
        run_id=run.info.run_id, name=run.info.run_name or "", status=run.info.status,
        trial_key=run.data.tags.get(TAG_TRIAL_KEY, ""), params=dict(run.data.params),
        metrics=dict(run.data.metrics), tags=dict(run.data.tags),
        start_time=run.info.start_time, end_time=run.info.end_time,
    )


def sweep_run(run: Run) -> SweepRun:
    return SweepRun(
        run_id=run.info.run_id, experiment_id=run.info.experiment_id,
        sweep_id=run.data.tags.get(TAG_SWEEP_ID, ""), name=run.info.run_name or "", status=run.info.status,
        tags=dict(run.data.tags), start_time=run.info.start_time, end_time=run.info.end_time,
    )
