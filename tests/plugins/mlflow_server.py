"""`mlflow server`: a real one on a loopback port, which a test may stop and start again on that port."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator.tracking import server_environment
from tests.support.processes import signal_group
from tests.support.sweeps import free_port


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
        signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self, grace_s: float = 15.0) -> None:
        """Stop every server process group this fixture started: SIGTERM, at most `grace_s` to exit,
        then SIGKILL (gunicorn workers can hang on a signal under load) and a bounded wait."""
        for proc in self.procs:
            if proc.poll() is not None:
                continue
            signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=30)
            signal_group(proc, signal.SIGKILL)  # workers of the group that outlived their master


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
