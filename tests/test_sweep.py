"""End-to-end sweeps through the real CLI: in-process Ray and a real MLflow store.

Each sweep is `ditsweep` run as a subprocess in a fresh folder, so Ray and MLflow start exactly as
they do for a user; commands that start no Ray (plan, status, a launch with nothing to run, bad
input) run in this process. A real `mlflow server` is in test_fault_injection (one that goes away),
S3 storage in test_cluster (data, checkpoints and artifacts all on S3), resume after a killed
driver in test_fault_injection and test_multinode.
"""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.support.sweeps import ditsweep, free_port, invoke, runs_by_role, sqlite_uri, write_spec

pytestmark = pytest.mark.slow


def test_sweep_tracks_every_trial_and_caches_finished_ones(tmp_path, monkeypatch):
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

    # Launching again runs nothing and creates no run (in this process: no Ray is started for it).
    again, written = invoke(tmp_path, monkeypatch, "launch", str(spec))
    assert again.exit_code == 0, again.output
    assert "nothing to run" in again.output and written == set()
    assert len(runs_by_role(client, "tiny")["sweep"]) == 1

    # plan shows both trials as cached; with a third axis value only the new trial is to run.
    plan, _ = invoke(tmp_path, monkeypatch, "plan", str(spec))
    assert plan.exit_code == 0 and plan.output.count("cached") == 2, plan.output
    bigger = write_spec(tmp_path, grid={"attention.placement": ["none", "head", "tail"]})
    plan, _ = invoke(tmp_path, monkeypatch, "plan", str(bigger))
    assert plan.exit_code == 0 and plan.output.count("cached") == 2, plan.output
    assert "1 of 3 trials to run" in plan.output, plan.output

    # --force reruns a finished trial as a new run and leaves the finished one as it was; the new
    # axis value in the same spec runs once.
    # No global-attention trial in this grid: its comparison names another baseline (a default one
    # that matches no trial is refused, tests/test_compare.py).
    head_and_tail = write_spec(tmp_path, grid={"attention.placement": ["head", "tail"]},
                               compare={"baseline": {"attention.placement": "head"}})
    first = next(r for r in runs["trial"] if r.info.run_name == "head")
    forced = ditsweep("launch", str(head_and_tail), "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    runs = runs_by_role(client, "tiny")
    assert len(runs["sweep"]) == 2
    assert sorted(r.info.run_name for r in runs["trial"]) == ["head", "head", "none", "tail"]
    assert {r.info.status for r in runs["trial"]} == {"FINISHED"}
    kept = client.get_run(first.info.run_id)
    assert kept.info.status == "FINISHED" and kept.data.metrics == first.data.metrics

    status, _ = invoke(tmp_path, monkeypatch, "status", sweep_id)
    assert status.exit_code == 0 and "FINISHED" in status.output and "head" in status.output


def test_bad_spec_exits_2_and_creates_nothing(tmp_path):
    spec = write_spec(tmp_path, grid={"attention.placement": ["head", "sideways"]})
    result = ditsweep("launch", str(spec), cwd=tmp_path)
    assert result.returncode == 2
    assert "sideways" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "ditsweep_results").exists()


