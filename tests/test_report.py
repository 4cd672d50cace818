"""`ditsweep report`: the comparison table read back from MLflow, plots, HTML.

The table's numbers are checked against the runs in MLflow, computed here independently (grouped by
the runs' own params, numpy for the statistics): once on a store built run by run with the MLflow
client (cached, failed and missing trials, FID and attention-distance metrics), and once on a real
tiny sweep launched through the CLI.
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.report import TrialResult, configuration_rows, table_csv, window_label, write_report
from tests.support.sweeps import ditsweep, sqlite_uri

PNG = b"\x89PNG\r\n\x1a\n"
LOCAL = "3,5,7,9,11,13,G,G,G,G,G,G"
GLOBAL = ",".join(["G"] * 12)
METRIC_COLUMNS = ("psnr_gap", "psnr_train", "psnr_test", "fid", "kid")


def read_table(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO((folder / "report.csv").read_text())))


def expected_rows(runs: list, axes: tuple[str, ...], metrics: tuple[str, ...]) -> dict[tuple, dict]:
    """Configuration (values of the non-seed `axes`, placement first) -> {metric_mean, metric_std}, from the
    runs' own params and metrics (the paired differences are test_compare's)."""
    by_config: dict[tuple, dict[str, dict]] = {}
    for run in runs:
        key = tuple(run.data.params[a] for a in axes)
        by_config.setdefault(key, {})[run.data.params["seed"]] = run.data.metrics
    expected = {}
    for key, seeds in by_config.items():
        row: dict[str, float | None] = {}
        for metric in metrics:
            values = np.array([m[metric] for m in seeds.values() if metric in m])
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else None
            row[f"{metric}_std"] = float(values.std(ddof=1)) if len(values) > 1 else None
        expected[key] = row
    return expected


def assert_table_matches(table: list[dict[str, str]], expected: dict, axes: tuple[str, ...],
                         metrics: tuple[str, ...]) -> None:
    assert {tuple(r[a] for a in axes) for r in table} == set(expected)
    for row in table:
        want = expected[tuple(row[a] for a in axes)]
        for column in (f"{m}_{part}" for m in metrics for part in ("mean", "std")):
            if want[column] is None:
                assert row[column] == "", (row, column)
            else:
                assert float(row[column]) == pytest.approx(want[column], rel=1e-9, abs=1e-12), (row, column)


# ---------------------------------------------------------------------------------------------
# A store built run by run


def trial_name(axes: dict) -> str:
    return f"{axes['attention.placement']}·N{axes['data.num_images']}·s{axes['seed']}"


def trial_key(axes: dict) -> str:
    return "-".join(str(v) for v in axes.values())


class StoreBuilder:
    """Runs shaped the way the sweep driver writes them (tags, flattened params, psnr_curve.csv)."""

    def __init__(self, folder: Path, experiment: str):
        self.uri = sqlite_uri(folder)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment = self.client.create_experiment(experiment, artifact_location=(folder / "art").as_uri())
        self.random = random.Random(0)

    def sweep(self, sweep_id: str, manifest: list[dict]) -> str:
        run = self.client.create_run(self.experiment, run_name=f"sweep {sweep_id}",
                                     tags={"ditsweep.role": "sweep", "ditsweep.sweep_id": sweep_id})
        self.client.log_text(run.info.run_id, json.dumps(manifest), "trials.json")
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def trial(self, sweep_id: str, parent: str, axes: dict, status: str = "FINISHED") -> str:
        run = self.client.create_run(self.experiment, run_name=trial_name(axes), tags={
            "mlflow.parentRunId": parent, "ditsweep.role": "trial", "ditsweep.sweep_id": sweep_id,
            "ditsweep.trial_key": trial_key(axes)})
        run_id = run.info.run_id
        params = {"attention.placement": axes["attention.placement"], "data.num_images": axes["data.num_images"],
                  "seed": axes["seed"], "data.fraction": None, "attention.windows": "[3, 5, 7, 9, 11, 13]",
                  "attention.schedule": GLOBAL if axes["attention.placement"] == "none" else LOCAL}
        train, test = 20 + self.random.random(), 19 + self.random.random()
        metrics = {"psnr_train": train, "psnr_test": test, "psnr_gap": train - test}
        if axes["data.num_images"] == 16:  # FID only at the larger size, as in the paper
            metrics |= {"fid": 50 + 10 * self.random.random(), "kid": 0.01 * self.random.random()}
        metrics |= {f"attn_distance.block_{b}": b + self.random.random() for b in range(4)}
        self.client.log_batch(run_id, metrics=[Metric(k, v, 0, 2) for k, v in metrics.items()],
                              params=[Param(k, str(v)) for k, v in params.items()])
        if status == "FINISHED":
            curve = "timestep,psnr_train,psnr_test,psnr_gap\n" + "".join(
                f"{t},{train - t / 100},{test - t / 100},{train - test}\n" for t in (0, 500, 999))
            self.client.log_text(run_id, curve, "psnr_curve.csv")
        self.client.set_terminated(run_id, status)
        return run_id


@pytest.fixture(scope="module")
def built_store(tmp_path_factory):
    """An earlier sweep whose trial (none, N8, s0) is reused, and a sweep of 2 placements x 2 sizes x
    3 seeds around it, with one FAILED trial and one trial that never got a run."""
    store = StoreBuilder(tmp_path_factory.mktemp("built"), "compare <b>&</b>")
    earlier = store.sweep("earlier", [])
    cached = store.trial("earlier", earlier, {"attention.placement": "none", "data.num_images": 8, "seed": 0})
    grid = [{"attention.placement": p, "data.num_images": n, "seed": s}
            for p in ("none", "head") for n in (8, 16) for s in (0, 1, 2)]
    failed, missing = grid[-1], grid[-4]  # head N16 s2, head N8 s2
    manifest = [{"key": trial_key(a), "name": trial_name(a), "axes": a, "schedule": "",
                 "cached_run": cached if a == grid[0] else None} for a in grid]
    parent = store.sweep("current", manifest)
    for axes in grid[1:]:
        if axes != missing:
            store.trial("current", parent, axes, "FAILED" if axes == failed else "FINISHED")
    return {"store": store, "parent": parent, "cached": cached}


def test_report_table_matches_the_runs_in_mlflow(built_store, tmp_path):
    store, out = built_store["store"], tmp_path / "report"
    result = CliRunner().invoke(app, ["report", "current", "--out", str(out), "--tracking-uri", store.uri])
    assert result.exit_code == 0, result.output
    client = store.client
    trials = client.search_runs([store.experiment], "tags.`ditsweep.sweep_id` = 'current' and "
                                "tags.`ditsweep.role` = 'trial' and attributes.status = 'FINISHED'")
    finished = [*trials, client.get_run(built_store["cached"])]
    assert len(finished) == 10  # 12 trials: one FAILED, one without a run
    table = read_table(out)
    axes = ("attention.placement", "data.num_images")
    assert_table_matches(table, expected_rows(finished, axes, METRIC_COLUMNS), axes, METRIC_COLUMNS)
    counts = {(r["attention.placement"], r["data.num_images"]): (r["finished"], r["trials"]) for r in table}
    assert counts == {("none", "8"): ("3", "3"), ("none", "16"): ("3", "3"),
                      ("head", "8"): ("2", "3"), ("head", "16"): ("2", "3")}
    assert [r["schedule"] for r in table] == [GLOBAL, GLOBAL, LOCAL, LOCAL]

    files = {p.name for p in out.iterdir()}
    plots = {"psnr_gap_vs_images.png", "psnr_per_step.png", "fid_vs_window.png", "attention_distance.png",
             "forest_psnr_gap.png", "locality_vs_gap.png", "attention_distance_vs_n.png"}
    assert files == {"report.md", "report.csv", "report.html", "paired.csv", "paired.md", "locality_vs_gap.csv"} | plots
    assert all((out / name).read_bytes().startswith(PNG) for name in plots)
    page = (out / "report.html").read_text()
    assert "compare &lt;b&gt;&amp;&lt;/b&gt;" in page and "<b>&</b>" not in page
    assert page.count('src="data:image/png;base64,') == len(plots)
    assert "head·N16·s2: failed" in page and "head·N8·s2: missing" in page
    markdown = (out / "report.md").read_text()
    assert "| attention.placement | data.num_images | schedule | finished | psnr_gap dB |" in markdown
    assert "![" in markdown and "(psnr_gap_vs_images.png)" in markdown

    attached = {a.path for a in client.list_artifacts(built_store["parent"], "report")}
    assert attached == {f"report/{name}" for name in files}
    view = json.loads(client.get_experiment(store.experiment).tags["mlflow.sharedViewState.ditsweep"])
    columns = json.loads(view["state"])["selectedColumns"]
    assert "params.`attention.placement`" in columns and "metrics.`psnr_gap`" in columns


def test_a_second_report_replaces_the_first(built_store, tmp_path):
    store, out = built_store["store"], tmp_path / "report"
    out.mkdir()
    (out / "old_plot.png").write_bytes(PNG)  # from an earlier report with other metrics
    result = CliRunner().invoke(app, ["report", "current", "--out", str(out), "--tracking-uri", store.uri])
    assert result.exit_code == 0, result.output
    assert not (out / "old_plot.png").exists() and (out / "report.csv").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no staging folder left behind


def test_a_folder_that_is_not_a_report_is_never_replaced(built_store, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["report", "current", "--out", str(tmp_path), "--tracking-uri",
                                      built_store["store"].uri])
    assert result.exit_code == 2 and "not a ditsweep report" in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_unknown_sweep_is_bad_input(built_store):
    result = CliRunner().invoke(app, ["report", "nope", "--tracking-uri", built_store["store"].uri])
    assert result.exit_code == 2
    assert "no sweep with id 'nope'" in result.output


# ---------------------------------------------------------------------------------------------
# Pure parts


def trial(placement: str, seed: int, gap: float) -> TrialResult:
    return TrialResult(f"{placement}·s{seed}", {"attention.placement": placement, "seed": seed}, "FINISHED",
                       params={"attention.placement": placement}, metrics={"psnr_gap": gap})


def test_the_table_has_no_second_pairing():
    """The paired differences come from orchestrator.compare alone (paired.csv); report.csv has none."""
    rows = configuration_rows([trial("head", 0, 1.0), trial("head", 1, 2.0), trial("none", 0, 4.0)],
                              ["attention.placement", "seed"])
    table = list(csv.DictReader(io.StringIO(table_csv(rows, ["attention.placement", "seed"], ["psnr_gap"]))))
    assert not any("change" in column for column in table[0])
    assert rows[0].mean["psnr_gap"] == 1.5 and rows[0].std["psnr_gap"] == pytest.approx(np.std([1.0, 2.0], ddof=1))
    assert [r["psnr_gap_std"] for r in table] == [repr(float(np.std([1.0, 2.0], ddof=1))), ""]


def test_gap_vs_n_points_carry_the_95_percent_interval():
    from scipy import stats

    from orchestrator.report import gap_vs_size

    trials = [TrialResult(f"head·N{n}·s{s}", {"attention.placement": "head", "data.num_images": n, "seed": s},
                          "FINISHED", params={"attention.placement": "head"}, metrics={"psnr_gap": gap})
              for n, s, gap in ((4, 0, 3.0), (4, 1, 4.0), (4, 2, 4.5), (64, 0, 0.2))]
    xlabel, series = gap_vs_size(configuration_rows(trials, ["attention.placement", "data.num_images", "seed"]))
    low, high = stats.t.interval(0.95, 2, loc=np.mean([3.0, 4.0, 4.5]), scale=stats.sem([3.0, 4.0, 4.5]))
    assert xlabel == "training images N"
    assert series["head"][0] == (4.0, pytest.approx(23 / 6), pytest.approx((high - low) / 2, rel=1e-9))
    assert series["head"][1] == (64.0, 0.2, None)  # one trial: no interval


def test_window_label():
    assert window_label(LOCAL) == "3,5,7,9,11,13"
    assert window_label("5,5,5,G") == "5"
    assert window_label(GLOBAL) is None


def test_a_failed_write_leaves_the_previous_report(tmp_path):
    out = tmp_path / "report"
    write_report({"report.csv": b"one"}, out)
    with pytest.raises(TypeError):
        write_report({"report.csv": b"two", "report.html": "not bytes"}, out)
    assert (out / "report.csv").read_bytes() == b"one" and not (out / "report.html").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_a_report_failure_only_warns_at_sweep_end(monkeypatch, capsys):
    from orchestrator import launch, report

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "publish", broken)
    launch._refresh_report(tracker=None, sweep_id="s1")
    assert "warning: could not build the report of sweep s1: RuntimeError: disk full" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# A real sweep


@pytest.mark.slow
def test_report_of_a_real_sweep(finished_sweep, tmp_path):
    folder, sweep_id = finished_sweep["folder"], finished_sweep["sweep_id"]
    client = MlflowClient(tracking_uri=sqlite_uri(folder))
    experiment = finished_sweep["experiment_id"]
    # Regenerated when the sweep ended: on disk and on the sweep's run.
    assert f"report: reports/{sweep_id}/report.html" in finished_sweep["stdout"]
    attached = {a.path for a in client.list_artifacts(finished_sweep["parent_run_id"], "report")}
    assert {"report/report.csv", "report/report.html", "report/psnr_gap_vs_images.png"} <= attached

    out = tmp_path / "cmp"
    result = ditsweep("report", sweep_id, "--out", str(out), "--tracking-uri", sqlite_uri(folder), cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    trials = client.search_runs([experiment], "tags.`ditsweep.role` = 'trial'")
    assert len(trials) == 4 and {r.info.status for r in trials} == {"FINISHED"}
    metrics = ("psnr_gap", "psnr_train", "psnr_test")
    axes = ("attention.placement",)
    assert_table_matches(read_table(out), expected_rows(trials, axes, metrics), axes, metrics)
    assert {"report.md", "report.csv", "report.html", "psnr_gap_vs_images.png", "psnr_per_step.png"} <= {
        p.name for p in out.iterdir()}
    assert (out / "psnr_gap_vs_images.png").read_bytes().startswith(PNG)

    # MLflow-native: each trial's PSNR per diffusion timestep as metric series, step = timestep,
    # the same numbers as its psnr_curve.csv.
    for trial in trials:
        run_id = trial.info.run_id
        curve = list(csv.DictReader(io.StringIO(
            Path(client.download_artifacts(run_id, "psnr_curve.csv", str(tmp_path / run_id))).read_text())))
        for column, name in (("psnr_train", "train"), ("psnr_test", "test"), ("psnr_gap", "gap")):
            history = sorted(client.get_metric_history(run_id, f"psnr_curve.{name}"), key=lambda m: m.step)
            assert [m.step for m in history] == [int(r["timestep"]) for r in curve]
            assert [m.value for m in history] == pytest.approx([float(r[column]) for r in curve], rel=1e-5, abs=1e-5)

    # The paired table: head against none, matched on the seed, against scipy's paired t interval.
    from scipy import stats

    by_seed = {(r.data.params["attention.placement"], r.data.params["seed"]): r.data.metrics["psnr_gap"] for r in trials}
    differences = [by_seed[("head", s)] - by_seed[("none", s)] for s in ("0", "1")]
    half = stats.t.ppf(0.975, 1) * stats.sem(differences)  # 0 when both seeds differ alike (t.interval: nan)
    low, high = np.mean(differences) - half, np.mean(differences) + half
    paired = {r["attention.placement"]: r for r in csv.DictReader(io.StringIO((out / "paired.csv").read_text()))}
    assert paired["none"]["baseline"] == "true"
    assert int(paired["head"]["psnr_gap_n"]) == 2
    assert float(paired["head"]["psnr_gap_lo"]) == pytest.approx(low, rel=1e-5, abs=1e-6)
    assert float(paired["head"]["psnr_gap_hi"]) == pytest.approx(high, rel=1e-5, abs=1e-6)
    parent_metrics = client.get_run(finished_sweep["parent_run_id"]).data.metrics
    assert parent_metrics["delta.psnr_gap.head"] == pytest.approx(float(np.mean(differences)), rel=1e-5, abs=1e-6)
    # One comparison: Holm's family of one leaves its p value (scipy's paired t test) as it is.
    p_value = stats.ttest_rel([by_seed[("head", s)] for s in "01"], [by_seed[("none", s)] for s in "01"]).pvalue
    if np.isfinite(p_value):
        assert float(paired["head"]["psnr_gap_p_holm"]) == pytest.approx(p_value, rel=1e-5)
        assert parent_metrics["delta.psnr_gap.head.p_holm"] == pytest.approx(p_value, rel=1e-5)
    # The forest plot and the compact primary table: in the report and on the sweep's parent run.
    assert (out / "forest_psnr_gap.png").read_bytes().startswith(PNG)
    markdown = (out / "report.md").read_text()
    assert "| configuration | N | n | Δpsnr_gap dB [95% interval] | verdict (Holm-adjusted) |" in markdown
    assert next(line for line in markdown.splitlines() if line.startswith("| head | 16 | 2 |"))
    attached = {a.path for a in client.list_artifacts(finished_sweep["parent_run_id"], "report")}
    assert {"report/forest_psnr_gap.png", "report/paired.md", "report/paired.csv"} <= attached
    parent_paired = client.download_artifacts(finished_sweep["parent_run_id"], "report/paired.md", str(tmp_path))
    assert "Holm-adjusted" in Path(parent_paired).read_text()
    # The run table view: the trials, their axes first, then psnr_gap; the experiment is model training.
    experiment_tags = client.get_experiment(experiment).tags
    assert experiment_tags["mlflow.experimentKind"] == "custom_model_development"
    state = json.loads(json.loads(experiment_tags["mlflow.sharedViewState.ditsweep"])["state"])
    assert state["selectedColumns"][:3] == ["params.`attention.placement`", "params.`seed`", "metrics.`psnr_gap`"]
    assert state["searchFilter"] == "tags.`ditsweep.role` = 'trial'"

    # The Jacobian analysis (trainer.jacobian): each trial's jacobian.npz, its spectrum as metric series with
    # step = rank (the mean over images of the file's eigenvalues), and the report's pictures.
    from trainer.jacobian import JacobianAnalysis

    for trial in trials:
        run_id = trial.info.run_id
        npz = Path(client.download_artifacts(run_id, "jacobian.npz", str(tmp_path / f"jac-{run_id}")))
        analysis = JacobianAnalysis.from_npz(npz.read_bytes())
        assert analysis.timesteps == [100, 600] and analysis.eigenvectors.shape == (2, 1, 4, 1, 8, 8)
        history = sorted(client.get_metric_history(run_id, "jacobian_spectrum.t600"), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(64))
        assert [m.value for m in history] == pytest.approx(analysis.eigenvalues[1].mean(axis=0).tolist(), rel=1e-5, abs=1e-6)
        assert "jac_asymmetry.t100" in trial.data.metrics
    assert {"jacobian_spectra.png", "jacobian_eigenvectors.png", "jacobian.csv", "locality_vs_gap.png",
            "attention_queries.png"} <= {
        p.name for p in out.iterdir()}
    assert "Jacobian asymmetry" in (out / "report.md").read_text()


def test_reproducibility_of_disjoint_pairs_is_reported(tmp_path):
    """Trials on disjoint subsets that differ only in data.shuffle_seed are paired; the report's score
    is trainer.metrics.reproducibility of their samples.npy grids."""
    from orchestrator.report import fetch_sweep, notes
    from orchestrator.tracking import Tracker
    from trainer.metrics import reproducibility

    store = StoreBuilder(tmp_path, "repro")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    grids = {0: base, 1: np.clip(base.astype(int) + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8),
             2: rng.integers(0, 256, base.shape, dtype=np.uint8)}
    manifest, parent = [], store.sweep("repro-1", [])
    for shuffle, grid in grids.items():
        axes = {"data.shuffle_seed": shuffle}
        run = store.client.create_run(store.experiment, run_name=f"sh{shuffle}", tags={
            "mlflow.parentRunId": parent, "ditsweep.role": "trial", "ditsweep.sweep_id": "repro-1",
            "ditsweep.trial_key": f"k{shuffle}"})
        params = {"data.disjoint": "True", "data.shuffle_seed": str(shuffle), "attention.placement": "head"}
        store.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
        buffer = io.BytesIO()
        np.save(buffer, grid)
        (tmp_path / "samples.npy").write_bytes(buffer.getvalue())
        store.client.log_artifact(run.info.run_id, str(tmp_path / "samples.npy"))
        store.client.set_terminated(run.info.run_id, "FINISHED")
        manifest.append({"key": f"k{shuffle}", "name": f"sh{shuffle}", "axes": axes, "cached_run": None})
    store.client.log_text(parent, json.dumps(manifest), "trials.json")

    data = fetch_sweep(Tracker(store.uri), "repro-1")
    scores = data.reproducibility["all trials"]
    expected = [reproducibility(grids[a], grids[b]) for a, b in ((0, 1), (0, 2), (1, 2))]
    assert sorted(scores) == pytest.approx(sorted(expected))
    assert max(scores) > 0.8 > 0.2 > min(scores)  # the noisy copy is close, the random grid is not
    assert any(line.startswith("reproducibility all trials: ") for line in notes(data))
