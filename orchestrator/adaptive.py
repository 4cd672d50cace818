"""More training subsets where the answer is still open (`launch --until-confident`), and how many a
comparison needs (`plan --power`).

Until confident. After a sweep's grid, every comparison of its paired table (a configuration against
the baseline at the same other axis values, orchestrator.compare) is looked at on the primary metric,
`psnr_gap`. It stops, and says why, when
- its 95% interval excludes 0 ("decided"; per comparison, as the rule is stated: the report's verdicts,
  Holm-adjusted over all comparisons, can be stricter),
- the interval's half-width is at most the target ("target width reached": the effect, if any, is
  smaller than that),
- it has `max_shuffles` training subsets (`data.shuffle_seed` values) already ("max shuffles"),
- the next round would run more trials than the budget left ("budget").
Otherwise it is open, and the next `data.shuffle_seed` value (one above the sweep's largest) is added
to it: its trial and its baseline's (at every value of the other pairing axes, e.g. `seed`), and only
those run, round after round. A baseline shared by several open comparisons runs once. An interval of
zero width (every difference equal) decides nothing and reaches no target: it stays open.

Stopping as soon as an interval excludes 0 is optional stopping: the chance that some round's interval
excludes 0 when there is no effect is above the nominal 5% (Armitage, McPherson & Rowe 1969), so a
"decided" reached after several rounds is weaker evidence than one from a fixed design. The table of
decisions says how many shuffles each comparison took.

Power. For a paired t test at two-sided level alpha, n pairs whose differences have standard deviation
sd detect a true mean difference `effect` with probability
    P(|T| > t_{1-alpha/2, n-1}),  T ~ noncentral t(df = n-1, nc = effect * sqrt(n) / sd)
(the power of the one-sample t test, e.g. Cohen 1988, ch. 2); `pairs_for_power` is the smallest n
reaching the wanted power. The sd of a finished sweep is read back from each comparison's interval
(half-width = t_{0.975, n-1} * sd / sqrt(n)).

No MLflow and no Ray here: runs are read through orchestrator.tracking's Tracker, and
orchestrator.launch runs the rounds.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.compare import CONFIDENCE, PRIMARY_METRIC, Observation, PairedDifference, paired_table
from orchestrator.display import format_table
from orchestrator.spec import Compare, SpecError, SweepSpec, Trial, axis_label, expand, parse_spec

if TYPE_CHECKING:
    from orchestrator.plan import Plan
    from orchestrator.tracking import SweepRun, Tracker

PRIMARY = PRIMARY_METRIC
SHUFFLE_AXIS = "data.shuffle_seed"
STATE_FILE = "until_confident.json"  # on the sweep's parent run: the rule, the rounds, the decisions
SUMMARY_FILE = "until_confident.md"

DECIDED = "decided"
TARGET = "target width reached"
MAX_SHUFFLES = "max shuffles"
BUDGET = "budget"
OPEN = "open"  # gets the next shuffle


@dataclass(frozen=True)
class StoppingRule:
    target_halfwidth: float  # dB of psnr_gap
    max_shuffles: int  # training subsets per comparison, the grid's included
    max_added_trials: int | None  # trials run beyond the grid, all rounds together (None: as many as the grid)

    def __post_init__(self) -> None:
        if not self.target_halfwidth > 0:
            raise SpecError(f"--target-halfwidth must be above 0 (dB of {PRIMARY}), got {self.target_halfwidth}")
        if self.max_shuffles < 2:
            raise SpecError(f"--max-shuffles must be at least 2 (an interval needs two pairs), got {self.max_shuffles}")
        if self.max_added_trials is not None and self.max_added_trials < 0:
            raise SpecError(f"--max-added-trials must be at least 0, got {self.max_added_trials}")


@dataclass(frozen=True)
class Decision:
    """Where one comparison stands after a round."""

    axes: dict[str, Any]  # the configuration (pairing axes left out)
    difference: PairedDifference | None  # of the primary metric; None without a matched pair
    shuffles: int  # data.shuffle_seed values the configuration has trials for
    reason: str  # DECIDED, TARGET, MAX_SHUFFLES, BUDGET or OPEN

    @property
    def label(self) -> str:
        return "·".join(axis_label(k, v) for k, v in self.axes.items()) or "configuration"


def check_spec(spec: SweepSpec) -> None:
    """--until-confident adds values of data.shuffle_seed: the spec must pair on it as a grid axis."""
    if SHUFFLE_AXIS not in spec.grid:
        raise SpecError(f"--until-confident adds {SHUFFLE_AXIS} values, but the spec's grid has no {SHUFFLE_AXIS} axis; "
                        f"add one (e.g. {SHUFFLE_AXIS}: [0, 1])")
    if SHUFFLE_AXIS not in spec.compare.pair_on:
        raise SpecError(f"--until-confident adds {SHUFFLE_AXIS} values, but compare.pair_on "
                        f"({', '.join(spec.compare.pair_on)}) does not pair on it; add it to compare.pair_on")
    if not all(isinstance(v, int) and v >= 0 for v in spec.grid[SHUFFLE_AXIS]):
        raise SpecError(f"--until-confident needs whole {SHUFFLE_AXIS} values, got {spec.grid[SHUFFLE_AXIS]}")


def halfwidth(difference: PairedDifference | None) -> float | None:
    if difference is None or difference.low is None or difference.high is None:
        return None
    return (difference.high - difference.low) / 2


def decide(observations: list[Observation], spec: SweepSpec, shuffles_of: dict[str, int],
           rule: StoppingRule) -> list[Decision]:
    """Each comparison's state on the primary metric (budget aside: see `next_round`).
    `shuffles_of`: configuration label -> how many shuffle values it has trials for."""
    rows = paired_table(observations, list(spec.grid), spec.compare.baseline, spec.compare.pair_on, [PRIMARY])
    decisions = []
    for row in rows:
        if row.baseline:
            continue
        difference = row.differences.get(PRIMARY)
        width = halfwidth(difference)
        shuffles = shuffles_of.get(_label(row.axes), 0)
        if width and (difference.high < 0 or difference.low > 0):
            reason = DECIDED
        elif width and width <= rule.target_halfwidth:
            reason = TARGET
        elif shuffles >= rule.max_shuffles:
            reason = MAX_SHUFFLES
        else:
            reason = OPEN
        decisions.append(Decision(row.axes, difference, shuffles, reason))
    return decisions


def _label(axes: dict[str, Any]) -> str:
    return json.dumps(axes, sort_keys=True)


def shuffle_counts(trial_axes: list[dict[str, Any]], compare: Compare) -> dict[str, int]:
    """Configuration label -> the number of distinct data.shuffle_seed values among these trials' axes."""
    values: dict[str, set] = {}
    for axes in trial_axes:
        config = {k: v for k, v in axes.items() if k not in compare.pair_on}
        values.setdefault(_label(config), set()).add(axes.get(SHUFFLE_AXIS))
    return {label: len(v) for label, v in values.items()}


