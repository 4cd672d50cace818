"""A new local store is a copy of the migrated empty store in the user cache (MLflow's 60 schema
migrations run once per MLflow version, not once per store): the copy must be the store MLflow's own
migrations make, and creating stores at once must stay safe with the cache empty."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from alembic.script import ScriptDirectory
from mlflow.store.db.base_sql_model import Base
from mlflow.store.tracking import dbmodels  # noqa: F401 - registers MLflow's tables on Base
from mlflow.tracking import MlflowClient

from orchestrator.tracking import prepare_sqlite_store

CACHED = f"mlflow-stores/empty-{mlflow.__version__}.db"


def schema_revision_and_tables(path: Path) -> tuple[str, set[str]]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        (revision,) = db.execute("SELECT version_num FROM alembic_version").fetchone()
        return revision, {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def default_experiment(path: Path) -> list:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT name, artifact_location, lifecycle_stage FROM experiments").fetchall()


def test_a_new_store_is_a_copy_of_the_cached_empty_store_at_mlflows_schema(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DITSWEEP_CACHE", str(cache))
    monkeypatch.delenv("DITSWEEP_ARTIFACT_ROOT", raising=False)
    # The installed MLflow's schema: its latest migration, and the tables its models declare.
    head = ScriptDirectory(str(Path(mlflow.__file__).parent / "store" / "db_migrations")).get_current_head()
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)
        prepare_sqlite_store(folder / "mlflow.db")
        if name == "first":  # mark the cached store: a later store that carries the mark was copied from it
            with contextlib.closing(sqlite3.connect(cache / CACHED)) as db:
                db.execute("PRAGMA user_version = 4321")
        revision, tables = schema_revision_and_tables(folder / "mlflow.db")
        assert revision == head and set(Base.metadata.tables) <= tables
        # MLflow made its Default experiment in the copy, with this folder's artifact root.
        assert default_experiment(folder / "mlflow.db") == [
            ("Default", f"{(folder / 'mlartifacts').as_uri()}/0", "active")]
        assert sorted(p.name for p in folder.iterdir()) == ["mlflow.db"]  # nothing left of the creation
    with contextlib.closing(sqlite3.connect(tmp_path / "second" / "mlflow.db")) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (4321,)
    assert default_experiment(cache / CACHED) == []  # the cached store has no experiment of a folder
    assert sorted(p.name for p in (cache / "mlflow-stores").iterdir()) == [Path(CACHED).name]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'second' / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("used"))
    client.log_metric(run.info.run_id, "loss", 0.5)
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.5}


def test_a_cache_that_cannot_be_written_leaves_the_store_to_mlflows_migrations(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would be\n")
    monkeypatch.setenv("DITSWEEP_CACHE", str(blocked))
    monkeypatch.chdir(tmp_path)
    prepare_sqlite_store(tmp_path / "mlflow.db")
    assert [name for name, _, _ in default_experiment(tmp_path / "mlflow.db")] == ["Default"]
    assert blocked.read_text() == "a file where the cache folder would be\n"


CREATE = """
import os, sys, time
from pathlib import Path
from orchestrator.tracking import prepare_sqlite_store  # imported before the start line: all start together
import mlflow.store.tracking.sqlalchemy_store
go = Path(sys.argv[2])
(go.parent / f"ready-{os.getpid()}").touch()
while not go.exists():
    time.sleep(0.01)
prepare_sqlite_store(Path(sys.argv[1]))
"""


@pytest.mark.slow
def test_stores_created_at_once_with_an_empty_cache_are_all_complete(tmp_path):
    """Three processes create stores at the same moment, two of them the same store, while the cached
    empty store does not exist yet: one of them builds it, every store is whole, nothing is left over."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    folders = [tmp_path / "a", tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir(exist_ok=True)
    env = {**os.environ, "DITSWEEP_CACHE": str(cache)}
    env.pop("DITSWEEP_ARTIFACT_ROOT", None)
    creators = [subprocess.Popen([sys.executable, "-c", CREATE, str(folder / "mlflow.db"), str(go)], cwd=folder,
                                 env=env, stderr=subprocess.PIPE, text=True) for folder in folders]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(creators):  # each has imported MLflow
        assert time.monotonic() < deadline, "the creating processes did not start within 120 s"
        time.sleep(0.05)
    go.touch()
    errors = [creator.communicate(timeout=240)[1] for creator in creators]
    assert [creator.returncode for creator in creators] == [0, 0, 0], errors
    for folder in (tmp_path / "a", tmp_path / "b"):
        assert sorted(p.name for p in folder.iterdir()) == ["mlflow.db"]
        assert default_experiment(folder / "mlflow.db") == [
            ("Default", f"{(folder / 'mlartifacts').as_uri()}/0", "active")]
        client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
        assert client.get_experiment_by_name("Default") is not None
    assert sorted(p.name for p in (cache / "mlflow-stores").iterdir()) == [Path(CACHED).name]
