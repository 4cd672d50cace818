"""The paired table of `ditsweep report`: every configuration against its baseline, matched on seeds and
shuffles, with a Student-t interval. Runs are written to a real MLflow sqlite store the way the driver
writes them, and the report's numbers are checked against scipy.stats computed here on the same runs."""

from __future__ import annotations

import csv
import io
import json
import random

import numpy as np
import pytest
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from scipy import stats
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.compare import NO_SPREAD, Observation, holm, paired_difference, paired_table
from orchestrator.spec import SpecError, parse_spec
from tests.support.sweeps import sqlite_uri

AXES = ("attention.placement", "data.num_images", "data.shuffle_seed")


def write_sweep(folder, spec: dict, trials: list[tuple[dict, dict, str]]) -> tuple[str, MlflowClient, str]:
    """A parent run with spec.yaml and trials.json, and one child run per (axes, metrics, status)."""
    uri = sqlite_uri(folder)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("paired", artifact_location=(folder / "art").as_uri())
    parent = client.create_run(experiment, run_name="sweep", tags={"ditsweep.role": "sweep", "ditsweep.sweep_id": "s1"})
    parent_id = parent.info.run_id
    manifest = []
    for i, (axes, metrics, status) in enumerate(trials):
        key = f"k{i}"
        manifest.append({"key": key, "name": key, "axes": axes, "schedule": "", "cached_run": None})
        run = client.create_run(experiment, run_name=key, tags={
            "mlflow.parentRunId": parent_id, "ditsweep.role": "trial", "ditsweep.sweep_id": "s1",
            "ditsweep.trial_key": key})
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, 0, 1) for k, v in metrics.items()],
                         params=[Param(k, str(v)) for k, v in axes.items()])
        client.set_terminated(run.info.run_id, status)
    client.log_text(parent_id, json.dumps(manifest), "trials.json")
    client.log_text(parent_id, yaml.safe_dump(spec), "spec.yaml")
    client.set_terminated(parent_id, "FINISHED")
    return uri, client, parent_id


def grid_trials(seed: int) -> list[tuple[dict, dict, str]]:
    """none/head/tail x N4/N64 x 4 shuffles. head lowers the gap by ~1 dB at N4 (clear), tail differs by
    noise; at N64 tail has a single finished shuffle (n = 1)."""
    rng = random.Random(seed)
    trials = []
    for placement in ("none", "head", "tail"):
        for n in (4, 64):
            for shuffle in range(4):
                base = (5.0 if n == 4 else 0.1) + 0.3 * shuffle  # a shuffle effect the pairing removes
                shift = {"none": 0.0, "head": -1.0 if n == 4 else 0.0, "tail": 0.0}[placement]
                gap = base + shift + rng.gauss(0, 0.1)
                train = 20 + gap / 2 + rng.gauss(0, 0.05)
                metrics = {"psnr_gap": gap, "psnr_train": train, "psnr_test": train - gap,
                           "mem_copy_fraction": rng.random()}
                status = "FAILED" if placement == "tail" and n == 64 and shuffle > 0 else "FINISHED"
                trials.append(({"attention.placement": placement, "data.num_images": n,
                                "data.shuffle_seed": shuffle}, metrics, status))
    return trials


def matched_pairs(trials, baseline: str, config: tuple, metric: str) -> np.ndarray:
    """(2, n): the configuration's and the baseline's values on the finished matched pairs."""
    done = {(a["attention.placement"], a["data.num_images"], a["data.shuffle_seed"]): m
            for a, m, status in trials if status == "FINISHED"}
    placement, n = config
    pairs = [(done[(placement, n, s)][metric], done[(baseline, n, s)][metric])
             for s in range(4) if (placement, n, s) in done and (baseline, n, s) in done]
    return np.array(pairs).T


