"""`ditsweep launch --until-confident` end to end: real in-process Ray, a real sqlite MLflow store. Every
round's choice and every stop reason is recomputed here from the trial runs with scipy's paired t
interval, so the test holds whatever the tiny trials measure."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from tests.support.sweeps import ditsweep, invoke, runs_by_role, sqlite_uri, tiny_config, write_spec

pytestmark = pytest.mark.slow

TARGET, MAX_SHUFFLES, BUDGET = 1e-6, 3, 5
OPTIONS = ("--until-confident", "--target-halfwidth", str(TARGET), "--max-shuffles", str(MAX_SHUFFLES),
           "--max-added-trials", str(BUDGET))


def artifact_json(client: MlflowClient, run_id: str, name: str, folder):
    folder.mkdir(exist_ok=True)
    with open(client.download_artifacts(run_id, name, str(folder))) as handle:
        return json.load(handle)


def interval(differences: list[float]) -> tuple[float, float] | None:
    if len(differences) < 2:
        return None
    return tuple(stats.ttest_1samp(differences, 0.0).confidence_interval(0.95))


def is_open(differences: list[float]) -> bool:
    """No interval, a zero-width one (scipy: NaN bounds), or one that crosses 0 wider than the target."""
    bounds = interval(differences)
    if bounds is None or not all(math.isfinite(b) for b in bounds):
        return True
    return bounds[0] <= 0 <= bounds[1] and (bounds[1] - bounds[0]) / 2 > TARGET


def test_rounds_go_only_to_open_comparisons_and_stop_for_their_stated_reasons(tmp_path, monkeypatch):
    # ema 0: a 4-step model is evaluated as trained (the EMA would still be the zero-output init, the
    # same for every placement); one shuffle in the grid, so the first round is certain.
    base = tiny_config({"train.ema": 0.0, "train.lr": 0.005})
    spec = write_spec(tmp_path, name="confident", base=base,
                      grid={"attention.placement": ["none", "head", "tail"], "data.shuffle_seed": [0]})
    result = ditsweep("launch", str(spec), *OPTIONS, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    client = MlflowClient(tracking_uri=sqlite_uri(tmp_path))
    runs = runs_by_role(client, "confident")
    (parent,) = runs["sweep"]
    assert parent.info.status == "FINISHED"
    gap = {}  # (placement, shuffle) -> psnr_gap
    for run in runs["trial"]:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["ditsweep.sweep_id"] == parent.data.tags["ditsweep.sweep_id"]
        gap[(run.data.params["attention.placement"], int(run.data.params["data.shuffle_seed"]))] = run.data.metrics["psnr_gap"]
    assert len(gap) == len(runs["trial"])  # no trial ran twice

    state = artifact_json(client, parent.info.run_id, "until_confident.json", tmp_path / "first")
    manifest = artifact_json(client, parent.info.run_id, "trials.json", tmp_path / "first")
    assert {(e["axes"]["attention.placement"], e["axes"]["data.shuffle_seed"]) for e in manifest} == set(gap)

    def differences(placement: str, below: int) -> list[float]:
        return [gap[(placement, s)] - gap[("none", s)] for s in range(below) if (placement, s) in gap]

    # Round by round: the shuffle went to exactly the open comparisons that fit the budget.
    assert state["added_shuffles"] == [r["shuffle"] for r in state["rounds"][1:]] and state["added_shuffles"][0] == 1
    spent = 0
    for shuffle in state["added_shuffles"]:
        got = {p for p in ("head", "tail") if (p, shuffle) in gap}
        opened = {p for p in ("head", "tail") if is_open(differences(p, shuffle)) and len(differences(p, shuffle)) < MAX_SHUFFLES}
        assert got <= opened and ("none", shuffle) in gap
        left_out = opened - got
        ran = len(got) + 1
        assert spent + ran <= BUDGET
        if left_out:  # a comparison left out only when its two trials no longer fit
            assert spent + ran + 1 > BUDGET
        spent += ran
    assert sum(r["trials"] for r in state["rounds"][1:]) == spent

    # Why each stopped, recomputed.
    reasons = {d["axes"]["attention.placement"]: d["reason"] for d in state["decisions"]}
    for placement in ("head", "tail"):
        diffs = differences(placement, 99)
        bounds = interval(diffs)
        if bounds is not None and (bounds[1] < 0 or bounds[0] > 0):
            expected = "decided"
        elif bounds is not None and (bounds[1] - bounds[0]) / 2 <= TARGET:
            expected = "target width reached"
        elif len(diffs) >= MAX_SHUFFLES:
            expected = "max shuffles"
        else:
            expected = "budget"
        assert reasons[placement] == expected, (placement, diffs)
        assert [d for d in state["decisions"] if d["axes"]["attention.placement"] == placement][0]["n"] == len(diffs)
    assert result.stdout.count("stopped:") >= 2 and "until confident: data.shuffle_seed 1" in result.stdout

    # The added trials are cached like any other: the same launch again, with no budget for new trials,
    # replays the rounds from the cache, runs nothing and stops each comparison for the same reason (in
    # this process: no Ray starts when nothing runs).
    no_budget = [*OPTIONS[:-1], "0"]
    again, _ = invoke(tmp_path, monkeypatch, "launch", str(spec), *no_budget)
    assert again.exit_code == 0, again.output
    assert len(runs_by_role(client, "confident")["trial"]) == len(gap)
    assert "0 trial(s) to run" in again.output and "1 trial(s) to run" not in again.output
    second = max(runs_by_role(client, "confident")["sweep"], key=lambda r: r.info.start_time)
    again_state = artifact_json(client, second.info.run_id, "until_confident.json", tmp_path / "again")
    assert {d["axes"]["attention.placement"]: d["reason"] for d in again_state["decisions"]} == reasons

    # resume of the finished sweep reads its stopping rule and rounds back, finds nothing open that fits
    # the budget, and runs nothing.
    resumed, _ = invoke(tmp_path, monkeypatch, "resume", parent.data.tags["ditsweep.sweep_id"])
    assert resumed.exit_code == 0, resumed.output
    assert f"{len(gap)} finished, 0 to continue" in resumed.output and "stopped:" in resumed.output
    assert len(runs_by_role(client, "confident")["trial"]) == len(gap)
    resumed_state = artifact_json(client, parent.info.run_id, "until_confident.json", tmp_path / "resumed")
    assert {d["axes"]["attention.placement"]: d["reason"] for d in resumed_state["decisions"]} == reasons

    # plan --power reads each comparison's sd from this sweep; the pairs it prints are the smallest n whose
    # noncentral-t power (written out here) reaches 80%.
    sweep_id = parent.data.tags["ditsweep.sweep_id"]
    effect = statistics.stdev(differences("head", 99))  # an effect of one sd: a handful of pairs
    planned, written = invoke(tmp_path, monkeypatch, "plan", str(spec), "--power", str(effect), "--from-sweep", sweep_id)
    assert planned.exit_code == 0, planned.output
    for placement in ("head", "tail"):
        diffs = differences(placement, 99)
        sd = statistics.stdev(diffs)
        n = 2
        while True:
            critical = stats.t.ppf(0.975, n - 1)
            shift = effect * math.sqrt(n) / sd
            if stats.nct.sf(critical, n - 1, shift) + stats.nct.sf(critical, n - 1, -shift) >= 0.8:
                break
            n += 1
        row = next(line for line in planned.output.splitlines() if line.startswith(placement + " "))
        assert row.split()[1:4] == [f"{sd:.4f}", f"n={len(diffs)}", str(n)], row
