"""`ditsweep prepare-data` in one process: a source -> a sharded pack (`trainer.packs`), resumable.

The steps, each of them deterministic, so the same arguments give byte-identical packs however often
the preparation is killed and restarted (and whichever writer runs them: the Ray Data preparation
follows the same `PreparePlan`):

1. **Plan** (`plan_items`): list the encoded images (an image folder's files in sorted order; an LMDB's
   keys; a Parquet folder's rows), read every header (the mode, not the pixels) to find unreadable
   files and the channel count (`--channels`, else 3 when any image is colour), and cut the list into
   shards of `images_per_shard` inputs (``--shard-mb``). Class folders give the classes here.
2. **Shards**: decode a shard's inputs (`trainer.decode`: every mode, EXIF, ADM/DiT resize), write it
   (`write_shard`) and note it in the progress file with what decoding did (conversions, rotations,
   skipped files). A restart with the same plan (same arguments, same inputs: names, sizes and
   modification times) skips every shard whose files still match their recorded sha256.
3. **Manifest** (`finish_manifest`), last: the pack is complete only once it exists.

Arrays (a builtin, ``.npy``/``.npz``, an older pack) are read whole and cut into shards the same way.
Unreadable inputs refuse the source before anything is written when the header shows it; a file whose
header reads but whose pixels do not is found when its shard is decoded: the preparation then stops
naming it, with the finished shards kept for a restart and no manifest.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainer.archives import EncodedItems
from trainer.data import download
from trainer.decode import UnreadableImage, decode_items, file_mode, name_some, reads_as_gray
from trainer.packs import (
    DEFAULT_SHARD_MB,
    PACK_VERSION,
    begin_pack,
    finish_manifest,
    images_per_shard,
    read_progress,
    record_progress,
    write_shard,
)
from trainer.builtins import builtin_name
from trainer.sources import (
    ImageSource,
    as_channels,
    check_image_size,
    encoded_items,
    missing_message,
    open_builtin,
    open_local,
)
from trainer.storage import DataError, filesystem, is_local, remote_errors

PREPROCESSING = "EXIF orientation; box halving then bicubic resize, center crop (ADM/DiT)"

Progress = Callable[[str], None]
# Where the reading runs: `run(fn, tasks, images)` yields fn(task) for every task, in task order; `images`
# says how many images the tasks read. `in_order` runs them here; orchestrator.prepare may run them on
# Ray Data across a cluster (fn and tasks then travel to other processes, pickled). Every file of the
# pack is written by this process either way, so where the reading ran does not change a byte.
Run = Callable[[Callable[[Any], Any], list, int], Iterable[Any]]
HEADER_CHUNK = 2048  # headers read by one task of the plan's scan


@dataclass(frozen=True)
class PreparePlan:
    """What a preparation will write: shard k holds the decoded `names[k * per_shard : (k + 1) * per_shard]`
    (less those that turn out unreadable), as `channels` channels of image_size x image_size."""

    source: str
    image_size: int
    channels: int
    per_shard: int
    names: list[str]
    skipped: dict[str, str]  # unreadable by their header (with skip_unreadable)
    classes: list[str] | None  # class names (class folders, a Parquet label column's names)
    labels: dict[str, int] | None  # input name -> class index, when the source has labels
    key: dict  # what decides the output: arguments and the inputs' fingerprint

    @property
    def shards(self) -> int:
        return -(-len(self.names) // self.per_shard)

    def shard_inputs(self, index: int) -> list[str]:
        return self.names[index * self.per_shard : (index + 1) * self.per_shard]


def in_order(fn: Callable[[Any], Any], tasks: list, images: int) -> Iterator[Any]:
    """The default `Run`: every task here, one after the other."""
    return map(fn, tasks)


def read_modes(items: EncodedItems, names: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The PIL mode of each of `names` read from its header, and {name: why} for those that do not parse."""
    modes, unreadable = {}, {}
    for name in names:
        try:
            modes[name] = file_mode(items.open(name))
        except UnreadableImage as err:
            unreadable[name] = str(err)
    return modes, unreadable


