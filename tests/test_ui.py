"""`ditsweep ui`: the `mlflow ui` command it runs for a store, what it refuses (no store, a tracking
server, a taken port), and the experiment kind MLflow's UI needs to open ditsweep's experiments as
model training. The UI itself, in a browser, is test_ui_browser's."""

from __future__ import annotations

import socket
import time

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.tracking import TrackingError, Tracker, ui_command
from tests.support.sweeps import invoke, sqlite_uri


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A store made by ditsweep with one experiment (made once: its migrations take a second or two)."""
    folder = tmp_path_factory.mktemp("store")
    uri = sqlite_uri(folder)
    return {"path": folder / "mlflow.db", "uri": uri, "experiment": Tracker(uri).experiment_id("kinds")}


def test_ui_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DITSWEEP_ARTIFACT_ROOT", raising=False)
    (tmp_path / "mlflow.db").touch()
    command = ui_command("sqlite:///mlflow.db", "127.0.0.1", 5123)
    assert command[1:3] == ["-m", "mlflow"] and command[3] == "ui"
    flags = dict(zip(command[4::2], command[5::2]))
    assert flags["--host"] == "127.0.0.1" and flags["--port"] == "5123"
    assert flags["--backend-store-uri"] == "sqlite:///mlflow.db"
    assert flags["--default-artifact-root"] == (tmp_path / "mlartifacts").as_uri()
    with pytest.raises(TrackingError, match="its UI is at that address"):
        ui_command("http://127.0.0.1:5000", "127.0.0.1", 5000)
    with pytest.raises(TrackingError, match="no tracking store"):
        ui_command("sqlite:///elsewhere.db", "127.0.0.1", 5000)
    result = CliRunner().invoke(app, ["ui", "--tracking-uri", "sqlite:///elsewhere.db"])
    assert result.exit_code == 2 and "no tracking store" in result.output


def test_a_new_experiment_is_model_training(store):
    """MLflow 3's UI opens an experiment without a kind as GenAI; ditsweep's are model training."""
    experiment = MlflowClient(tracking_uri=store["uri"]).get_experiment(store["experiment"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_ui_on_a_taken_port_exits_2_at_once_naming_the_port(tmp_path, monkeypatch, store):
    """Something listens on the port already (another UI): refused before a server starts, and no
    address printed, since what answers there is not this store's UI."""
    # A copy, at a path MLflow has not opened in this process (it keeps the store it opened for each URI).
    (tmp_path / "mlflow.db").write_bytes(store["path"].read_bytes())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        result, written = invoke(tmp_path, monkeypatch, "ui", "--port", str(port))
        elapsed = time.monotonic() - start
    assert result.exit_code == 2, result.output
    assert f"127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert "MLflow UI:" not in result.stdout
    assert elapsed < 5, elapsed
    assert written == set()
