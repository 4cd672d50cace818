"""prepare-data's sharded packs (issue #26): shards of bounded size, a killed preparation that resumes
byte for byte without rewriting finished shards, and a trial that reads only the shards it needs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.sweeps import ditsweep, tiny_config
from trainer.config import build_config
from trainer.data import DataError, load_images, load_labels
from trainer.packs import MANIFEST_NAME, PROGRESS_NAME
from trainer.prepare import prepare_images
from trainer.subsets import split_subsets
from trainer.pool import PoolCache, load_subsets

ROOT = Path(__file__).resolve().parents[1]
PER_SHARD_MB = 21 * 8 * 8 * 3 / (1 << 20)  # 21 images of 8x8 RGB a shard


def noise_folder(folder: Path, count: int, side: int = 24, classes: int = 0, seed: int = 0) -> Path:
    """`count` PNGs of random pixels (in `classes` class folders when > 0)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        name = f"c{i % classes}/{i:04d}.png" if classes else f"{i:04d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / name)
    return folder


def folder_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_shards_hold_at_most_shard_mb_and_load_back_in_order(tmp_path):
    src = noise_folder(tmp_path / "src", 50, classes=3)
    lines = []
    manifest = prepare_images(str(src), str(tmp_path / "pack"), 8, shard_mb=PER_SHARD_MB, progress=lines.append)
    assert [s["count"] for s in manifest["shards"]] == [21, 21, 8]
    assert all((tmp_path / "pack" / s["name"]).stat().st_size <= 21 * 192 + 128 for s in manifest["shards"])  # + header
    np.testing.assert_array_equal(load_images(str(tmp_path / "pack"), 8), load_images(str(src), 8))
    np.testing.assert_array_equal(load_labels(str(tmp_path / "pack")), [0] * 17 + [1] * 17 + [2] * 16)
    assert manifest["classes"] == ["c0", "c1", "c2"]
    assert len(lines) == 3 and lines[-1].startswith("shard 3/3 written: 50/50 images") and "ETA" in lines[0]
    assert not (tmp_path / "pack" / PROGRESS_NAME).exists()


def test_a_bad_shard_size_is_refused_before_anything_is_written(tmp_path):
    noise_folder(tmp_path / "src", 2)
    result = ditsweep("prepare-data", str(tmp_path / "src"), str(tmp_path / "pack"), "--image-size", "8",
                      "--shard-mb", "0", cwd=ROOT)
    assert result.returncode == 2 and "--shard-mb must be positive" in result.stderr
    assert not (tmp_path / "pack").exists()


def test_an_undecodable_file_found_in_a_later_shard_stops_without_a_manifest_and_resumes(tmp_path):
    src = noise_folder(tmp_path / "src", 30)
    (src / "0025.png").write_bytes((src / "0025.png").read_bytes()[:80])  # header intact, pixels cut off
    with pytest.raises(DataError, match=r"0025\.png.*the same command resumes"):
        prepare_images(str(src), str(tmp_path / "pack"), 8, shard_mb=PER_SHARD_MB)
    assert sorted(p.name for p in (tmp_path / "pack").iterdir()) == [PROGRESS_NAME, "shard-00000.npy"]
    with pytest.raises(DataError, match="no manifest.json: its preparation did not finish"):
        load_images(str(tmp_path / "pack"), 8)  # no trial reads incomplete data
    manifest = prepare_images(str(src), str(tmp_path / "pack"), 8, shard_mb=PER_SHARD_MB, skip_unreadable=True)
    assert manifest["count"] == 29 and list(manifest["skipped"]) == ["0025.png"]


