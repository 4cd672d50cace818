"""trainer.data: sources, crop/resize, prepared folders, S3 through a real moto server, subsets."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
import torch
from PIL import Image

from tests.support.sweeps import free_port
from trainer.data import DataError, load_images, to_tensor, to_unit
from trainer.prepare import prepare_images
from trainer.subsets import pool_sample, split_subsets

# ---------------------------------------------------------------------------------------------
# helpers


def solid(color: tuple[int, int, int], width: int, height: int, mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (width, height), color)
    return image.convert(mode) if mode != "RGB" else image


def write_folder(folder: Path, images: dict[str, Image.Image]) -> Path:
    for name, image in images.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return folder


def s3() -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


def upload_folder(local: Path, remote: str) -> None:
    fs = s3()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{remote}/{path.relative_to(local).as_posix()}")


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


# ---------------------------------------------------------------------------------------------
# builtin digits


def test_digits_load_as_uint8_full_range():
    images = load_images("digits", 8)
    assert images.shape == (1797, 8, 8, 1)
    assert images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    np.testing.assert_array_equal(load_images("builtin:digits", 8), images)


def test_digits_are_scikit_learns_read_without_importing_it():
    """The bundled table is read directly (no 4 s sklearn import in each trial); it must be exactly
    what `sklearn.datasets.load_digits` returns: levels 0..16 scaled to 0..255, labels aligned."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from trainer.data import load_labels

    reference = load_digits()
    expected = np.rint(reference.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(load_images("digits", 8), expected)
    np.testing.assert_array_equal(load_labels("digits"), reference.target)
    probe = "import sys; from trainer.data import load_images; load_images('digits', 8); print('sklearn' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_digits_upsample_to_16():
    images = load_images("digits", 16)
    assert images.shape == (1797, 16, 16, 1) and images.dtype == np.uint8
    # Resizing keeps the brightness of each digit roughly where it was.
    small = load_images("digits", 8).astype(float).mean(axis=(1, 2, 3))
    assert np.abs(images.astype(float).mean(axis=(1, 2, 3)) - small).mean() < 8


def test_unknown_builtin_lists_the_builtins():
    with pytest.raises(DataError, match=r"'cifar'.*digits"):
        load_images("builtin:cifar", 8)


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as info:
        load_images(str(missing), 8)
    assert str(missing) in str(info.value)


# ---------------------------------------------------------------------------------------------
# arrays


def test_npy_with_and_without_channel_axis(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "rgb.npy", rgb)
    np.testing.assert_array_equal(load_images(str(tmp_path / "rgb.npy"), 8), rgb)
    gray = rgb[..., 0]
    np.save(tmp_path / "gray.npy", gray)
    np.testing.assert_array_equal(load_images(str(tmp_path / "gray.npy"), 8), gray[..., None])
    assert load_images(str(tmp_path / "rgb.npy"), 4).shape == (5, 4, 4, 3)


def test_npz_single_array_or_images_key(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (3, 6, 6, 1), dtype=np.uint8)
    np.savez(tmp_path / "one.npz", whatever=images)
    np.savez(tmp_path / "named.npz", images=images, labels=np.arange(3))
    np.savez(tmp_path / "ambiguous.npz", a=images, b=images)
    np.testing.assert_array_equal(load_images(str(tmp_path / "one.npz"), 6), images)
    np.testing.assert_array_equal(load_images(str(tmp_path / "named.npz"), 6), images)
    with pytest.raises(DataError, match=r"ambiguous\.npz.*\['a', 'b'\].*'images'"):
        load_images(str(tmp_path / "ambiguous.npz"), 6)


@pytest.mark.parametrize(
    ("array", "pattern"),
    [
        (np.zeros((2, 8, 8, 3), np.float32), "dtype float32"),
        (np.zeros((2, 8, 8, 4), np.uint8), r"shape \(2, 8, 8, 4\)"),
        (np.zeros((2, 3, 8, 8), np.uint8), "channels-first"),
        (np.zeros((8, 8), np.uint8), r"shape \(8, 8\)"),
        (np.zeros((0, 8, 8, 3), np.uint8), "no images"),
    ],
)
def test_bad_arrays_are_refused_with_their_name(tmp_path, array, pattern):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=pattern) as info:
        load_images(str(path), 8)
    assert "bad.npy" in str(info.value)


