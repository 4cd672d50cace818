"""`ditsweep submit` against a real Ray head on this machine, `ditsweep render-k8s`, and a sweep
whose data, checkpoints and MLflow artifacts all live on S3 (moto's server on loopback), with no
credential written anywhere.

The head is `ray start --head --block` in a process group of its own, with token authentication
(Ray's default) and its dashboard on 127.0.0.1; it is killed by process id afterwards, and every
process it started is found by a marker in its environment and checked gone.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from tests.support.k8s_schema import check_kuberay_rules, validate_manifest
from orchestrator.cli import app
from orchestrator.cluster import launch_entrypoint, stage_working_dir
from orchestrator.k8s import RAYJOB_TEMPLATE
from tests.support.sweeps import ditsweep, free_port, runs_by_role, tiny_config, write_spec

REPO = Path(__file__).resolve().parents[1]
TINY = tiny_config(
    {"data.num_images": 8, "data.test_images": 8, "train.steps": 2, "train.batch_size": 4, "train.log_every": 1,
     "eval.psnr_gap.images": 4},
    drop=("eval.every",),
)
ONE_TRIAL = {"attention.placement": ["head"]}


def tiny_spec(folder: Path, name: str, **base_overrides) -> Path:
    return write_spec(folder, name=name, base={**TINY, **base_overrides}, grid=ONE_TRIAL)


# ---------------------------------------------------------------------------------------------
# submit


@pytest.mark.slow
def test_submit_follows_the_job_to_a_finished_sweep(ray_head, tmp_path):
    spec = tiny_spec(tmp_path, "cluster")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "results"
    result = ditsweep(
        "submit", str(spec), "--address", ray_head.address, "--follow",
        "--tracking-uri", tracking, "--storage", str(storage),
        cwd=tmp_path, env={**ray_head.auth, "AWS_SECRET_ACCESS_KEY": "never-shipped"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ray job logs --follow --address {ray_head.address} raysubmit_" in result.stdout
    assert "1 finished, 0 failed" in result.stdout  # the driver's own summary, streamed back
    assert "SUCCEEDED" in result.stdout

    runs = runs_by_role(MlflowClient(tracking_uri=tracking), "cluster")
    assert [r.info.status for r in runs["sweep"]] == ["FINISHED"]
    (trial,) = runs["trial"]
    assert trial.info.status == "FINISHED" and "psnr_gap" in trial.data.metrics
    assert (storage / runs["sweep"][0].data.tags["ditsweep.sweep_id"]).is_dir()

    (job,) = [j for j in ray_head.jobs() if j["metadata"].get("ditsweep.spec") == "cluster"]
    assert job["entrypoint"] == shlex.join(
        ["ditsweep", "launch", "cluster.yaml", "--address", "auto", "--storage", str(storage),
         "--tracking-uri", tracking]
    )
    assert job["runtime_env"]["env_vars"] == {"MLFLOW_TRACKING_URI": tracking}
    assert ray_head.driver_resources(job["submission_id"]) == {"CPU": 1.0}  # one CPU, no GPU
    shipped = json.dumps(job)
    assert "never-shipped" not in shipped and ray_head.auth["RAY_AUTH_TOKEN"] not in shipped


@pytest.mark.slow
def test_the_wait_for_a_job_to_end_is_bounded(ray_head):
    """What `submit --follow` does once the log stream has ended: wait for the job's status, bounded
    (a real job that is still running, on the real dashboard).

    In a process of its own: Ray keeps the token mode it was imported under for the life of the
    process, and a later in-process `ray.init` on this test worker would then expect a token its
    local cluster never got."""
    script = f"""
import json, time
from orchestrator.cluster import _wait_until_terminal, job_client
client = job_client({ray_head.address!r})
job_id = client.submit_job(entrypoint="sleep 120", entrypoint_num_cpus=0)
try:
    start = time.monotonic()
    first = _wait_until_terminal(client, job_id, {ray_head.address!r}, timeout_s=3)
    waited = time.monotonic() - start
finally:
    client.stop_job(job_id)
