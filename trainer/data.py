"""Training images: load from a builtin set, a folder, .npy/.npz or a prepared folder; split into subsets.

Images are uint8 arrays of shape (N, H, W, C) with C = 1 (grayscale) or 3 (RGB) until `to_tensor` turns
them into the model's float (N, C, H, W) in [-1, 1].

Sources (`load_images(source, ...)`):
- a builtin name: ``digits`` or ``builtin:digits`` (scikit-learn's 1,797 8x8 handwritten digits), or
  ``natural`` / ``natural-gray`` (patches of the two photographs scikit-learn ships, RGB or grayscale, at
  data.image_size 16 or 32, the held-out ones from stripes of their own: see "Natural patches" below);
- a folder of PNG/JPEG images, searched recursively, read in sorted order of their relative paths;
- a prepared folder (``manifest.json`` + ``images.npy``, written by `prepare_images`), checked by sha256;
- a ``.npy`` uint8 array (N, H, W, C) or (N, H, W), or a ``.npz`` holding one array (or one named "images").

Class labels (`load_labels(source)`, for class-conditional models) come from the digits builtin, a
``labels`` array in a ``.npz`` or an optional ``labels.npy`` in a prepared folder; other sources have none.

Any of these may be a local path or an fsspec URI such as ``s3://bucket/key``. Remote sources are
downloaded once into ``<cache_dir>/data/<sha256(uri)[:16]>-<name>`` (cache_dir defaults to
``$DITSWEEP_CACHE`` or ``~/.cache/ditsweep``); a later load reads that copy without touching the remote.
A download is decoded in a temporary sibling and renamed into place only once it has been read
successfully, so a cache entry is always complete. The cache is keyed by the URI alone: if the remote
data changes, delete the entry (or write the new data under a new URI).

S3 configuration (credentials, endpoint, retries) comes from the environment: see `trainer.storage`.

Failures of any kind (missing path, unreadable files, wrong arrays, S3 errors) raise `DataError`, a
`ValueError` whose message names the source and says what to do.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from trainer.decode import (
    DecodedFolder,
    UnreadableImage,
    class_folders,
    decode_folder,
    to_channels,
)
from trainer.packs import LEGACY_IMAGES_NAME, LEGACY_LABELS_NAME, MANIFEST_NAME, SHARD_PATTERN, open_pack
from trainer.storage import (
    DataError,
    cache_entry,
    default_cache_dir,
    fetch_all,
    file_sha256,
    filesystem,
    put_bytes,
    remote_errors,
    staged,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGES_NAME = LEGACY_IMAGES_NAME
LABELS_NAME = LEGACY_LABELS_NAME  # optional in a prepared folder: int (N,) class labels
LABELS_KEY = "labels"  # optional array in a .npz, next to the images
# The held-out test set is drawn with this seed, whatever data.shuffle_seed is, so every trial of a
# sweep measures PSNR on the same held-out images.
TEST_SPLIT_SEED = 0
# With data.disjoint, the pool is cut into shards in an order drawn with this seed.
DISJOINT_SHARD_SEED = 1


# ---------------------------------------------------------------------------------------------
# Loading


def load_images(source: str, image_size: int, cache_dir: str | None = None) -> np.ndarray:
    """All images of `source` as uint8 (N, image_size, image_size, C), center-cropped and resized."""
    _check_image_size(image_size, source)
    builtin = _builtin_name(source)
    if builtin in _PATCH_BUILTINS:
        return natural_patches(image_size, gray=_PATCH_BUILTINS[builtin])
    if builtin is not None:
        return _square_all(_BUILTINS[builtin](), image_size)
    fs, path = filesystem(source)
    if isinstance(fs, LocalFileSystem):
        if not os.path.exists(path):
            raise DataError(_missing_message(source))
        return _read_local(source, path, image_size)
    cached = cache_entry(source, cache_dir)
    if os.path.exists(cached):
        return _read_local(source, cached, image_size)
    with staged(cached) as staging:
        _download(source, fs, path, staging)
        images = _read_local(source, staging, image_size)
    return images


def source_fingerprint(source: str) -> tuple:
    """What identifies the current content of `source` without decoding it, for in-process caches.

    A builtin is fixed. A local file is its size and modification time; a local folder the count, total
    size and newest modification time of everything under it (a stat walk, cheap next to decoding). A
    remote URI is its local copy in the disk cache, fingerprinted the same way (None before the first
    download), since that copy is what every load reads (see the module docstring).
    """
    if _builtin_name(source) is not None:
        return ("builtin", source.removeprefix("builtin:"))
    if fsspec.utils.get_protocol(source) != "file":
        entry = cache_entry(source, None)
        return ("remote", source, _local_fingerprint(entry) if os.path.exists(entry) else None)
    _, path = filesystem(source)
    if not os.path.exists(path):
        raise DataError(_missing_message(source))
    return ("local", _local_fingerprint(path))


def _local_fingerprint(path: str) -> tuple:
    if not os.path.isdir(path):
        stat = os.stat(path)
        return (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    count = size = newest = 0
    for root, _, files in os.walk(path):
        newest = max(newest, os.stat(root).st_mtime_ns)
        for name in files:
            stat = os.stat(os.path.join(root, name))
            count, size, newest = count + 1, size + stat.st_size, max(newest, stat.st_mtime_ns)
    return (os.path.realpath(path), count, size, newest)


def _builtin_name(source: str) -> str | None:
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
    if _builtin_name(source) in _PATCH_BUILTINS:
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


def _missing_message(source: str) -> str:
    return (
        f"data source {source!r} does not exist; give an image folder, a .npy/.npz file, a prepared "
        f"folder or a builtin name ({', '.join(builtin_names())})"
    )


def _read_local(source: str, path: str, image_size: int) -> np.ndarray:
    """Read a local file or folder; `source` is the name the user gave, used in messages."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, MANIFEST_NAME)):
            return _square_all(_read_prepared(source, path), image_size)
        return _read_image_folder(source, path, image_size)
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return _square_all(_read_npy(source, path), image_size)
    if suffix == ".npz":
        return _square_all(_read_npz(source, path), image_size)
    raise DataError(
        f"data source {source!r} is a {suffix or 'suffix-less'} file; expected an image folder, "
        f"a .npy or .npz array, or a folder made by `ditsweep prepare-data`"
    )


