"""Sweeps on a real multi-node Ray cluster on 127.0.0.1 (`ray_cluster` in conftest.py): a head with
no CPUs and two one-CPU worker nodes, checkpoints on S3 (moto's server), tracking to a real
`mlflow server`."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.support.sweeps import TINY, ditsweep, runs_by_role, write_spec

FOUR_TRIALS = {"attention.placement": ["none", "head"], "seed": [0, 1]}


def test_placement_travels_as_flat_result_entries():
    import torch

    from orchestrator.sweep import placement_of
    from trainer.train import describe_device

    assert describe_device(torch.device("cpu")) == {"device": "cpu"}
    result = {"loss": 0.5, "placement_node_id": "abc", "placement_gpu_memory_gb": 80.0, "step": 3}
    assert placement_of(result) == {"node_id": "abc", "gpu_memory_gb": "80.0"}
    assert placement_of({"loss": 0.5}) == {}


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_placement_names_the_gpu_and_its_memory():
    import torch

    from trainer.train import describe_device

    described = describe_device(torch.device("cuda"))
    properties = torch.cuda.get_device_properties(0)
    assert described == {"device": "cuda:0", "gpu_name": properties.name,
                         "gpu_memory_gb": f"{properties.total_memory / 2**30:.1f}"}


@pytest.mark.slow  # the cluster takes 30 s to 2 min to start on 2 shared cores
def test_local_storage_on_a_multi_node_cluster_is_refused(ray_cluster, tmp_path):
    spec = write_spec(tmp_path, name="localstore")
    result = ditsweep("launch", str(spec), "--address", ray_cluster.address,
                      "--storage", str(tmp_path / "results"), cwd=tmp_path, timeout=180)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--storage" in result.stderr and "3 nodes" in result.stderr and "s3://" in result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "results").exists()


@pytest.mark.slow
def test_four_trials_spread_over_both_workers_with_s3_storage(ray_cluster, s3_bucket, mlflow_server, tmp_path):
    base = {**TINY, "train": {**TINY["train"], "steps": 4}}
    spec = write_spec(tmp_path, name="spread", base=base, grid=FOUR_TRIALS)
    result = ditsweep("launch", str(spec), "--address", ray_cluster.address, "--tracking-uri", mlflow_server,
                      "--storage", f"s3://{s3_bucket}/results", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = runs_by_role(MlflowClient(tracking_uri=mlflow_server), "spread")
    assert sorted(run.info.status for run in runs["trial"]) == ["FINISHED"] * 4
    workers = {node["id"]: node for node in ray_cluster.alive_nodes() if node["cpu"] > 0}
    used = {run.data.tags["ditsweep.node_id"] for run in runs["trial"]}
    assert used == set(workers), (used, workers)  # both workers, never the head (it has no CPUs)
    for run in runs["trial"]:  # the address each node registered with, as the GCS lists it
        assert run.data.tags["ditsweep.node_ip"] == workers[run.data.tags["ditsweep.node_id"]]["ip"]
    assert {run.data.tags["ditsweep.device"] for run in runs["trial"]} == {"cpu"}


@pytest.mark.slow
def test_a_trial_survives_the_loss_of_its_worker_node(ray_cluster, s3_bucket, mlflow_server, tmp_path):
    """Kill every process of the worker node a trial runs on, after its first checkpoint: the trial is
    retried on the other node from that checkpoint in S3. Runs last in this module: the node stays dead."""
    base = {**TINY, "train": {**TINY["train"], "steps": 60, "log_every": 5},
            "eval": {**TINY["eval"], "every": 10}}
    spec = write_spec(tmp_path, name="nodeloss", base=base, grid={"seed": [0, 1]}, max_failures=3)
    launch = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "launch", str(spec), "--address", ray_cluster.address,
         "--tracking-uri", mlflow_server, "--storage", f"s3://{s3_bucket}/results"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    client = MlflowClient(tracking_uri=mlflow_server)
    names = {node_id: name for name, node_id in ray_cluster.node_ids().items()}
    victim, deadline = None, time.monotonic() + 300
    while victim is None:  # a trial on a worker with a checkpoint (step >= 10) in S3
        assert launch.poll() is None, launch.stdout.read()
        assert time.monotonic() < deadline, "no trial reached its first checkpoint within 300 s"
        time.sleep(1)
        experiment = client.get_experiment_by_name("nodeloss")
        if experiment is None:
            continue
        for run in client.search_runs([experiment.experiment_id], "tags.`ditsweep.role` = 'trial'"):
            if run.data.metrics.get("step", 0) >= 10 and run.info.status == "RUNNING" and "ditsweep.node_id" in run.data.tags:
                victim = (run.info.run_name, names[run.data.tags["ditsweep.node_id"]])
                break
    ray_cluster.kill_node(victim[1])
    try:
        output, _ = launch.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        launch.kill()
        pytest.fail(f"the driver did not finish within 600 s of losing {victim[1]}:\n{launch.communicate()[0]}")
    assert launch.returncode == 0, output
    runs = runs_by_role(client, "nodeloss")["trial"]
    assert sorted(run.info.status for run in runs) == ["FINISHED", "FINISHED"], output
    moved = next(run for run in runs if run.info.run_name == victim[0])
    assert moved.data.metrics.get("resumed_from_step", 0) > 0, (moved.data.metrics, output)
    assert names[moved.data.tags["ditsweep.node_id"]] != victim[1]  # it finished on the other node
