"""`Tracker`: one tracking store opened (reachable, a complete store, MLflow's client made), with its
read side (orchestrator.tracking.queries) and its outboxed write side (orchestrator.tracking.writes)."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from orchestrator.tracking.queries import Queries
from orchestrator.tracking.store import (TrackingError, cannot_open, prepare_sqlite_store, require_store,
                                         resolve_tracking_uri, sqlite_path, store_uri)
from orchestrator.tracking.writes import Outbox, Writes


class Tracker(Queries, Writes):
    """A handle on one tracking store: its queries (`Queries`) and its outboxed writes (`Writes`)."""

    def __init__(self, uri: str | None = None, create: bool = True):
        """`create=False` for read-only commands: a local store that does not exist is an error, not made."""
        self.uri = resolve_tracking_uri(uri)
        if not create:
            require_store(self.uri)
        self._check_reachable()
        self._store = store_uri(self.uri)  # what MLflow is handed
        if (path := sqlite_path(self._store)) is not None:
            prepare_sqlite_store(path)
        from mlflow.tracking import MlflowClient

        try:
            self._client = MlflowClient(tracking_uri=self._store)
            self._client.search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001
            raise cannot_open(self._store, err) from None
        self.outbox = Outbox()
        self._created = {}

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