# ---------------------------------------------------------------------------------------------
# Class labels


def load_labels(source: str, cache_dir: str | None = None) -> np.ndarray | None:
    """Class labels of `source` as int64 (N,), aligned with `load_images(source)`; None when it has none.

    digits: scikit-learn's targets (0-9); a ``.npz``: its ``labels`` array; a prepared folder: its
    ``labels.npy`` if present; image folders and ``.npy`` files: None. A remote source is read from
    the local copy that `load_images` made, so load the images first.
    """
    builtin = _builtin_name(source)
    if builtin is not None:
        loader = _BUILTIN_LABELS.get(builtin)
        return None if loader is None else _checked_labels(loader(), source)
    fs, path = filesystem(source)
    if not isinstance(fs, LocalFileSystem):
        path = cache_entry(source, cache_dir)
        if not os.path.exists(path):
            raise DataError(f"labels of {source!r} are read from its local copy; call load_images({source!r}) first")
    elif not os.path.exists(path):
        raise DataError(_missing_message(source))
    return _read_labels(source, path)


def _read_labels(source: str, path: str) -> np.ndarray | None:
    if os.path.isdir(path):
        labels_path = os.path.join(path, LABELS_NAME)
        if not os.path.exists(os.path.join(path, MANIFEST_NAME)):
            found = class_folders(_image_names(path))  # class_name/file: ImageNet's layout
            return None if found is None else found[1]
        if not os.path.exists(labels_path):
            return None
        return _checked_labels(_load_array(source, labels_path, LABELS_NAME), source)
    if Path(path).suffix.lower() != ".npz":
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            labels = archive[LABELS_KEY] if LABELS_KEY in archive else None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {source!r} as a .npz archive ({err}); re-create it with numpy.savez") from err
    return None if labels is None else _checked_labels(labels, source)


