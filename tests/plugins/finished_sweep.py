"""One finished tiny sweep, launched through the CLI once per session, for the tests that read a
real sweep back (the report, the MLflow UI, what the console said while one trial errored and was retried)."""

from __future__ import annotations

import pytest

from tests.support.sweeps import ditsweep, runs_by_role, sqlite_uri, tiny_config, write_spec

# The trial of the finished sweep that raises on its first attempt (sweep.FAULT_DRILL_ENV) and finishes on its retry.
DRILLED = "none·s0"


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory) -> dict:
    """One finished tiny sweep (placement none/head x seed 0/1) in its own folder, launched through
    the CLI; shared by the tests that read a real sweep (report, MLflow UI). Trial DRILLED raises at the
    start of its first attempt and is retried (max_failures 1): a retry costs one Ray actor's start."""
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep import FAULT_DRILL_ENV

    folder = tmp_path_factory.mktemp("finished_sweep")
    # With the Jacobian analysis (trainer.jacobian) on a little: one image, two noise levels, d = 64.
    base = tiny_config({"train.steps": 2, "eval.jacobian": {"enabled": True, "images": 1, "timesteps": [100, 600],
                                                            "top_k": 4}})
    spec = write_spec(folder, name="realsweep", base=base,
                      grid={"attention.placement": ["none", "head"], "seed": [0, 1]}, max_failures=1)
    launched = ditsweep("launch", str(spec), cwd=folder, env={FAULT_DRILL_ENV: DRILLED})
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
        "drilled": DRILLED,
    }
