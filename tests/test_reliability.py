"""Reliability and security: bad input is refused before anything starts, faults lose nothing.

Bad input runs the CLI in-process (fast: it stops before Ray or MLflow start). Faults run real
sweeps as subprocesses and break them for real: SIGKILL, SIGINT, a killed worker, a tracking server
that goes away.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.support.sweeps import ditsweep, free_port, invoke, runs_by_role, sqlite_uri, tiny_config, write_spec


def launch_in_process(tmp_path: Path, monkeypatch, *args: str):
    return invoke(tmp_path, monkeypatch, "launch", *args)


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one message naming the problem, nothing started or written.


BAD_GRIDS = {
    "even window": ({"attention.windows": [[3, 4]]}, "4"),
    "zero window": ({"attention.windows": [[0]]}, "0"),
    "schedule longer than depth": ({"attention.windows": [[3] * 13]}, "13 windows"),
    "fraction above 1": ({"data.fraction": [1.5]}, "1.5"),
    "fraction zero": ({"data.fraction": [0]}, "data.fraction"),
    "empty axis": ({"seed": []}, "grid.seed"),
    "unknown axis": ({"train.stepz": [1]}, "stepz"),
    "wrong type": ({"train.batch_size": ["big"]}, "big"),
    "bad placement": ({"attention.placement": ["head", "sideways"]}, "sideways"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRIDS))
def test_bad_grid_values_exit_2_and_write_nothing(tmp_path, monkeypatch, case):
    grid, expected = BAD_GRIDS[case]
    spec = write_spec(tmp_path, grid=grid)
    result, written = launch_in_process(tmp_path, monkeypatch, str(spec))
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert written == set()


def test_malformed_yaml_exits_2(tmp_path, monkeypatch):
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: x\ngrid: {attention.placement: [head\n")
    result, written = launch_in_process(tmp_path, monkeypatch, str(spec))
    assert result.exit_code == 2 and "not valid YAML" in result.output
    assert written == set()


def test_unknown_top_level_key_exits_2(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, retries=3)
    result, written = launch_in_process(tmp_path, monkeypatch, str(spec))
    assert result.exit_code == 2 and "retries" in result.output
    assert written == set()


def test_num_images_beyond_the_pool_exits_2(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, grid={"data.num_images": [16, 5000]})
    result, written = launch_in_process(tmp_path, monkeypatch, str(spec))
    assert result.exit_code == 2
    assert "data.num_images=5000" in result.output and "1781" in result.output
    assert written == set()


def test_set_path_that_does_not_exist_exits_2(tmp_path, monkeypatch):
    spec = write_spec(tmp_path)
    result, written = launch_in_process(tmp_path, monkeypatch, str(spec), "--set", "train.epochs=3")
    assert result.exit_code == 2 and "train.epochs" in result.output
    assert written == set()


def test_missing_data_uri_exits_2(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, grid={"data.source": [str(tmp_path / "no-such-data.npy")]})
    result, written = launch_in_process(tmp_path, monkeypatch, str(spec))
    assert result.exit_code == 2 and "no-such-data.npy" in result.output
    assert written == set()


def test_unreachable_s3_data_exits_2(tmp_path, monkeypatch, s3_env):
    dead = f"http://127.0.0.1:{free_port()}"
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(name, dead)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    spec = write_spec(tmp_path, grid={"data.source": ["s3://ditsweep-data/digits.npy"]})
    result, written = launch_in_process(tmp_path, monkeypatch, str(spec))
    assert result.exit_code == 2 and "s3://ditsweep-data/digits.npy" in result.output
    assert written == set()


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/missing-folder/mlflow.db", "http://127.0.0.1:{port}"])
def test_tracking_uri_that_cannot_be_opened_exits_2(tmp_path, monkeypatch, uri):
    spec = write_spec(tmp_path)
    uri = uri.format(tmp=tmp_path, port=free_port())
    result, written = launch_in_process(tmp_path, monkeypatch, str(spec), "--tracking-uri", uri)
    assert result.exit_code == 2, result.output
    expected = "cannot reach tracking server" if uri.startswith("http") else "does not exist"
    assert expected in result.stderr and uri in result.stderr
    assert written == set()


# Strings that reach MLflow, Ray or a file name: refused at validation where MLflow would refuse or cut them.


@pytest.mark.parametrize(
    ("spec_fields", "args", "expected"),
    [
        ({"name": "n" * 5000}, [], "name: String should have at most 256 characters"),
        ({"description": "d" * 9000}, [], "description: String should have at most 8000 characters"),
        ({}, ["--set", "train.steps=4"] * 600, "MLflow keeps at most 8000"),
        ({}, ["--storage", "s" * 9000], "--storage is 9000 characters; MLflow keeps at most 8000"),
    ],
    ids=["long-name", "long-description", "many-sets", "long-storage"],
)
def test_strings_mlflow_would_refuse_or_cut_exit_2_and_write_nothing(tmp_path, monkeypatch, spec_fields, args,
                                                                      expected):
    spec = write_spec(tmp_path)
    spec.write_text(yaml.safe_dump({**yaml.safe_load(spec.read_text()), **spec_fields}))
    result, written = launch_in_process(tmp_path, monkeypatch, str(spec), *args)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr, result.stderr
    assert written == set()


@pytest.mark.parametrize("command", ["status", "resume", "report"])
def test_a_sweep_id_that_new_sweep_id_cannot_make_exits_2(tmp_path, monkeypatch, command):
    """A sweep id goes into MLflow's search filter and a folder name: a quote or a path is refused."""
    for bad in ("x' or '1'='1", "../../etc", "a" * 5000):
        result, written = invoke(tmp_path, monkeypatch, command, bad)
        assert result.exit_code == 2, result.output
        assert "is not a sweep id" in result.stderr and len(result.stderr) < 1000, result.stderr
        assert written == set()


