"""A multi-node Ray cluster on 127.0.0.1: only for tests marked slow.

Real `ray start --block` processes, each in a process group of its own: a head that takes no
trials (--num-cpus 0, as on KubeRay) and worker nodes of one CPU each, joined to it. Every process
a node starts (its raylet, agents, Ray workers and trial actors) inherits the node's marker in its
environment, so one node can be killed alone (`kill_node`) and leftovers are found by marker.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.plugins.s3_moto import s3_client_environment
from tests.support.processes import kill_marked
from tests.support.sweeps import free_port

RAY_NODE_MARKER = "DITSWEEP_TEST_RAY_NODE"


class RayTestCluster:
    """Handle on the running test cluster: its GCS address and one `ray start` process per node."""

    def __init__(self, address: str, temp_dir: str, env: dict[str, str]) -> None:
        self.address = address  # host:port of the head's GCS: `--address` for ditsweep and ray
        self.temp_dir = temp_dir
        self.env = env  # the environment the nodes run with (plus their markers)
        self.nodes: dict[str, subprocess.Popen] = {}  # name -> `ray start --block`
        self.markers: dict[str, str] = {}

    def start_node(self, name: str, args: list[str]) -> None:
        marker = f"{name}-{secrets.token_hex(6)}"
        with open(self._log_path(name), "w") as log:
            self.nodes[name] = subprocess.Popen(
                [str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
                 f"--temp-dir={self.temp_dir}", *args],
                env={**self.env, RAY_NODE_MARKER: marker}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.markers[name] = marker

    def _log_path(self, name: str) -> Path:
        return Path(self.temp_dir).with_suffix(f".{name}.log")

    def log(self, name: str) -> str:
        path = self._log_path(name)
        return path.read_text()[-3000:] if path.exists() else ""

    def alive_nodes(self) -> list[dict]:
        """ray.nodes() of the live nodes, read in a separate process (this one may hold its own Ray)."""
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
        proc = self.nodes[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)
        kill_marked(RAY_NODE_MARKER, self.markers[name], f"ray node {name}", timeout=timeout)

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):  # workers first, the head last
            self.kill_node(name)
            self._log_path(name).unlink(missing_ok=True)


def _node_ports() -> list[str]:
    """Every port a node listens on, free ones, so the cluster never meets another Ray on this machine."""
    names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port")
    return [f"--{name}={free_port()}" for name in names]


@pytest.fixture(scope="module")
def ray_cluster(s3_server: str) -> Iterator[RayTestCluster]:
    """A head with no CPUs and two worker nodes of one CPU each (`worker-1`, `worker-2`) on 127.0.0.1,
    their environment pointed at the session's moto S3 server (as a real cluster's nodes are
    configured with their storage's endpoint and credentials: trials write checkpoints from there).

    One cluster per module: a test that kills a node leaves it dead for the tests after it. All
    processes are killed by id (and checked gone) afterwards; the temporary folder is removed.
    """
    temp_dir = tempfile.mkdtemp(prefix="rc-")  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    # No token: a throwaway cluster on loopback (the `ray_head` fixture tests token auth).
    env.update(s3_client_environment(s3_server), RAY_AUTH_MODE="disabled")
    port = free_port()
    cluster = RayTestCluster(f"127.0.0.1:{port}", temp_dir, env)
    try:
        cluster.start_node("head", ["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
                                    "--num-gpus=0", "--include-dashboard=false",
                                    "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
                                    f"--ray-client-server-port={free_port()}", *_node_ports()])
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
