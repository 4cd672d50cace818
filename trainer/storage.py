"""Where data bytes live: filesystems (local or fsspec URIs such as ``s3://``), the download cache,
atomic writes, sha256, and fetching a remote folder.

Every file ditsweep writes for someone else to read goes through `atomic_file` (locally: a temporary
sibling renamed into place, removed on any failure, Ctrl-C included) or `put_bytes` (one PUT on an
object store), so a reader never sees half a file.

S3 configuration, all through the environment (nothing in the trial config):
- Credentials and region: the usual ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_DEFAULT_REGION`` (or a profile), read by botocore.
- Endpoint (MinIO, moto, Ceph...): ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``. botocore >= 1.31
  reads these itself, and s3fs passes them through (checked with s3fs/fsspec 2026.9, botocore 1.43).
  ``DITSWEEP_S3_ENDPOINT``, when set, wins over both and is passed to s3fs as ``endpoint_url``; use it
  with an older botocore. fsspec's own ``FSSPEC_S3_ENDPOINT_URL`` also works, but fsspec reads it
  once at import, so it must be set before the process starts.
- Retries: botocore's ``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE`` (an unreachable endpoint fails after
  about 6 s with the defaults, at once with ``AWS_MAX_ATTEMPTS=1``).
Every call builds a fresh filesystem (no fsspec instance cache), so changes to these variables take
effect on the next load.

Remote sources are downloaded once into ``<cache_dir>/data/<sha256(uri)[:16]>-<name>`` (cache_dir
defaults to ``$DITSWEEP_CACHE`` or ``~/.cache/ditsweep``), through `staged`: a temporary sibling renamed
into place once it has been read successfully, so a cache entry is always complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

from trainer.decode import name_some

# Downloading a remote folder: objects requested at once, and names per slice (the contents of one
# slice are held in memory before they are written: 1,024 small images are a few MiB).
FETCH_THREADS = 32  # requests in flight (on fsspec's event loop for S3; threads for other filesystems)
FETCH_SLICE = 1024


class DataError(ValueError):
    """The data source cannot be used; the message names it and says what to do."""


# ---------------------------------------------------------------------------------------------
# Filesystems and remote errors


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and path for `uri`, configured from the environment (see module docstring)."""
    protocol = fsspec.utils.get_protocol(uri)
    # A fresh instance per call: fsspec's instance cache would keep an endpoint read from an
    # environment that has since changed, and s3fs's listing cache could hide new or deleted files.
    options: dict = {"skip_instance_cache": True}
    endpoint = os.environ.get("DITSWEEP_S3_ENDPOINT")
    if protocol in ("s3", "s3a") and endpoint:
        options["endpoint_url"] = endpoint
    with remote_errors(uri, "data location"):
        if protocol == "file":
            return fsspec.core.url_to_fs(uri)
        return fsspec.core.url_to_fs(uri, **options)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


@contextlib.contextmanager
def remote_errors(uri: str, role: str = "data source") -> Iterator[None]:
    """Turn filesystem and S3 client errors into DataError naming `uri`."""
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError as err:
        raise DataError(f"{role} {uri!r} does not exist ({err}); check the bucket and key") from err
    except Exception as err:  # noqa: BLE001 - botocore, aiohttp and fsspec raise many unrelated types
        hint = "Check the URI"
        if fsspec.utils.get_protocol(uri) in ("s3", "s3a"):
            hint += ", the credentials and the endpoint (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, DITSWEEP_S3_ENDPOINT)"
        raise DataError(f"cannot access {role} {uri!r}: {type(err).__name__}: {err}. {hint}") from err


# ---------------------------------------------------------------------------------------------
# Writing and hashing


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, durable: bool = False,
                previous: str | os.PathLike | None = None) -> Iterator[BinaryIO]:
    """A binary handle whose contents appear at `path` all at once when the block succeeds.

    The bytes go to a temporary sibling (same folder, so the rename is atomic), which replaces `path`
    at the end; on any failure, Ctrl-C and SIGTERM included, the temporary file is removed and `path`
    is left as it was. `durable`: flushed to disk (fsync) before the rename, so a power cut leaves the
    old or the new file, never an empty one. `previous`: the file at `path`, if any, is first moved
    there (a fallback should the new one prove unreadable)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "wb") as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, payload: bytes) -> None:
    """`payload` at local `path`, all at once (see `atomic_file`)."""
    with atomic_file(path) as handle:
        handle.write(payload)


def put_bytes(fs: fsspec.AbstractFileSystem, path: str, payload: bytes) -> None:
    """`payload` at `path` of `fs`, never half-written: an atomic rename locally, one PUT (or a multipart
    upload completed at the end) on an object store."""
    if is_local(fs):
        write_atomically(path, payload)
    else:
        fs.pipe_file(path, payload)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a local file, read in 4 MiB blocks into one buffer (a new bytes object per block
    left freed blocks in the allocator: +32 MiB resident after hashing 100 MiB of shards)."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(1 << 22))
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(view):
            digest.update(view[:count])
    return digest.hexdigest()


def remove(path: str) -> None:
    """Delete a local file or folder if it is there."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# The local cache of remote data


