"""Sweeps, and `prepare-data` on Ray Data, on a real multi-node Ray cluster on 127.0.0.1 (the
`ray_cluster` fixture of tests/plugins/ray_cluster.py): a head with no CPUs and two one-CPU worker
nodes, checkpoints and packs on S3 (moto's server), tracking to a real `mlflow server`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import s3fs
from mlflow.tracking import MlflowClient

from orchestrator.status import status
from orchestrator.tracking import TAG_DEVICE, TAG_NODE_ID, TAG_NODE_IP, TAG_ROLE, TAG_SWEEP_ID
from tests.support.images import mixed_collection
from tests.support.sweeps import TINY, ditsweep, write_spec

FOUR_TRIALS = {"attention.placement": ["none", "head"], "seed": [0, 1]}


def test_the_location_travels_as_flat_result_entries():
    import torch

    from orchestrator.sweep import location_of
    from trainer.train import describe_device

    assert describe_device(torch.device("cpu")) == {"device": "cpu"}
    result = {"loss": 0.5, "location_node_id": "abc", "location_gpu_memory_gb": 80.0, "step": 3}
    assert location_of(result) == {"node_id": "abc", "gpu_memory_gb": "80.0"}
    assert location_of({"loss": 0.5}) == {}


def test_the_sink_tags_where_a_trial_runs_and_status_shows_its_node(tmp_path, monkeypatch):
    """A trial moved to another node: its run's tags follow it, and `ditsweep status` names that node."""
    from orchestrator.progress import SweepSink
    from orchestrator.spec import Trial, trial_key
    from orchestrator.tracking import Tracker
    from trainer.config import build_config

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    config = build_config({**TINY, "train": {**TINY["train"], "steps": 4}})
    trials = [Trial(axes={"seed": seed}, config=config, key=trial_key(config) + str(seed)) for seed in (0, 1)]
    parent = tracker.start_sweep(tracker.experiment_id("placed"), "placed-1", name="sweep placed-1", tags={},
                                 params={}, texts={})
    sink = SweepSink(tracker, parent, trials, existing={})
    moved, other = trials[0].key, trials[1].key
    first = {"node_id": "a" * 56, "node_ip": "10.0.0.1", "device": "cpu"}
    sink.result(moved, {"step": 2, "loss": 0.5})
    sink.located(moved, first)
    sink.located(moved, {"node_id": "b" * 56, "node_ip": "10.0.0.2", "device": "cuda:0", "gpu_name": "H100",
                        "gpu_memory_gb": "79.1", "unknown": "left out"})
    sink.result(other, {"step": 1, "loss": 0.75})  # reported, but no location (yet)
    assert tracker.flush()

    runs = {run.trial_key: run for run in tracker.sweep_trials(parent)}
    assert runs[moved].location == {"node_id": "b" * 56, "node_ip": "10.0.0.2", "device": "cuda:0",
                                     "gpu_name": "H100", "gpu_memory_gb": "79.1"}
    assert runs[other].location == {}
    table = status("placed-1", uri).splitlines()
    header = table[1].split()
    assert header[header.index("node")] == "node"
    row_moved = next(line for line in table if line.startswith(trials[0].name))
    row_other = next(line for line in table if line.startswith(trials[1].name))
    assert "10.0.0.2 bbbbbbbb" in row_moved and "10.0.0.1" not in row_moved
    assert " - " in row_other.split("0.7500", 1)[1]  # no node before the first location


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_location_names_the_gpu_and_its_memory():
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
def test_prepare_data_on_ray_data_across_both_workers_equals_one_process_byte_for_byte(ray_cluster, s3_bucket,
                                                                                      tmp_path):
    """A mixed-mode folder in class folders (RGB, grayscale, 16-bit, palette, RGBA, CMYK, EXIF-turned,
    one unreadable file skipped) packed in one process to a local folder, and on Ray Data across the
    two workers to S3: the same files, byte for byte, and the shards decoded on both workers."""
    src = tmp_path / "src"
    mixed_collection(src, per_class=12, classes=3)
    (src / "class_1" / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # listed in both manifests
    # 8x8x3 = 192 bytes an image: 0.002 MiB holds 10, so 36 images make 4 shards.
    options = ["--image-size", "8", "--shard-mb", "0.002", "--skip-unreadable"]
    one = ditsweep("prepare-data", str(src), str(tmp_path / "one"), *options, "--no-ray", cwd=tmp_path)
    assert one.returncode == 0, one.stdout + one.stderr
    on_ray = ditsweep("prepare-data", str(src), f"s3://{s3_bucket}/pack", *options, "--address", ray_cluster.address,
                      cwd=tmp_path, timeout=300)
    assert on_ray.returncode == 0, on_ray.stdout + on_ray.stderr
    assert "read on Ray Data by 2 node(s)" in on_ray.stdout, on_ray.stdout
    assert "eta" in on_ray.stderr.lower()
    local = {path.name: path.read_bytes() for path in (tmp_path / "one").iterdir()}
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    remote = {path.rsplit("/", 1)[-1]: fs.cat_file(path) for path in fs.find(f"{s3_bucket}/pack")}
    assert sorted(local) == sorted(remote) and "manifest.json" in local and "shard-00003.npy" in local
    assert {name for name in local if local[name] != remote[name]} == set()
    manifest = json.loads(local["manifest.json"])
    assert manifest["count"] == 35 and list(manifest["skipped"]) == ["class_1/0003.png"]


@pytest.mark.slow
def test_a_prepare_data_killed_on_the_cluster_resumes_in_one_process_byte_identical(ray_cluster, tmp_path):
    """One resume mechanism for both paths: a preparation decoding on the cluster, its driver SIGKILLed
    after the first shard it recorded, is finished by the single-process command, which keeps the
    shards already written (same inode and mtime) and gives the uninterrupted pack byte for byte."""
    src = tmp_path / "src"
    mixed_collection(src, per_class=420, classes=3)  # 1,260 images: 60 shards of 21
    options = ["--image-size", "8", "--shard-mb", str(21 * 8 * 8 * 3 / (1 << 20))]
    reference = ditsweep("prepare-data", str(src), str(tmp_path / "reference"), *options, "--no-ray", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "pack"
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "prepare-data", str(src), str(out), *options,
                               "--address", ray_cluster.address], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # polled often: on a quiet machine the shards after the first follow within seconds
        _wait_for("the first shard recorded", lambda: (out / "progress.json").exists(), 240, driver, every_s=0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):  # a driver that already ended: _wait_for said why
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and anything it started; the cluster stays
        driver.communicate(timeout=60)
    assert not (out / "manifest.json").exists(), "the preparation finished before it could be killed"
    recorded = json.loads((out / "progress.json").read_text())["shards"]
    finished = {e["shard"]["name"]: (out / e["shard"]["name"]).stat() for e in recorded.values()}
    assert 1 <= len(finished) < 60

    resumed = ditsweep("prepare-data", str(src), str(out), *options, "--no-ray", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(recorded)} of 60 shard(s) already written" in resumed.stderr
    files = {path.name: path.read_bytes() for path in out.iterdir()}
    assert files == {path.name: path.read_bytes() for path in (tmp_path / "reference").iterdir()}
    for name, before in finished.items():
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), f"{name} was rewritten"


