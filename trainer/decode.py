"""Image files to uint8 arrays, as the paper's data pipeline sees them.

One job: a folder of image files (PNG or JPEG, any mode) -> (N, size, size, C) uint8, with what was
done to get there. `trainer.data` decides where the files come from (local, S3, cache) and what is
kept; this module only decodes.

- **Every mode** is read as grayscale (L) or colour (RGB): palette, RGBA, LA, CMYK, YCbCr, 1-bit and
  16-bit images are converted (16-bit values scaled by 255/65535, not clipped; alpha dropped, as
  PIL's `convert("RGB")` and torchvision's ImageFolder do); the EXIF orientation is applied first.
- **Channels**: a folder becomes one channel count. By default RGB when any image is colour (a
  grayscale image is repeated over the three channels), grayscale when all are; `channels=1` makes
  every image grayscale (ITU-R 601-2 luma, PIL's L conversion), `channels=3` every image RGB.
- **Resize** (`center_crop_resize`): the preprocessing of ADM (Dhariwal & Nichol 2021) that DiT
  (Peebles & Xie 2023) kept for ImageNet: halve with a box filter while the short side is at least
  twice the target, resize with bicubic so the short side equals the target, then crop the centre.
  FID against published reference statistics assumes this preprocessing.
- **Class folders**: images in first-level subfolders (``class_name/xxx.JPEG``, ImageNet's layout)
  get the index of their folder among the sorted folder names as their class label.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

# EXIF orientation tag; 1 (or none) means the pixels are stored the way they are shown.
_ORIENTATION = 0x0112
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class UnreadableImage(ValueError):
    """A file that is not an image PIL can decode; the message says why."""


@dataclass
class DecodedFolder:
    """The images of a folder, in the order of `names`, and what decoding did to them."""

    images: np.ndarray  # (N, size, size, C) uint8
    names: list[str]  # relative paths, sorted
    conversions: dict[str, int] = field(default_factory=dict)  # "CMYK->RGB": count
    rotated: int = 0  # images turned upright by their EXIF orientation
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable name -> why (with skip_unreadable)
    classes: list[str] | None = None  # class folder names, when every image sits in one
    labels: np.ndarray | None = None  # int64 (N,) index into classes

    def summary(self) -> dict:
        """The manifest's record of the decoding."""
        record = {
            "preprocessing": "EXIF orientation; box halving then bicubic resize, center crop (ADM/DiT)",
            "conversions": dict(sorted(self.conversions.items())),
            "exif_rotated": self.rotated,
            "skipped": dict(sorted(self.skipped.items())),
        }
        if self.classes is not None:
            record["classes"] = self.classes
        return record


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """ADM's / DiT's resize: box-halve while the short side >= 2 * size, bicubic to short side = size,
    crop the centre size x size."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def upright_l_or_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """`image` turned by its EXIF orientation and read as L or RGB; and whether it was turned."""
    orientation = image.getexif().get(_ORIENTATION, 1)
    if orientation not in (None, 1):
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("L", "RGB"):
        return image, orientation not in (None, 1)
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        # 16-bit images (and 32-bit ones holding 16-bit values) span 0..65535: scale, do not clip.
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
    elif mode in _GRAY_MODES:  # 1, LA
        image = image.convert("L")
    elif mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA").convert("RGB")
    else:  # P, RGBA, CMYK, YCbCr, LAB, HSV, RGBX...
        image = image.convert("RGB")
    return image, orientation not in (None, 1)


def reads_as_gray(mode: str) -> bool:
    """Whether a file of PIL mode `mode` is read as grayscale (L) by `upright_l_or_rgb` (else RGB)."""
    return mode in _GRAY_MODES or mode.startswith("I")


def file_mode(path: str | BinaryIO) -> str:
    """The PIL mode of an image file, from its header alone (no pixels decoded)."""
    try:
        with Image.open(path) as image:
            return image.mode
    except Exception as err:  # noqa: BLE001 - any failure to parse the header means "unusable"
        raise UnreadableImage(f"{type(err).__name__}: {err}") from err


def decode_file(path: str | BinaryIO, size: int) -> tuple[np.ndarray, str, bool]:
    """(size, size, 1 or 3) uint8 of one file, its original mode, and whether EXIF turned it."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            upright, rotated = upright_l_or_rgb(image)
            array = np.asarray(center_crop_resize(upright, size), dtype=np.uint8)
    except Exception as err:  # noqa: BLE001 - any decoder failure means "this file is unusable"
        raise UnreadableImage(f"{type(err).__name__}: {err}") from err
    return (array[..., None] if array.ndim == 2 else array), mode, rotated