def _load_array(source: str, path: str, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {what} of {source!r} ({err}); re-create it with numpy.save") from err


def _checked_labels(labels: np.ndarray, source: str) -> np.ndarray:
    """Accept non-negative integers of shape (N,)."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"labels of {source!r} have dtype {labels.dtype} and shape {tuple(labels.shape)}; "
            f"expected integer class indices of shape (N,)"
        )
    if len(labels) and labels.min() < 0:
        raise DataError(f"labels of {source!r} include {labels.min()}; class indices start at 0")
    return labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Arrays and prepared folders


def _read_npy(source: str, path: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {source!r} as a .npy array ({err}); re-create it with numpy.save") from err
    return _checked_array(array, source)


def _read_npz(source: str, path: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.keys())
            candidates = [key for key in keys if key != LABELS_KEY]  # labels ride along (see load_labels)
            if "images" in keys or len(candidates) == 1:
                array = archive["images" if "images" in keys else candidates[0]]
            else:
                raise DataError(
                    f"{source!r} holds arrays {keys}; store a single array (plus optional '{LABELS_KEY}') "
                    f"or name the images 'images'"
                )
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        message = f"cannot read {source!r} as a .npz archive ({err}); re-create it with numpy.savez"
        raise DataError(message) from err
    return _checked_array(array, source)


def _checked_array(array: np.ndarray, source: str) -> np.ndarray:
    """Accept uint8 (N, H, W, C) with C in {1, 3}, or (N, H, W) as grayscale."""
    expected = "expected uint8 images of shape (N, H, W, C) with C = 1 or 3, or (N, H, W)"
    if array.dtype != np.uint8:
        raise DataError(
            f"{source!r} has dtype {array.dtype}; {expected} (for floats in [0, 1] save "
            f"np.clip(np.rint(x * 255), 0, 255).astype(np.uint8))"
        )
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        channels_first = array.ndim == 4 and array.shape[1] in (1, 3)
        hint = "; channels-first? save array.transpose(0, 2, 3, 1)" if channels_first else ""
        raise DataError(f"{source!r} has shape {tuple(array.shape)}; {expected}{hint}")
    if len(array) == 0:
        raise DataError(f"{source!r} contains no images")
    return array


def _read_prepared(source: str, folder: str) -> np.ndarray:
    return open_pack(folder, source).read_all()


# ---------------------------------------------------------------------------------------------
# Image folders: decode, square, check that every image decodes and all share one channel mode


def _read_image_folder(source: str, folder: str, image_size: int) -> np.ndarray:
    return decode_image_folder(source, folder, image_size).images


def decode_image_folder(
    source: str, folder: str, image_size: int, channels: int | None = None, skip_unreadable: bool = False
) -> DecodedFolder:
    """The images of a local folder decoded as `trainer.decode` says (every mode, EXIF, ADM/DiT resize,
    one channel count), with labels when it is laid out in class folders."""
    names = _image_names(folder)
    if not names:
        raise DataError(
            f"data source {source!r} contains no images ({', '.join(IMAGE_SUFFIXES)}); "
            f"point data.source at the folder that holds them"
        )
    try:
        return decode_folder(folder, names, image_size, channels, skip_unreadable)
    except UnreadableImage as err:
        raise DataError(f"cannot use the images in {source!r}: {err}") from None


def _image_names(folder: str) -> list[str]:
    """Relative paths of the image files under `folder`, sorted, hidden files skipped."""
    names = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for file in files:
            if not file.startswith(".") and file.lower().endswith(IMAGE_SUFFIXES):
                names.append(os.path.relpath(os.path.join(root, file), folder).replace(os.sep, "/"))
    return sorted(names)


# ---------------------------------------------------------------------------------------------
# Center crop + resize


def _square(image: Image.Image, size: int) -> np.ndarray:
    """Center-crop to a square and resize to size x size; returns (size, size, C) uint8."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    if (width, height) != (size, size):
        # BOX averages whole source pixels when shrinking (no aliasing); BICUBIC when enlarging.
        resample = Image.Resampling.BOX if side > size else Image.Resampling.BICUBIC
        image = image.resize((size, size), resample, box=(left, top, left + side, top + side))
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _check_image_size(image_size: int, source: str) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"data.image_size={image_size!r} must be a positive integer (loading {source!r})")


