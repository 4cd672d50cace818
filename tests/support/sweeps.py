"""Helpers for tests that run real sweeps through the CLI: tiny specs, the subprocess, the store."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

TINY = {
    "model": {"size": "DiT-T/1"},
    "data": {"num_images": 16, "test_images": 16},
    "train": {"steps": 4, "batch_size": 8, "log_every": 2, "warmup_steps": 0},
    "eval": {"every": 2, "psnr_gap": {"images": 8, "timesteps": 2}, "samples": {"grid": 2, "steps": 2}},
}


def tiny_config(changes: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> dict:
    """The one tiny trial config of the tests (TINY), with dotted keys changed and others dropped
    (back to their defaults), e.g. tiny_config({"train.steps": 2}, drop=("eval.every",))."""
    config = copy.deepcopy(TINY)
    for dotted, value in (changes or {}).items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    for dotted in drop:
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        del node[leaf]
    return config


def smallest_config() -> dict:
    """The smallest trial that still runs every stage once (one step of two images, evaluated at the
    end): for tests of many trials or many launches, where what a trial learns does not matter."""
    return tiny_config({"data.num_images": 4, "data.test_images": 4, "train.steps": 1, "train.batch_size": 2,
                        "train.log_every": 1, "eval.psnr_gap.images": 2, "eval.psnr_gap.timesteps": 1,
                        "eval.locality.enabled": False}, drop=("eval.every",))


def set_options(config: dict, prefix: str = "") -> list[str]:
    """A config as `--set key=value` options of the CLI, leaves in order."""
    options = []
    for key, value in config.items():
        if isinstance(value, dict):
            options += set_options(value, f"{prefix}{key}.")
        else:
            options += ["--set", f"{prefix}{key}={value}"]
    return options


def write_spec(folder: Path, name: str = "tiny", grid=None, base=None, **extra) -> Path:
    spec = {
        "name": name,
        "description": "test sweep",
        "base": base or TINY,
        "grid": grid or {"attention.placement": ["none", "head"]},
        "resources": {"cpu": 1},
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def ditsweep(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


def runs_by_role(client: MlflowClient, experiment: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    out: dict[str, list] = {"sweep": [], "trial": []}
    for run in runs:
        out[run.data.tags["ditsweep.role"]].append(run)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(folder: Path) -> set[str]:
    """Every file and folder under `folder`, relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def invoke(folder: Path, monkeypatch, *args: str):
    """Run the CLI in this process, in `folder`, with no tracking URI or Ray address from the
    environment: (typer's Result, paths it created). For commands that start no Ray here (bad input,
    plan, status, a launch with nothing to run, ...): no process start, no second import of torch."""
    from typer.testing import CliRunner

    from orchestrator.cli import app

    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = tree(folder)
    result = CliRunner().invoke(app, list(args))
    return result, tree(folder) - before
