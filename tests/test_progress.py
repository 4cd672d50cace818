"""The pieces of a running sweep's driver, each alone: the trial state machine, the console lines,
the run artifacts and the duration texts. No Ray, no tracking store."""

from __future__ import annotations

import yaml

from orchestrator.artifacts import trial_artifacts
from orchestrator.console import ConsoleProgress
from orchestrator.display import clock, duration, format_table, show_value
from orchestrator.spec import Trial, trial_key
from orchestrator.trial_state import TrialError, TrialState, counts, sweep_status
from tests.support.sweeps import tiny_config
from trainer.config import build_config


def make_trial(name: str = "head", steps: int = 4) -> Trial:
    config = build_config(tiny_config({"train.steps": steps}))
    return Trial(axes={"attention.placement": name}, config=config, key=trial_key(config) + name)


def test_a_trial_state_takes_in_what_the_trial_reported():
    state = TrialState(make_trial(steps=4))
    assert state.status == "PENDING" and state.progress == 0.0
    state.start()
    step, logged = state.record({"step": 2, "loss": 0.5, "attn_distance.block_0": 1.5, "psnr_curve": "rec",
                                 "training_iteration": 7})
    assert step == 2 and logged == {"loss": 0.5, "attn_distance.block_0": 1.5}  # Tune's keys are not metrics
    assert state.curve_record == "rec" and state.progress == 0.5 and not state.trained_all_steps
    state.record({"step": 1, "loss": 0.25})  # a late, older result never moves the step back
    assert state.step == 2 and state.metrics["loss"] == 0.25
    state.record({"step": 4})
    assert state.trained_all_steps and state.progress == 1.0


def test_the_sweep_status_follows_its_trials():
    a, b = TrialState(make_trial("a")), TrialState(make_trial("b"))
    a.status = b.status = "FINISHED"
    assert sweep_status([a, b]) == "FINISHED"
    b.status = "KILLED"
    assert sweep_status([a, b]) == "KILLED"
    a.status = "FAILED"
    assert sweep_status([a, b]) == "FAILED"
    assert counts([a, b])["FAILED"] == 1 and counts([a, b])["KILLED"] == 1


def test_the_progress_line_names_running_trials(capsys):
    running, waiting = TrialState(make_trial("head", steps=4)), TrialState(make_trial("none", steps=4))
    running.start()
    running.record({"step": 2, "loss": 0.125})
    console = ConsoleProgress([running, waiting], print_every_s=3600)
    line = console.line()
    assert line.startswith("[00:0") and "0/2 done, 1 running, 0 failed, eta " in line
    assert line.endswith(f" | {running.trial.name} step 2 loss 0.1250")
    console.tick(force=True)
    console.tick()  # within print_every_s of the last line: not printed again
    assert capsys.readouterr().out.count("0/2 done") == 1


def errored(state: TrialState, attempt: int, attempts: int = 3) -> TrialState:
    """`state` after its attempt `attempt` of `attempts` raised."""
    state.last_error = TrialError(message="ValueError: loss is nan at step 3", attempt=attempt, attempts=attempts,
                                  full_text=f"ditsweep_results/s1/{state.trial.name}-k/error.txt")
    return state


def test_the_progress_line_counts_retried_errors_apart_from_failed_trials(capsys):
    """"failed" stays the trials that failed for good; attempts that errored and were retried get their
    own count, absent while there are none, so the line stays short."""
    head, none, tail = (TrialState(make_trial(name)) for name in ("head", "none", "tail"))
    console = ConsoleProgress([head, none, tail], print_every_s=3600)
    assert "retried" not in console.line() and ", 0 failed, eta " in console.line()
    head.start()
    head.retries = 1
    console.retrying(errored(head, attempt=1))
    retry, progress = capsys.readouterr().out.splitlines()
    assert retry == ("  retry  head: attempt 1 of 3 errored: ValueError: loss is nan at step 3; "
                     "full text in ditsweep_results/s1/head-k/error.txt")
    assert progress.startswith("[") and "0/3 done, 1 running, 0 failed, 1 error retried, eta " in progress
    head.retries, none.retries = 2, 1
    none.status = "FAILED"
    console.failed(errored(none, attempt=2, attempts=2))
    final, progress = capsys.readouterr().out.splitlines()
    assert final.startswith("  FAILED none: attempt 2 of 2 errored: ValueError: loss is nan at step 3; full text in ")
    assert "0/3 done, 1 running, 1 failed, 3 errors retried, eta " in progress
    head.status = tail.status = "FINISHED"
    console.closed("s1", stopped=False, delivered=True)
    assert capsys.readouterr().out.splitlines()[-1] == "sweep s1: 2 finished, 1 failed, 0 killed; 3 errors retried"
    head.retries = none.retries = 0
    console.closed("s1", stopped=False, delivered=True)
    assert capsys.readouterr().out.splitlines()[-1] == "sweep s1: 2 finished, 1 failed, 0 killed"


def test_a_resumed_sweep_keeps_counting_the_retries_its_trials_runs_recorded():
    """`ditsweep resume` hands the sink each trial's run as the store has it; its retries (a run tag,
    what `ditsweep status` shows) are where the count goes on from."""
    from orchestrator.progress import SweepSink
    from orchestrator.tracking import TrialRun, retries_tags

    head, none = make_trial("head"), make_trial("none")
    run = TrialRun(run_id="r1", name="head", status="KILLED", trial_key=head.key, params={}, metrics={},
                   tags=retries_tags(2), start_time=None, end_time=None)
    assert run.retries == 2 and TrialRun(**{**run.__dict__, "tags": {}}).retries == 0
    sink = SweepSink(tracker=None, parent=None, trials=[head, none], existing={head.key: run})
    assert [state.retries for state in sink.states.values()] == [2, 0]
    assert ", 0 failed, 2 errors retried, eta " in sink.progress_line()


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (0, 61, 3599, 3600, 7384, float("nan"))] == [
        "0m00s", "1m01s", "59m59s", "1h00m", "2h03m", "unknown"]
    assert [clock(s) for s in (0, 61, 3725, float("inf"))] == ["00:00", "01:01", "1:02:05", "--:--"]


def test_tables_and_axis_values():
    assert show_value([3, 5, None]) == "3,5,G" and show_value(None) == "" and show_value(None, none="None") == "None"
    assert format_table([["a", "bb"], ["ccc", "d"]], rule=True) == "a    bb\n---  --\nccc  d"


def test_run_artifacts_of_a_finished_trial():
    state = TrialState(make_trial())
    state.record({"step": 4, "attn_distance.block_0": 1.0, "attn_local3.block_0": 0.5, "attn_local7.block_0": 0.9})
    state.read_checkpoint = lambda name: {"samples.png": b"png"}.get(name)
    artifacts = trial_artifacts(state)
    assert yaml.safe_load(artifacts.texts["config.yaml"]) == state.trial.config.model_dump(mode="json")
    assert artifacts.files["samples.png"] == b"png" and "samples.npy" not in artifacts.files
    assert artifacts.files["attn_locality.png"].startswith(b"\x89PNG")


def test_an_unreadable_checkpoint_file_costs_only_that_file(capsys):
    state = TrialState(make_trial())

    def broken(name: str) -> bytes:
        raise OSError("storage away")

    state.read_checkpoint = broken
    assert trial_artifacts(state).files == {}
    assert "could not read samples.png" in capsys.readouterr().out
