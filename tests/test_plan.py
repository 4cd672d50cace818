"""orchestrator.plan's functions called directly (`ditsweep plan` itself is test_preflight's and
test_input_limits'): which trials a Plan runs given the store's FINISHED runs and --force, its table
and manifest, the compute estimate, and the storage and FID checks that refuse a sweep before anything starts."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import yaml

from orchestrator.plan import (
    CALIBRATION_STEPS,
    build_plan,
    check_fid_weights,
    check_storage,
    check_storage_is_shared,
    compute_estimate,
    plan_table,
    read_grid,
    trials_manifest,
)
from orchestrator.spec import SpecError
from orchestrator.run_states import FINISHED
from orchestrator.tracking import TrialRun
from tests.support.sweeps import tiny_config, write_spec

PLACEMENTS, SEEDS = ["none", "head"], [0, 1]


def spec_text(base: dict | None = None) -> str:
    return yaml.safe_dump({"name": "p", "base": base or tiny_config(),
                           "grid": {"attention.placement": PLACEMENTS, "seed": SEEDS}})


def finished(trial) -> TrialRun:
    """The store's record of a FINISHED run of `trial`, as `Tracker.finished_trials` returns it."""
    return TrialRun(run_id=f"run-{trial.key[:8]}", name=trial.name, status=FINISHED, trial_key=trial.key,
                    params={}, metrics={}, tags={}, start_time=None, end_time=None)


def table_states(table: str) -> dict[str, str]:
    """Trial key (10 characters) -> state, from the rows of `plan_table` (the last two columns)."""
    rows = table.splitlines()[2:]  # the header and its rule
    return {row.split()[-2]: row.split()[-1] for row in rows}


def test_a_grid_keeps_its_text_and_overrides_and_expands_every_point():
    text = spec_text()
    grid = read_grid(text, "test", ["train.steps=3"])
    assert grid.spec_text == text and grid.overrides == ("train.steps=3",)
    points = {(t.axes["attention.placement"], t.axes["seed"]) for t in grid.trials}
    assert points == set(itertools.product(PLACEMENTS, SEEDS))
    assert {t.config.train.steps for t in grid.trials} == {3}
    assert len({t.key for t in grid.trials}) == len(points)


def test_a_plan_runs_what_the_store_lacks_and_force_reruns_everything():
    grid = read_grid(spec_text(), "test", [])
    store = {t.key: finished(t) for t in grid.trials[::2]}
    plan = build_plan(grid, store)
    assert [t.key for t in plan.to_run] == [t.key for t in grid.trials[1::2]]
    assert [t.key for t in build_plan(grid, store, force=True).to_run] == [t.key for t in grid.trials]
    assert [t.key for t in build_plan(grid).to_run] == [t.key for t in grid.trials]
    store.clear()  # the plan holds its own read-only copy
    assert len(plan.cached) == 2
    with pytest.raises(TypeError):
        plan.cached["another"] = finished(grid.trials[1])


def test_the_table_and_the_manifest_say_which_trials_are_cached_and_which_run():
    grid = read_grid(spec_text(), "test", [])
    cached = grid.trials[0]
    plan = build_plan(grid, {cached.key: finished(cached)})
    expected = {t.key[:10]: "cached" if t is cached else "run" for t in grid.trials}
    assert table_states(plan_table(plan)) == expected
    forced = build_plan(grid, {cached.key: finished(cached)}, force=True)
    assert table_states(plan_table(forced)) == {key: "rerun" if key == cached.key[:10] else "run" for key in expected}
    manifest = {entry["key"]: entry for entry in trials_manifest(plan)}
    assert manifest[cached.key]["cached_run"] == finished(cached).run_id
    assert [entry["cached_run"] for key, entry in manifest.items() if key != cached.key] == [None] * 3
    assert all(entry["cached_run"] is None for entry in trials_manifest(forced))
    assert {entry["name"] for entry in manifest.values()} == {t.name for t in grid.trials}