def default_cache_dir() -> Path:
    """Where ditsweep keeps downloads (data, weights, FID statistics): `$DITSWEEP_CACHE`, else `~/.cache/ditsweep`."""
    return Path(os.environ.get("DITSWEEP_CACHE") or Path.home() / ".cache" / "ditsweep")


def cache_entry(uri: str, cache_dir: str | None) -> str:
    """The local path that holds the copy of remote `uri`."""
    root = cache_dir or str(default_cache_dir())
    normalized = uri.rstrip("/")
    key = hashlib.sha256(normalized.encode()).hexdigest()[:16]
    name = normalized.rsplit("/", 1)[-1] or "data"
    return os.path.join(root, "data", f"{key}-{name}")


@contextlib.contextmanager
def staged(final: str) -> Iterator[str]:
    """A temporary sibling path of `final` (file or folder), renamed to `final` if the block succeeds,
    else removed."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    # Same folder (so the rename is atomic), same suffix (so the reader recognises .npy / .npz).
    staging = os.path.join(os.path.dirname(final), f".partial-{uuid.uuid4().hex[:8]}-{os.path.basename(final)}")
    try:
        yield staging
        try:
            os.replace(staging, final)
        except OSError:
            if not os.path.isdir(final):  # another process may have completed the same folder first
                raise
    finally:
        remove(staging)


# ---------------------------------------------------------------------------------------------
# Fetching many objects


def fetch_all(uri: str, fs: fsspec.AbstractFileSystem, root: str, names: list[str], local: str) -> None:
    """Copy `root`/name to `local`/name for every name, FETCH_THREADS objects in flight at a time.

    Small objects (image files of a few KiB) are bound by round trips, not bandwidth: one GET at a time
    reads a few hundred per second, many at once thousands. Names are fetched in slices of
    FETCH_SLICE so at most one slice of contents is held in memory; each file lands at its own path,
    so the order of arrival does not matter (the folder is read back in sorted order). A missing or
    unreadable object raises DataError naming it (up to five of them).
    """
    for start in range(0, len(names), FETCH_SLICE):
        chunk = names[start : start + FETCH_SLICE]
        contents, failed = _fetch_slice(fs, root, chunk)
        if failed:
            raise DataError(
                f"cannot fetch {len(failed)} object(s) of data source {uri!r}: {name_some(failed)}; check that they "
                f"exist and are readable, or remove them"
            )
        for name, payload in zip(chunk, contents):
            target = os.path.join(local, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(payload)


def _fetch_slice(fs: fsspec.AbstractFileSystem, root: str, names: list[str]) -> tuple[list[bytes], dict[str, str]]:
    """Contents of `root`/name for each name, in order, and {name: why} for those that failed."""

    paths = [f"{root}/{name}" for name in names]
    if getattr(fs, "async_impl", False):  # s3fs, gcsfs, ...: the requests in flight on fsspec's own event loop
        results = fsspec.asyn.sync(fs.loop, _cat_concurrently, fs, paths)
    else:

        def fetch(path: str) -> bytes | BaseException:
            try:
                return fs.cat_file(path)
            except Exception as err:  # noqa: BLE001 - reported by name below
                return err

        with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(names)), thread_name_prefix="ditsweep-fetch") as pool:
            results = list(pool.map(fetch, paths))
    failed = {
        name: ("missing" if isinstance(result, FileNotFoundError) else f"{type(result).__name__}: {result}")
        for name, result in zip(names, results)
        if isinstance(result, BaseException)
    }
    return [r for r in results if not isinstance(r, BaseException)], failed


async def _cat_concurrently(fs: fsspec.asyn.AsyncFileSystem, paths: list[str]) -> list[bytes | BaseException]:
    """Each path's contents or its error, FETCH_THREADS requests in flight (no threads: one event loop)."""
    in_flight = asyncio.Semaphore(FETCH_THREADS)

    async def fetch(path: str) -> bytes | BaseException:
        async with in_flight:
            try:
                return await fs._cat_file(path)
            except Exception as err:  # noqa: BLE001 - reported by name by the caller
                return err

    return await asyncio.gather(*(fetch(path) for path in paths))