def test_failing_trial_is_retried_then_failed_while_others_finish(tmp_path):
    """A trial that diverges on every attempt: its first error is retried and counted apart from
    "failed"; its second fails it for good. Each gets one line naming the attempt, the error's first
    line and the file that holds its traceback."""
    spec = write_spec(tmp_path, name="faulty", grid={"train.lr": [0.001, 1.0e30]}, max_failures=1)
    result = ditsweep("launch", str(spec), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    runs = runs_by_role(MlflowClient(tracking_uri=sqlite_uri(tmp_path)), "faulty")
    states = {r.data.params["train.lr"]: r.info.status for r in runs["trial"]}
    assert states == {"0.001": "FINISHED", "1e+30": "FAILED"}
    failed = next(r for r in runs["trial"] if r.info.status == "FAILED")
    assert "diverged" in failed.data.tags["ditsweep.error"]
    assert failed.data.tags["ditsweep.retries"] == "1"
    assert runs["sweep"][0].info.status == "FAILED"

    sweep_id = runs["sweep"][0].data.tags["ditsweep.sweep_id"]
    lines = result.stdout.splitlines()
    (retry,) = [line for line in lines if line.startswith(f"  retry  {failed.info.run_name}: ")]
    (final,) = [line for line in lines if line.startswith(f"  FAILED {failed.info.run_name}: ")]
    assert "attempt 1 of 2 errored: " in retry and "attempt 2 of 2 errored: " in final
    for line in (retry, final):
        assert "training diverged" in line, line
        where = line.split("; full text in ", 1)[1]
        assert where.startswith(f"ditsweep_results/{sweep_id}/") and where.endswith("/error.txt"), line
    traceback = (tmp_path / where).read_text()
    assert traceback.count("Failure # ") == 2 and "training diverged" in traceback  # both attempts'
    assert "Traceback" not in result.stdout + result.stderr  # the file has it; the console has one line each
    assert any(", 0 failed, 1 error retried, eta" in line for line in lines), result.stdout
    assert any(", 1 failed, 1 error retried, eta" in line for line in lines), result.stdout
    assert f"sweep {sweep_id}: 1 finished, 1 failed, 0 killed; 1 error retried" in lines


def test_a_trial_that_errors_once_is_retried_to_the_end_and_the_console_and_status_say_so(finished_sweep,
                                                                                        monkeypatch):
    """The shared finished sweep's DRILLED trial raises on its first attempt (sweep.FAULT_DRILL_ENV):
    a line says so when it happens, the progress line counts it apart from "failed", the summary and
    `ditsweep status` say how many attempts were retried, and every trial still FINISHED."""
    folder, sweep_id, drilled = finished_sweep["folder"], finished_sweep["sweep_id"], finished_sweep["drilled"]
    lines = finished_sweep["stdout"].splitlines()
    (retry,) = [line for line in lines if line.startswith("  retry  ")]
    prefix = (f"  retry  {drilled}: attempt 1 of 2 errored: FaultDrill: {drilled} raised on its first attempt, "
              "as DITSWEEP_FAULT_DRILL asks; full text in ")
    assert retry.startswith(prefix), retry
    where = retry[len(prefix):]
    assert where.startswith(f"ditsweep_results/{sweep_id}/") and where.endswith("/error.txt"), retry
    assert "FaultDrill" in (folder / where).read_text()
    at = lines.index(retry)
    before = [line for line in lines[:at] if line.startswith("[")]
    after = [line for line in lines[at:] if line.startswith("[")]
    assert not any("retried" in line for line in before), before
    assert after and all(", 0 failed, 1 error retried, eta " in line for line in after), after
    assert f"sweep {sweep_id}: 4 finished, 0 failed, 0 killed; 1 error retried" in lines
    assert "FAILED" not in finished_sweep["stdout"] and "Traceback" not in finished_sweep["stdout"]

    status, _ = invoke(folder, monkeypatch, "status", sweep_id)
    assert status.exit_code == 0, status.output
    header, columns, *rows = status.output.splitlines()
    assert header == f"sweep {sweep_id} (FINISHED): 4 finished; 1 error retried"
    retried = {row.split()[0]: row.split()[columns.split().index("retried")] for row in rows}
    assert retried == {name: "1" if name == drilled else "0" for name in finished_sweep["trials"]}
    listing, _ = invoke(folder, monkeypatch, "status")
    assert "4 finished; 1 error retried" in next(line for line in listing.output.splitlines() if sweep_id in line)


def test_unreachable_s3_storage_exits_2(tmp_path, s3_env, monkeypatch):
    spec = write_spec(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    for name, value in {"AWS_ENDPOINT_URL": dead, "AWS_ENDPOINT_URL_S3": dead, "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(name, value)
    result, written = invoke(tmp_path, monkeypatch, "launch", str(spec), "--storage", "s3://nowhere/results")
    assert result.exit_code == 2, result.output
    assert "s3://nowhere/results" in result.output
    assert written == set()