def test_a_local_storage_is_refused_only_on_a_cluster_of_several_nodes():
    asked: list[str] = []

    def nodes(count: int):
        def count_nodes(address: str) -> int:
            asked.append(address)
            return count
        return count_nodes

    with pytest.raises(SpecError, match=r"--storage '\(default, local\)' is a local folder.*has 3 nodes.*s3://"):
        check_storage_is_shared(None, "10.0.0.1:6379", nodes(3))
    check_storage_is_shared("results", "10.0.0.1:6379", nodes(1))
    assert asked == ["10.0.0.1:6379", "10.0.0.1:6379"]
    check_storage_is_shared("s3://bucket/results", "10.0.0.1:6379", nodes(3))  # shared: not asked
    check_storage_is_shared(None, None, nodes(3))  # in-process Ray: one node, not asked
    assert len(asked) == 2


def test_storage_is_checked_for_reach_and_length(s3_bucket):
    check_storage(None)
    check_storage(f"s3://{s3_bucket}/results")  # moto's server answers for the bucket
    with pytest.raises(SpecError, match=r"storage 's3://ditsweep-no-such-bucket/r' is not reachable"):
        check_storage("s3://ditsweep-no-such-bucket/r")
    with pytest.raises(SpecError, match="--storage is 9000 characters"):
        check_storage("s" * 9000)


def test_fid_weights_are_checked_only_for_trials_with_fid(tmp_path):
    missing = tmp_path / "no-weights.pth"
    without = read_grid(spec_text(tiny_config({"eval.fid.weights": str(missing)})), "test", []).trials
    check_fid_weights(without)  # FID off: the weights are never needed
    with_fid = read_grid(spec_text(tiny_config({"eval.fid.enabled": True, "eval.fid.weights": str(missing)})),
                         "test", []).trials
    with pytest.raises(SpecError, match=r"eval.fid.enabled=true needs the FID Inception weights \(eval.fid.weights\)"):
        check_fid_weights(with_fid)


def test_the_estimate_is_timed_only_when_calibration_is_at_most_the_given_share_of_the_training():
    """`launch` pays for its estimate before every sweep: calibration steps are timed only when they
    are a small share of the sweep's training. One model for all trials, so the shares are of images:
    calibration trains CALIBRATION_STEPS batches of min(batch, 16) images, the sweep trials x steps x batch."""
    batch, share = 8, 0.01

    def plan_of(steps: int):  # two tiny 8x8 trials: calibration steps of a few milliseconds
        base = tiny_config({"train.steps": steps, "train.batch_size": batch, "data.image_size": 8})
        spec = {"name": "estimate", "base": base, "grid": {"seed": [0, 1]}}
        return build_plan(read_grid(yaml.safe_dump(spec), "the test's spec", []))

    smallest_timed = CALIBRATION_STEPS * min(batch, 16) / (share * 2 * batch)  # steps of each trial: 250
    assert smallest_timed == int(smallest_timed)
    untimed = compute_estimate(plan_of(int(smallest_timed) - 1), max_share=share)
    timed = compute_estimate(plan_of(int(smallest_timed)), max_share=share)
    assert untimed.startswith("2 of 2 trials to run, ") and "TFLOP of training (not timed" in untimed
    assert "calibrated" not in untimed
    assert timed.startswith("2 of 2 trials to run, ") and timed.endswith("on this machine (calibrated)")


def test_the_checks_before_a_cpu_sweep_starts_do_not_import_torch(tmp_path):
    """Everything `launch` checks before it starts Ray (the spec, each trial's config and memory, its data,
    the FID weights, storage, resources) runs without torch, whose import is the slowest second of a
    launch: bad input is refused at once, and torch loads while the in-process Ray starts. A fresh
    process, since this one imported torch long ago."""
    write_spec(tmp_path, grid={"attention.placement": ["none", "head"]})
    script = ("import sys\nfrom orchestrator.launch import check_resources\n"
              "from orchestrator.plan import check_fid_weights, check_storage, read_grid_file\n"
              "grid = read_grid_file('tiny.yaml', [])\ncheck_fid_weights(grid.trials)\ncheck_storage(None)\n"
              "check_resources(grid.spec, None)\nprint(len(grid.trials), 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["2", "False"]
