"""`ditsweep prepare-data`: where the shards are decoded, in this process or on Ray Data.

The pack itself (the plan and shard boundaries, decoding, the shard files, the progress file, the
manifest, resuming, the progress line) is `trainer.prepare`'s, and this process writes every file of
it whichever way the shards are decoded; this module only picks where the decoding runs:

- ``--address ADDR``: on the Ray cluster at ADDR, through Ray Data (orchestrator.prepare_ray), each
  shard cut into parts of at most 1,024 images that any node's CPU decodes;
- otherwise in this process, unless the images still to decode number at least `LOCAL_RAY_MIN_IMAGES`
  and this machine has at least `LOCAL_RAY_MIN_CORES` cores: then on an in-process Ray using every
  core. On 2 loaded cores (benchmarks/RESULTS.md section 10) starting Ray and its workers cost 28 s
  and one process decodes ~860 JPEGs/s, so Ray did not pay on 2 cores; on 4 quiet cores at 80% of
  linear and a start of ~15 s it would from about 20,000 images (an estimate from those numbers);
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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from trainer.builtins import builtin_name
from trainer.prepare import Decoded, Part, ShardDecoder, decode_in_order, prepare_images, print_progress
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
    """A `trainer.prepare.ShardRunner` that decodes in this process or on Ray Data (see the module
    docstring), and remembers where: `shards` decoded on Ray and the ids of the `nodes` that did."""

    address: str | None = None
    ray: bool | None = None
    ray_cpus: int | None = None  # an in-process Ray's CPUs (default: all)
    stall_timeout_s: float = STALL_TIMEOUT_S
    shards: int = 0
    nodes: set[str] = field(default_factory=set)

    def __call__(self, todo: list[int], decoder: ShardDecoder) -> Iterable[tuple[int, Decoded]]:
        images = sum(len(decoder.plan.shard_inputs(index)) for index in todo)
        if not todo or not use_ray(images, self.address, self.ray):
            return decode_in_order(todo, decoder)
        from orchestrator.prepare_ray import travels

        if not travels(decoder):  # e.g. a reader holding an open database handle
            message = f"the reader of {decoder.plan.source!r} cannot be sent to Ray workers"
            if self.address:
                raise DataError(f"{message}; run prepare-data without --address on the machine that holds it")
            print(f"{message}: decoding in this process", file=sys.stderr, flush=True)
            return decode_in_order(todo, decoder)
        return self._on_ray(todo, decoder)

    def _on_ray(self, todo: list[int], decoder: ShardDecoder) -> Iterator[tuple[int, Decoded]]:
        from orchestrator.prepare_ray import run_tasks

        parts = [part for index in todo for part in decoder.parts(index)]
        decoded = run_tasks(parts, decoder.decode_part, self.address, num_cpus=self.ray_cpus,
                            stall_timeout_s=self.stall_timeout_s, expected=(DataError,), nodes=self.nodes,
                            stalled=PrepareStalled)
        for index, shard_parts in _by_shard(parts, decoded):
            self.shards += 1
            yield index, decoder.join(index, shard_parts)

    def join(self, src: str) -> None:
        """With an --address: join the cluster (bounded) and check that every node sees the files its
        workers will read by this machine's paths (the source, or for a remote source the temporary
        folder it is downloaded to), before anything is read or written."""
        if not self.address:
            return
        from orchestrator.prepare_ray import join_cluster

        if builtin_name(src) is not None:  # arrays in memory: nothing for the nodes to read
            join_cluster(self.address, [], "")
        elif _is_remote(src):
            with tempfile.TemporaryDirectory(prefix="ditsweep-prepare-") as scratch:
                join_cluster(self.address, [scratch], _where_to_put(src))
        else:
            join_cluster(self.address, [os.path.abspath(src)], _where_to_put(src))

    def summary(self) -> str:
        """'on Ray Data: 4 shard(s) decoded on 2 node(s)', or '' when nothing ran on Ray."""
        return f"on Ray Data: {self.shards} shard(s) decoded on {len(self.nodes)} node(s)" if self.shards else ""


def _by_shard(parts: list[Part], decoded: Iterable[Decoded]) -> Iterator[tuple[int, list[Decoded]]]:
    """(shard index, its decoded parts in order) from the parts and their results, both in task order."""
    current, joined = None, []
    for (index, _, _), result in zip(parts, decoded):
        if joined and index != current:
            yield current, joined
            joined = []
        current = index
        joined.append(result)
    if joined:
        yield current, joined


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
    placement.join(src)
    return prepare_images(src, dst, image_size, channels, skip_unreadable, shard_mb,
                          None if quiet else print_progress, placement)
