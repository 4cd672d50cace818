"""A file where the tracking store should be that is not a complete MLflow store (a text file, a
truncated copy, tables missing, a newer schema, another database): `launch` and `status` exit 2 naming
it and leave it unchanged. And the wait for another process creating a store is bounded."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from tests.support.sweeps import invoke, write_spec


@pytest.fixture(scope="session")
def pristine_store(tmp_path_factory) -> bytes:
    """The bytes of a complete store made by ditsweep (made once: its migrations take a second or two)."""
    from orchestrator.tracking import Tracker

    made = tmp_path_factory.mktemp("pristine") / "made.db"
    Tracker(f"sqlite:///{made}").experiment_id("kept")
    return made.read_bytes()


def _real_store(folder: Path, pristine: bytes) -> Path:
    """A copy of the pristine store as the folder's mlflow.db: a path MLflow has not opened in this
    process (it keeps the store it opened for each URI), so the command under test reads the file as it is."""
    store = folder / "mlflow.db"
    store.write_bytes(pristine)
    return store


def _truncated(folder: Path, pristine: bytes) -> str:
    store = _real_store(folder, pristine)
    store.write_bytes(store.read_bytes()[:5000])
    return "is not a readable MLflow tracking store"


def _tables_missing(folder: Path, pristine: bytes) -> str:
    """What two stores created at once, or one creation killed half-way, left before: tables missing."""
    store = _real_store(folder, pristine)
    with sqlite3.connect(store) as db:
        db.execute("DROP TABLE metrics")
    return "is an incomplete MLflow tracking store"


def _newer_schema(folder: Path, pristine: bytes) -> str:
    store = _real_store(folder, pristine)
    with sqlite3.connect(store) as db:
        db.execute("UPDATE alembic_version SET version_num = 'ffff00001111'")
    return "written by a newer MLflow (schema revision ffff00001111"


def _other_database(folder: Path, pristine: bytes) -> str:
    with sqlite3.connect(folder / "mlflow.db") as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    return "is an SQLite database but not an MLflow tracking store"


def _text_file(folder: Path, pristine: bytes) -> str:
    (folder / "mlflow.db").write_text("not a database\n")
    return "is not an MLflow tracking store (not an SQLite database)"


NOT_A_STORE = {"text file": _text_file, "truncated copy": _truncated, "tables missing": _tables_missing,
               "newer schema": _newer_schema, "other database": _other_database}


def test_the_wait_for_another_process_creating_the_store_is_bounded(tmp_path):
    """The folder lock that serializes store creation, held by someone else (here this process, on
    another descriptor): the wait ends with a message naming the folder, and nothing is created."""
    import fcntl

    from orchestrator.tracking import TrackingError, prepare_sqlite_store

    holder = os.open(tmp_path, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.raises(TrackingError, match=f"creating the tracking store in '{tmp_path}' for over 1 s"):
            prepare_sqlite_store(tmp_path / "mlflow.db", lock_timeout_s=1)
        assert 1 <= time.monotonic() - start < 10
    finally:
        os.close(holder)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", sorted(NOT_A_STORE))
@pytest.mark.parametrize("command", ["launch", "status"])
def test_a_store_that_is_not_one_exits_2_naming_it_and_is_left_unchanged(tmp_path, monkeypatch, pristine_store,
                                                                          case, command):
    expected = NOT_A_STORE[case](tmp_path, pristine_store)
    store = tmp_path / "mlflow.db"
    before = store.read_bytes()
    args = [str(write_spec(tmp_path))] if command == "launch" else []
    result, written = invoke(tmp_path, monkeypatch, command, *args)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and str(store) in result.stderr, result.stderr
    assert "--tracking-uri" in result.stderr or "mlflow db upgrade" in result.stderr
    assert "Traceback" not in result.output
    assert store.read_bytes() == before
    assert written == set()
