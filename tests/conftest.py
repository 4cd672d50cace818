"""The fixtures every test module shares, one of each: S3 (moto), `mlflow server`, a Ray head,
a loopback HTTP server, the recorder of network contacts, the stand-in FID weights, a finished
sweep, and one torch thread. Plain helpers (the tiny config, specs, the CLI) are in tests/support.

S3: a real S3 API (moto's server) on 127.0.0.1, reached by s3fs/boto3 through the standard
environment variables, exactly as a user's MinIO or AWS endpoint would be. Servers are stopped by
their process id.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator.tracking import server_environment
from tests.support.sweeps import ditsweep, free_port, runs_by_role, sqlite_uri, tiny_config, write_spec


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

    folder = tmp_path_factory.mktemp("finished_sweep")
    # With the Jacobian analysis (trainer.jacobian) on a little: one image, two noise levels, d = 64.
    base = tiny_config({"train.steps": 2, "eval.jacobian": {"enabled": True, "images": 1, "timesteps": [100, 600],
                                                            "top_k": 4}})
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


# ---------------------------------------------------------------------------------------------
# `mlflow server`


@dataclass
class MlflowServer:
    """A real `mlflow server` on a loopback port, which a test may stop and start again on that port."""

    folder: Path
    port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"],
            env=server_environment(),  # as ditsweep's UI and the Kubernetes manifest run it: no job workers
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    self.close()
                    pytest.fail(f"mlflow server did not answer at {self.url} within {timeout_s:.0f}s")
                time.sleep(0.5)

    def stop(self) -> None:
        """Kill the running server at once (a crash, as a test of going away wants it)."""
        proc = self.procs[-1]
        _signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self, grace_s: float = 15.0) -> None:
        """Stop every server process group this fixture started: SIGTERM, at most `grace_s` to exit,
        then SIGKILL (gunicorn workers can hang on a signal under load) and a bounded wait."""
        for proc in self.procs:
            if proc.poll() is not None:
                continue
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=30)
            _signal_group(proc, signal.SIGKILL)  # workers of the group that outlived their master


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except ProcessLookupError:  # the whole group is gone already
        pass


@pytest.fixture
def mlflow_server_process(tmp_path) -> Iterator[MlflowServer]:
    folder = tmp_path / "server"
    folder.mkdir()
    server = MlflowServer(folder)
    server.start()
    yield server
    server.close()


@pytest.fixture
def mlflow_server(mlflow_server_process: MlflowServer) -> str:
    """The URL of a real `mlflow server` on loopback."""
    return mlflow_server_process.url


@pytest.fixture
def restartable_mlflow_server(mlflow_server_process: MlflowServer):
    """(url, start, stop) of a real `mlflow server` that the test can stop and start again on the same port."""
    return mlflow_server_process.url, mlflow_server_process.start, mlflow_server_process.stop


# ---------------------------------------------------------------------------------------------
# A Ray head on this machine (`ray start --head`): only for tests marked slow


RAY_MARKER = "DITSWEEP_TEST_RAY_HEAD"


@dataclass(frozen=True)
class RayHead:
    address: str  # the dashboard, where jobs are submitted
    auth: dict[str, str]  # what a user allowed on the cluster has in the environment
    gcs_address: str  # host:port of the head's GCS: `launch --address` joins the cluster here

    def get(self, path: str):
        request = urllib.request.Request(
            self.address + path, headers={"Authorization": f"Bearer {self.auth['RAY_AUTH_TOKEN']}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def jobs(self) -> list[dict]:
        return self.get("/api/jobs/")

    def driver_resources(self, submission_id: str) -> dict[str, float]:
        """What the job's driver reserved: its JobSupervisor actor's resources."""
        actors = self.get("/api/v0/actors?detail=1&limit=1000")["data"]["result"]["result"]
        (actor,) = [a for a in actors if a["name"] == f"_ray_internal_job_actor_{submission_id}"]
        return actor["required_resources"]


def marked_processes(marker: str, variable: str = RAY_MARKER) -> list[int]:
    """Live processes whose environment carries variable=marker (zombies have an empty environ)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"{variable}={marker}".encode() in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    marker = secrets.token_hex(8)
    temp_dir = Path(tempfile.gettempdir()) / f"rs-{secrets.token_hex(4)}"  # Ray's socket paths must stay short
    gcs, dashboard, client, agent = (free_port() for _ in range(4))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {
        **os.environ,
        **auth,
        # As in an activated virtual environment: the job's `ditsweep launch` is found on PATH.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        RAY_MARKER: marker,
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    log = temp_dir.with_suffix(".log")
    with open(log, "w") as out:
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--disable-usage-stats",
             f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true", f"--temp-dir={temp_dir}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    cluster = RayHead(f"http://127.0.0.1:{dashboard}", auth, f"127.0.0.1:{gcs}")
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                cluster.jobs()  # the job API answers once the dashboard's job module is up
                break
            except (OSError, urllib.error.URLError):
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray head did not start:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        assert head.pid in marked_processes(marker)  # else the leak check below would see nothing
        yield cluster
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        deadline = time.monotonic() + 30
        while leftovers := marked_processes(marker):  # workers and job drivers in other groups
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            assert time.monotonic() < deadline, f"Ray processes left running: {leftovers}"
            time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)
        log.unlink(missing_ok=True)