def to_channels(images: list[np.ndarray], channels: int) -> list[np.ndarray]:
    """Each (H, W, 1|3) array as `channels` channels: gray repeated to RGB, or RGB to luma."""
    out = []
    for image in images:
        if image.shape[-1] == channels:
            out.append(image)
        elif channels == 3:
            out.append(np.repeat(image, 3, axis=-1))
        else:
            out.append(np.asarray(Image.fromarray(image).convert("L"), dtype=np.uint8)[..., None])
    return out


def name_some(problems: dict[str, str], most: int = 5) -> str:
    """'a.png (why), b.png (why) and 3 more': the first `most` of `problems` (name -> why) for a message."""
    listed = ", ".join(f"{name} ({why})" for name, why in list(problems.items())[:most])
    return listed + (f" and {len(problems) - most} more" if len(problems) > most else "")


def class_folders(names: list[str]) -> tuple[list[str], np.ndarray] | None:
    """(sorted class names, int64 labels) when every name is ``class/file``; else None."""
    parts = [name.split("/") for name in names]
    if not parts or any(len(p) != 2 for p in parts):
        return None
    classes = sorted({p[0] for p in parts})
    index = {name: i for i, name in enumerate(classes)}
    return classes, np.array([index[p[0]] for p in parts], dtype=np.int64)


def decode_folder(folder: str, names: list[str], size: int, channels: int | None = None,
                  skip_unreadable: bool = False) -> DecodedFolder:
    """Decode `names` (relative to `folder`). Unreadable files raise UnreadableImage naming them all,
    unless `skip_unreadable`, when they are left out and listed in `skipped`."""
    return decode_items(names, lambda name: os.path.join(folder, name), size, channels, skip_unreadable)


def decode_items(names: list[str], open_item: Callable[[str], str | BinaryIO], size: int,
                 channels: int | None = None, skip_unreadable: bool = False) -> DecodedFolder:
    """`decode_folder` for images that are not files of one folder: `open_item(name)` gives a path or a
    binary file object (an LMDB value, a Parquet cell). With `channels` given, an empty result is allowed."""
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 or 3 (or None for the folder's own), got {channels!r}")
    arrays, kept, skipped, conversions, rotated = [], [], {}, Counter(), 0
    for name in names:
        try:
            array, mode, turned = decode_file(open_item(name), size)
        except UnreadableImage as err:
            skipped[name] = str(err)
            continue
        arrays.append(array)
        kept.append((name, mode))
        rotated += turned
    if skipped and not skip_unreadable:
        raise UnreadableImage(
            f"{len(skipped)} unreadable file(s): {name_some(skipped)}; fix or remove them, or pass --skip-unreadable"
        )
    if not arrays and channels is None:
        raise UnreadableImage(f"none of the {len(names)} image file(s) could be read")
    target = channels or (3 if any(a.shape[-1] == 3 for a in arrays) else 1)
    final = "RGB" if target == 3 else "L"
    for (_, mode), array in zip(kept, arrays):
        natural = "RGB" if array.shape[-1] == 3 else "L"  # what the file was read as
        if mode != final:  # e.g. "CMYK->RGB", "L->RGB", or through the mode read: "I;16->L->RGB"
            conversions[f"{mode}->{final}" if natural in (mode, final)
                        else f"{mode}->{natural}->{final}"] += 1
    kept_names = [name for name, _ in kept]
    decoded = DecodedFolder(
        images=np.stack(to_channels(arrays, target)) if arrays else np.empty((0, size, size, target), np.uint8),
        names=kept_names, conversions=dict(conversions),
        rotated=rotated, skipped=skipped,
    )
    found = class_folders(kept_names)
    if found is not None:
        decoded.classes, decoded.labels = found
    return decoded