def expected(trials, baseline: str, config: tuple, metric: str):
    """(n, mean, lo, hi) by scipy.stats.ttest_rel on the finished matched pairs."""
    x, y = matched_pairs(trials, baseline, config, metric)
    if len(x) < 2:
        return len(x), float(np.mean(x - y)), None, None
    interval = stats.ttest_rel(x, y).confidence_interval(0.95)
    return len(x), float(np.mean(x - y)), float(interval.low), float(interval.high)


def expected_p(trials, baseline: str, config: tuple, metric: str) -> float:
    """scipy.stats.ttest_rel's two-sided p value on the finished matched pairs."""
    return float(stats.ttest_rel(*matched_pairs(trials, baseline, config, metric)).pvalue)


def holm_by_hand(p_values: list[float]) -> list[float]:
    """Holm (1979) written out independently: for each p, the largest over the hypotheses ranked at or
    below it of min(1, (m - rank + 1) p), ranks from 1 in ascending order."""
    m = len(p_values)
    ranked = sorted(p_values)
    out = []
    for p in p_values:
        rank = ranked.index(p) + 1
        out.append(max(min(1.0, (m - j + 1) * ranked[j - 1]) for j in range(1, rank + 1)))
    return out


def read_paired(folder) -> dict[tuple, dict[str, str]]:
    rows = csv.DictReader(io.StringIO((folder / "paired.csv").read_text()))
    return {(r["attention.placement"], int(r["data.num_images"])): r for r in rows}


SPEC = {"name": "paired", "grid": {"attention.placement": ["none", "head", "tail"], "data.num_images": [4, 64],
                                    "data.shuffle_seed": [0, 1, 2, 3]}}


