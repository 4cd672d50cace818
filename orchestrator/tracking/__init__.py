"""MLflow, and only here: the one package that imports it. Experiments, the sweep's parent run, one
child run per trial, the report's artifacts, the experiment's run-table view, and the `mlflow ui`
process of `ditsweep ui`.

One module per job: `records` (every tag name; the plain `TrialRun`, `SweepRun` records that leave
the package, never MLflow objects), `store` (the URI, the local sqlite store created whole, the
artifact root, `TrackingError`), `queries` (the read side), `writes` (the write side, every write
through the outbox that keeps writes while a server is away), `tracker` (`Tracker`: a store opened,
both sides over one client) and `ui` (`ditsweep ui`). MLflow itself (some 2 s to import) is imported
where a store is opened, not at import: a command refused for bad input, or one that finds no
store, answers without it. The names below are the package's interface.
"""

import os

# Fail fast on a dead server instead of MLflow's minutes of backoff: the outbox retries later. Set
# before any module of the package can import MLflow.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")

from orchestrator.tracking.records import (  # noqa: E402
    TAG_DEVICE, TAG_GPU_MEMORY_GB, TAG_GPU_NAME, TAG_NODE_ID, TAG_NODE_IP, TAG_ROLE, TAG_SWEEP_ID, SweepRun, TrialRun,
    location_tags, retries_tags, sweep_tags)
from orchestrator.tracking.store import (  # noqa: E402
    DEFAULT_TRACKING_URI, TrackingError, artifact_root, is_new_store, prepare_sqlite_store, require_store,
    resolve_tracking_uri, store_missing)
from orchestrator.tracking.tracker import Tracker  # noqa: E402
from orchestrator.tracking.ui import runs_page_url, serve_ui, server_environment, ui_command  # noqa: E402

__all__ = [
    "DEFAULT_TRACKING_URI", "TAG_DEVICE", "TAG_GPU_MEMORY_GB", "TAG_GPU_NAME", "TAG_NODE_ID", "TAG_NODE_IP",
    "TAG_ROLE", "TAG_SWEEP_ID", "SweepRun", "Tracker", "TrackingError", "TrialRun", "artifact_root", "is_new_store",
    "location_tags", "prepare_sqlite_store", "require_store", "resolve_tracking_uri", "retries_tags", "runs_page_url",
    "serve_ui", "server_environment", "store_missing", "sweep_tags", "ui_command",
]
