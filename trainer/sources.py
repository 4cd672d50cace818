"""Data sources read from local paths: what each kind holds and how it is read.

- a prepared pack (``manifest.json`` + shards, or a single-file pack; `trainer.packs`): memory-mapped,
  only the shards of the gathered indices read;
- a ``.npy`` uint8 array (N, H, W, C) or (N, H, W): memory-mapped too;
- a ``.npz`` holding one array (or one named "images"), optionally with a ``labels`` array;
- a folder of PNG/JPEG images, searched recursively, read in sorted order of their relative paths
  (class folders ``class/file`` give labels), decoded as `trainer.decode` says;
- a folder of Parquet files with an image column, or an LMDB export (LSUN's): `trainer.archives`.

`open_local` returns an `ImageSource`: the count, `gather(indices)` (uint8 (n, S, S, C) at the size asked
for, center-cropped and resized when the source has another size) and `labels(indices)`.
`source_shape` reads the count and channels from headers, manifests or file names, decoding nothing.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from trainer import archives
from trainer.builtins import builtin_images, builtin_labels, builtin_name, builtin_names, builtin_shape
from trainer.decode import DecodedFolder, UnreadableImage, class_folders, decode_folder, to_channels
from trainer.packs import MANIFEST_NAME, Pack, check_not_incomplete, open_pack
from trainer.storage import DataError, cache_entry, filesystem, is_local

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABELS_KEY = "labels"  # optional array in a .npz, next to the images


@dataclass(frozen=True)
class MappedNpy:
    """A .npy file indexed like an array, memory-mapped for each indexing and unmapped after: only the
    rows asked for are read, and no page stays mapped between trials (see `Pack.images_of`)."""

    source: str
    path: str
    shape: tuple[int, ...]

    @classmethod
    def open(cls, source: str, path: str) -> MappedNpy:
        return cls(source, path, read_npy(source, path, mmap=True).shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices) -> np.ndarray:
        return np.asarray(read_npy(self.source, self.path, mmap=True)[indices])


@dataclass
class ImageSource:
    """A data source opened for reading at one image size. `images` is an array, a `MappedNpy` or a
    `Pack`; gathering copies only the rows asked for."""

    name: str
    image_size: int
    images: np.ndarray | MappedNpy | Pack
    all_labels: np.ndarray | None = None  # for arrays; a pack reads its own

    @property
    def count(self) -> int:
        return self.images.count if isinstance(self.images, Pack) else len(self.images)

    @property
    def channels(self) -> int:
        return (self.images.image_shape if isinstance(self.images, Pack) else self.images.shape)[-1]

    def gather(self, indices) -> np.ndarray:
        """uint8 (len(indices), S, S, C) at image_size, in the order of `indices`."""
        indices = np.asarray(indices, dtype=np.int64)
        rows = self.images.gather(indices) if isinstance(self.images, Pack) else np.asarray(self.images[indices])
        return square_all(rows, self.image_size)

    @property
    def has_labels(self) -> bool:
        return self.images.has_labels if isinstance(self.images, Pack) else self.all_labels is not None

    def check_label_count(self) -> None:
        """Refuse labels that do not pair one to one with the images (a pack's always do)."""
        if self.all_labels is not None and len(self.all_labels) != self.count:
            raise DataError(f"data source {self.name!r} has {self.count} images but {len(self.all_labels)} labels")

    def read_all(self) -> np.ndarray:
        return self.gather(np.arange(self.count))

    def labels(self, indices=None) -> np.ndarray | None:
        """int64 labels at `indices` (all when None), or None when the source has none."""
        if isinstance(self.images, Pack):
            labels = self.images.labels(indices)
        elif self.all_labels is None:
            return None
        else:
            self.check_label_count()
            labels = self.all_labels if indices is None else self.all_labels[np.asarray(indices, dtype=np.int64)]
        return None if labels is None else checked_labels(labels, self.name)


def check_image_size(image_size: int, source: str) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"data.image_size={image_size!r} must be a positive integer (loading {source!r})")


def missing_message(source: str) -> str:
    return (
        f"data source {source!r} does not exist; give an image folder, a .npy/.npz file, a prepared "
        f"folder or a builtin name ({', '.join(builtin_names())})"
    )


def open_builtin(name: str, image_size: int) -> ImageSource:
    return ImageSource(name, image_size, builtin_images(name, image_size), builtin_labels(name))


def open_local(source: str, path: str, image_size: int, fetch: Callable[[str, str], None] | None = None) -> ImageSource:
    """The local file or folder `path` as an ImageSource; `source` is the name the user gave, for messages;
    `fetch` brings a remote pack's missing files into `path` (see `trainer.packs.Pack`)."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, MANIFEST_NAME)):
            return ImageSource(source, image_size, open_pack(path, source, fetch))
        check_not_incomplete(path, source)
        decoded = _decoded(source, path, image_size)
        return ImageSource(source, image_size, decoded.images, decoded.labels)
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return ImageSource(source, image_size, MappedNpy.open(source, path))
    if suffix == ".npz":
        return ImageSource(source, image_size, _read_npz(source, path), read_labels(source, path))
    raise DataError(
        f"data source {source!r} is a {suffix or 'suffix-less'} file; expected an image folder, "
        f"a .npy or .npz array, or a folder made by `ditsweep prepare-data`"
    )


def read_local(source: str, path: str, image_size: int) -> np.ndarray:
    """Every image of the local file or folder `path`, uint8 (N, image_size, image_size, C)."""
    return open_local(source, path, image_size).read_all()


def _decoded(source: str, path: str, image_size: int) -> DecodedFolder:
    items = archives.folder_items(source, path)
    if items is not None:  # Parquet or LMDB
        return archives.decode_all(source, items, image_size)
    return decode_image_folder(source, path, image_size)


# ---------------------------------------------------------------------------------------------
# Class labels


def read_labels(source: str, path: str) -> np.ndarray | None:
    """Labels of the local `path` without decoding images: a pack's, a class-folder tree's, a .npz's."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, MANIFEST_NAME)):
            return open_local(source, path, 1).labels()
        items = archives.folder_items(source, path)
        if items is not None:  # a Parquet label column (LMDB has none)
            return None if items.labels is None else np.array([items.labels[n] for n in items.names], np.int64)
        found = class_folders(image_names(path))  # class_name/file: ImageNet's layout
        return None if found is None else found[1]
    if Path(path).suffix.lower() != ".npz":
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            labels = archive[LABELS_KEY] if LABELS_KEY in archive else None
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {source!r} as a .npz archive ({err}); re-create it with numpy.savez") from err
    return None if labels is None else checked_labels(labels, source)


