"""The in-process Ray of orchestrator.ray_connect: started in the background while the launch goes on
(`start_local_ray`, waited for by `init_ray`), and ended at exit by killing its processes
(`end_local_ray`). Each case is a fresh Python process; its Ray processes are found afterwards by a
marker variable every one of them inherits (tests/support/processes.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.support.processes import kill_marked, marked_processes

MARKER = "DITSWEEP_TEST_RAY_LOCAL"

STARTED = """
import json, os, sys
import psutil
import ray
from orchestrator import ray_connect

ray_connect.start_local_ray()
ray_connect.init_ray(None)

@ray.remote
def pid():
    return os.getpid()

worker = ray.get(pid.remote())
ray_processes = [p.pid for p in psutil.Process().children(recursive=True)]
print(json.dumps({"worker": worker, "ray": ray_processes}), flush=True)
sys.exit(int(sys.argv[1]))
"""


def run(script: str, *args: str, env: dict | None = None, timeout: float = 180) -> tuple[subprocess.CompletedProcess, str]:
    marker = uuid.uuid4().hex
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "RAY_ADDRESS": "local", MARKER: marker, **(env or {})})
    return result, marker


def leftovers(marker: str, wait_s: float = 10.0) -> list[int]:
    """The marked processes still alive after up to `wait_s` seconds (a SIGKILL is not instant)."""
    deadline = time.monotonic() + wait_s
    while (alive := marked_processes(MARKER, marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


@pytest.fixture
def reap():
    """Kill, after the test, whatever a failing case left behind."""
    markers: list[str] = []
    yield markers
    for marker in markers:
        kill_marked(MARKER, marker, "the Ray processes of a test_ray_local case")


@pytest.mark.parametrize("code", [0, 3])
def test_a_ray_started_in_the_background_runs_tasks_and_none_of_its_processes_outlives_the_process(code, reap):
    result, marker = run(STARTED, str(code))
    reap.append(marker)
    assert result.returncode == code, result.stderr[-3000:]  # the exit code is the program's, not Ray's
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    # GCS, raylet, Ray's Python helpers, and the raylet's children (its agents and the task's worker)
    assert len(seen["ray"]) >= 5 and seen["worker"] in seen["ray"], seen
    assert leftovers(marker) == []


def test_a_process_that_ends_while_its_ray_is_still_starting_leaves_no_ray_process(reap):
    script = ("import sys, time\nfrom orchestrator import ray_connect\n"
              "ray_connect.start_local_ray()\ntime.sleep(0.3)\nsys.exit(5)\n")
    result, marker = run(script)
    reap.append(marker)
    assert result.returncode == 5, result.stderr[-3000:]
    assert leftovers(marker) == []


def test_init_ray_raises_what_the_background_start_raised(tmp_path, reap):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("Ray's temporary folder cannot be made under a file")
    script = ("from orchestrator import ray_connect\nray_connect.start_local_ray()\n"
              "try:\n    ray_connect.init_ray(None)\nexcept Exception as err:\n"
              "    print('raised', type(err).__name__)\nelse:\n    print('started')\n")
    result, marker = run(script, env={"RAY_TMPDIR": str(not_a_folder / "ray")})
    reap.append(marker)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("raised "), result.stdout + result.stderr[-2000:]
    assert leftovers(marker) == []


def test_the_end_leaves_alone_a_ray_this_module_did_not_start(reap):
    """Ray started here, shut down by someone else (as prepare-data does), then a Ray started with a
    plain ray.init: `end_local_ray` must not take that one for its own."""
    script = ("import ray\nfrom orchestrator import ray_connect\nray_connect.init_ray(None)\nray.shutdown()\n"
              "ray.init(num_cpus=1, include_dashboard=False, logging_level='ERROR')\nray_connect.end_local_ray()\n"
              "connected = ray.is_initialized()  # a task now would start a new Ray by itself if this one were gone\n"
              "@ray.remote\ndef one():\n    return 1\nprint('still up', connected, ray.get(one.remote(), timeout=60))\n"
              "ray.shutdown()\n")
    result, marker = run(script)
    reap.append(marker)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "still up True 1"
    assert leftovers(marker) == []