def extended_spec(spec: SweepSpec, shuffles: list[int]) -> SweepSpec:
    """The spec with data.shuffle_seed values added (in order, after the grid's own)."""
    values = list(spec.grid[SHUFFLE_AXIS]) + [s for s in shuffles if s not in spec.grid[SHUFFLE_AXIS]]
    return spec.model_copy(update={"grid": {**spec.grid, SHUFFLE_AXIS: values}})


def next_round(spec: SweepSpec, overrides: list[str], added: list[int], decisions: list[Decision],
               cached: set[str], budget_left: int) -> tuple[int, list[Trial], list[Decision]]:
    """(the next shuffle value, the trials of the round, the decisions with budget applied).

    Open comparisons take the next shuffle for their configuration and its baseline at every value of
    the other pairing axes, in table order, while the trials to run (not in `cached`) fit the budget;
    those that do not fit stop for BUDGET."""
    shuffle = max([*spec.grid[SHUFFLE_AXIS], *added]) + 1
    grid_trials = expand(extended_spec(spec, [*added, shuffle]), overrides)
    by_point = {_label(t.axes): t for t in grid_trials}
    others = [a for a in spec.compare.pair_on if a in spec.grid and a != SHUFFLE_AXIS]
    combos = [dict(zip(others, values)) for values in itertools.product(*(spec.grid[a] for a in others))]
    chosen: dict[str, Trial] = {}
    out = []
    for decision in decisions:
        if decision.reason != OPEN:
            out.append(decision)
            continue
        wanted = {}
        for combo in combos:
            for point in (decision.axes, {**decision.axes, **spec.compare.baseline}):
                match = by_point.get(_label({**point, **combo, SHUFFLE_AXIS: shuffle}))
                if match is not None:
                    wanted[match.key] = match
        to_run = [k for k in wanted if k not in chosen and k not in cached]
        if len([k for k in chosen if k not in cached]) + len(to_run) > budget_left:
            out.append(Decision(decision.axes, decision.difference, decision.shuffles, BUDGET))
            continue
        chosen.update(wanted)
        out.append(decision)
    order = [t for t in grid_trials if t.key in chosen]
    return shuffle, order, out


