"""Training images as a trial reads them: open any data.source (a builtin, a local path or a URI), gather
the images a trial needs, and move them to the model's scale.

Images are uint8 arrays of shape (N, H, W, C) with C = 1 (grayscale) or 3 (RGB) until `to_tensor` turns
them into the model's float (N, C, H, W) in [-1, 1].

The rooms behind this door: `trainer.builtins` (digits, natural patches), `trainer.sources` (what each
kind of local source holds and how it is read; `source_shape`), `trainer.archives` (Parquet, LMDB),
`trainer.packs` (the prepared, sharded format), `trainer.subsets` (which indices a trial trains on and
holds out), `trainer.pool` (what a trial gathers), `trainer.storage` (filesystems, S3, the cache, atomic
writes), `trainer.prepare` (``prepare-data``).

`open_source(source, image_size)` returns a `trainer.sources.ImageSource`: its count, and `gather(indices)`
which reads only those images: from a prepared pack only the shards that hold them (memory-mapped),
from a ``.npy`` only those rows; other kinds (image folders, ``.npz``, Parquet, LMDB) are decoded whole
when opened (prepare them with `ditsweep prepare-data` for large data).

Class labels (`load_labels(source)`, for class-conditional models) come from the digits builtin, a
``labels`` array in a ``.npz``, class folders (``class/file``), a Parquet ``label`` column or a pack's
labels; other sources have none.

Any source may be a local path or an fsspec URI such as ``s3://bucket/key``. Remote sources are read
through the local cache, ``<cache_dir>/data/<sha256(uri)[:16]>-<name>`` (cache_dir defaults to
``$DITSWEEP_CACHE`` or ``~/.cache/ditsweep``): a remote pack's manifest is copied there and each shard
the first time a trial needs it (checked against its sha256 before it is kept); any other remote source
is downloaded once, whole, and decoded in a temporary sibling renamed into place only once it has been
read successfully. A later load reads the cached copy without touching the remote. The cache is keyed
by the URI alone: if the remote data changes, delete the entry (or write the new data under a new URI).
S3 configuration (credentials, endpoint, retries) comes from the environment: see `trainer.storage`.

Failures of any kind (missing path, unreadable files, wrong arrays, S3 errors) raise `DataError`, a
`ValueError` whose message names the source and says what to do.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import fsspec
import numpy as np

from trainer.builtins import builtin_name
from trainer.packs import MANIFEST_NAME
from trainer import archives
from trainer.packs import LEGACY_IMAGES_NAME, LEGACY_LABELS_NAME, SHARD_PATTERN
from trainer.sources import (
    IMAGE_SUFFIXES,
    ImageSource,
    MappedNpy,
    check_image_size,
    missing_message,
    open_builtin,
    open_local,
    read_labels,
)
from trainer.storage import DataError, cache_entry, fetch_all, filesystem, is_local, remote_errors, staged

if TYPE_CHECKING:  # torch only where images become tensors: a sweep's data checks run without it
    import torch

__all__ = ["DataError", "ImageSource", "download", "load_images", "load_labels", "open_source",
           "source_fingerprint", "to_tensor", "to_unit"]


def open_source(source: str, image_size: int, cache_dir: str | None = None) -> ImageSource:
    """`source` opened for gathering images at image_size x image_size (see the module docstring)."""
    check_image_size(image_size, source)
    builtin = builtin_name(source)
    if builtin is not None:
        return open_builtin(builtin, image_size)
    fs, path = filesystem(source)
    if is_local(fs):
        if not os.path.exists(path):
            raise DataError(missing_message(source))
        return open_local(source, path, image_size)
    cached = cache_entry(source, cache_dir)
    if os.path.exists(os.path.join(cached, MANIFEST_NAME)) or _is_remote_pack(source, fs, path):
        return _open_remote_pack(source, fs, path, cached, image_size)
    if os.path.exists(cached):
        return open_local(source, cached, image_size)
    with staged(cached) as staging:
        download(source, fs, path, staging)
        opened = open_local(source, staging, image_size)  # decoded (or its header checked) before it is kept
    if isinstance(opened.images, MappedNpy):  # mapped at each gather: by its name in the cache from now on
        opened.images = dataclasses.replace(opened.images, path=cached)
    return opened


def load_images(source: str, image_size: int, cache_dir: str | None = None) -> np.ndarray:
    """All images of `source` as uint8 (N, image_size, image_size, C), center-cropped and resized."""
    return open_source(source, image_size, cache_dir).read_all()


def load_labels(source: str, cache_dir: str | None = None) -> np.ndarray | None:
    """Class labels of `source` as int64 (N,), aligned with `load_images(source)`; None when it has none.

    A remote source is read from the local copy that `load_images` (or `open_source`) made, so load the
    images first."""
    builtin = builtin_name(source)
    if builtin is not None:
        return open_builtin(builtin, 8).labels()
    fs, path = filesystem(source)
    if not is_local(fs):
        cached = cache_entry(source, cache_dir)
        if not os.path.exists(cached):
            raise DataError(f"labels of {source!r} are read from its local copy; call load_images({source!r}) first")
        if os.path.exists(os.path.join(cached, MANIFEST_NAME)):
            return _open_remote_pack(source, fs, path, cached, 1).labels()
        return read_labels(source, cached)
    if not os.path.exists(path):
        raise DataError(missing_message(source))
    return read_labels(source, path)


def source_fingerprint(source: str) -> tuple:
    """What identifies the current content of `source` without decoding it, for in-process caches.

    A builtin is fixed. A local file is its size and modification time; a pack its manifest's (the
    shards are checked against it when read); a local folder the count, total size and newest
    modification time of everything under it (a stat walk, cheap next to decoding). A remote URI is its
    local copy in the disk cache, fingerprinted the same way (None before the first download), since
    that copy is what every load reads (see the module docstring).
    """
    if builtin_name(source) is not None:
        return ("builtin", source.removeprefix("builtin:"))
    if fsspec.utils.get_protocol(source) != "file":
        entry = cache_entry(source, None)
        return ("remote", source, _local_fingerprint(entry) if os.path.exists(entry) else None)
    _, path = filesystem(source)
    if not os.path.exists(path):
        raise DataError(missing_message(source))
    return ("local", _local_fingerprint(path))


def _local_fingerprint(path: str) -> tuple:
    if os.path.isdir(path) and os.path.exists(os.path.join(path, MANIFEST_NAME)):
        path = os.path.join(path, MANIFEST_NAME)
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


def _is_remote_pack(source: str, fs: fsspec.AbstractFileSystem, path: str) -> bool:
    with remote_errors(source):
        return fs.exists(f"{path.rstrip('/')}/{MANIFEST_NAME}")


def _open_remote_pack(source: str, fs: fsspec.AbstractFileSystem, path: str, cached: str,
                      image_size: int) -> ImageSource:
    """A remote pack through its cache entry: the manifest copied once, each file when first needed."""
    root = path.rstrip("/")

    def fetch(name: str, local: str) -> None:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with remote_errors(source), staged(local) as staging:
            fs.get_file(f"{root}/{name}", staging)

    manifest = os.path.join(cached, MANIFEST_NAME)
    if not os.path.exists(manifest):
        fetch(MANIFEST_NAME, manifest)
        # a single-file pack's labels.npy is optional and unlisted: copied now if it is there
        with remote_errors(source):
            if fs.exists(f"{root}/{LEGACY_LABELS_NAME}"):
                fetch(LEGACY_LABELS_NAME, os.path.join(cached, LEGACY_LABELS_NAME))
    return open_local(source, cached, image_size, fetch)


# ---------------------------------------------------------------------------------------------
# Downloading a remote source whole


def download(uri: str, fs: fsspec.AbstractFileSystem, path: str, local: str) -> None:
    """Copy the remote file, or the images / prepared files of the remote folder, to `local`."""
    with remote_errors(uri):
        info = fs.info(path)
        if info["type"] != "directory":
            fs.get_file(path, local)
            return
        root = info["name"].rstrip("/")
        names = [name[len(root) + 1 :] for name in fs.find(root)]
        wanted = remote_selection(names)
        if not wanted:
            raise DataError(
                f"data source {uri!r} contains no images ({', '.join(IMAGE_SUFFIXES)}), no Parquet files, no "
                f"LMDB {archives.LMDB_DATA} and no {MANIFEST_NAME}; point data.source at the folder that holds them"
            )
        os.makedirs(local)
        fetch_all(uri, fs, root, wanted, local)


def remote_selection(names: list[str]) -> list[str]:
    """What of a remote folder's objects to download: a pack's files, an LMDB's data file, the Parquet
    files, or else the image files (hidden ones skipped)."""
    if MANIFEST_NAME in names:
        return [name for name in names if name in (MANIFEST_NAME, LEGACY_IMAGES_NAME, LEGACY_LABELS_NAME) or SHARD_PATTERN.match(name)]
    if archives.LMDB_DATA in names:
        return [archives.LMDB_DATA]
    visible = [name for name in names if not any(piece.startswith(".") for piece in name.split("/"))]
    parquet = [name for name in visible if name.endswith(archives.PARQUET_SUFFIX)]
    return parquet or [name for name in visible if name.lower().endswith(IMAGE_SUFFIXES)]


# ---------------------------------------------------------------------------------------------
# Model scale


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1], the model's scale."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Model scale [-1, 1] -> [0, 1] (clamped), e.g. for saving samples."""
    return x.add(1.0).div(2.0).clamp(0.0, 1.0)