def test_paired_table_matches_scipy_on_a_real_store(tmp_path):
    trials = grid_trials(0)
    uri, client, parent_id = write_sweep(tmp_path, SPEC, trials)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", "s1", "--out", str(out), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    paired = read_paired(out)
    assert paired[("none", 4)]["baseline"] == "true" and paired[("none", 4)]["psnr_gap_mean"] == ""
    configs = [("head", 4), ("head", 64), ("tail", 4), ("tail", 64)]
    # The primary metric's family: the comparisons with >= 2 pairs, Holm-adjusted together.
    family = [c for c in configs if expected(trials, "none", c, "psnr_gap")[2] is not None]
    adjusted = dict(zip(family, holm_by_hand([expected_p(trials, "none", c, "psnr_gap") for c in family])))
    verdicts = {}
    for config in configs:
        for metric in ("psnr_gap", "psnr_train", "psnr_test", "mem_copy_fraction"):
            n, mean, lo, hi = expected(trials, "none", config, metric)
            row = paired[config]
            assert int(row[f"{metric}_n"]) == n
            assert float(row[f"{metric}_mean"]) == pytest.approx(mean, rel=1e-6, abs=1e-9)
            if lo is None:
                assert row[f"{metric}_lo"] == row[f"{metric}_hi"] == ""
                assert row[f"{metric}_verdict"] == "needs >= 2 matched pairs"
            else:
                assert float(row[f"{metric}_lo"]) == pytest.approx(lo, rel=1e-6)
                assert float(row[f"{metric}_hi"]) == pytest.approx(hi, rel=1e-6)
                assert float(row[f"{metric}_p"]) == pytest.approx(expected_p(trials, "none", config, metric), rel=1e-6)
                if metric == "psnr_gap":  # primary: decided by the Holm-adjusted p value
                    assert float(row[f"{metric}_p_holm"]) == pytest.approx(adjusted[config], rel=1e-6)
                    decided = adjusted[config] < 0.05
                    want = "no clear difference" if not decided else "lower" if mean < 0 else "higher"
                else:  # secondary: 95% per comparison, unadjusted
                    assert row[f"{metric}_p_holm"] == ""
                    want = "lower" if hi < 0 else "higher" if lo > 0 else "no clear difference"
                assert row[f"{metric}_verdict"] == want
            verdicts[(config, metric)] = row[f"{metric}_verdict"]
    # The constructed effect: head lowers the gap at N4 (a clear shift), tail at N64 has one pair.
    assert verdicts[(("head", 4), "psnr_gap")] == "lower"
    assert verdicts[(("tail", 64), "psnr_gap")] == "needs >= 2 matched pairs"

    # Each configuration's own gap: its mean and the 95% Student-t interval over its finished shuffles,
    # against scipy's one-sample t interval on the same runs (report.csv; report.md shows it rounded).
    table = {(r["attention.placement"], int(r["data.num_images"])): r
             for r in csv.DictReader(io.StringIO((out / "report.csv").read_text()))}
    for config in [("none", 4), ("head", 4), ("tail", 4), ("tail", 64)]:
        gaps = np.array([m["psnr_gap"] for a, m, status in trials if status == "FINISHED"
                         and (a["attention.placement"], a["data.num_images"]) == config])
        row = table[config]
        if len(gaps) < 2:
            assert row["psnr_gap_ci95_low"] == row["psnr_gap_ci95_high"] == ""
            continue
        low, high = stats.t.interval(0.95, len(gaps) - 1, loc=gaps.mean(), scale=stats.sem(gaps))
        assert float(row["psnr_gap_ci95_low"]) == pytest.approx(low, rel=1e-6)
        assert float(row["psnr_gap_ci95_high"]) == pytest.approx(high, rel=1e-6)
    markdown = (out / "report.md").read_text()
    assert "| psnr_gap 95% interval |" in markdown and "needs >= 2 trials" in markdown  # tail at N64

    # The same table on the sweep's parent run, as metrics.
    parent = client.get_run(parent_id).data.metrics
    n, mean, lo, hi = expected(trials, "none", ("head", 4), "psnr_gap")
    assert parent["delta.psnr_gap.head.N4"] == pytest.approx(mean, rel=1e-6)
    assert parent["delta.psnr_gap.head.N4.lo"] == pytest.approx(lo, rel=1e-6)
    assert parent["delta.psnr_gap.head.N4.hi"] == pytest.approx(hi, rel=1e-6)
    assert parent["delta.psnr_gap.head.N4.n"] == n
    assert parent["delta.psnr_gap.head.N4.p_holm"] == pytest.approx(adjusted[("head", 4)], rel=1e-6)
    assert "delta.psnr_gap.tail.N64.lo" not in parent and parent["delta.psnr_gap.tail.N64.n"] == 1
    attached = {a.path for a in client.list_artifacts(parent_id, "report")}
    assert {"report/paired.csv", "report/paired.md", "report/forest_psnr_gap.png"} <= attached

    # For people: the Student-t note, Holm named, the secondary metrics labelled, dB to 3 decimals.
    page = (out / "report.html").read_text()
    assert "Student" in page and "scipy.stats.t" in page and "Holm-adjusted" in page
    assert "Secondary metrics (95% per comparison, unadjusted)" in page
    assert 'alt="Paired difference in PSNR gap' in page  # the forest plot, embedded
    markdown = (out / "report.md").read_text()
    # The compact primary table: configuration, N, n, Δ [interval], verdict; the baseline has no row.
    assert "| configuration | N | n | Δpsnr_gap dB [95% interval] | verdict (Holm-adjusted) |" in markdown
    head_line = next(line for line in markdown.splitlines() if line.startswith("| head | 4 | 4 |"))
    assert f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" in head_line and "| lower (p_Holm = " in head_line
    assert not any(line.startswith("| none | 4 | ") and "Holm" in line for line in markdown.splitlines())
    assert (out / "forest_psnr_gap.png").read_bytes().startswith(b"\x89PNG")


def test_the_baseline_and_pairing_come_from_the_spec(tmp_path):
    """compare: {baseline: {attention.placement: tail}}: every configuration against tail."""
    trials = grid_trials(1)
    spec = {**SPEC, "compare": {"baseline": {"attention.placement": "tail"}, "pair_on": ["data.shuffle_seed"]}}
    uri, _, _ = write_sweep(tmp_path, spec, trials)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", "s1", "--out", str(out), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    paired = read_paired(out)
    assert paired[("tail", 4)]["baseline"] == "true" and paired[("none", 4)]["baseline"] == "false"
    n, mean, lo, hi = expected(trials, "tail", ("head", 4), "psnr_gap")
    assert (int(paired[("head", 4)]["psnr_gap_n"]), float(paired[("head", 4)]["psnr_gap_lo"])) == (n, pytest.approx(lo))
    assert paired[("none", 64)]["psnr_gap_n"] == "1"


def test_compare_names_grid_axes_and_values():
    grid = "name: a\ngrid: {attention.placement: [none, head], seed: [0, 1]}\n"
    with pytest.raises(SpecError, match=r"compare.baseline.attention.placement is 'tail'"):
        parse_spec(grid + "compare: {baseline: {attention.placement: tail}}")
    with pytest.raises(SpecError, match=r"'model.size', which is not a grid axis"):
        parse_spec(grid + "compare: {baseline: {model.size: DiT-T/1}}")
    with pytest.raises(SpecError, match=r"compare.typo"):
        parse_spec(grid + "compare: {typo: 1}")
    assert parse_spec(grid).compare.baseline == {"attention.placement": "none"}


@pytest.mark.parametrize("differences", [[0.5, 0.7, 0.2], [-1.0, 1.0], [-2.0, -1.5, -1.7, -2.2]])
def test_interval_is_the_student_t_interval(differences):
    got = paired_difference(differences)
    interval = stats.t.interval(0.95, len(differences) - 1, loc=np.mean(differences), scale=stats.sem(differences))
    assert (got.low, got.high) == (pytest.approx(interval[0], rel=1e-9), pytest.approx(interval[1], rel=1e-9))
    assert got.n == len(differences)


def test_the_report_shows_one_sample_grid_per_configuration(tmp_path):
    """samples.png of each configuration's first trial; nearest_train.png only at the smallest N."""
    import base64

    from PIL import Image

    trials = [({"attention.placement": p, "data.num_images": n, "data.shuffle_seed": s}, {"psnr_gap": 1.0 + s}, "FINISHED")
              for p in ("none", "head") for n in (4, 64) for s in (0, 1)]
    uri, client, _ = write_sweep(tmp_path, SPEC, trials)
    shade = {}
    for i, run in enumerate(client.search_runs([client.get_experiment_by_name("paired").experiment_id],
                                               "tags.`ditsweep.role` = 'trial'")):
        for name in ("samples.png", "nearest_train.png"):
            value = (7 * i + (3 if name == "samples.png" else 5)) % 256
            shade[(run.data.params["attention.placement"], run.data.params["data.num_images"],
                   run.data.params["data.shuffle_seed"], name)] = value
            path = tmp_path / name
            Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)
            client.log_artifact(run.info.run_id, str(path))
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", "s1", "--out", str(out), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    # One size, a configuration x N layout: a row per configuration, a column per N, each grid labelled.
    layout = page.split('<table class="grids">', 1)[1].split("</table>", 1)[0]
    assert "<th>N = 4</th><th>N = 64</th>" in layout
    assert [row.split("</th>", 1)[0] for row in layout.split("<tr><th>")[2:]] == ["none", "head"]
    assert layout.count("<figcaption>") == 4 and "img.grid { image-rendering: pixelated; width: 160px; }" in page
    shown = {}
    for chunk in page.replace('<img class="pairs" alt="', '<img class="grid" alt="').split('<img class="grid" alt="')[1:]:
        alt, rest = chunk.split('"', 1)
        payload = rest.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload))).convert("L"))
        shown[alt] = int(pixels[0, 0])
    assert shown == {
        "none·N4 samples.png": shade[("none", "4", "0", "samples.png")],
        "none·N4 nearest_train.png": shade[("none", "4", "0", "nearest_train.png")],
        "none·N64 samples.png": shade[("none", "64", "0", "samples.png")],
        "head·N4 samples.png": shade[("head", "4", "0", "samples.png")],
        "head·N4 nearest_train.png": shade[("head", "4", "0", "nearest_train.png")],
        "head·N64 samples.png": shade[("head", "64", "0", "samples.png")],
    }


