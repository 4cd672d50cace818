"""orchestrator.tracking on its own: the run states it shares with the state machine, and the outbox
that every write goes through, against a real `mlflow server` stopped and started again."""

from __future__ import annotations

import os
import subprocess
import sys

from mlflow.entities import RunStatus

from orchestrator import run_states


def test_the_run_states_are_mlflows_run_statuses():
    for name in ("RUNNING", "FINISHED", "FAILED", "KILLED"):
        assert getattr(run_states, name) == RunStatus.to_string(getattr(RunStatus, name))
    assert set(run_states.ENDED) == {"FINISHED", "FAILED", "KILLED"}
    assert run_states.PENDING not in RunStatus.all_status()  # ditsweep's own: a trial with no run yet


def test_the_state_machine_and_the_console_do_not_load_the_tracking_package():
    """They read the state strings only: importing them neither imports MLflow's door (which sets
    MLflow's environment variables) nor MLflow."""
    code = ("import os, sys; import orchestrator.trial_state, orchestrator.console; "
            "print(sorted(m for m in sys.modules if m.startswith(('orchestrator.tracking', 'mlflow'))), "
            "'MLFLOW_HTTP_REQUEST_MAX_RETRIES' in os.environ)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["[]", "False"], out.stdout + out.stderr
