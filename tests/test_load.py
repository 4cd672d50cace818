"""Load: one launch of a 64-trial grid of the smallest trials finishes every trial once."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from tests.support.sweeps import ditsweep, runs_by_role, smallest_config, sqlite_uri, write_spec


@pytest.mark.slow
def test_64_trial_grid_finishes_without_duplicates(tmp_path):
    spec = write_spec(tmp_path, name="load", base=smallest_config(), grid={"seed": list(range(64))})
    result = ditsweep("launch", str(spec), cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = runs_by_role(MlflowClient(tracking_uri=sqlite_uri(tmp_path)), "load")
    keys = [r.data.tags["ditsweep.trial_key"] for r in runs["trial"]]
    assert len(keys) == 64 and len(set(keys)) == 64
    assert {r.info.status for r in runs["trial"]} == {"FINISHED"}
    assert len(runs["sweep"]) == 1
