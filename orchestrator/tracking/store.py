"""Where the tracking store is and what it is: the URI (`--tracking-uri`, MLFLOW_TRACKING_URI, or
./mlflow.db), the artifact root of a local store, and a local sqlite store created whole or not at all
and checked before MLflow is let near it. `TrackingError` is every problem a user can fix."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path

from orchestrator.display import first_line

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


class TrackingError(ValueError):
    """The tracking store cannot be opened or does not hold what was asked for."""


def resolve_tracking_uri(cli_value: str | None = None) -> str:
    return cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def store_missing(uri: str) -> bool:
    """A local sqlite store that does not exist yet (opening it would create it). An empty file counts
    as missing: SQLite reads it as an empty database."""
    path = sqlite_path(uri)
    return path is not None and not _has_content(path)


def is_new_store(uri: str | None) -> bool:
    """A local sqlite store this command is about to create (its folder exists, the file does not):
    nothing in it can be FINISHED yet, so every trial of a sweep launched into it will run."""
    uri = resolve_tracking_uri(uri)
    path = sqlite_path(uri)
    return path is not None and store_missing(uri) and path.resolve().parent.is_dir()


def require_store(uri: str | None) -> None:
    """Refuse a local store that does not exist, for commands that read one (before they import more)."""
    uri = resolve_tracking_uri(uri)
    if store_missing(uri):
        raise TrackingError(f"no tracking store at {uri!r} (nothing has been launched here); "
                            "pass --tracking-uri or run from the folder of the sweep")


def sqlite_path(uri: str) -> Path | None:
    """The file of a local sqlite store, or None for any other store."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:":
        return None
    return Path(uri.removeprefix("sqlite:///"))


def _has_content(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def store_uri(uri: str) -> str:
    """The URI MLflow is handed: a relative sqlite path made absolute. MLflow keeps one store per URI
    string for the life of the process, so `sqlite:///mlflow.db` would otherwise stay bound to the
    folder it was first opened in (`self.uri` keeps the form the user gave, for messages)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////") and uri != "sqlite:///:memory:":
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/", ".")) or "://" not in uri


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

    from trainer.storage import default_cache_dir

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


def cannot_open(uri: str, err: Exception) -> TrackingError:
    """Why MLflow would not open a store, and what to do. MLflow checks a complete store's schema
    revision itself, reading only, and tells to upgrade whatever it found; a revision it does not know
    comes from a newer MLflow, which an upgrade cannot help."""
    import mlflow

    path = sqlite_path(uri)
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