def _square_all(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return images
    squeeze = images.shape[-1] == 1  # PIL wants (H, W) for grayscale
    return np.stack([_square(Image.fromarray(image[..., 0] if squeeze else image), size) for image in images])


def _download(uri: str, fs: fsspec.AbstractFileSystem, path: str, local: str) -> None:
    """Copy the remote file, or the images / prepared files of the remote folder, to `local`."""
    with remote_errors(uri):
        info = fs.info(path)
        if info["type"] != "directory":
            fs.get_file(path, local)
            return
        root = info["name"].rstrip("/")
        names = [name[len(root) + 1 :] for name in fs.find(root)]
        wanted = _remote_selection(names)
        if not wanted:
            raise DataError(
                f"data source {uri!r} contains no images ({', '.join(IMAGE_SUFFIXES)}) and no "
                f"{MANIFEST_NAME}; point data.source at the folder that holds them"
            )
        os.makedirs(local)
        fetch_all(uri, fs, root, wanted, local)


def _remote_selection(names: list[str]) -> list[str]:
    if MANIFEST_NAME in names:
        return [name for name in names if name in (MANIFEST_NAME, IMAGES_NAME, LABELS_NAME) or SHARD_PATTERN.match(name)]
    parts = [name.split("/") for name in names]
    return [
        name
        for name, pieces in zip(names, parts)
        if name.lower().endswith(IMAGE_SUFFIXES) and not any(piece.startswith(".") for piece in pieces)
    ]


# ---------------------------------------------------------------------------------------------
# Preparing a folder


def prepare_images(
    src: str, dst: str, image_size: int, channels: int | None = None, skip_unreadable: bool = False
) -> dict:
    """Pack the images of `src` into `dst`/images.npy + `dst`/manifest.json; returns the manifest.

    An image folder is decoded as `trainer.decode` says: every mode converted to one channel count
    (`channels`: 1 or 3; by default 3 when any image is colour), EXIF orientation applied, ADM/DiT's
    box-then-bicubic resize and center crop; the manifest counts the conversions. Unreadable files
    refuse the folder, naming them, unless `skip_unreadable` (then they are listed in the manifest).
    A tree of class folders (``class/file``) also gets ``labels.npy`` and the class names.

    Everything is read and checked before anything is written. images.npy (and labels.npy) are
    written first and the manifest last, each under a temporary name then moved (locally) or as one
    PUT (S3), so a manifest implies complete data; its sha256 (of images.npy) is checked on every load.
    """
    _check_image_size(image_size, src)
    images, decoded = _read_for_prepare(src, image_size, channels, skip_unreadable)
    payload = _npy_bytes(images)
    manifest = {
        "count": int(images.shape[0]),
        "image_size": int(image_size),
        "channels": int(images.shape[-1]),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "source": src,
    }
    if decoded is not None:
        manifest.update(decoded.summary())
    fs, root = filesystem(dst)
    with remote_errors(dst, "data destination"):
        if isinstance(fs, LocalFileSystem):  # on S3, makedirs would create a missing (mistyped) bucket
            fs.makedirs(root, exist_ok=True)
        put_bytes(fs, f"{root.rstrip('/')}/{IMAGES_NAME}", payload)
        if decoded is not None and decoded.labels is not None:
            put_bytes(fs, f"{root.rstrip('/')}/{LABELS_NAME}", _npy_bytes(decoded.labels))
        put_bytes(fs, f"{root.rstrip('/')}/{MANIFEST_NAME}", json.dumps(manifest, indent=2).encode())
    return manifest


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _read_for_prepare(
    src: str, image_size: int, channels: int | None, skip_unreadable: bool
) -> tuple[np.ndarray, DecodedFolder | None]:
    """Like load_images, but a remote source goes through a throwaway folder instead of the cache, and
    an image folder is decoded with the options of prepare-data (and its record kept)."""
    if _builtin_name(src) is not None:
        return _as_channels(load_images(src, image_size), channels), None
    fs, path = filesystem(src)
    if isinstance(fs, LocalFileSystem):
        if not os.path.exists(path):
            raise DataError(_missing_message(src))
        return _read_local_for_prepare(src, path, image_size, channels, skip_unreadable)
    with tempfile.TemporaryDirectory(prefix="ditsweep-prepare-") as scratch:
        local = os.path.join(scratch, "source" + Path(path).suffix)
        _download(src, fs, path, local)
        return _read_local_for_prepare(src, local, image_size, channels, skip_unreadable)


def _read_local_for_prepare(
    src: str, path: str, image_size: int, channels: int | None, skip_unreadable: bool
) -> tuple[np.ndarray, DecodedFolder | None]:
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, MANIFEST_NAME)):
        decoded = decode_image_folder(src, path, image_size, channels, skip_unreadable)
        return decoded.images, decoded
    return _as_channels(_read_local(src, path, image_size), channels), None


def _as_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
    if channels is None or images.shape[-1] == channels:
        return images
    return np.stack(to_channels(list(images), channels))


# ---------------------------------------------------------------------------------------------
# Subsets


