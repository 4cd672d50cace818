"""The FID Inception weights file: a local path or an fsspec URI (https://, s3://, file://, memory://,
...), downloaded once into the cache, checked by the sha256 prefix its name carries; and the preflight
(`weights_available`) that `plan` and `launch` run before any trial needs it.

The file itself (the FID Inception-v3 of pytorch-fid, `trainer.config.FID_WEIGHTS_URL`) is loaded into
the network by `trainer.inception.load_fid_inception`. The bytes go through trainer.storage: its cache
folder, its sha256 and its `staged` temporary file renamed into place, so a cached copy is always whole.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import fsspec

from trainer.config import FID_WEIGHTS_FILENAME, FID_WEIGHTS_SHA256_PREFIX, FID_WEIGHTS_URL
from trainer.storage import default_cache_dir, file_sha256, staged


class WeightsError(ValueError):
    """The FID Inception weights are missing, unreachable or not the right file."""


def cached_weights_path(weights: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the cached copy of the remote file `weights` lives: <cache>/weights/<file name>."""
    name = Path(urllib.parse.urlsplit(weights).path).name
    if not name:
        raise WeightsError(f"cannot tell a file name from the weights URI {weights!r}")
    return _weights_folder(cache_dir) / name


def _weights_folder(cache_dir: str | os.PathLike | None) -> Path:
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "weights"


def fetch_weights(
    weights: str,
    cache_dir: str | os.PathLike | None = None,
    *,
    expected_sha256_prefix: str = FID_WEIGHTS_SHA256_PREFIX,
) -> Path:
    """A local, digest-checked copy of `weights`: a local path, used in place, or an fsspec URI,
    downloaded once into `<cache_dir>/weights/` (default `default_cache_dir()`). Raises WeightsError
    when the file is missing or cannot be had, or its sha256 does not start with
    `expected_sha256_prefix`."""
    if not _is_uri(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"FID Inception weights file {path} does not exist. {_how_to_supply(cache_dir)}"
            )
        _check_digest(str(path), file_sha256(path), expected_sha256_prefix, cache_dir)
        return path
    cached = cached_weights_path(weights, cache_dir)
    if cached.is_file():
        _check_digest(
            f"{cached} (cached copy of {weights}; delete it to download again)",
            file_sha256(cached),
            expected_sha256_prefix,
            cache_dir,
        )
        return cached
    _download(weights, cached, expected_sha256_prefix, cache_dir)
    return cached


def weights_available(
    weights: str, cache_dir: str | os.PathLike | None = None, timeout_s: float = 5.0
) -> tuple[bool, str]:
    """Preflight: can `fetch_weights(weights, cache_dir)` get the file? (ok, explanation).

    True for an existing local file, a cached copy of a URI, or a URI that answers within
    `timeout_s` (HTTP HEAD for http(s), `fs.exists` otherwise). Does not check the digest.
    """
    if not _is_uri(weights):
        path = Path(weights).expanduser()
        if path.is_file():
            return True, f"FID Inception weights: local file {path}"
        how_to = _how_to_supply(cache_dir)
        return False, f"FID Inception weights file {path} does not exist. {how_to}"
    cached = cached_weights_path(weights, cache_dir)
    if cached.is_file():
        return True, f"FID Inception weights: cached copy {cached} of {weights}"
    reachable, detail = _remote_exists(weights, timeout_s)
    if reachable:
        return True, (
            f"FID Inception weights: {weights} is reachable ({detail}); will be cached at {cached}"
        )
    return False, (
        f"FID Inception weights {weights} cannot be reached ({detail}) and there is no cached copy "
        f"at {cached}. {_how_to_supply(cache_dir)}"
    )


def _how_to_supply(cache_dir: str | os.PathLike | None) -> str:
    return (
        f"To supply it: download {FID_WEIGHTS_URL} on a machine with internet access (its sha256 "
        f"starts {FID_WEIGHTS_SHA256_PREFIX}), copy it to this machine and set "
        f"eval.fid.weights=/path/to/{FID_WEIGHTS_FILENAME} (or put it in the cache folder "
        f"{_weights_folder(cache_dir)}/); or set eval.fid.enabled=false."
    )


def _is_uri(weights: str) -> bool:
    return "://" in weights


def _check_digest(
    source: str, digest: str, expected_prefix: str, cache_dir: str | os.PathLike | None
) -> None:
    if not digest.startswith(expected_prefix.lower()):
        raise WeightsError(
            f"{source} has sha256 {digest}, but the FID Inception weights' sha256 starts with "
            f"{expected_prefix}: it is not {FID_WEIGHTS_FILENAME} (or it is damaged). "
            f"{_how_to_supply(cache_dir)}"
        )


def _download(
    uri: str, target: Path, expected_prefix: str, cache_dir: str | os.PathLike | None
) -> None:
    """Copy `uri` to `target` via a temporary file, renamed into place if its digest is right."""
    try:
        with staged(str(target)) as tmp_name:
            # get_file streams the way each backend does best (HTTP without range requests, S3
            # multipart); reading the file object would make HTTP ask for byte ranges.
            fs, path = fsspec.core.url_to_fs(uri)
            fs.get_file(path, tmp_name)
            _check_digest(uri, file_sha256(Path(tmp_name)), expected_prefix, cache_dir)
    except WeightsError:
        raise
    except Exception as err:  # fsspec backends raise their own error types
        raise WeightsError(
            f"could not download FID Inception weights {uri}: {err!r}. {_how_to_supply(cache_dir)}"
        ) from err


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect already proves the server is there; following it would start the download."""

    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return None


def _remote_exists(uri: str, timeout_s: float) -> tuple[bool, str]:
    if urllib.parse.urlsplit(uri).scheme in ("http", "https"):
        return _http_head(uri, timeout_s)
    return _fsspec_exists(uri, timeout_s)


def _http_head(url: str, timeout_s: float) -> tuple[bool, str]:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError, ValueError) as err:
        return False, str(getattr(err, "reason", err))
    if status in (405, 501):  # the server is up but does not answer HEAD
        return True, f"HTTP {status} to HEAD"
    return status < 400, f"HTTP {status}"


def _fsspec_exists(uri: str, timeout_s: float) -> tuple[bool, str]:
    """`fs.exists(uri)` with a deadline; a daemon thread so a hung backend cannot block exit."""
    answer: dict[str, object] = {}

    def probe() -> None:
        try:
            fs, path = fsspec.core.url_to_fs(uri)
            answer["exists"] = bool(fs.exists(path))
        except Exception as err:  # any backend error means "not available"
            answer["error"] = err

    thread = threading.Thread(target=probe, daemon=True, name="fid-weights-probe")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return False, f"no answer within {timeout_s:g} s"
    if "error" in answer:
        return False, repr(answer["error"])
    return (True, "exists") if answer["exists"] else (False, "no such file")
