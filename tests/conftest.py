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
    base = tiny_config({"train.steps": 2})
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
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


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


def marked_processes(marker: str) -> list[int]:
    """Live processes whose environment carries the marker (zombies have an empty environ)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"{RAY_MARKER}={marker}".encode() in environ.split(b"\0"):
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
    cluster = RayHead(f"http://127.0.0.1:{dashboard}", auth)
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


def pytest_collection_modifyitems(items) -> None:
    """`make test-fast` (-m "not slow") must start no Ray cluster: a test that wants the Ray head is slow."""
    for item in items:
        if "ray_head" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None:
            raise pytest.UsageError(f"{item.nodeid} uses the ray_head fixture: mark it @pytest.mark.slow")


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