def checked_labels(labels: np.ndarray, source: str) -> np.ndarray:
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
# Arrays


def read_npy(source: str, path: str, mmap: bool = False) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
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


def as_channels(images: np.ndarray, channels: int | None) -> np.ndarray:
    """`images` with `channels` channels (gray repeated, or RGB to luma); unchanged when None."""
    if channels is None or images.shape[-1] == channels:
        return images
    return np.stack(to_channels(list(images), channels))


# ---------------------------------------------------------------------------------------------
# Image folders


def decode_image_folder(source: str, folder: str, image_size: int) -> DecodedFolder:
    """The images of a local folder decoded as `trainer.decode` says (every mode, EXIF, ADM/DiT resize,
    one channel count), with labels when it is laid out in class folders."""
    names = image_names(folder)
    if not names:
        raise DataError(
            f"data source {source!r} contains no images ({', '.join(IMAGE_SUFFIXES)}); "
            f"point data.source at the folder that holds them"
        )
    try:
        return decode_folder(folder, names, image_size)
    except UnreadableImage as err:
        raise DataError(f"cannot use the images in {source!r}: {err}") from None


def encoded_items(source: str, path: str) -> archives.EncodedItems | None:
    """The encoded images of a local folder (image files, Parquet or LMDB) for `trainer.prepare`; None for
    sources that are already arrays (a pack, .npy, .npz)."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, MANIFEST_NAME)):
        return None
    check_not_incomplete(path, source)
    items = archives.folder_items(source, path)
    if items is not None:
        return items
    names = image_names(path)
    if not names:
        raise DataError(f"data source {source!r} contains no images ({', '.join(IMAGE_SUFFIXES)}); "
                        f"point it at the folder that holds them")
    found = class_folders(names)
    labels, classes = (None, None) if found is None else (dict(zip(names, found[1].tolist())), found[0])
    return archives.EncodedItems(names, lambda name: os.path.join(path, name), archives.files_fingerprint(path, names),
                                 labels, classes)


def image_names(folder: str) -> list[str]:
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


def square_all(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1:3] == (size, size):
        return images
    squeeze = images.shape[-1] == 1  # PIL wants (H, W) for grayscale
    return np.stack([_square(Image.fromarray(image[..., 0] if squeeze else image), size) for image in images])


# ---------------------------------------------------------------------------------------------
# The size of a data source without decoding it


class SourceShape(NamedTuple):
    """A source's image count and channels, and whether a trial reads it memory-mapped (a pack or a .npy:
    only the gathered images are held) or holds all of it decoded."""

    images: int
    channels: int
    mapped: bool = False


def source_shape(source: str) -> SourceShape | None:
    """The SourceShape of a data source, read from headers, manifests or file names only; None when that
    is unknown without downloading it (a remote source not yet in the local cache).

    An image folder is counted by its image files and assumed RGB (3 channels, the upper bound); a Parquet
    folder by its row counts, an LMDB by its entries (RGB too).
    """
    try:
        builtin = builtin_name(source)
    except DataError:
        return None
    if builtin is not None:
        return SourceShape(*builtin_shape(builtin))
    fs, path = filesystem(source)
    if not is_local(fs):
        path = cache_entry(source, None)
    if not os.path.exists(path):
        return None
    return _local_shape(source, path)


def _local_shape(source: str, path: str) -> SourceShape | None:
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, MANIFEST_NAME)):
            pack = open_pack(path, source)
            return SourceShape(pack.count, pack.image_shape[-1], mapped=True)
        if archives.parquet_files(path) or os.path.exists(os.path.join(path, archives.LMDB_DATA)):
            try:
                return SourceShape(len(archives.folder_items(source, path).names), 3)
            except DataError:
                return None
        return SourceShape(len(image_names(path)), 3)
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        shape = _npy_shape(path)
        return None if shape is None else SourceShape(*shape, mapped=True)
    if suffix == ".npz":
        shape = _npz_shape(path)
        return None if shape is None else SourceShape(*shape)
    return None


def _images_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    if len(shape) == 3:
        return shape[0], 1
    if len(shape) == 4:
        return shape[0], shape[-1]
    return None


def _npy_shape(path: str) -> tuple[int, int] | None:
    try:
        return _images_shape(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except (OSError, ValueError):
        return None


def _npz_shape(path: str) -> tuple[int, int] | None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".npy") and n != f"{LABELS_KEY}.npy"]
            name = "images.npy" if "images.npy" in names else (names[0] if len(names) == 1 else None)
            if name is None:
                return None
            with archive.open(name) as handle:
                version = np.lib.format.read_magic(handle)
                reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, _ = reader(handle)
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    return _images_shape(shape)