def decision_table(decisions: list[Decision], rule: StoppingRule) -> str:
    """Why each comparison stopped (or goes on), for the console and the sweep's run."""
    header = ["comparison", "shuffles", f"Δ {PRIMARY} [95% interval]", "half-width", "state"]
    rows = [header]
    for d in decisions:
        diff = d.difference
        if diff is None:
            interval = "no matched pair"
        elif diff.low is None:
            interval = f"{diff.mean:+.3f} (n={diff.n}, no interval)"
        else:
            interval = f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] n={diff.n}"
        width = halfwidth(diff)
        rows.append([d.label, str(d.shuffles), interval, "" if width is None else f"{width:.3f}", _why(d, rule)])
    return format_table(rows, rule=True)


def _why(decision: Decision, rule: StoppingRule) -> str:
    return {
        DECIDED: "stopped: decided (interval excludes 0)",
        TARGET: f"stopped: target width reached (half-width <= {rule.target_halfwidth:g})",
        MAX_SHUFFLES: f"stopped: max shuffles ({rule.max_shuffles})",
        BUDGET: f"stopped: budget (--max-added-trials {rule.max_added_trials})",
        OPEN: "open: one more shuffle",
    }[decision.reason]


def state_json(rule: StoppingRule, added: list[int], rounds: list[dict], decisions: list[Decision]) -> str:
    """until_confident.json: what resume needs (rule, added shuffles, rounds) and the last decisions."""
    return json.dumps({
        "rule": rule.__dict__,
        "added_shuffles": added,
        "rounds": rounds,
        "decisions": [
            {"axes": d.axes, "shuffles": d.shuffles, "reason": d.reason,
             "n": d.difference.n if d.difference else 0,
             "mean": d.difference.mean if d.difference else None,
             "low": d.difference.low if d.difference else None,
             "high": d.difference.high if d.difference else None}
            for d in decisions
        ],
    }, indent=2)


def read_state(text: str) -> tuple[StoppingRule, list[int], list[dict]]:
    state = json.loads(text)
    return StoppingRule(**state["rule"]), list(state["added_shuffles"]), list(state["rounds"])


# ---------------------------------------------------------------------------------------------
# Power of the paired t test


def paired_power(n: int, effect: float, sd: float, alpha: float = 1 - CONFIDENCE) -> float:
    """Power of the two-sided paired t test with n pairs (noncentral t; see the module docstring)."""
    from scipy import stats

    if n < 2:
        return float("nan")
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)
    noncentrality = effect * math.sqrt(n) / sd
    # P(T < -c) written as P(-T > c), -T ~ nct(df, -nc): scipy's nct.cdf returns NaN far in the lower tail
    return float(stats.nct.sf(critical, df, noncentrality) + stats.nct.sf(critical, df, -noncentrality))


def pairs_for_power(effect: float, sd: float, power: float = 0.8, alpha: float = 1 - CONFIDENCE,
                    limit: int = 100_000) -> int:
    """The smallest n >= 2 whose paired t test reaches `power` against `effect`."""
    if effect == 0 or sd <= 0:
        raise SpecError(f"--power needs a nonzero effect and a positive sd, got effect={effect}, sd={sd}")
    low, high = 2, 2
    while paired_power(high, effect, sd, alpha) < power:  # power grows with n: double, then bisect
        low, high = high, high * 2
        if high > limit:
            raise SpecError(f"--power {effect:g}: more than {limit} pairs needed with sd {sd:g}")
    while low < high:
        middle = (low + high) // 2
        if paired_power(middle, effect, sd, alpha) >= power:
            high = middle
        else:
            low = middle + 1
    return high


