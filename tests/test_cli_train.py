"""`ditsweep train` and `ditsweep prepare-data`: exit codes, messages, and what is (not) written.

Most cases go through Typer's CliRunner in-process; one runs the installed console script for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from orchestrator.cli import app
from tests.support.sweeps import set_options, tiny_config
from trainer.data import load_images

DITSWEEP = Path(sys.executable).with_name("ditsweep")
# The tests' tiny config as --set options, without the keys an empty config must show at their defaults.
TINY = set_options(tiny_config(
    {"train.steps": 2}, drop=("model", "train.log_every", "train.warmup_steps", "eval.every"),
))
# What the issue ran: an empty config plus these overrides.
ISSUE_OVERRIDES = [
    "--set", "train.steps=30",
    "--set", "data.num_images=64",
    "--set", "eval.psnr_gap.images=16",
    "--set", "eval.psnr_gap.timesteps=4",
    "--set", "eval.samples.grid=2",
    "--set", "eval.samples.steps=2",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """These tests train real models: one thread each keeps them steady on a shared 2-core box."""


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def empty_config(tmp_path: Path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    return path


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in an empty working folder, so default outputs (runs/...) land there and can be checked."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def png_folder(folder: Path, count: int = 6) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    return folder


def corrupt_folder(folder: Path) -> Path:
    png_folder(folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def quiet_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def assert_one_error_line(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# train: success


def test_train_prints_metrics_and_writes_its_folder(runner, empty_config, tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(empty_config), *TINY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "training DiT-T/1 schedule=3,5,7,9,11,13,G,G,G,G,G,G data=digits" in result.stdout
    assert "psnr_gap=" in result.stdout and "step=2" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 2 and "psnr_gap" in metrics
    assert (out / "psnr_curve.csv").is_file() and (out / "checkpoint" / "state.pt").is_file()


def test_console_script_runs_a_trial_without_importing_torchs_compiler(empty_config, in_tmp):
    result = subprocess.run(
        [str(DITSWEEP), "train", str(empty_config), *TINY],
        capture_output=True, text=True, timeout=120,
        env={**quiet_env(), "PYTHONPROFILEIMPORTTIME": "1"},  # every import, on stderr
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "psnr_gap=" in result.stdout
    (run,) = (in_tmp / "runs").iterdir()  # the default output folder, under the working folder
    assert (run / "metrics.json").is_file()
    # A trial (this, or one in a sweep's worker) trains without torch.optim, whose first use imports
    # torch's compiler stack (trainer/optim.py); the import log shows torch itself was imported.
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "torch" in imported and "trainer.optim" in imported
    assert not [name for name in imported if name.startswith("torch._dynamo")]


@pytest.mark.slow
def test_the_issue_command_finishes(empty_config, in_tmp):
    # `ditsweep train empty.yaml --set train.steps=30 --set data.num_images=64 ...` (about 30 s here)
    result = subprocess.run(
        [str(DITSWEEP), "train", "../empty.yaml", *ISSUE_OVERRIDES],
        capture_output=True, text=True, timeout=300, env=quiet_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "psnr_gap=" in result.stdout
    assert "step=30" in result.stdout


# ---------------------------------------------------------------------------------------------
# train: bad input -> exit 2, one message, nothing written


def test_missing_data_path(runner, empty_config, in_tmp, tmp_path):
    absent = tmp_path / "no-such-folder"
    result = runner.invoke(app, ["train", str(empty_config), *TINY, "--set", f"data.source={absent}"])
    assert_one_error_line(result, f"data source '{absent}' does not exist")
    assert list(in_tmp.iterdir()) == []  # no runs/ folder


def test_unreadable_image(runner, empty_config, in_tmp, tmp_path):
    folder = corrupt_folder(tmp_path / "images")
    result = runner.invoke(app, ["train", str(empty_config), *TINY, "--set", f"data.source={folder}"])
    assert_one_error_line(result, "broken.png", "unreadable")
    assert list(in_tmp.iterdir()) == []


def test_unknown_key_via_set(runner, empty_config, in_tmp):
    result = runner.invoke(app, ["train", str(empty_config), "--set", "train.stepz=3"])
    assert_one_error_line(result, "unknown config key 'train.stepz'", "steps")
    assert list(in_tmp.iterdir()) == []


def test_unknown_key_in_yaml(runner, in_tmp, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("train:\n  stepz: 3\n")
    result = runner.invoke(app, ["train", str(config)])
    assert_one_error_line(result, "train.stepz")


def test_even_window(runner, empty_config, in_tmp):
    result = runner.invoke(app, ["train", str(empty_config), "--set", "attention.windows=[3,4]"])
    assert_one_error_line(result, "attention.windows", "got 4")
    assert list(in_tmp.iterdir()) == []


@pytest.mark.parametrize("item", ["train.steps", "attention.windows=[3,"])
def test_malformed_set(runner, empty_config, in_tmp, item):
    result = runner.invoke(app, ["train", str(empty_config), "--set", item])
    assert result.exit_code == 2 and "error: --set" in result.stderr


def test_missing_config_file(runner, in_tmp, tmp_path):
    result = runner.invoke(app, ["train", str(tmp_path / "absent.yaml")])
    assert_one_error_line(result, "absent.yaml", "does not exist")


def test_labels_needed_for_a_conditional_model(runner, empty_config, in_tmp, tmp_path):
    folder = png_folder(tmp_path / "images", count=20)
    args = [*TINY, "--set", f"data.source={folder}", "--set", "model.num_classes=10", "--set", "data.test_images=4"]
    result = runner.invoke(app, ["train", str(empty_config), *args])
    assert_one_error_line(result, "model.num_classes=10 needs labels", str(folder))
    assert list(in_tmp.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# prepare-data


def test_prepare_data_packs_a_folder(runner, tmp_path):
    src, dst = png_folder(tmp_path / "images"), tmp_path / "prepared"
    result = runner.invoke(app, ["prepare-data", str(src), str(dst), "--image-size", "8"])
    assert result.exit_code == 0, result.output
    assert "wrote 6 images of 8x8" in result.stdout
    manifest = json.loads((dst / "manifest.json").read_text())
    assert (manifest["count"], manifest["image_size"], manifest["channels"]) == (6, 8, 1)
    packed = np.load(dst / manifest["shards"][0]["name"], mmap_mode="r")
    assert packed.shape == (6, 8, 8, 1) and packed.dtype == np.uint8
    np.testing.assert_array_equal(load_images(str(dst), 8), load_images(str(src), 8))


def test_prepare_data_refuses_a_corrupt_image_and_writes_nothing(runner, tmp_path):
    src, dst = corrupt_folder(tmp_path / "images"), tmp_path / "prepared"
    result = runner.invoke(app, ["prepare-data", str(src), str(dst), "--image-size", "8"])
    assert_one_error_line(result, "broken.png")
    assert not dst.exists()


def test_prepare_data_refuses_a_tiny_image_size(runner, tmp_path):
    src, dst = png_folder(tmp_path / "images"), tmp_path / "prepared"
    result = runner.invoke(app, ["prepare-data", str(src), str(dst), "--image-size", "1"])
    assert_one_error_line(result, "--image-size must be at least 2, got 1")
    assert not dst.exists()