# ---------------------------------------------------------------------------------------------
# Degenerate differences, Holm, and baselines that match no trial


def test_a_zero_width_interval_gives_no_verdict():
    """Every difference equal (s = 0, as mem_copy_fraction's 1/64 steps often are): the interval has zero
    width, so no verdict and no p value, however far from 0 the mean is."""
    got = paired_difference([1 / 64, 1 / 64, 1 / 64])
    assert (got.low, got.high, got.p_value) == (1 / 64, 1 / 64, None)
    assert got.verdict == NO_SPREAD


def test_a_nan_pair_is_dropped_and_counted():
    got = paired_difference([0.5, float("nan"), 0.7, 0.2])
    want = paired_difference([0.5, 0.7, 0.2])
    assert (got.n, got.dropped, got.mean, got.low) == (3, 1, want.mean, want.low)
    lost = paired_difference([float("nan"), float("inf")])
    assert (lost.n, lost.dropped, lost.verdict) == (0, 2, "needs >= 2 matched pairs")
    rows = paired_table([Observation({"p": "none", "s": 0}, {"psnr_gap": 1.0}),
                         Observation({"p": "head", "s": 0}, {"psnr_gap": float("nan")})],
                        ["p", "s"], {"p": "none"}, ["s"], ["psnr_gap"])
    assert rows[1].differences["psnr_gap"].dropped == 1 and rows[1].differences["psnr_gap"].n == 0
    from orchestrator import paired

    assert paired.primary_table(rows, ["4", "4"])[1:] == [
        ["p=head", "4", "0", "", "needs >= 2 matched pairs; 1 non-finite pair(s) dropped"]]
    assert paired.delta_metrics(rows) == {"delta.psnr_gap.p-head.n": 0.0, "delta.psnr_gap.p-head.dropped": 1.0}


