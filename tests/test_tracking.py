"""orchestrator.tracking on its own: the run states it shares with the state machine, and the outbox
that every write goes through, against a real `mlflow server` stopped and started again."""

from __future__ import annotations

import pytest
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from orchestrator import run_states
from orchestrator.run_states import FINISHED
from orchestrator.tracking import TAG_DEVICE, TAG_ROLE, Tracker, TrackingError
from orchestrator.tracking.writes import PENDING_RUN
from tests.support.sweeps import sqlite_uri


def test_the_run_states_are_mlflows_run_statuses():
    for name in ("RUNNING", "FINISHED", "FAILED", "KILLED"):
        assert getattr(run_states, name) == RunStatus.to_string(getattr(RunStatus, name))
    assert set(run_states.ENDED) == {"FINISHED", "FAILED", "KILLED"}
    assert run_states.PENDING not in RunStatus.all_status()  # ditsweep's own: a trial with no run yet


@pytest.mark.slow
def test_every_write_waits_in_the_outbox_while_the_server_is_away(restartable_mlflow_server, capsys):
    """A trial opened while the server is down gets a local id; its run is created, with its params,
    metrics, tags and end, in order once the server is back. A write whose id is needed now (a new
    sweep's run) is refused with a message instead of being kept."""
    url, start, stop = restartable_mlflow_server
    tracker = Tracker(url)
    experiment = tracker.experiment_id("away")
    sweep = tracker.start_sweep(experiment, "s1", name="s1", tags={}, params={"steps": 4}, texts={"spec.yaml": "x"})
    stop()
    run_id = tracker.open_trial(sweep, "t0", "k0", {"seed": 0, "optim.lr": 0.1}, existing=None)
    assert run_id.startswith(PENDING_RUN)
    tracker.log_metrics(run_id, {"loss": 1.5}, step=3)
    tracker.set_tags(run_id, {TAG_DEVICE: "cpu"})
    tracker.end_run(run_id, FINISHED)
    with pytest.raises(TrackingError, match="still pending"):
        tracker.start_sweep(experiment, "s2", name="s2", tags={}, params={}, texts={})
    start()
    assert tracker.flush(timeout_s=60)
    out = capsys.readouterr().out
    assert out.index("keeping results to write later") < out.index("tracking server is back; pending writes delivered")

    client = MlflowClient(tracking_uri=url)
    (run,) = client.search_runs([experiment], f"tags.`{TAG_ROLE}` = 'trial'")
    assert run.info.status == FINISHED and run.info.run_name == "t0"
    assert run.data.params == {"seed": "0", "optim.lr": "0.1"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(3, 1.5)]
    assert run.data.tags["mlflow.parentRunId"] == sweep.run_id and run.data.tags[TAG_DEVICE] == "cpu"
    assert [r.info.run_name for r in client.search_runs([experiment], f"tags.`{TAG_ROLE}` = 'sweep'")] == ["s1"]


@pytest.mark.slow
def test_each_trial_of_a_real_sweep_records_where_it_ran(finished_sweep):
    """The location a trial reports with every result (sweep.py) becomes its run's tags (progress.py),
    read back as `TrialRun.location`: this machine's one Ray node, and its device."""
    tracker = Tracker(sqlite_uri(finished_sweep["folder"]), create=False)
    trials = tracker.sweep_trials(tracker.find_sweep(finished_sweep["sweep_id"]))
    assert len(trials) == len(finished_sweep["trials"])
    nodes = {t.location["node_id"] for t in trials}
    assert len(nodes) == 1 and len(nodes.pop()) == 56  # Ray's node ids are 28 bytes in hex
    assert all(t.location["device"] in ("cpu", "cuda:0", "mps") and t.location["node_ip"] for t in trials)
