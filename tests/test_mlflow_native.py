"""What a finished trial leaves in MLflow for MLflow's own chart and image views: the PSNR curve per
diffusion timestep as metric series (step = timestep) and the sample grids as MLflow images. The sweep
driver's sink writes into a real sqlite store; the store is read back with MlflowClient."""

from __future__ import annotations

import io

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from orchestrator.progress import SweepSink
from orchestrator.spec import Trial, trial_key
from orchestrator.tracking import Tracker
from tests.support.sweeps import sqlite_uri, tiny_config
from trainer.config import build_config
from trainer.records import PsnrCurve

TIMESTEPS = [0, 111, 333, 555, 999]
TRAIN = [31.5, 24.25, 18.0, 12.5, 7.75]
TEST = [30.0, 22.0, 17.5, 12.5, 7.5]


def png(value: int, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def finished_trial(tmp_path, monkeypatch):
    """One trial run through the sink: started, its final result (with the PSNR curve), its checkpoint's
    pictures, completed."""
    monkeypatch.setenv("DITSWEEP_ARTIFACT_ROOT", str(tmp_path / "art"))
    uri = sqlite_uri(tmp_path)
    tracker = Tracker(uri)
    experiment = tracker.experiment_id("native")
    parent = tracker.start_sweep(experiment, "native-1", name="sweep", tags={}, params={}, texts={})
    config = build_config(tiny_config({"train.steps": 4}))
    trial = Trial(axes={"attention.placement": "none"}, config=config, key=trial_key(config))
    sink = SweepSink(tracker, parent, [trial], {})
    sink.started(trial.key)
    record = PsnrCurve(TIMESTEPS, TRAIN, TEST).to_csv()
    sink.result(trial.key, {"step": 4, "psnr_gap": 1.0, "psnr_curve": record})
    pictures = {"samples.png": png(200), "nearest_train.png": png(100)}
    sink.checkpointed(trial.key, pictures.get)
    sink.completed(trial.key)
    assert tracker.flush(30)
    return MlflowClient(tracking_uri=uri), sink.states[trial.key].run_id


def test_psnr_curves_are_metric_series_over_the_diffusion_timestep(finished_trial):
    client, run_id = finished_trial
    expected = {"psnr_curve.train": TRAIN, "psnr_curve.test": TEST,
                "psnr_curve.gap": [a - b for a, b in zip(TRAIN, TEST)]}
    for name, values in expected.items():
        history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        assert [m.step for m in history] == TIMESTEPS, name
        assert [m.value for m in history] == pytest.approx(values, rel=1e-6), name


def test_sample_grids_are_mlflow_images(finished_trial):
    client, run_id = finished_trial
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    for key, value in (("samples", 200), ("nearest_train", 100)):
        pictures = [p for p in images if p.split("/")[-1].startswith(f"{key}+step+4+") and p.endswith(".png")]
        assert pictures, (key, images)
        local = client.download_artifacts(run_id, pictures[0])
        pixels = np.asarray(Image.open(local).convert("L"))
        assert pixels.shape == (12, 12) and (pixels == value).all()
    # The plain artifacts stay as they were.
    assert {"samples.png", "nearest_train.png", "psnr_curve.csv"} <= {a.path for a in client.list_artifacts(run_id)}


def test_a_picture_that_does_not_decode_is_only_an_artifact(tmp_path, capsys):
    tracker = Tracker(sqlite_uri(tmp_path))
    experiment = tracker.experiment_id("native", create=True)
    run = tracker.start_sweep(experiment, "x", name="x", tags={}, params={}, texts={})
    tracker.log_images(run.run_id, {"samples": b"not a png"}, step=1)
    assert "samples is not a readable picture" in capsys.readouterr().out
    assert not tracker.outbox.pending  # nothing left to retry forever


def test_the_default_store_is_the_one_in_the_current_folder_each_time(tmp_path, monkeypatch):
    """MLflow keeps one store per URI string for the life of a process: the default relative
    `sqlite:///mlflow.db` must still open the current folder's file after the folder changes."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        monkeypatch.chdir(folder)
        tracker = Tracker()
        assert tracker.uri == "sqlite:///mlflow.db"  # as the user gave it, for messages
        tracker.experiment_id(f"experiment-{name}")
        names = {e.name for e in MlflowClient(tracking_uri=sqlite_uri(folder)).search_experiments()}
        assert names == {"Default", f"experiment-{name}"}
