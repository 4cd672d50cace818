"""`ditsweep ui`: the MLflow UI over a local store, run in the foreground until Ctrl-C, its address
printed once it answers, with a link to each experiment's ditsweep run-table view."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from orchestrator.tracking.records import UI_WORKFLOW, VIEW_KEY
from orchestrator.tracking.store import TrackingError, artifact_root, is_local_store, resolve_tracking_uri
from orchestrator.tracking.tracker import Tracker


def ui_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow ui` over a local store, with the artifact root `launch` uses for new experiments."""
    if uri.startswith(("http://", "https://")):
        raise TrackingError(f"{uri} is a tracking server: its UI is at that address already")
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise TrackingError(f"no tracking store at '{path}': launch a sweep here first or pass --tracking-uri")
    command = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port),
               "--backend-store-uri", uri, "--workers", "1"]
    if is_local_store(uri):
        command += ["--default-artifact-root", artifact_root()]
    return command


def server_environment() -> dict[str, str]:
    """The environment for an `mlflow ui` or `mlflow server` that tracks sweeps. It needs no background
    job workers (GenAI judges, trace jobs): MLflow starts seven, a process and some 2.4 s of CPU each,
    for nothing a sweep uses. MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings them back."""
    key = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
    return {**os.environ, key: os.environ.get(key, "false")}


def serve_ui(uri: str | None, host: str, port: int, startup_timeout_s: float = 120.0) -> int:
    """Run the MLflow UI in the foreground until Ctrl-C; print its address once it answers."""
    uri = resolve_tracking_uri(uri)
    command = ui_command(uri, host, port)
    experiments = Tracker(uri, create=False).experiments_with_view()
    check_port_free(host, port)
    base_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    signal.signal(signal.SIGTERM, _interrupt)  # `kill PID` stops the server too, like Ctrl-C
    # Its own process group: the server, its uvicorn worker and job runner are stopped together.
    server = subprocess.Popen(command, start_new_session=True, env=server_environment())
    try:
        if not _wait_healthy(server, base_url, startup_timeout_s):
            return (server.wait() or 1) if server.poll() is not None else _stop(server, 1)
        print(f"MLflow UI: {base_url}", flush=True)
        for experiment_id, name in experiments:
            print(f"  {name}: {runs_page_url(base_url, experiment_id)}", flush=True)
        print("Ctrl-C stops it.", flush=True)
        return server.wait()
    except KeyboardInterrupt:
        return _stop(server, 0)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port something already listens on: the server would fail to bind it after seconds of
    start-up (its error buried in log lines), and another server answering there would be taken for it."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(address)
    except OSError as err:
        raise TrackingError(f"cannot listen on {host}:{port} ({err.strerror or err}); another process has "
                            "the port: pass --port with a free one") from None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _wait_healthy(server: subprocess.Popen, base_url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while server.poll() is None and time.monotonic() < deadline:
        try:
            urllib.request.urlopen(base_url + "/health", timeout=2).read()
            return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    if server.poll() is None:
        print(f"[ditsweep] the MLflow UI did not answer at {base_url} within {timeout_s:.0f}s", flush=True)
    return False


def _stop(server: subprocess.Popen, code: int) -> int:
    """Stop the server's whole process group: SIGTERM (uvicorn shuts down gracefully), SIGKILL if it lingers."""
    for sig, grace_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    return code


def runs_page_url(base_url: str, experiment_id: str) -> str:
    """The experiment's run table in the MLflow UI, opened on the ditsweep view."""
    # workflowType: MLflow 3's UI opens in its GenAI workspace unless the link (or the browser's last
    # choice) says model training; the query parameter wins over the browser's memory.
    return (f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
            f"&workflowType={UI_WORKFLOW}")