def split_subsets(
    num_total: int,
    test_images: int,
    num_images: int | None,
    fraction: float | None,
    shuffle_seed: int,
    disjoint: bool = False,
    region: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx) into a data set of `num_total` images.

    The test set is the last `test_images` of a permutation with a fixed seed, so it is the same for
    every shuffle_seed and subset size. With `region` (`held_out_region`: the data set's last `region`
    images are its own held-out region, e.g. the natural patches), the test set is `test_images` of
    those, drawn with the same fixed seed, and the pool is the images before them: no image of the
    region is ever trained on, whether it is in the test set or not. The remaining pool is shuffled by `shuffle_seed` and the
    training subset is its first `num_images` (or round(fraction * pool), at least 1; the whole pool
    when neither is given): with one seed, a smaller subset is a prefix of a larger one. train_idx
    keeps the shuffled order; test_idx keeps the fixed random order it was drawn in, so its first k images
    (what the PSNR gap scores) are a uniform sample of the held-out set, not its k lowest indices (a sorted
    test set would score only the first photograph's patches, or an image folder's first classes).

    With `disjoint`, subsets of different shuffle seeds share no image (for the reproducibility score
    of Kadkhodaie et al., two models trained on non-overlapping data): the pool is permuted with the
    fixed DISJOINT_SHARD_SEED and cut into consecutive shards of the subset size, and shuffle_seed s
    takes shard s. Subsets of different sizes are then no longer nested.
    """
    pool, test_idx = _held_out_split(num_total, test_images, region)
    size = _subset_size(len(pool), test_images, num_images, fraction)
    if disjoint:
        return _disjoint_shard(pool, size, shuffle_seed), test_idx
    train_idx = np.random.default_rng(shuffle_seed).permutation(pool)[:size]
    return train_idx, test_idx


def _disjoint_shard(pool: np.ndarray, size: int, shuffle_seed: int) -> np.ndarray:
    shards = len(pool) // size
    if shuffle_seed >= shards:
        raise DataError(
            f"data.disjoint=true gives each data.shuffle_seed its own {size} images, but the pool of "
            f"{len(pool)} images holds only {shards} such shard(s) (shuffle seeds 0..{shards - 1}), not "
            f"data.shuffle_seed={shuffle_seed}; lower data.shuffle_seed, data.num_images or data.fraction, or use more data"
        )
    shuffled = np.random.default_rng(DISJOINT_SHARD_SEED).permutation(pool)
    return shuffled[shuffle_seed * size : (shuffle_seed + 1) * size]


def _held_out_split(num_total: int, test_images: int, region: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(pool, test_idx): the held-out set drawn with TEST_SPLIT_SEED from the whole data set, or from its
    last `region` images when it has a held-out region (the pool is then the rest). The pool is sorted (so
    a shuffle depends only on which images are in it); test_idx is in the fixed order it was drawn in."""
    candidates = num_total if region is None else region
    if not 1 <= test_images <= candidates or test_images >= num_total:
        where = "the data set" if region is None else "its held-out region (kept apart from the training images)"
        raise DataError(
            f"data.test_images={test_images} must be at least 1 and at most the {candidates} images of {where}, "
            f"leaving images to train on; lower data.test_images"
        )
    if region is None:
        fixed = np.random.default_rng(TEST_SPLIT_SEED).permutation(num_total)
        return np.sort(fixed[: num_total - test_images]), fixed[num_total - test_images :]
    held_out = np.random.default_rng(TEST_SPLIT_SEED).permutation(np.arange(num_total - region, num_total))
    return np.arange(num_total - region), held_out[:test_images]


def pool_sample(num_total: int, test_images: int, count: int, region: int | None = None) -> np.ndarray:
    """`count` images of the pool (everything but the held-out set, or its region) in a fixed random
    order, the same for every subset and shuffle: the reference images that FID compares samples with."""
    pool, _ = _held_out_split(num_total, test_images, region)
    if region is not None:
        return pool[np.sort(np.random.default_rng(TEST_SPLIT_SEED).permutation(len(pool))[:count])]
    fixed = np.random.default_rng(TEST_SPLIT_SEED).permutation(num_total)
    return np.sort(fixed[: min(count, len(pool))])


def _subset_size(pool_size: int, test_images: int, num_images: int | None, fraction: float | None) -> int:
    if num_images is not None and fraction is not None:
        raise DataError(f"give data.num_images ({num_images}) or data.fraction ({fraction}), not both")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise DataError(f"data.fraction={fraction} must be in (0, 1]")
        return max(1, round(fraction * pool_size))
    if num_images is None:
        return pool_size
    if num_images < 1:
        raise DataError(f"data.num_images={num_images} must be at least 1")
    if num_images > pool_size:
        raise DataError(
            f"data.num_images={num_images} but only {pool_size} images remain after {test_images} "
            f"held-out test images; lower data.num_images or data.test_images, or use more data"
        )
    return num_images


# ---------------------------------------------------------------------------------------------
# Model scale


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], the model's scale."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model scale [-1, 1] -> [0, 1] (clamped), e.g. for saving samples."""
    return x.add(1.0).div(2.0).clamp(0.0, 1.0)
