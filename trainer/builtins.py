"""The builtin data sets: scikit-learn's digits and patches of its two sample photographs.

Both are read from scikit-learn's package files, never downloaded, and without importing scikit-learn
(its import costs every trial process about 4 s of CPU).
- ``digits`` (or ``builtin:digits``): 1,797 8x8 handwritten digits, grayscale, with labels 0-9.
- ``natural`` / ``natural-gray``: patches of china.jpg and flower.jpg at data.image_size 16 or 32, RGB or
  grayscale, the held-out ones cut from stripes of their own (see "Natural patches" below).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.storage import DataError


def builtin_images(name: str, image_size: int) -> np.ndarray:
    """The images of builtin `name` as uint8 (N, S, S, C): natural patches cut at image_size, digits at 8x8
    (the caller resizes)."""
    if name in _PATCH_BUILTINS:
        return natural_patches(image_size, gray=_PATCH_BUILTINS[name])
    return _BUILTINS[name]()


def builtin_labels(name: str) -> np.ndarray | None:
    """int labels of builtin `name`, or None when it has none."""
    loader = _BUILTIN_LABELS.get(name)
    return None if loader is None else loader()


def builtin_name(source: str) -> str | None:
    name = source.removeprefix("builtin:")
    if name in _BUILTINS or name in _PATCH_BUILTINS:
        return name
    if source.startswith("builtin:"):
        raise DataError(f"unknown builtin data set {name!r} in {source!r}; builtins: {', '.join(builtin_names())}")
    return None


def builtin_names() -> list[str]:
    return [*_BUILTINS, *_PATCH_BUILTINS]


def builtin_shape(name: str) -> tuple[int, int]:
    """(images, channels) of a builtin; for the natural patches the count at their smallest size (the
    most patches), an upper bound for any data.image_size."""
    if name in _PATCH_BUILTINS:
        return len(natural_patch_boxes(min(NATURAL_SIZES))), 1 if _PATCH_BUILTINS[name] else 3
    images = _BUILTINS[name]()  # builtins are small at their native size
    return len(images), images.shape[-1]


@functools.lru_cache(maxsize=1)
def _digits_table() -> np.ndarray:
    """scikit-learn's digits as its bundled table (1,797 rows: 64 pixel levels 0..16, then the label).

    Read from the package's data file without importing scikit-learn, whose import costs about 4 s of
    CPU in every trial process; `sklearn.datasets.load_digits` (which reads this same file) is the
    fallback should a release move it."""
    spec = importlib.util.find_spec("sklearn")
    bundled = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if bundled is not None and bundled.is_file():
        with gzip.open(bundled, "rt") as rows:
            table = np.loadtxt(rows, delimiter=",", dtype=np.int64)
    else:
        from sklearn.datasets import load_digits  # no download either way

        bunch = load_digits()
        table = np.column_stack([bunch.data.astype(np.int64), bunch.target])
    table.flags.writeable = False  # shared by every caller
    return table


def _load_digits() -> np.ndarray:
    levels = _digits_table()[:, :64].reshape(-1, 8, 8)  # (1797, 8, 8), levels 0..16
    return np.rint(levels * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (N, 8, 8, 1)


def _load_digit_labels() -> np.ndarray:
    return _digits_table()[:, 64].copy()  # (1797,) ints 0..9, aligned with _load_digits


_BUILTINS: dict[str, Callable[[], np.ndarray]] = {"digits": _load_digits}
_BUILTIN_LABELS: dict[str, Callable[[], np.ndarray]] = {"digits": _load_digit_labels}


# ---------------------------------------------------------------------------------------------
# Natural patches: tiles of the two photographs scikit-learn ships (china.jpg, flower.jpg, 640x427 RGB,
# CC BY 2.0, see sklearn/datasets/images/README.txt), read from the package's files (no download, and
# no scikit-learn import, whose cost every trial process would pay).
#
# Each photograph is cut into vertical stripes, so that training and held-out patches sample the same
# scenes (sky, roof, petals, background) rather than two different parts of a photograph: every
# NATURAL_STRIPE_PERIOD columns hold a training stripe [0, 64), a gap of 16 columns, a held-out stripe
# [80, 112) and another gap of 16 (640 columns = 5 periods). Each stripe is tiled with non-overlapping
# patches of image_size x image_size (stride = image_size, from the stripe's top-left corner; leftover
# rows are dropped), so every patch is independent of the others and no held-out patch shares a pixel
# with a training patch, nor touches one (16 columns lie between them). Training patches do not overlap
# one another either. The array holds the training patches first (photo by photo, row by row), then
# the held-out ones (`held_out_region` says how many): `split_subsets` draws data.test_images from
# those and the training subsets from the others.
#
#   image_size   training patches     held-out patches    nested N it supports (doubling)
#   16           2 x 5 x 4 x 26 = 1040   2 x 5 x 2 x 26 = 520   up to 1024
#   32           2 x 5 x 2 x 13 = 260    2 x 5 x 1 x 13 = 130   up to 256
#   (photos x periods x patches across a stripe x rows)
#
# The patches are cut at the photographs' own resolution (no resampling): flat sky and blurred
# background give some near-uniform patches, as natural images do.

NATURAL_PHOTOS = ("china.jpg", "flower.jpg")
NATURAL_SIZES = (16, 32)
NATURAL_STRIPE_PERIOD = 128
# [left, right) columns within each period; the 16 columns between them keep the two sets apart
NATURAL_STRIPES = {False: (0, 64), True: (80, 112)}  # held_out -> stripe


@dataclass(frozen=True)
class PatchBox:
    """Where a natural patch comes from: the photograph, its top-left pixel and its side."""

    photo: str
    top: int
    left: int
    size: int
    held_out: bool


def natural_patch_boxes(image_size: int) -> list[PatchBox]:
    """Every patch of the natural builtins in array order: training patches, then held-out ones."""
    _check_natural_size(image_size)
    boxes = {False: [], True: []}
    for name in NATURAL_PHOTOS:
        height, width = _natural_photo(name).shape[:2]
        for held_out, (start, stop) in NATURAL_STRIPES.items():
            for top in range(0, height - image_size + 1, image_size):
                for period in range(0, width - NATURAL_STRIPE_PERIOD + 1, NATURAL_STRIPE_PERIOD):
                    for left in range(period + start, period + stop - image_size + 1, image_size):
                        boxes[held_out].append(PatchBox(name, top, left, image_size, held_out))
    return boxes[False] + boxes[True]


def natural_patches(image_size: int, gray: bool = False) -> np.ndarray:
    """The natural builtin's patches as uint8 (N, image_size, image_size, C), C = 1 (PIL's "L" luma) or 3."""
    boxes = natural_patch_boxes(image_size)
    return np.stack([_natural_photo(b.photo, gray)[b.top : b.top + b.size, b.left : b.left + b.size] for b in boxes])


def held_out_region(source: str, image_size: int) -> int | None:
    """How many images at the end of `source`'s array form its own held-out region (the natural
    builtins); None when any image may be held out (the held-out set is then drawn at random)."""
    if builtin_name(source) in _PATCH_BUILTINS:
        return sum(box.held_out for box in natural_patch_boxes(image_size))
    return None


def _check_natural_size(image_size: int) -> None:
    if image_size not in NATURAL_SIZES:
        raise DataError(
            f"the natural builtins are cut at data.image_size {' or '.join(map(str, NATURAL_SIZES))}, "
            f"not {image_size}; set data.image_size to one of those"
        )


@functools.lru_cache(maxsize=4)
def _natural_photo(name: str, gray: bool = False) -> np.ndarray:
    """One of scikit-learn's sample photographs as uint8 (H, W, C), read from its package files."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "images" / name if spec else None
    if path is None or not path.is_file():
        raise DataError(f"the natural builtins need scikit-learn's sample image {name}, which is not installed; "
                        f"install scikit-learn (a ditsweep dependency) or use another data.source")
    with Image.open(path) as image:
        array = np.asarray(image.convert("L") if gray else image.convert("RGB"), dtype=np.uint8)
    array = array[..., None] if array.ndim == 2 else array
    array.flags.writeable = False  # shared by every caller
    return array


_PATCH_BUILTINS: dict[str, bool] = {"natural": False, "natural-gray": True}  # name -> grayscale


