"""Faults: real sweeps run as subprocesses and broken for real (SIGKILLed Ray workers, SIGTERM and
Ctrl-C, a driver killed at the worst moment, a tracking server that goes away, launches that race to
create one store), and what must survive each: every trial finishes, none trains twice, no result is
lost.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.support.sweeps import ditsweep, runs_by_role, smallest_config, sqlite_uri, tiny_config, write_spec


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
    """SIGTERM as soon as the command has taken it over, while it reads the images: exit 143, one
    line, and no manifest, which is what says a prepared folder is complete. One "image" is a FIFO no
    one writes to, so the command is still reading when the signal comes, however fast it is."""
    from PIL import Image

    source, out = tmp_path / "images", tmp_path / "prepared"
    source.mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(source / f"{i}.png")
    os.mkfifo(source / "9-never-written.png")
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


def store_files(folder: Path) -> list[str]:
    """The store and anything made while creating it (MLflow's journal, a temporary copy)."""
    return [p.name for p in folder.iterdir() if "mlflow.db" in p.name]


@pytest.mark.slow
def test_a_launch_killed_creating_the_store_then_four_launched_at_once_all_finish(tmp_path):
    """The store's creation is where two launches in a new folder collided (a half-migrated store no
    command could open again), and where a killed launch left one. First a launch is SIGKILLed as soon
    as a store file appears; then four launches of the same spec start at once in that folder."""
    spec = write_spec(tmp_path, name="together", base=smallest_config(), grid={"seed": [0]})
    # The killed launch cannot use a cached empty store (its cache is a file), so it runs MLflow's
    # migrations in place and is killed among them; the four build the cached one together, then copy it.
    (tmp_path / "no-cache").write_text("")
    killed = start_launch(spec, tmp_path, env={"DITSWEEP_CACHE": str(tmp_path / "no-cache")})
    try:
        wait_for(lambda: store_files(tmp_path), 240, "the store's creation", killed)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
    drivers = [start_launch(spec, tmp_path, env={"DITSWEEP_CACHE": str(tmp_path / "cache")}) for _ in range(4)]
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
