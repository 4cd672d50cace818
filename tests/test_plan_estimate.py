"""The plan's compute estimate: `launch` times calibration steps only when they are a small share of
the sweep's training (a sweep of a few steps would pay more for its estimate than for its trials)."""

from __future__ import annotations

import yaml

from orchestrator.plan import CALIBRATION_STEPS, build_plan, compute_estimate, read_grid
from tests.support.sweeps import tiny_config

BATCH = 8


def plan_of(steps: int, seeds: int = 1):
    """A plan of `seeds` tiny 8x8 trials (calibration steps of a few milliseconds) of `steps` steps."""
    base = tiny_config({"train.steps": steps, "train.batch_size": BATCH, "data.image_size": 8})
    spec = {"name": "estimate", "description": "", "base": base, "grid": {"seed": list(range(seeds))},
            "resources": {"cpu": 1}}
    return build_plan(read_grid(yaml.safe_dump(spec), "the test's spec", []))


def test_the_estimate_is_timed_only_when_calibration_is_at_most_the_given_share_of_the_training():
    # One model for all trials, so the shares are of images: calibration trains CALIBRATION_STEPS
    # batches of min(batch, 16) images, the sweep trials x steps x batch images.
    share = 0.01
    smallest_timed = CALIBRATION_STEPS * min(BATCH, 16) / (share * 2 * BATCH)  # steps of each of 2 trials: 250
    assert smallest_timed == int(smallest_timed)
    untimed = compute_estimate(plan_of(int(smallest_timed) - 1, seeds=2), max_share=share)
    timed = compute_estimate(plan_of(int(smallest_timed), seeds=2), max_share=share)
    assert untimed.startswith("2 of 2 trials to run, ") and "TFLOP of training (not timed" in untimed
    assert "calibrated" not in untimed
    assert timed.startswith("2 of 2 trials to run, ") and timed.endswith("on this machine (calibrated)")