def test_a_trial_name_fits_mlflow_and_its_folder_name_fits_the_file_system():
    from orchestrator.spec import run_name
    from orchestrator.sweep import _dirname

    class Trial:
        config = {"trial": {"name": run_name({"data.source": "/data/" + "é" * 400}), "key": "0123456789abcdef"}}

    assert len(Trial.config["trial"]["name"]) == 250  # MLflow's runs.name column
    folder = _dirname(Trial)
    assert len(folder.encode()) <= 255 and folder.isascii() and folder.endswith("-0123456789")


# A file where the tracking store should be that is not a complete MLflow store: refused, unchanged.


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


def test_ui_on_a_taken_port_exits_2_at_once_naming_the_port(tmp_path, monkeypatch, pristine_store):
    """Something listens on the port already (another UI): refused before a server starts, and no
    address printed, since what answers there is not this store's UI."""
    _real_store(tmp_path, pristine_store)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        result, written = invoke(tmp_path, monkeypatch, "ui", "--port", str(port))
        elapsed = time.monotonic() - start
    assert result.exit_code == 2, result.output
    assert f"127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert "MLflow UI:" not in result.stdout
    assert elapsed < 5, elapsed
    assert written == set()


def test_yaml_is_loaded_safely(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    spec = tmp_path / "evil.yaml"
    spec.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    result, _ = launch_in_process(tmp_path, monkeypatch, str(spec))
    assert result.exit_code == 2
    assert not marker.exists()


def test_checkpoints_load_with_weights_only(tmp_path):
    """A checkpoint that smuggles in a pickled object is refused, not executed."""
    import torch

    from trainer.train import CHECKPOINT_FILE, load_checkpoint

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save({"step": 1, "payload": Payload()}, folder / CHECKPOINT_FILE)
    assert load_checkpoint(folder) is None
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Faults: real sweeps, broken for real.


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the sweep ended before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)


