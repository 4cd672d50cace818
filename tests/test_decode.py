"""Image folders as researchers hold them (issue #26): every mode, EXIF orientation, class folders,
unreadable files, and the ADM/DiT resize, each checked pixel by pixel against values worked out here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.images import mixed_folder, save
from trainer.data import DataError, load_images, load_labels
from trainer.prepare import prepare_images
from trainer.decode import center_crop_resize

ROOT = Path(__file__).resolve().parents[1]


def pixel(images: np.ndarray, index: int) -> np.ndarray:
    """Mean colour of one decoded image (all solid here)."""
    return images[index].reshape(-1, images.shape[-1]).mean(axis=0)


def test_a_mixed_mode_folder_packs_with_every_image_converted(tmp_path):
    expected = mixed_folder(tmp_path / "src")
    manifest = prepare_images(str(tmp_path / "src"), str(tmp_path / "out"), 8)
    images = load_images(str(tmp_path / "out"), 8)
    assert images.shape == (6, 8, 8, 3) and manifest["channels"] == 3
    for index, (name, rgb) in enumerate(sorted(expected.items())):
        tolerance = 6 if name.endswith(".jpg") else 0.5  # JPEG's chroma rounding; PNGs are exact
        np.testing.assert_allclose(pixel(images, index), rgb, atol=tolerance, err_msg=name)
    assert manifest["conversions"] == {
        "CMYK->RGB": 1, "I;16->L->RGB": 1, "L->RGB": 1, "P->RGB": 1, "RGBA->RGB": 1,
    } or manifest["conversions"] == {  # Pillow may open a 16-bit PNG as mode I
        "CMYK->RGB": 1, "I->L->RGB": 1, "L->RGB": 1, "P->RGB": 1, "RGBA->RGB": 1,
    }


def test_channels_1_makes_every_image_grayscale_by_luma(tmp_path):
    expected = mixed_folder(tmp_path / "src")
    prepare_images(str(tmp_path / "src"), str(tmp_path / "out"), 8, channels=1)
    images = load_images(str(tmp_path / "out"), 8)
    assert images.shape == (6, 8, 8, 1)
    for index, (name, (r, g, b)) in enumerate(sorted(expected.items())):
        luma = r * 299 / 1000 + g * 587 / 1000 + b * 114 / 1000  # ITU-R 601-2
        np.testing.assert_allclose(pixel(images, index), [luma], atol=7 if name.endswith(".jpg") else 1, err_msg=name)


def test_all_grayscale_folder_stays_one_channel(tmp_path):
    save(tmp_path, "a.png", Image.new("L", (8, 8), 10))
    save(tmp_path, "b.png", Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)))
    images = load_images(str(tmp_path), 8)
    assert images.shape == (2, 8, 8, 1)
    assert pixel(images, 0)[0] == 10 and pixel(images, 1)[0] == 255


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((16, 16, 3), np.uint8)
    stored[:8], stored[8:] = (255, 0, 0), (0, 255, 0)  # red on top, green below, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    save(tmp_path / "src", "turned.png", Image.fromarray(stored), exif=exif)
    manifest = prepare_images(str(tmp_path / "src"), str(tmp_path / "out"), 16)
    shown = load_images(str(tmp_path / "out"), 16)[0]
    np.testing.assert_array_equal(shown, np.rot90(stored, k=-1))  # clockwise: red now on the right
    assert manifest["exif_rotated"] == 1


def reference_adm_resize(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center_crop_arr (Dhariwal & Nichol 2021, kept by DiT), step by step."""
    width, height = image.size
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
        image = image.resize((width, height), resample=Image.Resampling.BOX)
    scale = size / min(width, height)
    image = image.resize((round(width * scale), round(height * scale)), resample=Image.Resampling.BICUBIC)
    array = np.array(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


@pytest.mark.parametrize("width, height, size", [(100, 70, 16), (70, 100, 16), (33, 40, 16), (12, 9, 16), (64, 64, 32)])
def test_resize_is_adms_box_then_bicubic_center_crop(width, height, size):
    rng = np.random.default_rng(width * height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(center_crop_resize(image, size)), reference_adm_resize(image, size))


def test_class_folders_give_labels_and_class_names(tmp_path):
    for name, color in (("dog/x.png", 10), ("cat/b.png", 20), ("cat/a.png", 30), ("emu/z.jpg", 40)):
        save(tmp_path / "src", name, Image.new("RGB", (8, 8), (color, color, color)))
    manifest = prepare_images(str(tmp_path / "src"), str(tmp_path / "out"), 8)
    assert manifest["classes"] == ["cat", "dog", "emu"]
    # sorted paths: cat/a, cat/b, dog/x, emu/z
    assert load_labels(str(tmp_path / "out")).tolist() == [0, 0, 1, 2]
    assert load_labels(str(tmp_path / "src")).tolist() == [0, 0, 1, 2]  # the folder itself, unprepared
    assert [round(pixel(load_images(str(tmp_path / "out"), 8), i)[0]) for i in range(4)] == [30, 20, 10, 40]


def test_a_flat_folder_has_no_labels(tmp_path):
    save(tmp_path, "a.png", Image.new("RGB", (8, 8)))
    save(tmp_path, "sub/deeper/b.png", Image.new("RGB", (8, 8)))
    assert load_labels(str(tmp_path)) is None


def broken_folder(folder: Path) -> None:
    save(folder, "good.png", Image.new("RGB", (8, 8), (1, 2, 3)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")


def test_unreadable_files_refuse_by_default_and_are_listed_when_skipped(tmp_path):
    broken_folder(tmp_path / "src")
    with pytest.raises(DataError, match=r"broken\.png.*--skip-unreadable"):
        prepare_images(str(tmp_path / "src"), str(tmp_path / "refused"), 8)
    assert not (tmp_path / "refused").exists()
    manifest = prepare_images(str(tmp_path / "src"), str(tmp_path / "out"), 8, skip_unreadable=True)
    assert manifest["count"] == 1 and list(manifest["skipped"]) == ["broken.png"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["skipped"] == manifest["skipped"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_prepare_data_command_skips_and_names_unreadable_files(tmp_path):
    broken_folder(tmp_path / "src")
    result = run_cli("prepare-data", str(tmp_path / "src"), str(tmp_path / "out"), "--image-size", "8",
                     "--skip-unreadable", "--channels", "1")
    assert result.returncode == 0, result.stderr
    assert "skipped broken.png" in result.stderr and "1 unreadable skipped" in result.stdout
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["channels"] == 1
    refused = run_cli("prepare-data", str(tmp_path / "src"), str(tmp_path / "bad"), "--channels", "2")
    assert refused.returncode == 2 and "--channels must be 1 or 3" in refused.stderr
    assert not (tmp_path / "bad").exists()