def _xdist_group(item) -> str | None:
    """Tests that share an expensive fixture run on the same xdist worker (`make test` runs two, with
    `--dist loadgroup`), so it is built once: the finished sweep (session), and per module a Ray head
    or cluster, a trained model or a built store (any module-scoped fixture)."""
    definitions = getattr(item, "_fixtureinfo", None)
    scopes = {name: defs[-1].scope for name, defs in (definitions.name2fixturedefs.items() if definitions else ())
              if defs}
    if scopes.get("finished_sweep") == "session":
        return "finished_sweep"
    if "module" in scopes.values():
        return item.module.__name__
    return None


# The default per-test timeout is pyproject.toml's; a slow test (a real sweep, a cluster started for its
# module) gets this much, what its own subprocess waits allow on a loaded 2-core machine.
SLOW_TEST_TIMEOUT_S = 1200


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the xdist_group markers
def pytest_collection_modifyitems(items) -> None:
    """`make test-fast` (-m "not slow") must start no Ray cluster: a test that wants the Ray head is slow.
    A slow test gets the longer timeout SLOW_TEST_TIMEOUT_S.

    Slow tests go first, so the two workers of `make test` are not left with one long test at the end
    (a group's tests still run together on one worker, so a module fixture is built once)."""
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))
        for cluster in ("ray_head", "ray_cluster"):
            if cluster in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
                raise pytest.UsageError(f"{item.nodeid} uses the {cluster} fixture: mark it @pytest.mark.slow")
        group = _xdist_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise


def pytest_configure(config) -> None:
    """Under `--dist loadgroup`, pytest-xdist (3.8) sends a group's tests to one worker by rewriting
    their old `_nodeid` attribute, which pytest 9.2 no longer reads: every shared cluster, sweep and
    model would be built once per worker, silently. Refuse that pairing, naming the fix."""
    if config.getoption("dist", "no") != "loadgroup":
        return
    major, minor = (int(part) for part in pytest.__version__.split(".")[:2])
    if (major, minor) >= (9, 2):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} with --dist loadgroup: pytest-xdist cannot keep grouped tests on one "
            "worker; install the versions pyproject.toml allows (make install-dev)"
        )


# ---------------------------------------------------------------------------------------------
# A multi-node Ray cluster on 127.0.0.1: only for tests marked slow
#
# Real `ray start --block` processes, each in a process group of its own: a head that takes no
# trials (--num-cpus 0, as on KubeRay) and worker nodes of one CPU each, joined to it. Every process
# a node starts (its raylet, agents, Ray workers and trial actors) inherits the node's marker in its
# environment, so one node can be killed alone (`kill_node`) and leftovers are found by marker.


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
        deadline = time.monotonic() + timeout
        while leftovers := marked_processes(self.markers[name], RAY_NODE_MARKER):
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
            self._log_path(name).unlink(missing_ok=True)