def plan_items(source: str, items: EncodedItems, image_size: int, channels: int | None, skip_unreadable: bool,
               shard_mb: float, run: Run = in_order) -> PreparePlan:
    """Read every input's header (in chunks, where `run` says), refuse (or with `skip_unreadable` leave
    out) those that do not parse, settle the channel count and the shards."""
    modes, unreadable = {}, {}
    chunks = [items.names[start : start + HEADER_CHUNK] for start in range(0, len(items.names), HEADER_CHUNK)]
    for chunk_modes, chunk_unreadable in run(functools.partial(read_modes, items), chunks, len(items.names)):
        modes.update(chunk_modes)
        unreadable.update(chunk_unreadable)
    if unreadable and not skip_unreadable:
        raise DataError(f"cannot use the images in {source!r}: {len(unreadable)} unreadable file(s): "
                        f"{name_some(unreadable)}; fix or remove them, or pass --skip-unreadable")
    names = [name for name in items.names if name in modes]
    if not names:
        raise DataError(f"cannot use the images in {source!r}: none of the {len(items.names)} image file(s) could be read")
    channels = channels or (1 if all(reads_as_gray(mode) for mode in modes.values()) else 3)
    per_shard = images_per_shard(image_size, channels, shard_mb)
    classes, labels = items.classes, items.labels
    key = {"version": PACK_VERSION, "source": source, "image_size": image_size, "channels": channels,
           "per_shard": per_shard, "skip_unreadable": skip_unreadable, "inputs": items.fingerprint}
    return PreparePlan(source, image_size, channels, per_shard, names, unreadable, classes, labels, key)


