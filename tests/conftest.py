"""Shared fixtures.

S3: a real S3 API (moto's server) on 127.0.0.1, reached by s3fs/boto3 through the standard
environment variables, exactly as a user's MinIO or AWS endpoint would be.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server on a free loopback port for the whole session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory) -> Iterator[str]:
    """Point boto3/s3fs at the moto server via the environment; yields the endpoint URL."""
    import s3fs

    missing = tmp_path_factory.mktemp("aws") / "absent"  # keep ~/.aws profiles out of the tests
    settings = {
        "AWS_ACCESS_KEY_ID": "fake",
        "AWS_SECRET_ACCESS_KEY": "fake",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ENDPOINT_URL_S3": s3_server,
        "AWS_CONFIG_FILE": str(missing),
        "AWS_SHARED_CREDENTIALS_FILE": str(missing),
    }
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "DITSWEEP_S3_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    # Cached S3FileSystem instances hold a client built for an earlier environment.
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_server
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_bucket(s3_env: str) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"ditsweep-test-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory) -> dict:
    """One finished tiny sweep (placement none/head x seed 0/1) in its own folder, launched through
    the CLI; shared by the tests that read a real sweep (report, MLflow UI)."""
    from mlflow.tracking import MlflowClient

    from tests.sweeps import TINY, ditsweep, runs_by_role, sqlite_uri, write_spec

    folder = tmp_path_factory.mktemp("finished_sweep")
    base = {**TINY, "train": {**TINY["train"], "steps": 2}}
    spec = write_spec(folder, name="realsweep", base=base,
                      grid={"attention.placement": ["none", "head"], "seed": [0, 1]})
    launched = ditsweep("launch", str(spec), cwd=folder)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    client = MlflowClient(tracking_uri=sqlite_uri(folder))
    runs = runs_by_role(client, "realsweep")
    parent = runs["sweep"][0]
    return {
        "folder": folder,
        "stdout": launched.stdout,
        "experiment_id": parent.info.experiment_id,
        "sweep": parent.info.run_name,
        "sweep_id": parent.data.tags["ditsweep.sweep_id"],
        "parent_run_id": parent.info.run_id,
        "trials": sorted(r.info.run_name for r in runs["trial"]),
    }


@pytest.fixture(scope="module")
def one_torch_thread():
    """Limit torch to one thread for a module, then restore the previous setting."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# =============================================================================================
# A multi-node Ray cluster on 127.0.0.1 (issue #15). Kept as one block at the end of this file.
#
# Real `ray start --block` processes, each in a process group of its own: a head that takes no
# trials (--num-cpus 0, as on KubeRay) and worker nodes of one CPU each, joined to it. Every process
# a node starts (its raylet, agents, Ray workers and trial actors) inherits the node's marker in its
# environment, so one node can be killed alone (`kill_node`) and leftovers are found by marker.


RAY_NODE_MARKER = "DITSWEEP_TEST_RAY_NODE"


