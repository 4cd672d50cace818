"""A Ray head on this machine (`ray start --head`, token auth, its dashboard's job API): only for
tests marked slow. Every process it starts carries a marker in its environment, so none is left
behind: they are killed by id, and checked gone."""

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
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import kill_marked, marked_processes
from tests.support.sweeps import free_port

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
        assert head.pid in marked_processes(RAY_MARKER, marker)  # else the leak check below would see nothing
        yield cluster
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        kill_marked(RAY_MARKER, marker, "the Ray head", timeout=30, poll_s=0.5)  # workers and job drivers in other groups
        shutil.rmtree(temp_dir, ignore_errors=True)
        log.unlink(missing_ok=True)