def test_image_size_must_be_positive(tmp_path):
    with pytest.raises(DataError, match="data.image_size=0"):
        load_images("digits", 0)
    with pytest.raises(DataError, match="data.image_size=-4"):
        prepare_images(str(tmp_path), str(tmp_path / "out"), -4)


def test_unsupported_file_type(tmp_path):
    (tmp_path / "data.csv").write_text("1,2,3")
    with pytest.raises(DataError, match=r"data\.csv.*\.csv file"):
        load_images(str(tmp_path / "data.csv"), 8)


# ---------------------------------------------------------------------------------------------
# image folders


def test_folder_of_png_and_jpeg_sorted_by_name(tmp_path):
    write_folder(
        tmp_path / "imgs",
        {"b.png": solid(GREEN, 8, 8), "a.jpg": solid(RED, 8, 8), "sub/c.jpeg": solid(BLUE, 8, 8)},
    )
    (tmp_path / "imgs" / "README.txt").write_text("not an image")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"ignored")
    images = load_images(str(tmp_path / "imgs"), 8)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    dominant = images.reshape(3, -1, 3).mean(axis=1).argmax(axis=1)
    assert dominant.tolist() == [0, 1, 2]  # a.jpg red, b.png green, sub/c.jpeg blue


def test_folder_center_crops_then_resizes(tmp_path):
    # 12 x 8: two red columns either side of a green centre; the centre crop is all green.
    image = np.zeros((8, 12, 3), np.uint8)
    image[:, :2], image[:, 2:10], image[:, 10:] = RED, GREEN, RED
    Image.fromarray(image).save(tmp_path / "wide.png")
    cropped = load_images(str(tmp_path), 8)
    assert (cropped[0] == GREEN).all()
    assert (load_images(str(tmp_path), 4)[0] == GREEN).all()
    assert load_images(str(tmp_path), 16).shape == (1, 16, 16, 3)


def test_grayscale_folder_has_one_channel(tmp_path):
    write_folder(tmp_path, {"a.png": solid(RED, 8, 8, "L"), "b.png": solid(BLUE, 10, 10, "L")})
    assert load_images(str(tmp_path), 8).shape == (2, 8, 8, 1)


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="contains no images") as info:
        load_images(str(tmp_path), 8)
    assert str(tmp_path) in str(info.value)


def test_corrupt_files_are_all_named(tmp_path):
    write_folder(tmp_path, {"good.png": solid(RED, 8, 8)})
    (tmp_path / "garbage.png").write_bytes(b"definitely not a png")
    buffer = tmp_path / "whole.jpg"
    solid(GREEN, 64, 64).save(buffer)
    (tmp_path / "truncated.jpg").write_bytes(buffer.read_bytes()[:200])
    buffer.unlink()
    with pytest.raises(DataError, match="2 unreadable") as info:
        load_images(str(tmp_path), 8)
    assert "garbage.png" in str(info.value) and "truncated.jpg" in str(info.value)
    assert "good.png" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# prepared folders


