"""Prepared data packs: the on-disk format `prepare-data` writes, its writer and its reader.

A pack is a folder (local, or a prefix on an object store such as ``s3://``) holding:

- ``shard-00000.npy``, ``shard-00001.npy``, ...: uint8 arrays (n, S, S, C), C = 1 or 3, written with
  ``numpy.save`` (no pickle), so each is read with ``np.load(path, mmap_mode="r")``. Shard k holds the
  pack's images ``offset_k .. offset_k + n_k - 1`` in order (offset_k: the counts of the shards before
  it). A shard is bounded in bytes (`images_per_shard`, ``prepare-data --shard-mb``); the last may be
  smaller, and a shard may be short when unreadable inputs were skipped.
- ``shard-00000.labels.npy``, ...: int64 (n,) class labels of the same images, when the pack has labels
  (every shard or none).
- ``manifest.json``, written LAST and atomically (`finish_manifest`): the format and version, count,
  image_size, channels, and per shard its name, count and sha256 (and its labels file and sha256),
  plus what preparation recorded (source, conversions, classes, skipped files). A folder without a
  manifest is incomplete: no reader accepts it.

Old single-file packs (``images.npy`` + optional ``labels.npy`` + a manifest with one ``sha256``) are
read as a pack of one shard.

Writing (the single-process `prepare-data` and the Ray Data preparation share it): for each shard,
``write_shard(out_dir, index, images, labels) -> ShardRecord`` (any order, any process; each file
appears whole or not at all); then, once every shard is written, ``finish_manifest(out_dir, records,
image_size, channels, info)`` with the records in shard order. Identical inputs give byte-identical
files: nothing time- or host-dependent is written. `read_progress` / `record_progress` keep the
records of a preparation that may be killed, so a restart skips shards whose files still match;
`begin_pack` removes an old manifest before any shard of a new preparation is written.

Reading: ``open_pack(folder)`` -> `Pack`; ``pack.gather(indices)`` memory-maps only the shards that hold
those indices and copies just those rows. Each shard's sha256 is checked the first time a process
opens it, and remembered for that file's (inode, size, mtime) so a later trial in the same process
does not hash it again; a shard that does not match is refused naming it. `Pack.opened` lists the
shards read so far (what a trial touched).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np

from trainer.storage import DataError, file_sha256, filesystem, is_local, put_bytes, remote_errors

PACK_FORMAT = "ditsweep-pack"
PACK_VERSION = 2
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "progress.json"  # a preparation under way; removed once the manifest is written
LEGACY_IMAGES_NAME = "images.npy"  # version 1: one array for the whole pack
LEGACY_LABELS_NAME = "labels.npy"
DEFAULT_SHARD_MB = 256
SHARD_PATTERN = re.compile(r"^shard-\d{5,}(\.labels)?\.npy$")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npy"


def shard_labels_name(index: int) -> str:
    return f"shard-{index:05d}.labels.npy"


def images_per_shard(image_size: int, channels: int, shard_mb: float) -> int:
    """How many images of image_size x image_size x channels uint8 fit in `shard_mb` MiB (at least 1)."""
    if not shard_mb > 0:
        raise DataError(f"--shard-mb must be positive, got {shard_mb}")
    return max(1, int(shard_mb * (1 << 20)) // (image_size * image_size * channels))


@dataclass(frozen=True)
class ShardRecord:
    """One shard as the manifest lists it."""

    name: str
    count: int
    sha256: str
    labels: str | None = None  # the labels file's name, when the pack has labels
    labels_sha256: str | None = None

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, record: dict) -> ShardRecord:
        return cls(**{key: record.get(key) for key in ("name", "count", "sha256", "labels", "labels_sha256")})


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of a .npy file (no pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Writing


def write_shard(out_dir: str, index: int, images: np.ndarray, labels: np.ndarray | None = None) -> ShardRecord:
    """Write shard `index` of the pack at `out_dir` (local folder or URI, created if local) and return its
    record for `finish_manifest`. `images`: uint8 (n, S, S, C) with C in {1, 3}; `labels`: int (n,) or None.
    Each file appears whole or not at all (see `trainer.storage.put_bytes`)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"a shard holds uint8 (n, S, S, 1 or 3) images, got {images.dtype} {images.shape}")
    if labels is not None and (labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"shard labels must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}")
    fs, root = _folder(out_dir)
    payload = npy_bytes(images)
    record = {"name": shard_name(index), "count": int(len(images)), "sha256": _sha256(payload)}
    with remote_errors(out_dir, "data destination"):
        if labels is not None:
            label_bytes = npy_bytes(labels.astype(np.int64))
            put_bytes(fs, f"{root}/{shard_labels_name(index)}", label_bytes)
            record.update(labels=shard_labels_name(index), labels_sha256=_sha256(label_bytes))
        put_bytes(fs, f"{root}/{shard_name(index)}", payload)
    return ShardRecord(**record)


