"""Images stored inside container files: a folder of Parquet files, or an LMDB database (LSUN's export).

- **Parquet** (the on-disk form of Hugging Face datasets, ``data/train-00000-of-00004.parquet``...): the
  ``*.parquet`` files under a folder, in sorted order of their relative paths, rows in file order. The
  image column is the one named ``image`` or ``img`` (else the only candidate): a struct with ``bytes``
  (and ``path``), Hugging Face's Image feature, or plain binary. An integer ``label`` column gives labels,
  and the class names come from the Hugging Face features stored in the file's metadata when present.
  Read with pyarrow (an MLflow dependency), one file's column at a time.
- **LMDB** (LSUN's ``bedroom_train_lmdb/`` holding ``data.mdb``): every value is an encoded image, keys in
  the database's (sorted) order. Needs the optional ``lmdb`` package (``pip install 'ditsweep[lmdb]'``),
  imported only when such a folder is read.

Either becomes `EncodedItems` (names, an opener, a fingerprint of the files), which `trainer.prepare`
packs and `decode_all` decodes in one go for a direct `data.source`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from trainer.decode import DecodedFolder, UnreadableImage, decode_items
from trainer.storage import DataError

PARQUET_SUFFIX = ".parquet"
LMDB_DATA = "data.mdb"
IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMN = "label"


@dataclass(frozen=True)
class EncodedItems:
    """The encoded images of a source: names in pack order, how to open one (a path, or a binary file
    object PIL reads), a fingerprint of their current content (for resuming), and labels when the
    source carries them (name -> class index, with the class names)."""

    names: list[str]
    open: Callable[[str], str | BinaryIO]
    fingerprint: str
    labels: dict[str, int] | None = None
    classes: list[str] | None = field(default=None)


def folder_items(source: str, folder: str) -> EncodedItems | None:
    """The Parquet files or LMDB database in `folder` as EncodedItems; None when it holds neither."""
    if os.path.exists(os.path.join(folder, LMDB_DATA)):
        return lmdb_items(source, folder)
    files = parquet_files(folder)
    return parquet_items(source, folder, files) if files else None


def decode_all(source: str, items: EncodedItems, image_size: int) -> DecodedFolder:
    """Every image of `items` decoded (as an image folder is), with their labels."""
    try:
        decoded = decode_items(items.names, items.open, image_size)
    except UnreadableImage as err:
        raise DataError(f"cannot use the images in {source!r}: {err}") from None
    if items.labels is not None:
        decoded.labels = np.array([items.labels[name] for name in decoded.names], dtype=np.int64)
        decoded.classes = items.classes
    return decoded


def files_fingerprint(folder: str, names: list[str]) -> str:
    """sha256 of the names, sizes and modification times of files under `folder`: what says the inputs
    changed (a digest, so a progress file stays small for a million files)."""
    digest = hashlib.sha256()
    for name in names:
        stat = os.stat(os.path.join(folder, name))
        digest.update(json.dumps([name, stat.st_size, stat.st_mtime_ns]).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Parquet


def parquet_files(folder: str) -> list[str]:
    """Relative paths of the Parquet files under `folder`, sorted, hidden files skipped."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
                  for f in files if f.endswith(PARQUET_SUFFIX) and not f.startswith(".")]
    return sorted(found)


def parquet_items(source: str, folder: str, files: list[str]) -> EncodedItems:
    """Rows of the Parquet files as items named ``file.parquet:row``."""
    import pyarrow.parquet as pq

    names, labels, classes = [], {}, None
    for file in files:
        path = os.path.join(folder, file)
        try:
            schema = pq.read_schema(path)
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise DataError(f"cannot read {file} of {source!r} as Parquet ({type(err).__name__}: {err})") from err
        image_column(source, file, schema)
        file_names = [f"{file}:{row}" for row in range(rows)]
        names += file_names
        if LABEL_COLUMN in schema.names and _is_integer(schema.field(LABEL_COLUMN).type):
            column = pq.read_table(path, columns=[LABEL_COLUMN]).column(LABEL_COLUMN).to_numpy()
            labels.update(zip(file_names, (int(v) for v in column)))
            classes = classes or _hf_class_names(schema)
    cells = _ParquetCells(source, folder)
    complete = len(labels) == len(names)
    return EncodedItems(names, cells.open, files_fingerprint(folder, files),
                        labels if complete and names else None, classes if complete else None)


def image_column(source: str, file: str, schema) -> str:
    """The name of the image column of a Parquet schema (see the module docstring)."""
    import pyarrow as pa

    def holds_images(kind) -> bool:
        return pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or (
            pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)

    candidates = [f.name for f in schema if holds_images(f.type)]
    named = [name for name in IMAGE_COLUMNS if name in candidates]
    if named:
        return named[0]
    if len(candidates) == 1:
        return candidates[0]
    raise DataError(
        f"{file} of {source!r} has {'no' if not candidates else len(candidates)} image column(s) "
        f"{candidates if candidates else ''}; expected one binary column or a struct with 'bytes' "
        f"(Hugging Face's Image feature), or one named {' or '.join(IMAGE_COLUMNS)}"
    )


class _ParquetCells:
    """Opens ``file:row`` items, holding one file's image column at a time (names come in file order)."""

    def __init__(self, source: str, folder: str) -> None:
        self.source, self.folder = source, folder

    def open(self, name: str) -> BinaryIO:
        file, row = name.rsplit(":", 1)
        cell = self._column(file)[int(row)]
        if isinstance(cell, dict):
            cell = cell.get("bytes")
        if cell is None:
            raise UnreadableImage("an empty image cell (no bytes)")
        return io.BytesIO(cell)

    @functools.lru_cache(maxsize=1)  # noqa: B019 - one instance per source listing
    def _column(self, file: str) -> list:
        import pyarrow.parquet as pq

        path = os.path.join(self.folder, file)
        column = image_column(self.source, file, pq.read_schema(path))
        return pq.read_table(path, columns=[column]).column(column).to_pylist()


def _is_integer(kind) -> bool:
    import pyarrow as pa

    return pa.types.is_integer(kind)


def _hf_class_names(schema) -> list[str] | None:
    """The ClassLabel names of the ``label`` column from Hugging Face's metadata, when it is there."""
    metadata = schema.metadata or {}
    try:
        info = json.loads(metadata[b"huggingface"])
        return list(info["info"]["features"][LABEL_COLUMN]["names"])
    except (KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# LMDB


def lmdb_items(source: str, folder: str) -> EncodedItems:
    """The values of the LMDB database in `folder` as items named by their keys."""
    env = _open_lmdb(source, folder)
    with env.begin(write=False) as txn:
        keys = [key.decode("latin-1") for key in txn.cursor().iternext(keys=True, values=False)]

    def open_value(name: str) -> BinaryIO:
        with env.begin(write=False) as txn:
            value = txn.get(name.encode("latin-1"))
        if value is None:
            raise UnreadableImage("missing from the database")
        return io.BytesIO(value)

    return EncodedItems(keys, open_value, files_fingerprint(folder, [LMDB_DATA]))


def _open_lmdb(source: str, folder: str):
    try:
        import lmdb
    except ImportError:
        raise DataError(
            f"{source!r} is an LMDB database (LSUN's export); reading it needs the optional lmdb package: "
            f"pip install 'ditsweep[lmdb]' (or pip install lmdb)"
        ) from None
    try:
        return lmdb.open(folder, readonly=True, lock=False, readahead=False, meminit=False, max_readers=64)
    except lmdb.Error as err:
        raise DataError(f"cannot open the LMDB database in {source!r} ({err})") from err