def _processes_marked(marker: str) -> list[int]:
    """Live processes whose environment carries RAY_NODE_MARKER=marker (zombies have an empty environ)."""
    from pathlib import Path

    wanted, found = f"{RAY_NODE_MARKER}={marker}".encode(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


class RayTestCluster:
    """Handle on the running test cluster: its GCS address and one `ray start` process per node."""

    def __init__(self, address: str, temp_dir: str, env: dict[str, str]) -> None:
        self.address = address  # host:port of the head's GCS: `--address` for ditsweep and ray
        self.temp_dir = temp_dir
        self.env = env  # the environment the nodes run with (plus their markers)
        self.nodes: dict[str, object] = {}  # name -> subprocess.Popen of `ray start --block`
        self.markers: dict[str, str] = {}

    def start_node(self, name: str, args: list[str]) -> None:
        import secrets
        import subprocess
        import sys
        from pathlib import Path

        marker = f"{name}-{secrets.token_hex(6)}"
        log = open(Path(self.temp_dir).with_suffix(f".{name}.log"), "w")  # noqa: SIM115 - owned by the process
        self.nodes[name] = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
             f"--temp-dir={self.temp_dir}", *args],
            env={**self.env, RAY_NODE_MARKER: marker}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.markers[name] = marker

    def log(self, name: str) -> str:
        from pathlib import Path

        path = Path(self.temp_dir).with_suffix(f".{name}.log")
        return path.read_text()[-3000:] if path.exists() else ""

    def alive_nodes(self) -> list[dict]:
        """ray.nodes() of the live nodes, read in a separate process (this one may hold its own Ray)."""
        import json
        import subprocess
        import sys

        script = (
            "import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps([{'id': n['NodeID'], 'ip': n['NodeManagerAddress'], 'cpu': n['Resources'].get('CPU', 0),"
            " 'port': n['NodeManagerPort']}"
            " for n in ray.nodes() if n['Alive']]))" % self.address
        )
        done = subprocess.run([sys.executable, "-c", script], env=self.env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return []
        return json.loads(done.stdout.strip().splitlines()[-1])

    def node_ids(self) -> dict[str, str]:
        """{node name: Ray node id} of the live nodes, matched by the node manager port each was given."""
        ports = {}
        for name, proc in self.nodes.items():
            for arg in proc.args:
                if arg.startswith("--node-manager-port="):
                    ports[int(arg.split("=", 1)[1])] = name
        return {ports[node["port"]]: node["id"] for node in self.alive_nodes() if node["port"] in ports}

    def wait_for_nodes(self, count: int, timeout: float = 180) -> list[dict]:
        import time

        deadline = time.monotonic() + timeout
        while len(nodes := self.alive_nodes()) != count:
            for name, proc in self.nodes.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"ray node {name} exited ({proc.returncode}):\n{self.log(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} of {count} Ray nodes alive after {timeout:.0f} s: {nodes}")
            time.sleep(2)
        return nodes

    def kill_node(self, name: str, timeout: float = 30) -> None:
        """SIGKILL every process of one node (its group, then anything else carrying its marker)."""
        import os
        import signal
        import time

        proc = self.nodes[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while leftovers := _processes_marked(self.markers[name]):
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of ray node {name} still running: {leftovers}")
            time.sleep(0.3)

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):  # workers first, the head last
            self.kill_node(name)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_ports() -> list[str]:
    """Every port a node listens on, free ones, so the cluster never meets another Ray on this machine."""
    names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port")
    return [f"--{name}={_free_port()}" for name in names]


def s3_node_environment(endpoint: str) -> dict[str, str]:
    """What every node of a cluster needs to reach the test's S3 (as a real cluster's nodes are
    configured with their storage's endpoint and credentials): trials write checkpoints from there."""
    return {"AWS_ACCESS_KEY_ID": "fake", "AWS_SECRET_ACCESS_KEY": "fake", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}


@pytest.fixture(scope="module")
def ray_cluster(s3_server: str) -> Iterator[RayTestCluster]:
    """A head with no CPUs and two worker nodes of one CPU each (`worker-1`, `worker-2`) on 127.0.0.1,
    their environment pointed at the session's moto S3 server (see `s3_node_environment`).

    Tests that kill a node should use a cluster of their own (this fixture is module-scoped). All
    processes are killed by id (and checked gone) afterwards; the temporary folder is removed.
    """
    import os
    import shutil
    import tempfile
    from pathlib import Path

    temp_dir = tempfile.mkdtemp(prefix="rc-")  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    # No token: a throwaway test cluster (note Ray registers the nodes under the host's IP, not only loopback).
    env.update(s3_node_environment(s3_server), RAY_AUTH_MODE="disabled")
    port = _free_port()
    cluster = RayTestCluster(f"127.0.0.1:{port}", temp_dir, env)
    try:
        cluster.start_node("head", ["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
                                    "--num-gpus=0", "--include-dashboard=false",
                                    "--dashboard-host=127.0.0.1", f"--dashboard-port={_free_port()}",
                                    f"--ray-client-server-port={_free_port()}", *_node_ports()])
        cluster.wait_for_nodes(1)
        for count, name in enumerate(("worker-1", "worker-2"), start=2):
            for attempt in (1, 2):  # on a loaded machine a join can miss the GCS's deadline once
                cluster.start_node(name, [f"--address={cluster.address}", "--node-ip-address=127.0.0.1",
                                          "--num-cpus=1", "--num-gpus=0", *_node_ports()])
                try:
                    cluster.wait_for_nodes(count)
                    break
                except RuntimeError:
                    cluster.kill_node(name)
                    if attempt == 2:
                        raise
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for name in cluster.nodes:
            Path(temp_dir).with_suffix(f".{name}.log").unlink(missing_ok=True)