def start_launch(spec: Path, cwd: Path, *args: str, env: dict | None = None, log=None) -> subprocess.Popen:
    """`ditsweep launch` in its own process group; its output piped, or into the open file `log` (to be
    read while it runs)."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "launch", str(spec), *args],
        cwd=cwd, env={**os.environ, **(env or {})}, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )


# A trial long enough to be broken mid-way: a checkpoint every 5 steps. Attention locality (a figure
# per trial) is left out: these tests are about what survives a fault, not what is measured.
LONGER = tiny_config({"train.steps": 40, "train.log_every": 5, "eval.every": 5, "eval.locality.enabled": False})
# The killed-workers-then-Ctrl-C sweep needs less: its faults land from the second checkpoint on, with steps to go.
SHORTER = tiny_config({"train.steps": 20, "train.log_every": 5, "eval.every": 5, "eval.locality.enabled": False})


def checkpoints(folder: Path, index: int) -> list[Path]:
    return list((folder / "ditsweep_results").glob(f"*/*/checkpoint_{index:06d}"))


@pytest.mark.slow
def test_killed_workers_retry_from_checkpoints_then_sigterm_and_resume_finish_every_trial(tmp_path):
    """One sweep (3 trials, 2 CPUs) broken twice. The running trials' Ray workers are SIGKILLed after a
    checkpoint: Tune retries each from its checkpoint (`max_failures`), not from step 0. Then SIGTERM (an
    eviction, `ray job stop`), handled as Ctrl-C: exit 143, no native stack from Ray's own handler,
    unfinished trials KILLED, nothing left RUNNING; `ditsweep resume` continues them to the end.
    (Ctrl-C takes the same path from its handler on: test_sigterm_runs_what_ctrl_c_runs.)"""
    spec = write_spec(tmp_path, name="interrupt", base=SHORTER, grid={"attention.placement": ["none", "head", "tail"]},
                      max_failures=2)
    store = tmp_path / "mlflow.db"
    driver = start_launch(spec, tmp_path)
    try:
        wait_for(lambda: checkpoints(tmp_path, 1), 240, "a checkpoint", driver)
        workers = ray_trial_workers(driver.pid)
        assert workers, "no Ray worker found"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: restored_steps(store), 240, "a trial restored from its checkpoint", driver)
        driver.send_signal(signal.SIGTERM)  # the restored trials have steps to go: 20, from step 5 or 10
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    # From a checkpoint (every 5 steps), not from step 0. Which one depends on whether Tune had
    # registered the checkpoint being uploaded when the worker died.
    restored = restored_steps(store)
    assert restored and all(step >= 5 and step % 5 == 0 for step in restored.values()), restored
    assert driver.returncode == 143, output  # the shell's convention: 128 + SIGTERM
    assert "retry" in output and "ditsweep resume" in output
    assert "SIGTERM received" not in output and "logging.cc" not in output, output  # Ray's native handler
    assert "Context impl" not in output and "Creating initial MLflow" not in output, output
    client = MlflowClient(tracking_uri=sqlite_uri(tmp_path))
    runs = runs_by_role(client, "interrupt")
    states = [r.info.status for r in runs["trial"]]
    assert "RUNNING" not in states and "KILLED" in states, states
    assert runs["sweep"][0].info.status == "KILLED"

    sweep_id = runs["sweep"][0].data.tags["ditsweep.sweep_id"]
    resumed = ditsweep("resume", sweep_id, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    runs = runs_by_role(client, "interrupt")
    assert len(runs["trial"]) == 3
    assert {r.info.status for r in runs["trial"]} == {"FINISHED"}
    assert all(r.data.metrics["step"] == 20 for r in runs["trial"])
    resumed_steps = [r.data.metrics.get("resumed_from_step") for r in runs["trial"]]
    assert any(s and s >= 5 for s in resumed_steps), resumed_steps  # continued, not restarted


def test_sigterm_runs_what_ctrl_c_runs(monkeypatch):
    """SIGTERM calls whatever handles SIGINT at that moment (Tune's graceful stop during a sweep), or
    raises KeyboardInterrupt where SIGINT is ignored; the exit code then says which signal it was."""
    from orchestrator import interrupt

    monkeypatch.setitem(interrupt._LAST, "signum", signal.SIGINT)
    seen: list[int] = []
    previous = signal.getsignal(signal.SIGTERM), signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        assert interrupt.interrupted_exit_code() == 130
        interrupt.terminate_as_interrupt()
        signal.raise_signal(signal.SIGTERM)
        assert seen == [signal.SIGINT]
        assert interrupt.interrupted_exit_code() == 143
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])


def catches_sigterm(pid: int) -> bool:
    """Has process `pid` installed a SIGTERM handler (bit 15 of SigCgt in /proc/PID/status)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


def test_sigterm_stops_prepare_data_with_exit_143_and_no_output_that_looks_complete(tmp_path):
    """SIGTERM as soon as the command has taken it over (while it imports the trainer and reads the
    images): exit 143, one line, and no manifest, which is what says a prepared folder is complete."""
    from PIL import Image

    source, out = tmp_path / "images", tmp_path / "prepared"
    source.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(source / f"{i}.png")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "prepare-data", str(source), str(out)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: catches_sigterm(proc.pid), 60, "prepare-data to take over SIGTERM", proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stdout + stderr
    assert stderr.strip() == "interrupted" and "Traceback" not in stderr
    assert not (out / "manifest.json").exists()
    assert not any(out.glob("*.partial-*"))  # nothing half-written left either (none when out is absent)


def restored_steps(store: Path) -> dict[str, float]:
    """Run id -> the first `resumed_from_step` a trial logged (read with sqlite3, as finished_trial_ids)."""
    if not store.exists():
        return {}
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
            rows = db.execute(
                "SELECT run_uuid, value FROM metrics WHERE key = 'resumed_from_step' ORDER BY timestamp DESC"
            ).fetchall()
    except sqlite3.OperationalError:
        return {}
    return dict(rows)  # ordered newest first, so each run keeps its oldest value


def finished_trial_ids(store: Path) -> list[str]:
    """FINISHED trial runs, read from the sqlite store without MLflow (which would create its tables
    while the sweep's driver does the same)."""
    if not store.exists():
        return []
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
            rows = db.execute(
                "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                "WHERE t.key = 'ditsweep.role' AND t.value = 'trial' AND r.status = 'FINISHED'"
            ).fetchall()
    except sqlite3.OperationalError:  # the tables are not there yet, or the store is busy
        return []
    return [row[0] for row in rows]


def result_rows(folder: Path, key: str) -> int:
    """How many results Tune recorded for a trial (its result.json has one line per report)."""
    files = list((folder / "ditsweep_results").glob(f"*/*-{key[:10]}/result.json"))
    return sum(len(f.read_text().splitlines()) for f in files)


@pytest.mark.slow
def test_resume_after_the_driver_died_just_after_a_trial_finished_trains_no_trial_twice(tmp_path):
    # One trial at a time (all CPUs each), so the first FINISHED run comes while the second still trains.
    spec = write_spec(tmp_path, name="killdone", base=tiny_config({"train.steps": 8, "eval.locality.enabled": False}), grid={"attention.placement": ["none", "head"]},
                      resources={"cpu": os.cpu_count()})
    uri = sqlite_uri(tmp_path)
    driver = start_launch(spec, tmp_path)
    try:
        wait_for(lambda: finished_trial_ids(tmp_path / "mlflow.db"), 600, "a FINISHED trial run", driver)
        os.killpg(driver.pid, signal.SIGKILL)  # the window where Tune's saved state lags MLflow
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    client = MlflowClient(tracking_uri=uri)
    done = client.get_run(finished_trial_ids(tmp_path / "mlflow.db")[0])
    key = done.data.tags["ditsweep.trial_key"]
    rows_before = result_rows(tmp_path, key)
    (sweep,) = runs_by_role(client, "killdone")["sweep"]
    assert sweep.info.status == "RUNNING"  # left as the driver died
    sweep_id = sweep.data.tags["ditsweep.sweep_id"]

    resumed = ditsweep("resume", sweep_id, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    trials = runs_by_role(client, "killdone")["trial"]
    assert sorted(r.data.tags["ditsweep.trial_key"] for r in trials) == sorted(
        {r.data.tags["ditsweep.trial_key"] for r in trials})  # one run per trial
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}
    assert all(r.data.metrics["step"] == 8 for r in trials)  # the interrupted one trained to the end
    assert result_rows(tmp_path, key) == rows_before  # the finished trial did not train again
    again = client.get_run(done.info.run_id)
    assert again.info.end_time == done.info.end_time
    assert client.get_run(sweep.info.run_id).info.status == "FINISHED"


def ray_trial_workers(driver: int) -> list[int]:
    """Process ids of the Ray workers running a trial of the sweep whose driver is process `driver`
    (descendants of it: its in-process Ray's raylet starts them; their titles name the trainable's
    actor). Other sweeps on this machine, such as parallel tests', are left alone."""
    parents = {}
    for proc in Path("/proc").iterdir():
        try:
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue

    def descends_from_driver(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == driver:
                return True
        return False

    pids = []
    for pid in parents:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "ImplicitFunc" in cmdline and descends_from_driver(pid):
            pids.append(pid)
    return pids


@pytest.mark.slow
def test_tracking_server_going_away_loses_no_results(tmp_path, restartable_mlflow_server):
    """A sweep tracked by a real `mlflow server` that is killed mid-sweep and started again."""
    url, start, stop = restartable_mlflow_server
    spec = write_spec(tmp_path, name="flaky", base=LONGER, grid={"attention.placement": ["none", "head"]})
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = start_launch(spec, tmp_path, "--tracking-uri", url, log=log)
    client = MlflowClient(tracking_uri=url)
    try:
        def some_metric_logged() -> bool:
            exp = client.get_experiment_by_name("flaky")
            return bool(exp and any("loss" in r.data.metrics for r in client.search_runs([exp.experiment_id])))

        wait_for(some_metric_logged, 240, "the first metrics", driver)
        stop()
        # Trials keep reporting while the server is away: wait until the driver has kept a write for later.
        wait_for(lambda: "keeping results to write later" in log_path.read_text(), 240,
                 "a tracking write kept during the outage", driver)
        start()
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert driver.returncode == 0, output
    kept = output.index("keeping results to write later")
    assert "tracking server is back; pending writes delivered" in output[kept:], output  # then delivered
    runs = runs_by_role(client, "flaky")
    assert len(runs["trial"]) == 2
    for run in runs["trial"]:
        assert run.info.status == "FINISHED"
        assert run.data.metrics["step"] == 40 and "psnr_gap" in run.data.metrics
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert steps == list(range(5, 41, 5)), steps  # every report arrived, none twice
    assert runs["sweep"][0].info.status == "FINISHED" and len(runs["sweep"]) == 1
    artifacts = {a.path for a in client.list_artifacts(runs["trial"][0].info.run_id)}
    assert {"config.yaml", "psnr_curve.csv"} <= artifacts  # uploaded through the server
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the embedded store


# The smallest trial that still runs every stage once.
MINIMAL = {
    "data": {"num_images": 4, "test_images": 4},
    "train": {"steps": 1, "batch_size": 2, "log_every": 1, "warmup_steps": 0},
    "eval": {"psnr_gap": {"images": 2, "timesteps": 1}, "samples": {"grid": 2, "steps": 2},
             "locality": {"enabled": False}},
}


def store_files(folder: Path) -> list[str]:
    """The store and anything made while creating it (MLflow's journal, a temporary copy)."""
    return [p.name for p in folder.iterdir() if "mlflow.db" in p.name]


@pytest.mark.slow
def test_a_launch_killed_creating_the_store_then_four_launched_at_once_all_finish(tmp_path):
    """The store's creation is where two launches in a new folder collided (a half-migrated store no
    command could open again), and where a killed launch left one. First a launch is SIGKILLed as soon
    as a store file appears; then four launches of the same spec start at once in that folder."""
    spec = write_spec(tmp_path, name="together", base=MINIMAL, grid={"seed": [0]})
    killed = start_launch(spec, tmp_path)
    try:
        wait_for(lambda: store_files(tmp_path), 240, "the store's creation", killed)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
    drivers = [start_launch(spec, tmp_path) for _ in range(4)]
    try:
        outputs = [driver.communicate(timeout=600)[0] for driver in drivers]
    finally:
        for driver in drivers:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    for driver, output in zip(drivers, outputs):
        assert driver.returncode == 0, output[-3000:]
    runs = runs_by_role(MlflowClient(tracking_uri=sqlite_uri(tmp_path)), "together")
    assert len(runs["sweep"]) == 4 and len(runs["trial"]) == 4
    assert {r.info.status for r in runs["sweep"] + runs["trial"]} == {"FINISHED"}
    assert store_files(tmp_path) == ["mlflow.db"]  # no temporary copy left behind


@pytest.mark.slow
def test_64_trial_grid_finishes_without_duplicates(tmp_path):
    spec = write_spec(tmp_path, name="load", base=MINIMAL, grid={"seed": list(range(64))})
    result = ditsweep("launch", str(spec), cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = runs_by_role(MlflowClient(tracking_uri=sqlite_uri(tmp_path)), "load")
    keys = [r.data.tags["ditsweep.trial_key"] for r in runs["trial"]]
    assert len(keys) == 64 and len(set(keys)) == 64
    assert {r.info.status for r in runs["trial"]} == {"FINISHED"}
    assert len(runs["sweep"]) == 1

