"""Images inside container files (issue #26): a folder of Parquet files (Hugging Face datasets' on-disk
form) and LSUN's LMDB export, packed by prepare-data locally and from S3; pixels checked against the
solid colours written."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from PIL import Image

from trainer.data import DataError, load_images, load_labels
from trainer.prepare import prepare_images

COLOURS = [(200, 30, 60), (10, 200, 30), (40, 50, 220), (250, 250, 0), (0, 120, 120)]
CLASSES = ["cat", "dog"]


def encoded(colour: tuple[int, int, int], size: tuple[int, int] = (12, 10), kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, kind)
    return buffer.getvalue()


def hugging_face_folder(folder: Path) -> Path:
    """COLOURS as two Parquet files the way `datasets` writes them: an Image struct and a ClassLabel."""
    features = {"image": {"_type": "Image"}, "label": {"names": CLASSES, "_type": "ClassLabel"}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    (folder / "data").mkdir(parents=True)
    for part, rows in enumerate([COLOURS[:3], COLOURS[3:]]):
        start = 3 * part
        table = pa.table({
            "image": pa.array([{"bytes": encoded(c), "path": f"{start + i}.png"} for i, c in enumerate(rows)], struct),
            "label": pa.array([(start + i) % 2 for i in range(len(rows))], pa.int64()),
        }).replace_schema_metadata(metadata)
        pq.write_table(table, folder / "data" / f"train-{part:05d}-of-00002.parquet")
    return folder


def mean_colours(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1, images.shape[-1]).mean(axis=1)


def test_a_hugging_face_parquet_folder_packs_with_labels_and_class_names(tmp_path):
    src = hugging_face_folder(tmp_path / "hf")
    manifest = prepare_images(str(src), str(tmp_path / "pack"), 8)
    assert manifest["count"] == 5 and manifest["classes"] == CLASSES
    images = load_images(str(tmp_path / "pack"), 8)
    np.testing.assert_allclose(mean_colours(images), COLOURS, atol=0.5)
    np.testing.assert_array_equal(load_labels(str(tmp_path / "pack")), [0, 1, 0, 1, 0])
    # read directly as a data.source, without preparing
    np.testing.assert_array_equal(load_images(str(src), 8), images)
    np.testing.assert_array_equal(load_labels(str(src)), [0, 1, 0, 1, 0])


def test_a_plain_binary_column_is_the_image_column(tmp_path):
    (tmp_path / "plain").mkdir()
    table = pa.table({"id": pa.array([7, 8]), "png": pa.array([encoded(c) for c in COLOURS[:2]], pa.binary())})
    pq.write_table(table, tmp_path / "plain" / "part.parquet")
    np.testing.assert_allclose(mean_colours(load_images(str(tmp_path / "plain"), 8)), COLOURS[:2], atol=0.5)
    assert load_labels(str(tmp_path / "plain")) is None


def test_a_parquet_file_without_an_image_column_is_named(tmp_path):
    (tmp_path / "bad").mkdir()
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), tmp_path / "bad" / "only-numbers.parquet")
    with pytest.raises(DataError, match=r"only-numbers\.parquet .* no image column"):
        prepare_images(str(tmp_path / "bad"), str(tmp_path / "pack"), 8)
    assert not (tmp_path / "pack").exists()


def test_a_parquet_folder_on_s3_packs_like_the_local_one(tmp_path, s3_bucket):
    src = hugging_face_folder(tmp_path / "hf")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for path in sorted(src.rglob("*.parquet")):
        fs.put_file(str(path), f"{s3_bucket}/hf/{path.relative_to(src).as_posix()}")
    local = prepare_images(str(src), str(tmp_path / "local"), 8)
    remote = prepare_images(f"s3://{s3_bucket}/hf", f"s3://{s3_bucket}/pack", 8)
    assert remote["shards"] == local["shards"]
    np.testing.assert_array_equal(load_images(f"s3://{s3_bucket}/pack", 8, cache_dir=str(tmp_path / "cache")),
                                  load_images(str(tmp_path / "local"), 8))


@pytest.mark.skipif(importlib.util.find_spec("lmdb") is None, reason="the optional lmdb package is not installed")
def test_an_lsun_lmdb_export_packs(tmp_path):
    import lmdb

    folder = tmp_path / "bedroom_train_lmdb"
    with lmdb.open(str(folder), map_size=1 << 24) as env, env.begin(write=True) as txn:
        for i, colour in enumerate(COLOURS):  # LSUN stores WebP (older exports JPEG) under hex ids
            txn.put(f"{i:040x}".encode(), encoded(colour, kind="WEBP" if i % 2 else "PNG"))
    manifest = prepare_images(str(folder), str(tmp_path / "pack"), 8)
    assert manifest["count"] == 5
    np.testing.assert_allclose(mean_colours(load_images(str(tmp_path / "pack"), 8)), COLOURS, atol=4)


def test_without_lmdb_an_lmdb_folder_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdb", None)  # as if not installed: `import lmdb` raises ImportError
    (tmp_path / "bedroom_train_lmdb").mkdir()
    (tmp_path / "bedroom_train_lmdb" / "data.mdb").write_bytes(b"\0" * 64)
    with pytest.raises(DataError, match=r"ditsweep\[lmdb\]"):
        prepare_images(str(tmp_path / "bedroom_train_lmdb"), str(tmp_path / "pack"), 8)