def _node_ports() -> list[str]:
    """Every port a node listens on, free ones, so the cluster never meets another Ray on this machine."""
    names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port")
    return [f"--{name}={free_port()}" for name in names]


def s3_node_environment(endpoint: str) -> dict[str, str]:
    """What every node of a cluster needs to reach the test's S3 (as a real cluster's nodes are
    configured with their storage's endpoint and credentials): trials write checkpoints from there."""
    return {"AWS_ACCESS_KEY_ID": "fake", "AWS_SECRET_ACCESS_KEY": "fake", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}


@pytest.fixture(scope="module")
def ray_cluster(s3_server: str) -> Iterator[RayTestCluster]:
    """A head with no CPUs and two worker nodes of one CPU each (`worker-1`, `worker-2`) on 127.0.0.1,
    their environment pointed at the session's moto S3 server (see `s3_node_environment`).

    One cluster per module: a test that kills a node leaves it dead for the tests after it. All
    processes are killed by id (and checked gone) afterwards; the temporary folder is removed.
    """
    temp_dir = tempfile.mkdtemp(prefix="rc-")  # short: Ray's socket paths must stay under 108 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    # No token: a throwaway cluster on loopback (the `ray_head` fixture tests token auth).
    env.update(s3_node_environment(s3_server), RAY_AUTH_MODE="disabled")
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


# ---------------------------------------------------------------------------------------------
# Loopback HTTP, and who the code under test tried to reach


class RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder and records each request's path on the server (`server.requests`)."""

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        super().do_GET()

    def do_HEAD(self) -> None:
        self.server.requests.append(self.path)
        super().do_HEAD()

    def log_message(self, *args) -> None:
        pass


@dataclass
class HttpServer:
    folder: Path  # what it serves
    url: str
    requests: list[str]  # paths asked for, in order

    def __iter__(self):  # `served, base = http_server`
        return iter((self.folder, self.url))


@pytest.fixture
def http_server(tmp_path) -> Iterator[HttpServer]:
    """A real HTTP server on loopback serving tmp_path/served, recording the paths asked for."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(RecordingHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield HttpServer(served, f"http://127.0.0.1:{server.server_address[1]}", server.requests)
    server.shutdown()
    server.server_close()
    thread.join()


class NetworkContacts:
    """Hosts this process looked up or connected to while recording (Python's audit events
    `socket.getaddrinfo` and `socket.connect`, which every client library goes through)."""

    def __init__(self):
        self.hosts: list[str] = []
        self.recording = False

    def hook(self, event: str, args: tuple) -> None:
        if not self.recording:
            return
        if event == "socket.getaddrinfo":
            self.hosts.append(str(args[0]))
        elif event == "socket.connect" and isinstance(args[1], tuple):
            self.hosts.append(str(args[1][0]))


_CONTACTS = NetworkContacts()
sys.addaudithook(_CONTACTS.hook)  # audit hooks cannot be removed: this one records only inside the fixture


@pytest.fixture
def network_contacts() -> Iterator[NetworkContacts]:
    _CONTACTS.hosts.clear()
    _CONTACTS.recording = True
    try:
        yield _CONTACTS
    finally:
        _CONTACTS.recording = False


# ---------------------------------------------------------------------------------------------
# Stand-in FID weights


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory) -> tuple[Path, str]:
    """(path, sha256 prefix) of a random-weights file laid out like pt_inception-2015-12-05-6726825d.pth
    (the real weights cannot be downloaded in tests)."""
    import torch

    from tests.support.weights import random_fid_state_dict

    path = tmp_path_factory.mktemp("weights") / "random_inception.pth"
    torch.save(random_fid_state_dict(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()[:8]