def test_prepare_crops_mixed_sizes_and_loads_back(tmp_path):
    src = write_folder(
        tmp_path / "src",
        {"a.png": solid(RED, 16, 16), "b.png": solid(GREEN, 20, 12), "c.jpg": solid(BLUE, 8, 8)},
    )
    dst = tmp_path / "prepared"
    manifest = prepare_images(str(src), str(dst), 8)
    assert manifest["count"] == 3 and manifest["image_size"] == 8 and manifest["channels"] == 3
    assert manifest["source"] == str(src)
    (shard,) = manifest["shards"]
    assert shard["sha256"] == hashlib.sha256((dst / shard["name"]).read_bytes()).hexdigest()
    assert json.loads((dst / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in dst.iterdir()) == ["manifest.json", shard["name"]]
    prepared = load_images(str(dst), 8)
    np.testing.assert_array_equal(prepared, load_images(str(src), 8))
    assert load_images(str(dst), 4).shape == (3, 4, 4, 3)


def test_prepare_writes_nothing_when_a_file_is_corrupt(tmp_path):
    src = write_folder(tmp_path / "src", {"fine.png": solid(RED, 8, 8)})
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    dst = tmp_path / "prepared"
    with pytest.raises(DataError, match="broken.png"):
        prepare_images(str(src), str(dst), 8)
    assert not dst.exists()


def test_prepare_packs_mixed_channel_modes_as_rgb_but_refuses_a_broken_file(tmp_path):
    src = write_folder(
        tmp_path / "src",
        {"gray1.png": solid(RED, 8, 8, "L"), "color1.png": solid(RED, 8, 8), "color2.jpg": solid(BLUE, 8, 8)},
    )
    (src / "broken.jpg").write_bytes(b"nope")
    dst = tmp_path / "prepared"
    with pytest.raises(DataError, match="1 unreadable file.*broken.jpg"):
        prepare_images(str(src), str(dst), 8)
    assert not dst.exists()
    (src / "broken.jpg").unlink()
    manifest = prepare_images(str(src), str(dst), 8)  # grayscale repeated over RGB (tests/test_decode.py)
    assert manifest["channels"] == 3 and manifest["conversions"] == {"L->RGB": 1}


def test_prepared_folder_checks_sha256(tmp_path):
    src = write_folder(tmp_path / "src", {"a.png": solid(RED, 8, 8), "b.png": solid(GREEN, 8, 8)})
    dst = tmp_path / "prepared"
    manifest = prepare_images(str(src), str(dst), 8)
    np.save(dst / manifest["shards"][0]["name"], np.zeros((2, 8, 8, 3), np.uint8))  # same shape, other content
    with pytest.raises(DataError, match="does not match its manifest") as info:
        load_images(str(dst), 8)
    assert str(dst) in str(info.value)


def test_prepare_accepts_arrays_too(tmp_path):
    np.save(tmp_path / "x.npy", np.full((4, 10, 10), 7, np.uint8))
    manifest = prepare_images(str(tmp_path / "x.npy"), str(tmp_path / "out"), 8)
    assert manifest["channels"] == 1 and manifest["count"] == 4
    assert (load_images(str(tmp_path / "out"), 8) == 7).all()


# ---------------------------------------------------------------------------------------------
# S3 through moto


def test_npy_on_s3_is_cached(s3_bucket, tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    uri = f"s3://{s3_bucket}/data/x.npy"
    s3().put_file(str(tmp_path / "x.npy"), uri)
    cache = tmp_path / "cache"
    np.testing.assert_array_equal(load_images(uri, 8, cache_dir=str(cache)), images)
    assert [p.name for p in (cache / "data").iterdir()][0].endswith("-x.npy")
    s3().rm(uri)
    np.testing.assert_array_equal(load_images(uri, 8, cache_dir=str(cache)), images)
    with pytest.raises(DataError, match="does not exist"):
        load_images(uri, 8, cache_dir=str(tmp_path / "other-cache"))


def test_image_folder_on_s3_with_cache_from_environment(s3_bucket, tmp_path, monkeypatch):
    local = write_folder(tmp_path / "imgs", {"a.png": solid(RED, 12, 12), "d/b.jpg": solid(BLUE, 8, 8)})
    uri = f"s3://{s3_bucket}/imgs"
    upload_folder(local, uri)
    monkeypatch.setenv("DITSWEEP_CACHE", str(tmp_path / "env-cache"))
    first = load_images(uri, 8)
    np.testing.assert_array_equal(first, load_images(str(local), 8))
    s3().rm(uri, recursive=True)
    np.testing.assert_array_equal(load_images(uri + "/", 8), first)  # trailing slash: same entry
    assert len(list((tmp_path / "env-cache" / "data").iterdir())) == 1


def test_corrupt_remote_folder_is_not_cached(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}/imgs"
    s3().pipe(f"{uri}/bad.png", b"not an image")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"bad\.png") as info:
        load_images(uri, 8, cache_dir=str(cache))
    assert uri in str(info.value)
    assert list((cache / "data").iterdir()) == []  # neither an entry nor a leftover partial download
    s3().rm(f"{uri}/bad.png")
    upload_folder(write_folder(tmp_path / "fixed", {"ok.png": solid(GREEN, 8, 8)}), uri)
    assert load_images(uri, 8, cache_dir=str(cache)).shape == (1, 8, 8, 3)


def test_many_object_folder_on_s3_matches_local_bytes_and_order(s3_bucket, tmp_path, monkeypatch):
    """Fetched concurrently and in slices (4 slices of 64 here), the cached copy holds exactly the
    remote bytes and the images come back in the local folder's sorted order, odd names included."""
    import trainer.storage

    monkeypatch.setattr(trainer.storage, "FETCH_SLICE", 64)
    rng = np.random.default_rng(5)
    images = {
        f"c{i % 3}/{i:04d}{'[x]' if i % 50 == 0 else ''}.png": Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        for i in range(230)
    }
    local = write_folder(tmp_path / "imgs", images)
    uri = f"s3://{s3_bucket}/many"
    upload_folder(local, uri)
    cache = tmp_path / "cache"
    loaded = load_images(uri, 6, cache_dir=str(cache))
    expected = np.stack([np.asarray(Image.open(local / name)) for name in sorted(images)])
    np.testing.assert_array_equal(loaded, expected)
    (entry,) = (cache / "data").iterdir()
    copied = sorted(p.relative_to(entry).as_posix() for p in entry.rglob("*.png"))
    assert copied == sorted(images)
    assert all((entry / name).read_bytes() == (local / name).read_bytes() for name in images)


def test_an_object_that_vanishes_before_its_fetch_is_named(s3_bucket, tmp_path):
    """Listed but gone when fetched (deleted in between): DataError names the source and the file."""
    from trainer.storage import fetch_all

    uri = f"s3://{s3_bucket}/imgs"
    upload_folder(write_folder(tmp_path / "src", {"a.png": solid(RED, 8, 8), "b.png": solid(GREEN, 8, 8)}), uri)
    fs = s3()
    with pytest.raises(DataError, match=r"1 object\(s\).*gone\.png \(missing\)") as info:
        fetch_all(uri, fs, f"{s3_bucket}/imgs", ["a.png", "gone.png", "b.png"], str(tmp_path / "out"))
    assert uri in str(info.value)


def test_prepare_to_s3_and_load_back(s3_bucket, tmp_path):
    local = write_folder(tmp_path / "src", {"a.png": solid(RED, 16, 16), "b.png": solid(GREEN, 8, 12)})
    src = f"s3://{s3_bucket}/raw"
    upload_folder(local, src)
    dst = f"s3://{s3_bucket}/prepared/v1"
    manifest = prepare_images(src, dst, 8)
    assert manifest["source"] == src and manifest["count"] == 2
    assert sorted(s3().ls(dst)) == [f"{s3_bucket}/prepared/v1/manifest.json", f"{s3_bucket}/prepared/v1/shard-00000.npy"]
    assert json.loads(s3().cat(f"{dst}/manifest.json")) == manifest
    loaded = load_images(dst, 8, cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(loaded, load_images(str(local), 8))
    assert [p.name.split("-", 1)[1] for p in (tmp_path / "cache" / "data").iterdir()] == ["v1"]


def test_prepared_on_s3_with_tampered_data_is_refused(s3_bucket, tmp_path):
    local = write_folder(tmp_path / "src", {"a.png": solid(RED, 8, 8)})
    dst = f"s3://{s3_bucket}/prepared"
    prepare_images(str(local), dst, 8)
    np.save(tmp_path / "other.npy", np.zeros((1, 8, 8, 3), np.uint8))
    s3().put_file(str(tmp_path / "other.npy"), f"{dst}/shard-00000.npy")
    with pytest.raises(DataError, match="does not match its manifest") as info:
        load_images(dst, 8, cache_dir=str(tmp_path / "cache"))
    assert dst in str(info.value)
    (entry,) = (tmp_path / "cache" / "data").iterdir()
    assert [p.name for p in entry.iterdir()] == ["manifest.json"]  # the tampered shard is not kept


def test_missing_bucket_names_the_uri(s3_env, tmp_path):
    uri = "s3://no-such-bucket-ditsweep/x.npy"
    with pytest.raises(DataError, match="does not exist") as info:
        load_images(uri, 8, cache_dir=str(tmp_path))
    assert uri in str(info.value)


def test_prepare_into_missing_bucket_names_the_destination(s3_env, tmp_path):
    write_folder(tmp_path / "src", {"a.png": solid(RED, 8, 8)})
    dst = "s3://no-such-bucket-ditsweep/prepared"
    with pytest.raises(DataError) as info:
        prepare_images(str(tmp_path / "src"), dst, 8)
    assert dst in str(info.value)


def test_unreachable_endpoint_names_the_uri_quickly(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    uri = "s3://some-bucket/data/x.npy"
    start = time.monotonic()
    with pytest.raises(DataError, match="cannot access") as info:
        load_images(uri, 8, cache_dir=str(tmp_path))
    assert uri in str(info.value) and "AWS_ENDPOINT_URL" in str(info.value)
    assert time.monotonic() - start < 10


def test_ditsweep_endpoint_overrides_aws_endpoint(s3_env, s3_bucket, tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", np.ones((2, 8, 8, 1), np.uint8))
    uri = f"s3://{s3_bucket}/x.npy"
    s3().put_file(str(tmp_path / "x.npy"), uri)
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    monkeypatch.setenv("DITSWEEP_S3_ENDPOINT", s3_env)
    assert load_images(uri, 8, cache_dir=str(tmp_path / "cache")).shape == (2, 8, 8, 1)


# ---------------------------------------------------------------------------------------------
# subsets


def test_split_is_deterministic_and_nested():
    train_a, test_a = split_subsets(1797, 256, 100, None, shuffle_seed=3)
    train_b, test_b = split_subsets(1797, 256, 100, None, shuffle_seed=3)
    np.testing.assert_array_equal(train_a, train_b)
    np.testing.assert_array_equal(test_a, test_b)
    bigger, _ = split_subsets(1797, 256, 1000, None, shuffle_seed=3)
    np.testing.assert_array_equal(bigger[:100], train_a)  # N=100 is a prefix of N=1000
    assert len(np.unique(bigger)) == 1000


def test_test_set_is_fixed_and_disjoint_from_every_training_subset():
    _, reference = split_subsets(1797, 256, None, None, shuffle_seed=0)
    assert len(reference) == 256 and len(np.unique(reference)) == 256
    seen_train = set()
    for seed in range(4):
        for num_images in (10, 100, 1541):
            train, test = split_subsets(1797, 256, num_images, None, shuffle_seed=seed)
            np.testing.assert_array_equal(test, reference)
            assert not set(train.tolist()) & set(test.tolist())
            assert len(train) == num_images
            seen_train |= set(train.tolist())
    assert seen_train == set(range(1797)) - set(reference.tolist())


def test_seeds_choose_different_subsets():
    first, _ = split_subsets(1797, 256, 100, None, shuffle_seed=0)
    second, _ = split_subsets(1797, 256, 100, None, shuffle_seed=1)
    assert set(first.tolist()) != set(second.tolist())


def test_fraction_of_the_pool():
    train, _ = split_subsets(1000, 100, None, 0.25, shuffle_seed=0)
    assert len(train) == 225
    tiny, _ = split_subsets(1000, 100, None, 1e-6, shuffle_seed=0)
    assert len(tiny) == 1
    everything, _ = split_subsets(1000, 100, None, 1.0, shuffle_seed=0)
    np.testing.assert_array_equal(everything, split_subsets(1000, 100, None, None, shuffle_seed=0)[0])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1797, 256, 5000, None), "data.num_images=5000 but only 1541 images remain after 256 held-out test images"),
        ((1797, 256, 0, None), "data.num_images=0"),
        ((1797, 256, None, 0.0), r"data.fraction=0.0 must be in \(0, 1\]"),
        ((1797, 256, None, 1.5), "data.fraction=1.5"),
        ((1797, 0, 10, None), "data.test_images=0"),
        ((1797, 1797, 10, None), "data.test_images=1797.*1797 images"),
        ((1797, 256, 10, 0.5), r"data.num_images \(10\) or data.fraction \(0.5\), not both"),
    ],
)
def test_split_errors_name_the_value(args, message):
    with pytest.raises(DataError, match=message):
        split_subsets(*args, shuffle_seed=0)


