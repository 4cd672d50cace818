"""`launch --until-confident` and `plan --power`: which comparisons get another training subset and why
the others stop (on constructed paired differences, checked with scipy), the trials a round adds, and the
pairs a paired t test needs (against a Monte Carlo of the test itself)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from orchestrator.adaptive import (
    BUDGET,
    DECIDED,
    MAX_SHUFFLES,
    OPEN,
    TARGET,
    StoppingRule,
    decide,
    decision_table,
    next_round,
    paired_power,
    pairs_for_power,
    sd_of,
    shuffle_counts,
)
from orchestrator.compare import Observation, paired_difference
from orchestrator.spec import SpecError, parse_spec
from tests.support.sweeps import TINY, invoke, write_spec

SPEC = parse_spec(f"""
name: adaptive
base: {TINY}
grid:
  attention.placement: [none, head, tail]
  data.num_images: [4, 8]
  data.shuffle_seed: [0, 1, 2]
""")
# (placement, N) -> paired differences (config - none) of psnr_gap over shuffles 0, 1, 2
DIFFERENCES = {
    ("head", 4): [-1.0, -1.1, -0.9],  # clearly lower: decided
    ("tail", 4): [0.3, -0.3, 0.02],  # crosses 0, wide: open
    ("head", 8): [0.01, -0.01, 0.0],  # crosses 0, narrow: target width reached
    ("tail", 8): [0.5, -0.6, 0.1],  # crosses 0, wide: open
}


def observations(differences=DIFFERENCES, shuffles=(0, 1, 2)) -> list[Observation]:
    out = []
    for n in (4, 8):
        for shuffle in shuffles:
            baseline = 2.0 + shuffle  # a shuffle effect the pairing removes
            axes = {"attention.placement": "none", "data.num_images": n, "data.shuffle_seed": shuffle}
            out.append(Observation(axes, {"psnr_gap": baseline}))
            for placement in ("head", "tail"):
                value = baseline + differences[(placement, n)][shuffle]
                out.append(Observation({**axes, "attention.placement": placement}, {"psnr_gap": value}))
    return out


def counts(obs: list[Observation]) -> dict[str, int]:
    return shuffle_counts([o.axes for o in obs], SPEC.compare)


def reasons(decisions) -> dict[tuple, str]:
    return {(d.axes["attention.placement"], d.axes["data.num_images"]): d.reason for d in decisions}


def test_each_comparison_stops_for_its_own_reason_checked_against_scipy():
    rule = StoppingRule(target_halfwidth=0.1, max_shuffles=8, max_added_trials=100)
    obs = observations()
    decisions = decide(obs, SPEC, counts(obs), rule)
    expected = {}
    for key, diffs in DIFFERENCES.items():
        low, high = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
        if high < 0 or low > 0:
            expected[key] = DECIDED
        elif (high - low) / 2 <= 0.1:
            expected[key] = TARGET
        else:
            expected[key] = OPEN
    assert reasons(decisions) == expected
    assert sorted(expected.values()) == sorted([DECIDED, TARGET, OPEN, OPEN])  # the cases cover every reason
    assert all(d.shuffles == 3 for d in decisions)
    table = decision_table(decisions, rule)
    assert "decided" in table and "target width reached" in table and "one more shuffle" in table


def test_a_round_adds_the_next_shuffle_to_open_comparisons_and_their_baselines_only():
    rule = StoppingRule(target_halfwidth=0.1, max_shuffles=8, max_added_trials=100)
    obs = observations()
    decisions = decide(obs, SPEC, counts(obs), rule)
    shuffle, trials, after = next_round(SPEC, [], [], decisions, set(), rule.max_added_trials)
    assert shuffle == 3
    points = sorted((t.axes["attention.placement"], t.axes["data.num_images"], t.axes["data.shuffle_seed"]) for t in trials)
    assert points == [("none", 4, 3), ("none", 8, 3), ("tail", 4, 3), ("tail", 8, 3)]
    assert reasons(after) == reasons(decisions)
    # the trials are the grid's own configs at shuffle 3: same keys as a grid that listed it
    from orchestrator.spec import expand

    listed = {t.key for t in expand(SPEC.model_copy(update={"grid": {**SPEC.grid, "data.shuffle_seed": [0, 1, 2, 3]}}))}
    assert {t.key for t in trials} <= listed
    # cached trials cost no budget; a round after shuffle 3 takes 4
    shuffle, _, _ = next_round(SPEC, [], [3], decisions, set(), 100)
    assert shuffle == 4


def test_the_budget_and_max_shuffles_stop_open_comparisons():
    obs = observations()
    # room for one comparison and its baseline (2 trials), not for the second (2 more)
    rule = StoppingRule(target_halfwidth=0.1, max_shuffles=8, max_added_trials=3)
    _, trials, after = next_round(SPEC, [], [], decide(obs, SPEC, counts(obs), rule), set(), 3)
    assert len(trials) == 2 and reasons(after)[("tail", 8)] == BUDGET and reasons(after)[("tail", 4)] == OPEN
    # the same with the baseline cached: both fit (one trial to run each)
    cached = {t.key for t in trials if t.axes["attention.placement"] == "none"}
    _, both, after = next_round(SPEC, [], [], decide(obs, SPEC, counts(obs), rule), cached, 2)
    assert len(both) == 2
    assert reasons(after)[("tail", 8)] == BUDGET  # the N8 baseline is not cached: 3 to run > 2
    capped = StoppingRule(target_halfwidth=0.1, max_shuffles=3, max_added_trials=100)
    assert set(reasons(decide(obs, SPEC, counts(obs), capped)).values()) == {DECIDED, TARGET, MAX_SHUFFLES}


def test_a_zero_width_interval_decides_nothing_and_stays_open():
    equal = {**DIFFERENCES, ("head", 4): [-0.5, -0.5, -0.5]}
    obs = observations(equal)
    assert reasons(decide(obs, SPEC, counts(obs), StoppingRule(0.1, 8, 100)))[("head", 4)] == OPEN


def test_one_shuffle_gives_no_interval_and_stays_open():
    obs = observations(shuffles=(0,))
    decisions = decide(obs, SPEC, counts(obs), StoppingRule(0.1, 8, 100))
    assert {d.reason for d in decisions} == {OPEN} and all(d.difference.low is None for d in decisions)


@pytest.mark.parametrize("args", [(0.0, 8, 10), (0.1, 1, 10), (0.1, 8, -1)])
def test_bad_rules_are_refused(args):
    with pytest.raises(SpecError):
        StoppingRule(*args)


# ---------------------------------------------------------------------------------------------
# Power


@pytest.mark.parametrize("effect,sd", [(0.2, 0.3), (0.5, 0.4), (-0.1, 0.25), (0.5, 0.06)])
def test_pairs_for_power_against_a_monte_carlo_of_the_paired_t_test(effect, sd):
    n = pairs_for_power(effect, sd)
    rng = np.random.default_rng(0)
    sims = 20_000

    def rejection_rate(pairs: int) -> float:
        differences = rng.normal(effect, sd, size=(sims, pairs))
        return float(np.mean(stats.ttest_1samp(differences, 0.0, axis=1).pvalue < 0.05))

    tolerance = 4 * np.sqrt(0.8 * 0.2 / sims)  # four Monte Carlo standard errors
    assert abs(rejection_rate(n) - paired_power(n, effect, sd)) < tolerance
    assert rejection_rate(n) > 0.8 - tolerance
    assert paired_power(n, effect, sd) >= 0.8 > paired_power(n - 1, effect, sd)
    # and the large-sample normal formula with Guenther's correction, within a pair or two
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert abs(n - ((z * sd / effect) ** 2 + stats.norm.ppf(0.975) ** 2 / 2)) <= 2


def test_sd_is_read_back_from_an_interval():
    differences = [0.3, -0.1, 0.25, 0.05, 0.4]
    assert sd_of(paired_difference(differences)) == pytest.approx(np.std(differences, ddof=1), rel=1e-12)


def test_plan_power_with_a_given_sd_and_its_bad_input(tmp_path, monkeypatch):
    spec = write_spec(tmp_path, grid={"attention.placement": ["none", "head"], "data.shuffle_seed": [0, 1, 2]})
    result, _ = invoke(tmp_path, monkeypatch, "plan", str(spec), "--power", "0.2", "--sd", "0.3")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("--sd"))
    # 3 matched pairs per comparison: their power, and the pairs 80% needs (the Monte Carlo test above)
    assert row.split()[1:] == ["0.3000", "given", str(pairs_for_power(0.2, 0.3)), f"{paired_power(3, 0.2, 0.3):.2f}"]
    for args, message in [(("--power", "0.2"), "give --sd or --from-sweep"),
                          (("--power", "0.2", "--sd", "1", "--from-sweep", "x"), "one of them"),
                          (("--sd", "1"), "go with --power")]:
        bad, written = invoke(tmp_path, monkeypatch, "plan", str(spec), *args)
        assert bad.exit_code == 2 and message in bad.output and written == set(), bad.output


def test_until_confident_needs_a_shuffle_axis_it_pairs_on(tmp_path, monkeypatch):
    cases = [
        ({"attention.placement": ["none", "head"]}, {}, "grid has no data.shuffle_seed axis"),
        ({"attention.placement": ["none", "head"], "data.shuffle_seed": [0, 1]},
         {"compare": {"pair_on": ["seed"]}}, "does not pair on it"),
    ]
    for grid, extra, message in cases:
        spec = write_spec(tmp_path, grid=grid, **extra)
        result, written = invoke(tmp_path, monkeypatch, "launch", str(spec), "--until-confident")
        assert result.exit_code == 2 and message in result.output and written == set(), result.output
    bad, written = invoke(tmp_path, monkeypatch, "launch", str(spec), "--until-confident", "--max-shuffles", "1")
    assert bad.exit_code == 2 and "--max-shuffles must be at least 2" in bad.output and written == set()
    alone, written = invoke(tmp_path, monkeypatch, "launch", str(spec), "--max-shuffles", "4")
    assert alone.exit_code == 2 and "go with --until-confident" in alone.output and written == set()
