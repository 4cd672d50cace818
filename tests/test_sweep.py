"""End-to-end sweeps through the real CLI: in-process Ray, a real MLflow store or server, moto's S3.

Each test launches `ditsweep` as a subprocess in a fresh folder, so Ray and MLflow start exactly as
they do for a user, and then reads what landed in the tracking store.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.support.sweeps import ditsweep, free_port, runs_by_role, sqlite_uri, tiny_config, write_spec

pytestmark = pytest.mark.slow

def test_sweep_tracks_every_trial_and_caches_finished_ones(tmp_path):
    spec = write_spec(tmp_path)
    first = ditsweep("launch", str(spec), cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    client = MlflowClient(tracking_uri=sqlite_uri(tmp_path))
    runs = runs_by_role(client, "tiny")
    assert len(runs["sweep"]) == 1 and len(runs["trial"]) == 2
    parent = runs["sweep"][0]
    sweep_id = parent.data.tags["ditsweep.sweep_id"]
    assert parent.info.status == "FINISHED"
    assert {r.info.run_name for r in runs["trial"]} == {"none", "head"}
    for run in runs["trial"]:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["ditsweep.sweep_id"] == sweep_id
        assert len(run.data.tags["ditsweep.trial_key"]) == 64
        assert {"psnr_gap", "psnr_train", "psnr_test", "loss", "images_per_sec"} <= set(run.data.metrics)
        assert run.data.params["train.steps"] == "4"
        expected = "G," * 11 + "G" if run.info.run_name == "none" else "3,5,7,9,11,13" + ",G" * 6
        assert run.data.params["attention.schedule"] == expected
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "psnr_curve.csv", "psnr_curve.png"} <= artifacts
        loss_history = client.get_metric_history(run.info.run_id, "loss")
        assert [m.step for m in loss_history] == [2, 4]
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "plan.txt", "trials.json", "versions.json"} <= parent_artifacts
    assert (tmp_path / "ditsweep_results" / sweep_id).is_dir()
    assert (tmp_path / "mlartifacts").is_dir()

    # Launching again runs nothing and creates no run.
    again = ditsweep("launch", str(spec), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "nothing to run" in again.stdout
    assert len(runs_by_role(client, "tiny")["sweep"]) == 1

    # plan shows both trials as cached; adding an axis value runs only the new trial.
    plan = ditsweep("plan", str(spec), cwd=tmp_path)
    assert plan.returncode == 0 and plan.stdout.count("cached") == 2, plan.stdout
    bigger = write_spec(tmp_path, grid={"attention.placement": ["none", "head", "tail"]})
    third = ditsweep("launch", str(bigger), cwd=tmp_path)
    assert third.returncode == 0, third.stdout + third.stderr
    runs = runs_by_role(client, "tiny")
    assert len(runs["sweep"]) == 2
    assert sorted(r.info.run_name for r in runs["trial"]) == ["head", "none", "tail"]

    status = ditsweep("status", sweep_id, cwd=tmp_path)
    assert status.returncode == 0 and "FINISHED" in status.stdout and "head" in status.stdout

    # --force reruns a finished trial as a new run and leaves the finished one as it was.
    only_head = write_spec(tmp_path, grid={"attention.placement": ["head"]})
    first = next(r for r in runs["trial"] if r.info.run_name == "head")
    forced = ditsweep("launch", str(only_head), "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    heads = [r for r in runs_by_role(client, "tiny")["trial"] if r.info.run_name == "head"]
    assert len(heads) == 2
    kept = client.get_run(first.info.run_id)
    assert kept.info.status == "FINISHED" and kept.data.metrics == first.data.metrics


def test_bad_spec_exits_2_and_creates_nothing(tmp_path):
    spec = write_spec(tmp_path, grid={"attention.placement": ["head", "sideways"]})
    result = ditsweep("launch", str(spec), cwd=tmp_path)
    assert result.returncode == 2
    assert "sideways" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "ditsweep_results").exists()


def test_failing_trial_is_retried_then_failed_while_others_finish(tmp_path):
    spec = write_spec(tmp_path, name="faulty", grid={"train.lr": [0.001, 1.0e30]}, max_failures=1)
    result = ditsweep("launch", str(spec), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "retry" in result.stdout
    runs = runs_by_role(MlflowClient(tracking_uri=sqlite_uri(tmp_path)), "faulty")
    states = {r.data.params["train.lr"]: r.info.status for r in runs["trial"]}
    assert states == {"0.001": "FINISHED", "1e+30": "FAILED"}
    failed = next(r for r in runs["trial"] if r.info.status == "FAILED")
    assert "diverged" in failed.data.tags["ditsweep.error"]
    assert runs["sweep"][0].info.status == "FAILED"


def test_sweep_against_a_real_mlflow_server(tmp_path, mlflow_server):
    spec = write_spec(tmp_path, name="remote")
    result = ditsweep("launch", str(spec), "--tracking-uri", mlflow_server, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = runs_by_role(client, "remote")
    assert len(runs["sweep"]) == 1
    assert [r.info.status for r in runs["trial"]] == ["FINISHED", "FINISHED"]
    run = runs["trial"][0]
    assert {"config.yaml", "psnr_curve.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the embedded store


def test_unreachable_tracking_server_exits_2(tmp_path):
    spec = write_spec(tmp_path)
    result = ditsweep("launch", str(spec), "--tracking-uri", f"http://127.0.0.1:{free_port()}", cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot reach tracking server" in result.stderr
    assert not (tmp_path / "ditsweep_results").exists()


def test_storage_on_s3(tmp_path, s3_bucket):
    import s3fs

    spec = write_spec(tmp_path, name="s3sweep", grid={"attention.placement": ["head"]})
    storage = f"s3://{s3_bucket}/results"
    result = ditsweep("launch", str(spec), "--storage", storage, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = runs_by_role(MlflowClient(tracking_uri=sqlite_uri(tmp_path)), "s3sweep")
    sweep_id = runs["sweep"][0].data.tags["ditsweep.sweep_id"]
    assert runs["sweep"][0].data.tags["ditsweep.storage"] == storage
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    stored = fs.find(f"{s3_bucket}/results/{sweep_id}")
    assert any("/checkpoint_" in p and p.endswith("state.pt") for p in stored), stored
    assert not (tmp_path / "ditsweep_results").exists()


def test_unreachable_s3_storage_exits_2(tmp_path, s3_env, monkeypatch):
    spec = write_spec(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"AWS_ENDPOINT_URL": dead, "AWS_ENDPOINT_URL_S3": dead, "AWS_MAX_ATTEMPTS": "1"}
    result = ditsweep("launch", str(spec), "--storage", "s3://nowhere/results", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "s3://nowhere/results" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_resume_after_the_driver_is_killed(tmp_path):
    base = tiny_config({"train.steps": 60, "train.log_every": 5, "eval.every": 5})
    spec = write_spec(tmp_path, name="crash", base=base, grid={"attention.placement": ["none", "head", "tail"]})
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "launch", str(spec)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    results = tmp_path / "ditsweep_results"
    deadline = time.monotonic() + 240
    try:
        while not list(results.glob("*/*/checkpoint_000001")):  # some trial has checkpointed twice
            assert driver.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.5)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        driver.wait()
    client = MlflowClient(tracking_uri=sqlite_uri(tmp_path))
    before = runs_by_role(client, "crash")
    assert before["sweep"][0].info.status == "RUNNING"
    sweep_id = before["sweep"][0].data.tags["ditsweep.sweep_id"]

    resumed = ditsweep("resume", sweep_id, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = runs_by_role(client, "crash")
    keys = [r.data.tags["ditsweep.trial_key"] for r in after["trial"]]
    assert len(keys) == 3 and len(set(keys)) == 3  # exactly one run per trial
    assert {r.info.status for r in after["trial"]} == {"FINISHED"}
    assert after["sweep"][0].info.status == "FINISHED"
    assert all(r.data.metrics["step"] == 60 for r in after["trial"])