def finish_manifest(out_dir: str, shards: Sequence[ShardRecord], image_size: int, channels: int,
                    info: dict | None = None) -> dict:
    """Write ``manifest.json`` for `shards` (in shard order, all already written) and return it: first
    remove shard files of the folder that `shards` do not list (left by an earlier preparation), then
    write the manifest, then drop the progress file. `info` (source, conversions, classes, ...) is stored
    beside the pack's own keys."""
    if not shards:
        raise DataError(f"no images to write to {out_dir!r}")
    if len({record.labels is None for record in shards}) != 1:
        raise ValueError("either every shard has labels or none has")
    manifest = dict(info or {})
    manifest.update(
        format=PACK_FORMAT, version=PACK_VERSION, count=sum(record.count for record in shards),
        image_size=int(image_size), channels=int(channels), shards=[record.to_json() for record in shards],
    )
    listed = {name for record in shards for name in (record.name, record.labels) if name}
    fs, root = _folder(out_dir)
    with remote_errors(out_dir, "data destination"):
        for path in fs.ls(root, detail=False):  # shards of an earlier, larger preparation
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if SHARD_PATTERN.match(name) and name not in listed:
                fs.rm_file(path)
        put_bytes(fs, f"{root}/{MANIFEST_NAME}", manifest_bytes(manifest))
        if fs.exists(f"{root}/{PROGRESS_NAME}"):
            fs.rm_file(f"{root}/{PROGRESS_NAME}")
    return manifest


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def _folder(out_dir: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = filesystem(out_dir)
    with remote_errors(out_dir, "data destination"):
        if is_local(fs):
            fs.makedirs(root, exist_ok=True)  # on S3, makedirs would create a missing (mistyped) bucket
    return fs, root.rstrip("/")


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


# ---------------------------------------------------------------------------------------------
# Progress of a preparation that may be killed


def read_progress(out_dir: str, plan: dict) -> dict[int, tuple[ShardRecord, dict]]:
    """The shards a previous preparation of the same `plan` (any JSON: the arguments and inputs that decide
    the output) finished at `out_dir` and whose files still match their sha256, each with the `info` it
    was recorded with; {} when there was none."""
    fs, root = _folder(out_dir)
    with remote_errors(out_dir, "data destination"):
        try:
            progress = json.loads(fs.cat_file(f"{root}/{PROGRESS_NAME}"))
        except (FileNotFoundError, ValueError):
            return {}
        if not isinstance(progress, dict) or progress.get("plan") != plan:
            return {}
        done = {}
        for index, entry in progress.get("shards", {}).items():
            shard = ShardRecord.from_json(entry["shard"])
            files = [(shard.name, shard.sha256)] + ([(shard.labels, shard.labels_sha256)] if shard.labels else [])
            if all(_remote_sha256(fs, f"{root}/{name}") == digest for name, digest in files):
                done[int(index)] = (shard, entry.get("info", {}))
    return done


def record_progress(out_dir: str, plan: dict, done: dict[int, tuple[ShardRecord, dict]]) -> None:
    """Note that the shards in `done` ({index: (record, info)}, info any JSON the caller wants back) are
    written; atomically, so the file is always one whole record."""
    fs, root = _folder(out_dir)
    shards = {str(index): {"shard": done[index][0].to_json(), "info": done[index][1]} for index in sorted(done)}
    with remote_errors(out_dir, "data destination"):
        put_bytes(fs, f"{root}/{PROGRESS_NAME}", json.dumps({"plan": plan, "shards": shards}, sort_keys=True).encode())


def begin_pack(out_dir: str) -> None:
    """Before (re)writing the pack at `out_dir`: remove its manifest, so that while shards are being
    replaced no reader takes the folder for a complete pack."""
    fs, root = _folder(out_dir)
    with remote_errors(out_dir, "data destination"):
        if fs.exists(f"{root}/{MANIFEST_NAME}"):
            fs.rm_file(f"{root}/{MANIFEST_NAME}")


def _remote_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """sha256 of `path` on `fs`, or None when it is missing."""
    digest = hashlib.sha256()
    try:
        with fs.open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading


# (realpath, inode, size, mtime_ns) -> sha256 of shards this process has hashed
_VERIFIED: dict[tuple, str] = {}


def is_pack(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, MANIFEST_NAME))


