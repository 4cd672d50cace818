"""Nothing hangs: per-trial resources this machine or a cluster can never give, an `--address` that
does not answer and a sweep stuck waiting for resources all end with a message; read-only commands
write nothing and no MLflow or Ray internals reach the terminal."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.support.sweeps import ditsweep, free_port, invoke, runs_by_role, sqlite_uri, tiny_config, tree, write_spec

# What MLflow and alembic print at INFO when they create a store; never on a ditsweep terminal.
INTERNAL_LINES = ("Context impl", "Will assume", "Creating initial MLflow database tables", "INFO ")


def this_machine_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(this_machine_gpus() > 0, reason="this machine has a GPU")
def test_a_gpu_trial_on_a_machine_without_gpu_exits_2_naming_the_fix(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, resources={"cpu": 1, "gpu": 1})
    result, written = invoke(tmp_path, monkeypatch, "launch", str(spec))
    assert result.exit_code == 2, result.output
    assert "resources.gpu=1 but this machine has no GPU" in result.output
    assert "--address" in result.output and "resources.gpu: 0" in result.output
    assert written == set()


def test_more_cpus_than_this_machine_has_exits_2_with_both_numbers(tmp_path, monkeypatch):
    cpus = os.cpu_count()
    spec = write_spec(tmp_path, resources={"cpu": cpus + 62})
    result, written = invoke(tmp_path, monkeypatch, "launch", str(spec))
    assert result.exit_code == 2, result.output
    assert f"resources.cpu={cpus + 62} but this machine has {cpus} CPU" in result.output
    assert written == set()


def test_an_address_that_does_not_answer_exits_2_fast_and_writes_nothing(tmp_path, monkeypatch):
    import orchestrator.sweep  # noqa: F401 - imported before the clock starts: Ray's import is not the wait

    port = free_port()  # bound and released: nothing listens there
    spec = write_spec(tmp_path)
    start = time.monotonic()
    result, written = invoke(tmp_path, monkeypatch, "launch", str(spec), "--address", f"127.0.0.1:{port}")
    assert time.monotonic() - start < 30
    assert result.exit_code == 2, result.output
    assert f"127.0.0.1:{port}" in result.output and "no Ray cluster answers" in result.output
    assert written == set()  # no mlflow.db: Ray is reached before MLflow


@pytest.mark.parametrize("command", [["status"], ["status", "nope-1"], ["report", "nope-1"], ["resume", "nope-1"]])
def test_read_only_commands_in_an_empty_folder_create_nothing(tmp_path, command):
    env = {"MLFLOW_TRACKING_URI": ""}
    result = ditsweep(*command, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == (0 if command == ["status"] else 2), result.stdout + result.stderr
    assert "no tracking store" in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []
    assert not any(line in result.stderr + result.stdout for line in INTERNAL_LINES), result.stderr


def test_plan_reads_an_existing_store_without_mlflow_lines_and_writes_nothing(tmp_path):
    spec = write_spec(tmp_path)
    before = tree(tmp_path)
    result = ditsweep("plan", str(spec), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert tree(tmp_path) == before
    # A store that exists is read (its cached trials shown), still without MLflow's INFO lines.
    MlflowClient(tracking_uri=sqlite_uri(tmp_path)).search_experiments()  # creates the store
    result = ditsweep("plan", str(spec), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": ""}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any(line in result.stderr + result.stdout for line in INTERNAL_LINES), result.stderr


def test_progress_says_what_a_scaling_cluster_is_waited_for():
    from orchestrator.console import ConsoleProgress
    from orchestrator.resources import Cluster, NodeType, check_trial_fits
    from orchestrator.spec import expand, parse_spec
    from orchestrator.trial_state import TrialState

    cluster = Cluster(nodes=[{"CPU": 4.0}], node_types={"gpu-workers": NodeType({"CPU": 8.0, "GPU": 1.0}, 2)})
    fit = check_trial_fits({"CPU": 1.0, "GPU": 1.0}, cluster)
    assert fit.when == "after scale-up"
    spec = parse_spec(yaml.safe_dump({"name": "t", "base": tiny_config(), "grid": {"attention.placement": ["none"]}}),
                      "test")
    console = ConsoleProgress([TrialState(t) for t in expand(spec, [])])
    console.waiting = fit.message
    assert "waiting for 1 GPU: the cluster is scaling up" in console.line()


@pytest.fixture
def ray_with_one_cpu():
    """In-process Ray smaller than the machine (1 CPU): a 2-CPU trial passes the machine check
    (a stand-in for a cluster that could scale up) but is never scheduled."""
    import ray

    if os.cpu_count() < 2:
        pytest.skip("needs a machine with 2 CPUs")
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_pending_timeout_stops_a_sweep_that_waits_with_nothing_running(tmp_path, monkeypatch, ray_with_one_cpu):
    spec = write_spec(tmp_path, name="pending", base=tiny_config(), grid={"attention.placement": ["none"]},
                      resources={"cpu": 2})
    start = time.monotonic()
    result, _ = invoke(tmp_path, monkeypatch, "launch", str(spec), "--pending-timeout", "3")
    assert time.monotonic() - start < 120
    assert result.exit_code == 1, result.output
    assert "--pending-timeout 3" in result.output and "ditsweep resume" in result.output
    runs = runs_by_role(MlflowClient(tracking_uri=sqlite_uri(tmp_path)), "pending")
    assert runs["sweep"][0].info.status == "KILLED"  # resumable
    assert all(r.info.status == "KILLED" for r in runs["trial"])