@pytest.mark.slow
def test_a_killed_preparation_resumes_byte_identical_without_rewriting_finished_shards(tmp_path):
    src = noise_folder(tmp_path / "src", 420, side=96, classes=4)  # 20 shards, slow enough to kill mid-way
    reference = tmp_path / "reference"
    prepare_images(str(src), str(reference), 8, shard_mb=PER_SHARD_MB)  # uninterrupted
    args = ["--image-size", "8", "--shard-mb", str(PER_SHARD_MB)]

    out = tmp_path / "pack"
    command = [sys.executable, "-m", "orchestrator.cli", "prepare-data", str(src), str(out), *args]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    # the first shard written and recorded (its file, then the progress file naming it)
    while not (out / PROGRESS_NAME).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGSTOP)  # frozen where it stands, then killed: nothing more is written
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert not (out / MANIFEST_NAME).exists(), "the preparation finished before it could be killed"
    recorded = json.loads((out / PROGRESS_NAME).read_text())["shards"]
    shards = sorted(p.name for p in out.glob("shard-*.npy") if not p.name.endswith(".labels.npy"))
    assert 1 <= len(recorded) and len(shards) < 20, f"killed after {len(shards)} of 20 shards"
    finished = {e["shard"][k]: (out / e["shard"][k]).stat() for e in recorded.values() for k in ("name", "labels")}

    result = ditsweep("prepare-data", str(src), str(out), *args, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {len(recorded)} of 20 shard(s) already written" in result.stderr
    assert "ETA" in result.stderr
    assert folder_files(out) == folder_files(reference)
    for name, before in finished.items():
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), f"{name} was rewritten"


def test_a_trial_reads_only_the_shards_of_its_subset_and_held_out_set(tmp_path, monkeypatch):
    """Every shard the trial does not need is deleted after preparation: loading the whole pool would
    fail on the first of them; the trial's images must still equal the pool's at its indices."""
    images = np.random.default_rng(4).integers(0, 256, (400, 8, 8, 1), dtype=np.uint8)
    np.save(tmp_path / "pool.npy", images)
    manifest = prepare_images(str(tmp_path / "pool.npy"), str(tmp_path / "pack"), 8, shard_mb=10 * 64 / (1 << 20))
    assert len(manifest["shards"]) == 40  # 10 images a shard
    config = build_config(tiny_config({"data.source": str(tmp_path / "pack"), "data.num_images": 6,
                                       "data.test_images": 5}))
    train_idx, test_idx = split_subsets(400, 5, 6, None, config.data.shuffle_seed)
    needed = {f"shard-{i // 10:05d}.npy" for i in [*train_idx, *test_idx]}
    for shard in manifest["shards"]:
        if shard["name"] not in needed:
            (tmp_path / "pack" / shard["name"]).unlink()

    cache = PoolCache()
    monkeypatch.setattr("trainer.pool.POOLS", cache)
    subsets = load_subsets(config, torch.device("cpu"))
    assert sorted(cache.get(config).images.opened) == sorted(needed)
    np.testing.assert_array_equal(subsets.train.permute(0, 2, 3, 1).numpy(), images[train_idx])
    np.testing.assert_array_equal(subsets.test.permute(0, 2, 3, 1).numpy(), images[test_idx])


class Interrupted(Exception):
    pass


def test_a_preparation_from_s3_interrupted_after_a_shard_resumes_there(tmp_path, s3_bucket):
    """A remote source is downloaded again on restart, but its objects (names, sizes, ETags) are what
    the progress file's plan names, so the shards already written are kept."""
    import s3fs

    src = noise_folder(tmp_path / "src", 50)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for path in sorted(src.iterdir()):
        fs.put_file(str(path), f"{s3_bucket}/raw/{path.name}")
    uri, out = f"s3://{s3_bucket}/raw", tmp_path / "pack"

    def stop_after_first(line: str) -> None:
        raise Interrupted(line)

    with pytest.raises(Interrupted, match="shard 1/3 written"):
        prepare_images(uri, str(out), 8, shard_mb=PER_SHARD_MB, progress=stop_after_first)
    assert not (out / MANIFEST_NAME).exists()
    first = (out / "shard-00000.npy").stat()
    lines = []
    prepare_images(uri, str(out), 8, shard_mb=PER_SHARD_MB, progress=lines.append)
    assert lines[0] == "resuming: 1 of 3 shard(s) already written and intact"
    assert (out / "shard-00000.npy").stat().st_ino == first.st_ino
    prepare_images(str(src), str(tmp_path / "local"), 8, shard_mb=PER_SHARD_MB)
    assert {n: b for n, b in folder_files(out).items() if n != MANIFEST_NAME} == {
        n: b for n, b in folder_files(tmp_path / "local").items() if n != MANIFEST_NAME}
