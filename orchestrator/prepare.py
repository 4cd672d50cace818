"""`ditsweep prepare-data`: where the shards are decoded, in this process or on Ray Data.

The pack itself (shard boundaries, decoding, the shard files, the manifest, resuming) is
`trainer`'s, the same whichever way the shards run; this module only picks how they run:

- ``--address ADDR``: on the Ray cluster at ADDR, through Ray Data (orchestrator.prepare_ray);
- otherwise in this process, unless the shards still to do hold at least `LOCAL_RAY_MIN_IMAGES` images
  and this machine has more than one core: then on an in-process Ray using every core. Starting Ray
  costs about 10 s on a small machine, a tenth of what a second core saves on 20,000 images;
- ``--ray`` / ``--no-ray`` force either way.

Progress (a line per shard with the rate and the time left), resuming and the manifest are
`trainer.prepare`'s, whichever way the shards run. Nothing in this module imports Ray; prepare_ray is
imported only when Ray is used.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator


LOCAL_RAY_MIN_IMAGES = 20_000


def use_ray(images: int, address: str | None, ray: bool | None, cores: int | None = None) -> bool:
    """Whether shards holding `images` images (the ones still to do) run on Ray Data."""
    if ray is not None:
        return ray
    if address:
        return True
    return images >= LOCAL_RAY_MIN_IMAGES and (cores or os.cpu_count() or 1) > 1


def run_serially(tasks: list[dict], work: Callable[[dict], dict]) -> Iterator[dict]:
    """Each task's result in this process, in order."""
    return map(work, tasks)


def shard_runner(address: str | None, ray: bool | None, count: Callable[[dict], int],
                 stall_timeout_s: float, expected: tuple[type[BaseException], ...]
                 ) -> Callable[[list[dict], Callable[[dict], dict]], Iterable[dict]]:
    """How the shards still to do run: in this process, or on Ray Data (see the module docstring).
    `count(task)` says how many images a task decodes."""

    def run(tasks: list[dict], work: Callable[[dict], dict]) -> Iterable[dict]:
        if not use_ray(sum(map(count, tasks)), address, ray):
            return run_serially(tasks, work)
        from orchestrator.prepare_ray import run_tasks

        return run_tasks(tasks, work, address, stall_timeout_s=stall_timeout_s, expected=expected)

    return run