def check_not_incomplete(folder: str, source: str) -> None:
    """Refuse a local folder holding shards or a progress file but no manifest: a preparation that
    did not finish."""
    if is_pack(folder):
        return
    if os.path.exists(os.path.join(folder, PROGRESS_NAME)) or any(SHARD_PATTERN.match(n) for n in os.listdir(folder)):
        raise DataError(f"{source!r} holds shards but no {MANIFEST_NAME}: its preparation did not finish; run the "
                        f"same `ditsweep prepare-data` command again (it resumes after the shards already written)")


def read_manifest(folder: str, source: str | None = None) -> dict:
    """The manifest of the local pack `folder` (version 1 or 2), checked for the keys a reader needs."""
    source = source or folder
    try:
        with open(os.path.join(folder, MANIFEST_NAME)) as handle:
            manifest = json.load(handle)
        required = ("count", "shards") if manifest.get("format") == PACK_FORMAT else ("count", "sha256")
        missing = [key for key in required if key not in manifest]
    except (OSError, ValueError, TypeError, AttributeError) as err:
        message = f"cannot read {MANIFEST_NAME} in {source!r} ({err}); run `ditsweep prepare-data` again"
        raise DataError(message) from err
    if missing:
        raise DataError(f"{MANIFEST_NAME} in {source!r} lacks {missing}; run `ditsweep prepare-data` again")
    if manifest.get("format") == PACK_FORMAT and manifest.get("version") != PACK_VERSION:
        raise DataError(f"{source!r} is a version {manifest.get('version')} pack; this ditsweep reads version "
                        f"{PACK_VERSION} (and single-file packs): run `ditsweep prepare-data` again")
    return manifest


def shard_records(manifest: dict, folder: str) -> list[ShardRecord]:
    """The shards of a manifest; a single-file pack is one shard (its labels.npy, if any, unhashed)."""
    if manifest.get("format") == PACK_FORMAT:
        return [ShardRecord.from_json(record) for record in manifest["shards"]]
    labels = LEGACY_LABELS_NAME if os.path.exists(os.path.join(folder, LEGACY_LABELS_NAME)) else None
    return [ShardRecord(LEGACY_IMAGES_NAME, int(manifest["count"]), manifest["sha256"], labels)]