def decode_shard(plan: PreparePlan, items: EncodedItems, index: int, skip_unreadable: bool
                 ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Shard `index` of `plan`: its images, their labels (or None) and what decoding did (JSON)."""
    return ShardDecoder(plan, items, skip_unreadable)(index)


# A decoded shard, or a part of one: images (n, S, S, C), labels (n,) or None, what decoding did (JSON).
Decoded = tuple[np.ndarray, np.ndarray | None, dict]
# Part of a shard: (shard index, first input, end) as positions in `plan.shard_inputs(index)`.
Part = tuple[int, int, int]
PART_MB = 16  # the decoded bytes of one part, so a part's images travel between processes in one piece
PART_IMAGES = 1024  # and at most this many images, so a shard of small images is still many parts


@dataclass(frozen=True)
class ShardDecoder:
    """Decodes the shards of a plan, whole (`decoder(index)`) or in parts that any process may decode
    (`parts`, `decode_part`) and this one joins (`join`): the same images and counts either way, since
    every image is decoded alone at the plan's channel count. Picklable when `items.open` is."""

    plan: PreparePlan
    items: EncodedItems
    skip_unreadable: bool

    def __call__(self, index: int) -> Decoded:
        return self.join(index, [self.decode_part((index, 0, len(self.plan.shard_inputs(index))))])

    def parts(self, index: int) -> list[Part]:
        """Shard `index` cut into parts of at most PART_MB decoded MiB and PART_IMAGES images."""
        image_bytes = self.plan.image_size * self.plan.image_size * self.plan.channels
        size = max(1, min(PART_IMAGES, (PART_MB << 20) // image_bytes))
        count = len(self.plan.shard_inputs(index))
        return [(index, start, min(start + size, count)) for start in range(0, count, size)]

    def decode_part(self, part: Part) -> Decoded:
        index, start, stop = part
        inputs = self.plan.shard_inputs(index)[start:stop]
        decoded = decode_items(inputs, self.items.open, self.plan.image_size, self.plan.channels, skip_unreadable=True)
        labels = None if self.plan.labels is None else np.array([self.plan.labels[n] for n in decoded.names], np.int64)
        info = {"conversions": decoded.conversions, "exif_rotated": decoded.rotated, "skipped": decoded.skipped}
        return decoded.images, labels, info

    def join(self, index: int, parts: list[Decoded]) -> Decoded:
        """Shard `index` from its parts in order; unreadable pixels refuse it unless skip_unreadable."""
        conversions, skipped = Counter(), {}
        for _, _, info in parts:
            conversions.update(info["conversions"])
            skipped.update(info["skipped"])
        if skipped and not self.skip_unreadable:
            raise DataError(
                f"cannot use the images in {self.plan.source!r}: {len(skipped)} unreadable file(s): "
                f"{name_some(skipped)}; fix or remove them, or pass --skip-unreadable (the {index} shard(s) "
                f"before are kept: the same command resumes after them)"
            )
        images = np.concatenate([images for images, _, _ in parts])
        labels = None if self.plan.labels is None else np.concatenate([labels for _, labels, _ in parts])
        info = {"conversions": dict(sorted(conversions.items())), "skipped": dict(sorted(skipped.items())),
                "exif_rotated": sum(info["exif_rotated"] for _, _, info in parts)}
        return images, labels, info


def manifest_info(plan: PreparePlan, infos: list[dict]) -> dict:
    """The manifest's record of the decoding, from every shard's info (in shard order)."""
    conversions = Counter()
    skipped = dict(plan.skipped)
    for info in infos:
        conversions.update(info["conversions"])
        skipped.update(info["skipped"])
    record = {
        "source": plan.source,
        "preprocessing": PREPROCESSING,
        "conversions": dict(sorted(conversions.items())),
        "exif_rotated": sum(info["exif_rotated"] for info in infos),
        "skipped": dict(sorted(skipped.items())),
    }
    if plan.classes is not None:
        record["classes"] = plan.classes
    return record


# ---------------------------------------------------------------------------------------------
# The single-process preparation


def prepare_images(src: str, dst: str, image_size: int, channels: int | None = None, skip_unreadable: bool = False,
                   shard_mb: float | None = None, progress: Progress | None = None,
                   run: Run = in_order) -> dict:
    """Pack `src` into the sharded pack `dst` (see the module docstring); returns the manifest.

    `shard_mb` bounds a shard's bytes (default `DEFAULT_SHARD_MB`); `progress` receives a line after each
    shard (done, rate, ETA) and one when a restart skips shards. `run` says where encoded images are
    read (headers and pixels; see `Run`); this process writes the shards, the progress file and the
    manifest either way."""
    shard_mb = DEFAULT_SHARD_MB if shard_mb is None else shard_mb
    check_image_size(image_size, src)
    if channels not in (None, 1, 3):
        raise DataError(f"--channels must be 1 or 3, got {channels}")
    images_per_shard(image_size, channels or 3, shard_mb)  # refuses a bad --shard-mb before any reading
    report = progress or (lambda line: None)
    builtin = builtin_name(src)
    if builtin is not None:
        return _prepare_arrays(src, open_builtin(builtin, image_size), dst, channels, shard_mb, report)
    with _local_copy(src) as (local, remote_fingerprint):
        items = encoded_items(src, local)
        if items is not None:
            if remote_fingerprint is not None:  # the copy's own times are those of this download
                items = dataclasses.replace(items, fingerprint=remote_fingerprint)
            plan = plan_items(src, items, image_size, channels, skip_unreadable, shard_mb, run)
            decoder = ShardDecoder(plan, items, skip_unreadable)
            return _write_pack(dst, plan, functools.partial(decoded_shards, decoder, run), report)
        return _prepare_arrays(src, open_local(src, local, image_size), dst, channels, shard_mb, report)


def _prepare_arrays(src: str, opened: ImageSource, dst: str, channels: int | None, shard_mb: float,
                    report: Progress) -> dict:
    images, labels, image_size = as_channels(opened.read_all(), channels), opened.labels(), opened.image_size
    if labels is not None and len(labels) != len(images):
        raise DataError(f"data source {src!r} has {len(images)} images but {len(labels)} labels")
    channels = images.shape[-1]
    per_shard = images_per_shard(image_size, channels, shard_mb)
    names = [str(i) for i in range(len(images))]
    key = {"version": PACK_VERSION, "source": src, "image_size": image_size, "channels": channels,
           "per_shard": per_shard, "inputs": _array_fingerprint(images, labels)}
    plan = PreparePlan(src, image_size, channels, per_shard, names, {}, None, None, key)

    def shards(todo: list[int]) -> Iterator[tuple[int, Decoded]]:
        for index in todo:
            rows = slice(index * per_shard, (index + 1) * per_shard)
            info = {"conversions": {}, "exif_rotated": 0, "skipped": {}}
            yield index, (images[rows], None if labels is None else labels[rows], info)

    return _write_pack(dst, plan, shards, report, {"source": src})


def decoded_shards(decoder: ShardDecoder, run: Run, todo: list[int]) -> Iterator[tuple[int, Decoded]]:
    """(index, decoded shard) for each shard of `todo`, in order: all their parts read where `run`
    says, each shard joined here as soon as its last part is in."""
    parts = [part for index in todo for part in decoder.parts(index)]
    images = sum(len(decoder.plan.shard_inputs(index)) for index in todo)
    joined, current = [], None
    for (index, _, _), decoded in zip(parts, run(decoder.decode_part, parts, images)):
        if joined and index != current:
            yield current, decoder.join(current, joined)
            joined = []
        current = index
        joined.append(decoded)
    if joined:
        yield current, decoder.join(current, joined)


def _write_pack(dst: str, plan: PreparePlan, decode: Callable[[list[int]], Iterable[tuple[int, Decoded]]],
                report: Progress, info: dict | None = None) -> dict:
    """Decode (`decode(todo)`) and write the shards a previous run did not finish, then the manifest."""
    done = read_progress(dst, plan.key)
    if done:
        report(f"resuming: {len(done)} of {plan.shards} shard(s) already written and intact")
    begin_pack(dst)
    started, inputs_done = time.monotonic(), 0
    todo = [index for index in range(plan.shards) if index not in done]
    for index, (images, labels, shard_info) in decode(todo):
        done[index] = (write_shard(dst, index, images, labels), shard_info)
        record_progress(dst, plan.key, done)
        inputs_done += len(plan.shard_inputs(index))
        report(_progress_line(plan, done, inputs_done, time.monotonic() - started))
    if sum(done[k][0].count for k in done) == 0:
        raise DataError(f"none of the {len(plan.names)} images of {plan.source!r} could be read")
    records, infos = [done[k][0] for k in range(plan.shards)], [done[k][1] for k in range(plan.shards)]
    return finish_manifest(dst, records, plan.image_size, plan.channels, info or manifest_info(plan, infos))


def _progress_line(plan: PreparePlan, done: dict, inputs_done: int, elapsed: float) -> str:
    """'shard 3/40 written: 1,536/20,480 images, 850 images/s, ETA 0:00:22' (rate of this run)."""
    written = sum(len(plan.shard_inputs(k)) for k in done)
    rate = inputs_done / elapsed if elapsed > 0 else float("inf")
    left = len(plan.names) - written
    eta = time.strftime("%H:%M:%S", time.gmtime(left / rate)) if rate not in (0, float("inf")) else "0:00:00"
    return (f"shard {len(done)}/{plan.shards} written: {written:,}/{len(plan.names):,} images, "
            f"{rate:,.0f} images/s, ETA {eta}")


def _array_fingerprint(images: np.ndarray, labels: np.ndarray | None) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(images).data)
    if labels is not None:
        digest.update(np.ascontiguousarray(labels).data)
    return digest.hexdigest()


@contextmanager
def _local_copy(src: str) -> Iterator[tuple[str, str | None]]:
    """A local path holding `src` (the path itself, or a throwaway download of a remote source) and, for a
    remote source, a fingerprint of its objects as the store lists them (names, sizes, ETags)."""
    fs, path = filesystem(src)
    if is_local(fs):
        if not os.path.exists(path):
            raise DataError(missing_message(src))
        yield path, None
        return
    with remote_errors(src):
        listing = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    objects = sorted([name, info.get("size"), str(info.get("ETag") or info.get("LastModified"))]
                     for name, info in listing.items())
    fingerprint = hashlib.sha256(json.dumps(objects).encode()).hexdigest()
    with tempfile.TemporaryDirectory(prefix="ditsweep-prepare-") as scratch:
        local = os.path.join(scratch, "source" + Path(path).suffix)
        download(src, fs, path, local)
        yield local, fingerprint


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)