# ---------------------------------------------------------------------------------------------
# model scale


def test_to_tensor_and_back():
    images = np.array([[[[0, 128, 255]]]], np.uint8)  # (1, 1, 1, 3)
    x = to_tensor(images)
    assert x.shape == (1, 3, 1, 1) and x.dtype == torch.float32
    assert x.flatten().tolist() == pytest.approx([-1.0, 128 / 127.5 - 1, 1.0], abs=1e-6)
    assert to_unit(x).flatten().tolist() == pytest.approx([0.0, 128 / 255, 1.0], abs=1e-6)
    assert to_unit(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Disjoint subsets (data.disjoint) and the FID reference sample


def test_disjoint_subsets_of_different_shuffle_seeds_share_no_image():
    _, test = split_subsets(1797, 256, 300, None, shuffle_seed=0)
    shards = [split_subsets(1797, 256, 300, None, shuffle_seed=s, disjoint=True) for s in range(5)]
    trains = [set(train.tolist()) for train, _ in shards]
    assert all(len(train) == 300 for train in trains)
    for i in range(5):
        for j in range(i + 1, 5):
            assert not trains[i] & trains[j]
    assert all(np.array_equal(shard_test, test) for _, shard_test in shards)  # the held-out set never moves
    assert not set().union(*trains) & set(test.tolist())
    again, _ = split_subsets(1797, 256, 300, None, shuffle_seed=2, disjoint=True)
    assert np.array_equal(again, shards[2][0])


def test_disjoint_subsets_by_fraction_and_when_the_pool_runs_out():
    halves = [split_subsets(1000, 100, None, 0.5, shuffle_seed=s, disjoint=True)[0] for s in (0, 1)]
    assert sorted(np.concatenate(halves).tolist()) == sorted(split_subsets(1000, 100, None, None, 0)[0].tolist())
    with pytest.raises(DataError, match=r"holds only 2 such shard.*data.shuffle_seed=2"):
        split_subsets(1000, 100, None, 0.5, shuffle_seed=2, disjoint=True)
    with pytest.raises(DataError, match=r"data.shuffle_seed=1"):
        split_subsets(1000, 100, 600, None, shuffle_seed=1, disjoint=True)


def test_without_disjoint_subsets_overlap_as_before():
    plain = [set(split_subsets(1000, 100, 600, None, shuffle_seed=s)[0].tolist()) for s in (0, 1)]
    assert plain[0] & plain[1]  # two 600-image subsets of a 900-image pool must overlap


def test_the_fid_reference_is_a_fixed_sample_of_the_pool():
    _, test = split_subsets(1797, 256, None, None, shuffle_seed=0)
    reference = pool_sample(1797, 256, 500)
    assert len(reference) == 500 and len(set(reference.tolist())) == 500
    assert not set(reference.tolist()) & set(test.tolist())
    assert np.array_equal(reference, pool_sample(1797, 256, 500))
    assert len(pool_sample(1797, 256, 10_000)) == 1797 - 256  # at most the whole pool