@dataclass
class Pack:
    """A prepared pack in a local folder. `fetch(name, local_path)`, when given, brings a missing file into
    the folder first (a remote pack read through the local cache)."""

    folder: str
    source: str
    manifest: dict
    shards: list[ShardRecord]
    fetch: Callable[[str, str], None] | None = None
    opened: list[str] = field(default_factory=list)  # image shards read, in order of first use

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(S, S, C) of every image, from the manifest or else the first shard's .npy header (no data read)."""
        if "image_size" in self.manifest and "channels" in self.manifest:
            size = int(self.manifest["image_size"])
            return size, size, int(self.manifest["channels"])
        path = os.path.join(self.folder, self.shards[0].name)
        if not os.path.exists(path) and self.fetch is not None:
            self.fetch(self.shards[0].name, path)
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            shape, _, _ = np.lib.format._read_array_header(handle, version)
        return tuple(shape[1:])

    @property
    def has_labels(self) -> bool:
        return self.shards[0].labels is not None

    @property
    def offsets(self) -> np.ndarray:
        """Index of each shard's first image, and the total at the end: (shards + 1,)."""
        return np.concatenate([[0], np.cumsum([record.count for record in self.shards])]).astype(np.int64)

    def gather(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The images at `indices` (any order, repeats allowed), uint8 (len, S, S, C), reading only their shards."""
        return self._gather(np.asarray(indices, dtype=np.int64), self.images_of)

    def labels(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray | None:
        """int64 labels at `indices` (all when None), or None when the pack has none."""
        if not self.has_labels:
            return None
        indices = np.arange(self.count) if indices is None else np.asarray(indices, dtype=np.int64)
        return self._gather(indices, self.labels_of)

    def read_all(self) -> np.ndarray:
        return self.gather(np.arange(self.count))

    def images_of(self, shard: int) -> np.ndarray:
        """Shard `shard`'s images, memory-mapped (checked against its sha256 on first use).

        A fresh map each call, dropped by the caller once it has copied its rows: a map kept open would
        keep every page it touched (and the kernel's fault-around neighbours) in this process's RSS."""
        record = self.shards[shard]
        if record.name not in self.opened:
            self.opened.append(record.name)
        return self._map(record.name, record.sha256, record.count)

    def labels_of(self, shard: int) -> np.ndarray:
        record = self.shards[shard]
        return self._map(record.labels, record.labels_sha256, record.count)

    def _gather(self, indices: np.ndarray, part: Callable[[int], np.ndarray]) -> np.ndarray:
        offsets = self.offsets
        if len(indices) and (indices.min() < 0 or indices.max() >= self.count):
            raise IndexError(f"indices must lie in [0, {self.count}) for {self.source!r}")
        owner = np.searchsorted(offsets, indices, side="right") - 1  # the shard of each index
        result = None
        for shard in np.unique(owner):
            rows = np.flatnonzero(owner == shard)
            block = part(int(shard))
            if result is None:
                result = np.empty((len(indices), *block.shape[1:]), dtype=block.dtype)
            result[rows] = block[indices[rows] - offsets[shard]]  # copies only these rows out of the map
            del block  # unmapped here
        if result is None:  # no indices: the shape from the header alone
            block = part(0)
            result = np.empty((0, *block.shape[1:]), dtype=block.dtype)
        return result

    def _map(self, name: str, sha256: str | None, count: int) -> np.ndarray:
        path = os.path.join(self.folder, name)
        fetched = not os.path.exists(path) and self.fetch is not None
        if fetched:
            self.fetch(name, path)
        if not os.path.exists(path):
            raise DataError(f"prepared data {self.source!r} lacks {name}, which its manifest lists; "
                            f"run `ditsweep prepare-data` again")
        if sha256 is not None:
            try:
                verify_file(path, sha256, f"{name} of {self.source!r}")
            except DataError:
                if fetched:  # a copy that does not match is not kept in the cache
                    os.remove(path)
                raise
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {name} of {self.source!r} ({err}); run `ditsweep prepare-data` again") from err
        if len(array) != count:
            raise DataError(f"{name} of {self.source!r} holds {len(array)} rows, its manifest says {count}; "
                            f"run `ditsweep prepare-data` again")
        return array


def verify_file(path: str, sha256: str, what: str) -> None:
    """Refuse `path` unless its sha256 is `sha256`; a match is remembered for the file as it is now."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(key) == sha256:
        return
    digest = file_sha256(path)
    if digest != sha256:
        raise DataError(
            f"{what} does not match its manifest (sha256 {digest[:12]}... != {sha256[:12]}...): the pack is "
            f"damaged or was modified; run `ditsweep prepare-data` again"
        )
    _VERIFIED[key] = digest


def open_pack(folder: str, source: str | None = None, fetch: Callable[[str, str], None] | None = None) -> Pack:
    """The pack in local `folder` (its manifest read and checked; no shard opened yet). `source` is the name
    the user gave, for messages; `fetch` brings missing shard files (see `Pack`)."""
    manifest = read_manifest(folder, source)
    return Pack(folder, source or folder, manifest, shard_records(manifest, folder), fetch)