def test_a_report_with_a_nan_metric_drops_that_pair_and_says_so(tmp_path):
    trials = grid_trials(2)
    axes, metrics, status = trials[0]  # none, N4, shuffle 0: the baseline of head's and tail's shuffle 0
    assert (axes["attention.placement"], axes["data.num_images"], axes["data.shuffle_seed"]) == ("none", 4, 0)
    trials[0] = (axes, {**metrics, "psnr_gap": float("nan")}, status)
    uri, _, _ = write_sweep(tmp_path, SPEC, trials)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", "s1", "--out", str(out), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    head = read_paired(out)[("head", 4)]
    assert (head["psnr_gap_n"], head["psnr_gap_dropped"], head["psnr_train_dropped"]) == ("3", "1", "0")
    finite = [m["psnr_gap"] for a, m, s in trials if (a["attention.placement"], a["data.num_images"]) == ("none", 4)][1:]
    table = {(r["attention.placement"], r["data.num_images"]): r for r in csv.DictReader(io.StringIO((out / "report.csv").read_text()))}
    assert float(table[("none", "4")]["psnr_gap_mean"]) == pytest.approx(np.mean(finite), rel=1e-9)
    markdown = (out / "report.md").read_text()
    assert "psnr_gap is nan, left out of the statistics" in markdown
    assert "1 non-finite pair(s) dropped" in next(line for line in markdown.splitlines() if line.startswith("| head | 4 | 3 |"))
    assert "nan" not in (out / "paired.md").read_text()


def test_holm_matches_the_method_written_out():
    rng = np.random.default_rng(5)
    for m in (1, 2, 5, 12):
        p = list(rng.uniform(0, 0.1, m))
        assert holm(p) == pytest.approx(holm_by_hand(p), rel=1e-12)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3·0.01, max(2·0.03, ·), 1·0.04 -> 0.06


