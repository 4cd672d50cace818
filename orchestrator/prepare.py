"""`ditsweep prepare-data`: where the shards are decoded, in this process or on Ray Data.

The pack itself (the plan and shard boundaries, decoding, the shard files, the progress file, the
manifest, resuming, the progress line) is `trainer.prepare`'s, and this process writes every file of
it whichever way the shards are decoded; this module only picks where the decoding runs:

- ``--address ADDR``: on the Ray cluster at ADDR, through Ray Data (orchestrator.prepare_ray): the
  headers in chunks of 2,048 files, then each shard in parts of at most 1,024 images, read and decoded
  by any node's CPU;
- otherwise in this process, unless the images still to decode number at least `LOCAL_RAY_MIN_IMAGES`
  and this machine has at least `LOCAL_RAY_MIN_CORES` cores: then on an in-process Ray using every
  core. On 2 loaded cores (benchmarks/RESULTS.md section 10) starting Ray and its workers cost 25-28 s
  and one process read 530-860 JPEGs/s, so Ray did not pay for itself on 2 cores; on 4 quiet cores at
  80% of linear and a start of ~15 s it would from about 20,000 images (an estimate, not measured);
- ``--ray`` / ``--no-ray`` force either way.

Workers read the source's files themselves, by the paths this machine uses: on a cluster a local
source must be on a filesystem every node mounts at the same path (checked before anything is
decoded, exit 2 otherwise). A remote source (``s3://``) is downloaded to this machine first by
`trainer.prepare`, so it works on this machine's cores but not across a cluster's machines.

Nothing in this module imports Ray; prepare_ray is imported only when Ray is used.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from trainer.builtins import builtin_name
from trainer.prepare import in_order, prepare_images, print_progress
from trainer.storage import DataError

LOCAL_RAY_MIN_IMAGES = 20_000
LOCAL_RAY_MIN_CORES = 4
STALL_TIMEOUT_S = 600.0  # no part decoded for this long: the run stops (resumable); --stall-timeout


class PrepareStalled(RuntimeError):
    """Ray Data decoded nothing for --stall-timeout seconds: stopped, resumable (exit 1)."""


def use_ray(images: int, address: str | None, ray: bool | None, cores: int | None = None) -> bool:
    """Whether shards holding `images` images (the ones still to do) are decoded on Ray Data."""
    if ray is not None:
        return ray
    if address:
        return True
    return images >= LOCAL_RAY_MIN_IMAGES and (cores or os.cpu_count() or 1) >= LOCAL_RAY_MIN_CORES


@dataclass
class ShardPlacement:
    """Where `prepare-data` reads and decodes: a `trainer.prepare.Run` that runs the plan's header scan
    and the shards' parts in this process or on Ray Data (see the module docstring). Ray, once started
    for a preparation, serves both steps; `close` stops it. `nodes`: the ids of the nodes that ran tasks."""

    address: str | None = None
    ray: bool | None = None
    ray_cpus: int | None = None  # an in-process Ray's CPUs (default: all)
    stall_timeout_s: float = STALL_TIMEOUT_S
    nodes: set[str] = field(default_factory=set)
    _started: bool = False

    def __call__(self, fn: Callable[[Any], Any], tasks: list, images: int) -> Iterable[Any]:
        if not tasks or not use_ray(images, self.address, self.ray):
            return in_order(fn, tasks, images)
        from orchestrator.prepare_ray import run_tasks, start, travels

        if not travels(fn):  # e.g. a reader holding an open database handle
            message = "the reader of this source cannot be sent to Ray workers"
            if self.address:
                raise DataError(f"{message}; run prepare-data without --address on the machine that holds it")
            print(f"{message}: reading it in this process", file=sys.stderr, flush=True)
            self.ray = False  # the shards' parts hold the same reader: said once
            return in_order(fn, tasks, images)
        self._started = start(self.address, self.ray_cpus) or self._started
        return run_tasks(tasks, fn, stall_timeout_s=self.stall_timeout_s, expected=(DataError,), nodes=self.nodes,
                         stalled=PrepareStalled)

    def join(self, src: str) -> None:
        """With an --address: join the cluster (bounded) and check that every node sees the files its
        workers will read by this machine's paths (the source, or for a remote source the temporary
        folder it is downloaded to), before anything is read or written."""
        if not self.address:
            return
        from orchestrator.prepare_ray import check_nodes_see, start

        self._started = start(self.address, None) or self._started
        if builtin_name(src) is not None:  # arrays in memory: nothing for the nodes to read
            return
        if _is_remote(src):
            with tempfile.TemporaryDirectory(prefix="ditsweep-prepare-") as scratch:
                check_nodes_see([scratch], _where_to_put(src))
        else:
            check_nodes_see([os.path.abspath(src)], _where_to_put(src))

    def close(self) -> None:
        """Stop (or leave) the Ray this placement started or joined; tasks still running are cancelled."""
        if self._started:
            from orchestrator.prepare_ray import stop

            stop()
            self._started = False

    def summary(self) -> str:
        """'read on Ray Data by 2 node(s)', or '' when nothing ran on Ray."""
        return f"read on Ray Data by {len(self.nodes)} node(s)" if self.nodes else ""


def _where_to_put(source: str) -> str:
    """The end of the refusal when some node does not see the source's files."""
    if _is_remote(source):
        return (f"{source} was downloaded to this machine first (a remote source is read through the machine "
                f"that runs prepare-data): run it without --address on one large machine, or copy the files to "
                f"a filesystem every node mounts and give that path")
    return ("put the source on a filesystem every node mounts at the same path, or run prepare-data without "
            "--address on the machine that holds it")


def _is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def prepare_pack(src: str, dst: str, image_size: int = 32, channels: int | None = None,
                 skip_unreadable: bool = False, shard_mb: float | None = None,
                 placement: ShardPlacement | None = None, quiet: bool = False) -> dict:
    """`ditsweep prepare-data`: pack `src` into `dst` with the shards decoded where `placement` says
    (default: see the module docstring); returns the manifest. A cluster (`placement.address`) is
    joined and checked first, so one that does not answer, or cannot see the source, changes nothing."""
    placement = placement or ShardPlacement()
    try:
        placement.join(src)
        return prepare_images(src, dst, image_size, channels, skip_unreadable, shard_mb,
                              None if quiet else print_progress, placement)
    finally:
        placement.close()
