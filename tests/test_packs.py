"""trainer.packs: the sharded pack format (writer, manifest, reader), its sha256 checks and the
single-file packs written before it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import s3fs

from trainer import packs
from trainer.packs import (
    MANIFEST_NAME,
    finish_manifest,
    images_per_shard,
    open_pack,
    read_progress,
    record_progress,
    write_shard,
)
from trainer.storage import DataError

FIXTURES = Path(__file__).parent / "fixtures"


def random_images(count: int, size: int = 4, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def write_pack(folder: str, images: np.ndarray, per_shard: int, labels: np.ndarray | None = None) -> dict:
    records = [
        write_shard(folder, index, images[start : start + per_shard],
                    None if labels is None else labels[start : start + per_shard])
        for index, start in enumerate(range(0, len(images), per_shard))
    ]
    return finish_manifest(folder, records, images.shape[1], images.shape[-1], {"source": "test"})


def test_shards_are_plain_npy_files_listed_with_their_sha256(tmp_path):
    images, labels = random_images(10), np.arange(10) % 3
    manifest = write_pack(str(tmp_path), images, per_shard=4, labels=labels)
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["count"] == 10 and manifest["image_size"] == 4 and manifest["channels"] == 3
    for index, shard in enumerate(manifest["shards"]):
        path = tmp_path / shard["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        np.testing.assert_array_equal(np.load(path, mmap_mode="r"), images[4 * index : 4 * index + 4])
        np.testing.assert_array_equal(np.load(tmp_path / shard["labels"]), labels[4 * index : 4 * index + 4])
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == manifest


def test_gather_reads_only_the_shards_holding_the_indices(tmp_path):
    images, labels = random_images(12), np.arange(12)
    write_pack(str(tmp_path), images, per_shard=3, labels=labels)  # shards 0..3 of 3 images
    pack = open_pack(str(tmp_path))
    wanted = [7, 1, 7, 2]  # any order, repeats allowed: shards 0 and 2
    np.testing.assert_array_equal(pack.gather(wanted), images[wanted])
    np.testing.assert_array_equal(pack.labels(wanted), labels[wanted])
    assert sorted(pack.opened) == ["shard-00000.npy", "shard-00002.npy"]
    # the other shards' bytes are never needed: removing them changes nothing for these indices
    (tmp_path / "shard-00001.npy").unlink()
    (tmp_path / "shard-00003.npy").unlink()
    np.testing.assert_array_equal(open_pack(str(tmp_path)).gather([0, 8]), images[[0, 8]])
    with pytest.raises(DataError, match="lacks shard-00001.npy"):
        open_pack(str(tmp_path)).gather([4])


def test_a_damaged_shard_is_refused_by_name(tmp_path):
    write_pack(str(tmp_path), random_images(6), per_shard=2)
    shard = tmp_path / "shard-00001.npy"
    payload = bytearray(shard.read_bytes())
    payload[-1] ^= 0xFF
    shard.write_bytes(bytes(payload))
    pack = open_pack(str(tmp_path))
    pack.gather([0, 1])  # shard 0 is intact
    with pytest.raises(DataError, match=r"shard-00001\.npy of .* does not match its manifest"):
        pack.gather([2])


def test_a_shard_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    write_pack(str(tmp_path), random_images(4, seed=5), per_shard=2)
    hashed = []
    real = packs.file_sha256
    monkeypatch.setattr(packs, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    open_pack(str(tmp_path)).gather([0, 3])
    open_pack(str(tmp_path)).gather([1, 2])  # a second trial in the same process
    assert sorted(hashed) == ["shard-00000.npy", "shard-00001.npy"]
    shard = tmp_path / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes())  # rewritten (same bytes): checked again
    open_pack(str(tmp_path)).gather([0])
    assert hashed.count("shard-00000.npy") == 2


def test_single_file_packs_written_before_shards_still_load(tmp_path):
    """tests/fixtures/single_file_pack was written by the single-file prepare-data (images.npy, labels.npy,
    a manifest with one sha256) from a folder of two classes of three images."""
    pack = open_pack(str(FIXTURES / "single_file_pack"))
    reference = np.load(FIXTURES / "single_file_pack" / "images.npy")
    assert pack.count == 6 and pack.image_shape == (4, 4, 3)
    np.testing.assert_array_equal(pack.read_all(), reference)
    np.testing.assert_array_equal(pack.labels(), [0, 0, 0, 1, 1, 1])
    copy = shutil.copytree(FIXTURES / "single_file_pack", tmp_path / "copy")
    (copy / "images.npy").write_bytes((copy / "images.npy").read_bytes()[:-1] + b"\x00")
    with pytest.raises(DataError, match="images.npy of .* does not match"):
        open_pack(str(copy)).read_all()


def test_progress_keeps_only_shards_that_still_match(tmp_path):
    plan = {"source": "x", "shard_mb": 1}
    done = {i: (write_shard(str(tmp_path), i, random_images(2, seed=i)), {"seen": i}) for i in range(3)}
    record_progress(str(tmp_path), plan, done)
    assert read_progress(str(tmp_path), plan) == done
    assert read_progress(str(tmp_path), {**plan, "shard_mb": 2}) == {}  # other arguments: start over
    (tmp_path / "shard-00001.npy").write_bytes(b"half")
    assert sorted(read_progress(str(tmp_path), plan)) == [0, 2]
    (tmp_path / "shard-00007.npy").write_bytes(b"left by an earlier, larger preparation")
    finish_manifest(str(tmp_path), [done[i][0] for i in range(3)], 4, 3)
    assert not (tmp_path / packs.PROGRESS_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME, *(f"shard-0000{i}.npy" for i in range(3))]


def test_shard_size_follows_the_byte_budget():
    assert images_per_shard(64, 3, 1) == (1 << 20) // (64 * 64 * 3)
    assert images_per_shard(1024, 3, 0.001) == 1  # never empty
    with pytest.raises(DataError, match="--shard-mb"):
        images_per_shard(8, 1, 0)


def test_shards_and_manifest_written_to_s3(s3_bucket, tmp_path):
    images = random_images(5, seed=2)
    manifest = write_pack(f"s3://{s3_bucket}/pack", images, per_shard=2)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert sorted(Path(p).name for p in fs.ls(f"{s3_bucket}/pack")) == [
        MANIFEST_NAME, "shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    fs.get(f"{s3_bucket}/pack/", str(tmp_path / "copy"), recursive=True)
    np.testing.assert_array_equal(open_pack(str(tmp_path / "copy")).read_all(), images)
    assert manifest["count"] == 5


def test_a_single_file_pack_on_s3_loads_with_its_labels(s3_bucket, tmp_path):
    from trainer.data import load_images, load_labels

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for path in (FIXTURES / "single_file_pack").iterdir():
        fs.put_file(str(path), f"{s3_bucket}/old/{path.name}")
    uri, cache = f"s3://{s3_bucket}/old", str(tmp_path / "cache")
    np.testing.assert_array_equal(load_images(uri, 4, cache_dir=cache),
                                  np.load(FIXTURES / "single_file_pack" / "images.npy"))
    np.testing.assert_array_equal(load_labels(uri, cache_dir=cache), [0, 0, 0, 1, 1, 1])