def test_pairs_use_only_seeds_both_sides_have_and_no_baseline_gives_no_table():
    trials = [Observation({"p": "head", "s": 0}, {"g": 1.0}), Observation({"p": "head", "s": 1}, {"g": 2.0}),
              Observation({"p": "none", "s": 0}, {"g": 4.0})]
    head = paired_table(trials, ["p", "s"], {"p": "none"}, ["s"], ["g"])[0]
    assert (head.differences["g"].n, head.differences["g"].mean) == (1, -3.0)
    assert paired_table(trials[:2], ["p", "s"], {"p": "none"}, ["s"], ["g"]) == []
    assert paired_table(trials, ["p", "s"], {}, ["s"], ["g"]) == []  # compare: {baseline: {}}


@pytest.mark.parametrize("command", ["plan", "launch"])
def test_a_default_baseline_that_matches_no_trial_is_refused(tmp_path, monkeypatch, command):
    from tests.support.sweeps import invoke, write_spec

    spec = write_spec(tmp_path, grid={"attention.windows": [[3], [5]], "data.shuffle_seed": [0, 1]})
    result, created = invoke(tmp_path, monkeypatch, command, str(spec))
    assert result.exit_code == 2, result.output
    assert "default compare baseline (attention.placement = 'none') matches no trial" in result.output
    assert created == set()  # nothing written
    fixed = write_spec(tmp_path, grid={"attention.windows": [[3], [5]], "data.shuffle_seed": [0, 1]},
                       compare={"baseline": {"attention.windows": [5]}})
    result, _ = invoke(tmp_path, monkeypatch, "plan", str(fixed))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["plan", "launch"])
def test_a_written_baseline_that_exclude_removes_is_refused(tmp_path, monkeypatch, command):
    from tests.support.sweeps import invoke, write_spec

    grid = {"attention.windows": [[3], [5]], "data.shuffle_seed": [0, 1]}
    spec = write_spec(tmp_path, grid=grid, compare={"baseline": {"attention.windows": [5]}},
                      exclude=[{"attention.windows": [5]}])
    result, created = invoke(tmp_path, monkeypatch, command, str(spec))
    assert result.exit_code == 2, result.output
    assert "compare.baseline (attention.windows = [5]) matches no trial" in result.output
    assert created == set()  # nothing written
    # Excluding only some of the baseline's points leaves a baseline to compare against.
    partly = write_spec(tmp_path, grid=grid, compare={"baseline": {"attention.windows": [5]}},
                        exclude=[{"attention.windows": [5], "data.shuffle_seed": 1}])
    result, _ = invoke(tmp_path, monkeypatch, "plan", str(partly))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("name", ["window_size.yaml", "paper/window_size_xs.yaml"])
def test_window_size_specs_compare_against_the_window_that_covers_the_grid(name):
    from pathlib import Path

    from orchestrator.spec import expand, load_spec

    spec = load_spec(Path(__file__).parents[1] / "search_spaces" / name)
    trials = expand(spec)
    baselines = [t for t in trials if t.axes["attention.windows"] == spec.compare.baseline["attention.windows"]]
    assert baselines and len(baselines) < len(trials)
    side = spec.base["data"]["image_size"]
    assert all(w >= 2 * side - 1 for w in spec.compare.baseline["attention.windows"])  # global on this grid
    # Every comparison has an interval: at least 2 matched pairs (values of the pairing axes that both
    # the configuration and its baseline were trained at).
    fixed = set(spec.compare.baseline) | set(spec.compare.pair_on)

    def point(trial):
        return tuple(sorted((a, repr(v)) for a, v in trial.axes.items() if a not in fixed))

    def pairing(trial):
        return tuple(repr(trial.axes.get(a)) for a in spec.compare.pair_on)

    for trial in trials:
        if trial in baselines:
            continue
        own = {pairing(t) for t in trials if t not in baselines and point(t) == point(trial)
               and t.axes["attention.windows"] == trial.axes["attention.windows"]}
        base = {pairing(b) for b in baselines if point(b) == point(trial)}
        assert len(own & base) >= 2, (trial.name, own, base)