def _trial_runs(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")


def _wait_for(what: str, check, timeout_s: float, driver: subprocess.Popen | None = None, every_s: float = 1.0):
    """Poll `check()` every `every_s` seconds until it returns something truthy; fail naming `what` after
    timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        if driver is not None and driver.poll() is not None:
            pytest.fail(f"the driver exited ({driver.returncode}) before {what}:\n{driver.stdout.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(every_s)
    return found


@pytest.mark.slow
def test_four_trials_spread_survive_a_lost_node_and_a_killed_driver(ray_cluster, s3_bucket, mlflow_server, tmp_path):
    """One sweep of 4 trials on the two workers, checkpoints in S3: trials land on both workers; the
    worker under a trial that has a checkpoint is killed (every process of that node) and the trial
    continues on the other worker from that checkpoint; then the driver itself is killed and `resume`
    finishes the sweep. Each trial ends with exactly one FINISHED run; `status` names its node."""
    base = {**TINY, "train": {**TINY["train"], "steps": 30, "log_every": 5},
            "eval": {**TINY["eval"], "every": 10, "locality": {"enabled": False}}}
    spec = write_spec(tmp_path, name="cluster", base=base, grid=FOUR_TRIALS, max_failures=3)
    cluster = ["--address", ray_cluster.address, "--tracking-uri", mlflow_server]
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "launch", str(spec), *cluster,
         "--storage", f"s3://{s3_bucket}/results"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    client = MlflowClient(tracking_uri=mlflow_server)
    names = {node_id: name for name, node_id in ray_cluster.node_ids().items()}
    assert sorted(names.values()) == ["head", "worker-1", "worker-2"]
    seen: dict[str, set[str]] = {}  # trial -> every node its run was tagged with

    def running_with_checkpoint():
        victim = None
        for run in _trial_runs(client, "cluster"):
            if TAG_NODE_ID in run.data.tags:
                seen.setdefault(run.info.run_name, set()).add(names[run.data.tags[TAG_NODE_ID]])
                if run.info.status == "RUNNING" and run.data.metrics.get("step", 0) >= 10:
                    victim = victim or (run.info.run_name, names[run.data.tags[TAG_NODE_ID]])
        both = set().union(*seen.values()) == {"worker-1", "worker-2"}
        return victim if victim and both else None

    try:
        moved, lost_node = _wait_for("trials on both workers, one with a checkpoint", running_with_checkpoint,
                                     420, driver)
        assert "head" not in set().union(*seen.values())  # the head has no CPUs: it takes no trials
        ray_cluster.kill_node(lost_node)

        def moved_and_resumed():
            run = next(r for r in _trial_runs(client, "cluster") if r.info.run_name == moved)
            node = names.get(run.data.tags[TAG_NODE_ID])
            return run if node not in (lost_node, None) and run.data.metrics.get("resumed_from_step", 0) > 0 else None

        run = _wait_for(f"{moved} continues on the other worker from its checkpoint", moved_and_resumed, 420, driver)
        assert 0 < run.data.metrics["resumed_from_step"] < 30
        os.killpg(driver.pid, signal.SIGKILL)  # the driver's own machine goes away mid-sweep
        output = driver.communicate(timeout=60)[0]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=60)
    sweep = client.search_runs([client.get_experiment_by_name("cluster").experiment_id],
                               f"tags.`{TAG_ROLE}` = 'sweep'")[0]
    sweep_id = sweep.data.tags[TAG_SWEEP_ID]

    resumed = ditsweep("resume", sweep_id, *cluster, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, output + resumed.stdout + resumed.stderr
    runs = _trial_runs(client, "cluster")
    assert sorted(r.info.run_name for r in runs) == sorted(set(r.info.run_name for r in runs))  # one run each
    assert [r.info.status for r in runs] == ["FINISHED"] * 4, resumed.stdout
    final = next(r for r in runs if r.info.run_name == moved)
    assert final.data.metrics["resumed_from_step"] > 0 and names[final.data.tags[TAG_NODE_ID]] != lost_node
    assert {r.data.tags[TAG_DEVICE] for r in runs} == {"cpu"}
    alive = {node["id"]: node for node in ray_cluster.alive_nodes()}
    for r in runs:  # the address each node registered with, as the GCS lists it
        if r.data.tags[TAG_NODE_ID] in alive:
            assert r.data.tags[TAG_NODE_IP] == alive[r.data.tags[TAG_NODE_ID]]["ip"]

    shown = status(sweep_id, mlflow_server)  # what `ditsweep status` prints, without another process
    for r in runs:
        row = next(line for line in shown.splitlines() if line.startswith(r.info.run_name + " "))
        assert f"{r.data.tags[TAG_NODE_IP]} {r.data.tags[TAG_NODE_ID][:8]}" in row, shown
