"""Image folders for tests: one image of each awkward mode (with the colour each must decode to), and
larger mixed collections laid out in class folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# EXIF orientation 6: the stored pixels are shown turned 90 degrees clockwise.
EXIF_ORIENTATION, TURNED_CLOCKWISE = 0x0112, 6


def save(folder: Path, name: str, image: Image.Image, **kwargs) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def mixed_folder(folder: Path) -> dict[str, tuple[float, float, float]]:
    """One image of each awkward kind, and the RGB each must decode to (worked out by hand)."""
    save(folder, "a_rgb.png", Image.new("RGB", (12, 12), (200, 30, 60)))
    save(folder, "b_gray.png", Image.new("L", (12, 12), 100))
    # 16-bit grayscale: 51400 of 65535 is 200.0 of 255 (scaled, not clipped to 255).
    save(folder, "c_gray16.png", Image.fromarray(np.full((12, 12), 51400, dtype=np.uint16)))
    save(folder, "d_palette.png", Image.new("RGB", (12, 12), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE))
    save(folder, "e_rgba.png", Image.new("RGBA", (12, 12), (40, 50, 220, 128)))  # alpha dropped
    save(folder, "f_cmyk.jpg", Image.new("RGB", (12, 12), (220, 120, 20)).convert("CMYK"), quality=95)
    return {
        "a_rgb.png": (200, 30, 60),
        "b_gray.png": (100, 100, 100),
        "c_gray16.png": (200, 200, 200),
        "d_palette.png": (10, 200, 30),
        "e_rgba.png": (40, 50, 220),
        "f_cmyk.jpg": (220, 120, 20),
    }


def mixed_collection(folder: Path, per_class: int, classes: int = 3, seed: int = 0) -> int:
    """`classes` class folders of `per_class` images each, of random sizes and content, cycling through
    RGB, grayscale, 16-bit, palette and RGBA PNGs, CMYK JPEGs and EXIF-turned JPEGs; returns the count."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        for index in range(per_class):
            width, height = (int(side) for side in rng.integers(9, 40, size=2))
            rgb = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
            kind = index % 7
            name = f"class_{label}/{index:04d}"
            if kind == 0:
                save(folder, f"{name}.png", rgb)
            elif kind == 1:
                save(folder, f"{name}.png", rgb.convert("L"))
            elif kind == 2:
                save(folder, f"{name}.png", Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
            elif kind == 3:
                save(folder, f"{name}.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE))
            elif kind == 4:
                save(folder, f"{name}.png", rgb.convert("RGBA"))
            elif kind == 5:
                save(folder, f"{name}.jpg", rgb.convert("CMYK"), quality=90)
            else:
                exif = Image.Exif()
                exif[EXIF_ORIENTATION] = TURNED_CLOCKWISE
                save(folder, f"{name}.jpg", rgb, quality=90, exif=exif)
    return per_class * classes