info = _wait_until_terminal(client, job_id, {ray_head.address!r}, timeout_s=60)
print(json.dumps({{"first": first is None, "waited": waited, "final": None if info is None else str(info.status)}}))
"""
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, **ray_head.auth},
                            capture_output=True, text=True, timeout=180, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["first"] is True and 3 <= outcome["waited"] < 20, outcome
    assert outcome["final"] == "STOPPED", outcome


@pytest.mark.slow
def test_sigterm_while_following_a_job_stops_following_with_exit_143(ray_head, tmp_path):
    """SIGTERM to `submit --follow` once the job's logs stream: handled as Ctrl-C (the job goes on, the
    command says how to stop it), exit 143, no traceback. The job is stopped afterwards."""
    import signal
    import time

    spec = tiny_spec(tmp_path, "followed", **{"train": {**TINY["train"], "steps": 400}})
    follow = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "submit", str(spec), "--address", ray_head.address, "--follow"],
        cwd=tmp_path, env={**os.environ, **ray_head.auth}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any(line.startswith("  stop:") for line in lines):  # printed just before the logs stream
            assert time.monotonic() < deadline and follow.poll() is None, "".join(lines)
            lines.append(follow.stdout.readline())
        time.sleep(2)  # inside the log stream's wait
        follow.send_signal(signal.SIGTERM)
        stdout, stderr = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
        for job in ray_head.jobs():
            if job["metadata"].get("ditsweep.spec") == "followed" and job["status"] in ("PENDING", "RUNNING"):
                subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "stop", "--address",
                                ray_head.address, job["submission_id"]], env={**os.environ, **ray_head.auth},
                               capture_output=True, timeout=60)
    assert follow.returncode == 143, "".join(lines) + stdout + stderr
    assert "stopped following" in stderr and "ray job stop" in stderr and "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_a_job_that_fails_on_the_cluster_exits_1(ray_head, tmp_path):
    # Valid here, refused by `launch` on the cluster: the data source is not there. The driver is
    # the shipped code, run from the job's working directory.
    spec = tiny_spec(tmp_path, "nodata", data={**TINY["data"], "source": "/nonexistent/ditsweep-data"})
    result = ditsweep("submit", str(spec), "--address", ray_head.address, "--follow", "--with-code",
                      cwd=tmp_path, env=ray_head.auth)
    assert result.returncode == 1, result.stdout + result.stderr
    assert ": python -m orchestrator.cli launch nodata.yaml --address auto" in result.stdout  # Ray's log line
    assert "/nonexistent/ditsweep-data" in result.stdout  # the driver's error, streamed back
    assert "FAILED: the driver exited with code 2" in result.stderr


@pytest.mark.slow
def test_bad_spec_exits_2_and_submits_nothing(ray_head, tmp_path):
    spec = write_spec(tmp_path, name="bad", grid={"attention.placement": ["head", "sideways"]})
    before = len(ray_head.jobs())
    result = CliRunner().invoke(app, ["submit", str(spec), "--address", ray_head.address])
    assert result.exit_code == 2, result.output
    assert "sideways" in result.stderr
    assert len(ray_head.jobs()) == before


@pytest.mark.slow
def test_a_cluster_that_wants_a_token_is_explained(ray_head, tmp_path):
    spec = tiny_spec(tmp_path, "notoken")
    before = len(ray_head.jobs())
    result = ditsweep("submit", str(spec), "--address", ray_head.address, cwd=tmp_path,
                      env={"RAY_AUTH_MODE": "disabled"})
    assert result.returncode == 2, result.stdout + result.stderr
    assert ray_head.address in result.stderr and "RAY_AUTH_MODE=token" in result.stderr
    assert len(ray_head.jobs()) == before


@pytest.mark.slow
def test_submit_of_a_trial_no_node_can_hold_is_refused_by_the_drivers_check(ray_head, tmp_path):
    """The head has 2 CPUs, no GPU and no autoscaler: a GPU trial can never run. `submit` cannot see
    autoscaler node types through the dashboard, so it waits for the driver's own check and passes
    its refusal on as exit 2; no MLflow run was made."""
    spec = write_spec(tmp_path, name="wantsgpu", base=TINY, grid=ONE_TRIAL, resources={"cpu": 1, "gpu": 1})
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = ditsweep("submit", str(spec), "--address", ray_head.address, "--tracking-uri", tracking,
                      cwd=tmp_path, env=ray_head.auth)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no current node of the cluster holds a trial (resources.cpu=1, resources.gpu=1)" in result.stderr
    assert "resources.gpu=1 but no node of the cluster, current or one its autoscaler can add, has a GPU" \
        in result.stderr
    (job,) = [j for j in ray_head.jobs() if j["metadata"].get("ditsweep.spec") == "wantsgpu"]
    assert job["status"] == "FAILED" and job["driver_exit_code"] == 2
    assert not (tmp_path / "mlflow.db").exists()  # refused before the tracking store was touched


# Written into the head's GCS the way an autoscaler reports its node types (KubeRay worker groups):
# a GPU group that may grow from 0 to 2 nodes of 4 CPUs and 1 GPU.
_REPORT_GPU_GROUP = """
import sys
import ray
from ray.core.generated import autoscaler_pb2
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put
ray.init(address=sys.argv[1], log_to_driver=False, include_dashboard=False)
key, namespace = ray._raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, ray._raylet.GCS_AUTOSCALER_STATE_NAMESPACE
if sys.argv[2] == "put":
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="gpu-workers", min_count=0, max_count=2)
    group.resources["CPU"], group.resources["GPU"] = 4, 1
    _internal_kv_put(key, config.SerializeToString(), namespace=namespace)