def sd_of(difference: PairedDifference) -> float | None:
    """The sd of the paired differences behind an interval: half-width * sqrt(n) / t_{0.975, n-1}."""
    from scipy.special import stdtrit

    width = halfwidth(difference)
    if width is None:
        return None
    return width * math.sqrt(difference.n) / float(stdtrit(difference.n - 1, 0.5 + CONFIDENCE / 2))


def power_table(effect: float, sds: list[tuple[str, float | None, str]], shuffles_now: int) -> str:
    """For each (label, sd, n it was measured on): pairs for 80% power, and the power of the spec's
    own number of pairs."""
    header = ["comparison", "sd of differences", "measured on", "pairs for 80% power", f"power with {shuffles_now}"]
    rows = [header]
    for label, sd, n in sds:
        if sd is None or sd <= 0:
            rows.append([label, "-", n, "no sd (needs >= 2 pairs, not all equal)", "-"])
            continue
        rows.append([label, f"{sd:.4f}", n, str(pairs_for_power(effect, sd)),
                     f"{paired_power(shuffles_now, effect, sd):.2f}" if shuffles_now >= 2 else "-"])
    return format_table(rows, rule=True)


def sweep_observations(tracker: Tracker, parent: SweepRun) -> list[Observation]:
    """The finished trials of a sweep (its own and the cached runs it reused), as the comparison sees them."""
    from orchestrator.run_states import FINISHED

    manifest = json.loads(tracker.read_text(parent.run_id, "trials.json"))
    children = {run.trial_key: run for run in tracker.sweep_trials(parent)}
    observations = []
    for entry in manifest:
        run = tracker.find_run(entry["cached_run"]) if entry.get("cached_run") else children.get(entry["key"])
        if run is not None and run.status == FINISHED:
            observations.append(Observation(entry["axes"], run.metrics))
    return observations


def show_power(plan: Plan, effect: float, sd: float | None, sweep_id: str | None, tracking_uri: str | None) -> None:
    """`ditsweep plan --power`: pairs for 80% power with a given sd, or with each comparison's sd in a
    finished sweep; and the power of the matched pairs this spec's grid gives each comparison."""
    pairs_now = math.prod(len(plan.spec.grid[a]) for a in plan.spec.compare.pair_on if a in plan.spec.grid)
    if sd is not None:
        if not sd > 0:
            raise SpecError(f"--sd must be above 0, got {sd}")
        sds = [("--sd", sd, "given")]
    else:
        sds = _sweep_sds(sweep_id, tracking_uri)
    print(f"\npower of a two-sided paired t test at alpha 0.05 against a {PRIMARY} difference of {effect:g} dB "
          f"(noncentral t); this spec gives {pairs_now} matched pair(s) per comparison:")
    print(power_table(effect, sds, pairs_now))


def _sweep_sds(sweep_id: str, tracking_uri: str | None) -> list[tuple[str, float | None, str]]:
    from orchestrator.tracking import Tracker

    tracker = Tracker(tracking_uri, create=False)
    parent = tracker.find_sweep(sweep_id)
    spec = parse_spec(tracker.read_text(parent.run_id, "spec.yaml"), f"the spec of sweep {sweep_id}")
    rows = paired_table(sweep_observations(tracker, parent), list(spec.grid), spec.compare.baseline,
                        spec.compare.pair_on, [PRIMARY])
    out = []
    for row in rows:
        difference = row.differences.get(PRIMARY)
        if row.baseline:
            continue
        label = "·".join(axis_label(k, v) for k, v in row.axes.items())
        out.append((label, sd_of(difference) if difference else None, f"n={difference.n if difference else 0}"))
    if not out:
        raise SpecError(f"sweep {sweep_id} has no comparison with a finished {PRIMARY} pair; "
                        f"give --sd instead")
    return out