else:
    _internal_kv_del(key, namespace=namespace)
"""


@pytest.mark.slow
def test_launch_on_a_cluster_waits_for_a_gpu_its_autoscaler_can_add_then_times_out(ray_head, tmp_path):
    """--address of a real head: without node types a GPU trial is refused (exit 2, nothing written);
    with a GPU worker group reported by the autoscaler it is accepted, the progress line says what it
    waits for, and --pending-timeout ends the sweep with its runs KILLED (resumable)."""
    spec = write_spec(tmp_path, name="scaleup", base=TINY, grid=ONE_TRIAL, resources={"cpu": 1, "gpu": 1})
    launch = ("launch", str(spec), "--address", ray_head.gcs_address, "--pending-timeout", "5")
    refused = ditsweep(*launch, cwd=tmp_path, env=ray_head.auth)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "resources.gpu=1 but no node of the cluster, current or one its autoscaler can add, has a GPU" \
        in refused.stderr
    assert not (tmp_path / "mlflow.db").exists()

    def report(action: str) -> None:
        done = subprocess.run([sys.executable, "-c", _REPORT_GPU_GROUP, ray_head.gcs_address, action],
                              env={**os.environ, **ray_head.auth}, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]

    report("put")
    try:
        waited = ditsweep(*launch, cwd=tmp_path, env=ray_head.auth)
    finally:
        report("delete")
    assert waited.returncode == 1, waited.stdout + waited.stderr
    waiting = "waiting for 1 GPU: the cluster is scaling up (node type gpu-workers)"
    assert waiting in waited.stdout.splitlines()  # said at once, then on the progress lines:
    assert any(line.startswith("[") and line.endswith(f"| {waiting}") for line in waited.stdout.splitlines())
    assert "--pending-timeout 5" in waited.stdout and "ditsweep resume" in waited.stdout
    runs = runs_by_role(MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "scaleup")
    assert [r.info.status for r in runs["sweep"]] == ["KILLED"]
    assert [r.info.status for r in runs["trial"]] in ([], ["KILLED"])  # never started, or marked KILLED

@pytest.mark.slow
def test_submit_knows_the_line_launch_prints_once_it_accepted_a_sweep(finished_sweep):
    """`submit` reads a job's logs for the line a real `launch` printed (the shared finished sweep's
    output): rewording either side alone fails here instead of leaving `submit` waiting silently."""
    from orchestrator.display import ACCEPTED_LINE, accepted_line

    printed = [line for line in finished_sweep["stdout"].splitlines() if ACCEPTED_LINE.match(line)]
    assert printed == [accepted_line(finished_sweep["sweep_id"], len(finished_sweep["trials"]), "sqlite:///mlflow.db")]


@pytest.mark.parametrize("address", ["http://127.0.0.1:{port}", "ray://127.0.0.1:10001"], ids=["dashboard", "ray-client"])
def test_unreachable_address_exits_2_naming_it(tmp_path, address):
    address = address.format(port=free_port())  # chosen when the test runs: collection must not vary
    spec = tiny_spec(tmp_path, "nowhere")
    result = CliRunner().invoke(app, ["submit", str(spec), "--address", address])
    assert result.exit_code == 2, result.output
    assert address in result.stderr


def test_passwords_never_travel_with_the_job(tmp_path):
    spec = tiny_spec(tmp_path, "secret")
    result = CliRunner().invoke(app, [
        "submit", str(spec), "--address", f"http://127.0.0.1:{free_port()}",
        "--tracking-uri", "postgresql://mlflow:hunter2@db:5432/mlflow",
    ])
    assert result.exit_code == 2, result.output
    assert "--tracking-uri holds a password" in result.stderr and "hunter2" not in result.output


def test_with_code_ships_the_packages_and_the_entrypoint_uses_them(tmp_path):
    spec = tiny_spec(tmp_path, "shipped")
    folder = tmp_path / "job"
    folder.mkdir()
    stage_working_dir(spec, folder, with_code=True)
    assert (folder / "shipped.yaml").read_text() == spec.read_text()
    assert (folder / "pyproject.toml").is_file()
    assert (folder / "trainer" / "train.py").is_file() and (folder / "orchestrator" / "cli.py").is_file()
    assert not list(folder.rglob("__pycache__"))
    entrypoint = launch_entrypoint("shipped.yaml", ["train.steps=3"], "s3://b/r", None, with_code=True)
    assert shlex.split(entrypoint) == [
        "python", "-m", "orchestrator.cli", "launch", "shipped.yaml", "--address", "auto",
        "--set", "train.steps=3", "--storage", "s3://b/r",
    ]


# ---------------------------------------------------------------------------------------------
# render-k8s


def render(*args: str) -> object:
    return CliRunner().invoke(app, ["render-k8s", *args])


def test_render_k8s_of_the_templates_spec_is_rayjob_yaml(monkeypatch):
    monkeypatch.chdir(REPO)
    result = render("search_spaces/paper/placement_xs.yaml")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout) == yaml.safe_load(RAYJOB_TEMPLATE.read_text())


def test_render_k8s_output_validates_against_the_crd(monkeypatch):
    monkeypatch.chdir(REPO)
    result = render("search_spaces/paper/window_size_xs.yaml", "--image", "registry.example/ditsweep:1.2.3",
                    "--storage", "s3://lab/results", "--namespace", "research")
    assert result.exit_code == 0, result.output
    manifest = yaml.safe_load(result.stdout)
    validate_manifest(manifest)
    check_kuberay_rules(manifest)
    assert (manifest["metadata"]["name"], manifest["metadata"]["namespace"]) == ("ditsweep-window-size-xs", "research")
    assert shlex.split(manifest["spec"]["entrypoint"]) == [
        "ditsweep", "launch", "search_spaces/paper/window_size_xs.yaml", "--storage", "s3://lab/results",
        "--address", "auto",
    ]


def test_render_k8s_refuses_a_bad_spec_or_name(tmp_path):
    bad = write_spec(tmp_path, name="bad", grid={"attention.placement": ["sideways"]})
    result = render(str(bad))
    assert result.exit_code == 2 and "sideways" in result.stderr and not result.stdout
    good = tiny_spec(tmp_path, "good")
    result = render(str(good), "--name", "Not_A_Label")
    assert result.exit_code == 2 and "not accepted by KubeRay" in result.stderr and not result.stdout


@pytest.mark.parametrize("storage", ["/srv/results", "results", "file-but-no-scheme"])
def test_render_k8s_refuses_a_local_storage(monkeypatch, storage):
    """A RayJob's trials run in pods of their own: a local folder is not shared, and the driver's
    `launch` would refuse it at start on the multi-node cluster. Refused here, nothing printed."""
    monkeypatch.chdir(REPO)
    result = render("search_spaces/paper/placement_xs.yaml", "--storage", storage)
    assert result.exit_code == 2, result.output
    assert f"--storage '{storage}' is a local folder" in result.stderr and "s3://" in result.stderr
    assert not result.stdout


@pytest.mark.parametrize(
    ("uri", "nodes", "expected"),
    [
        ("sqlite:///mlflow.db", 1, "relative to the job's working directory"),
        ("sqlite:////srv/mlflow.db", 3, "local to one machine"),
        ("http://127.0.0.1:5000", 2, "local to one machine"),
        ("http://localhost:5000", 2, "local to one machine"),
        ("/srv/mlruns", 2, "local to one machine"),
    ],
)
def test_submit_refuses_a_tracking_uri_the_jobs_driver_cannot_share(uri, nodes, expected):
    from orchestrator.cluster import ClusterError, check_tracking_reachable

    with pytest.raises(ClusterError, match=expected):
        check_tracking_reachable(uri, "http://head:8265", nodes)


@pytest.mark.parametrize(("uri", "nodes"), [("sqlite:////srv/mlflow.db", 1), ("http://127.0.0.1:5000", 1),
                                             ("http://mlflow.research:5000", 4), (None, 4)])
def test_submit_takes_a_tracking_uri_the_jobs_driver_can_share(uri, nodes):
    from orchestrator.cluster import check_tracking_reachable

    check_tracking_reachable(uri, "http://head:8265", nodes)  # one node: its own files and loopback are shared


def test_submit_with_a_relative_sqlite_store_exits_2_before_reaching_the_cluster(tmp_path):
    spec = tiny_spec(tmp_path, "relative")
    result = CliRunner().invoke(app, ["submit", str(spec), "--address", f"http://127.0.0.1:{free_port()}",
                                      "--tracking-uri", "sqlite:///mlflow.db"])
    assert result.exit_code == 2, result.output
    assert "relative to the job's working directory" in result.stderr and "cannot reach" not in result.stderr


# ---------------------------------------------------------------------------------------------
# Everything on S3


# What a user's environment holds. The sweep really uses the AWS ones (moto takes any key); none may
# be written to the store, the results, S3 or the terminal.
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEY0DITSWEEP",
    "AWS_SECRET_ACCESS_KEY": "fakeSecretValue+DitSweep/123456",
    "AWS_SESSION_TOKEN": "fakeSessionTokenDitSweep987",
    "MLFLOW_TRACKING_PASSWORD": "fakeTrackingPasswordDitSweep",
    "MLFLOW_TRACKING_TOKEN": "fakeTrackingTokenDitSweep",
}


@pytest.mark.slow
def test_sweep_with_data_checkpoints_and_artifacts_on_s3_and_no_credentials_anywhere(tmp_path, s3_bucket, s3_env):
    import s3fs

    images = tmp_path / "png"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    env = {
        "DITSWEEP_ARTIFACT_ROOT": f"s3://{s3_bucket}/mlartifacts",
        "MLFLOW_S3_ENDPOINT_URL": s3_env,
        "DITSWEEP_CACHE": str(tmp_path / "cache"),
        **SECRETS,
    }
    prepared = ditsweep("prepare-data", str(images), f"s3://{s3_bucket}/data", "--image-size", "8",
                        cwd=tmp_path, env=env)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr

    storage = f"s3://{s3_bucket}/results"
    spec = tiny_spec(tmp_path, "s3all", data={**TINY["data"], "source": f"s3://{s3_bucket}/data"})
    result = ditsweep("launch", str(spec), "--storage", storage, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    runs = runs_by_role(MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "s3all")
    (trial,) = runs["trial"]
    assert trial.info.status == "FINISHED" and "psnr_gap" in trial.data.metrics
    assert trial.info.artifact_uri.startswith(f"s3://{s3_bucket}/mlartifacts/")
    assert runs["sweep"][0].data.tags["ditsweep.storage"] == storage
    sweep_id = runs["sweep"][0].data.tags["ditsweep.sweep_id"]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    stored = fs.find(s3_bucket)
    assert {f"{s3_bucket}/data/shard-00000.npy", f"{s3_bucket}/data/manifest.json"} <= set(stored)
    assert any(p.startswith(f"{s3_bucket}/results/{sweep_id}/") and "/checkpoint_" in p and p.endswith("state.pt")
               for p in stored), stored
    trial_artifacts = trial.info.artifact_uri.removeprefix("s3://")
    assert {f"{trial_artifacts}/config.yaml", f"{trial_artifacts}/psnr_curve.csv"} <= set(stored)
    assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / "ditsweep_results").exists()

    written = {str(path): path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    written |= {f"s3://{key}": fs.cat_file(key) for key in stored}
    leaks = [f"{where}: {name}" for where, payload in written.items()
             for name, value in SECRETS.items() if value.encode() in payload]
    output = prepared.stdout + prepared.stderr + result.stdout + result.stderr
    leaks += [f"output: {name}" for name, value in SECRETS.items() if value in output]
    assert not leaks, leaks
