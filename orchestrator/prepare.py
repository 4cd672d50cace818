"""`ditsweep prepare-data`: where the shards are decoded (one process, or Ray Data) and the progress line.

The pack itself (shard boundaries, decoding, the shard files, the manifest, resuming) is
`trainer`'s, the same whichever way the shards run; this module only picks how they run:

- ``--address ADDR``: on the Ray cluster at ADDR, through Ray Data (orchestrator.prepare_ray);
- otherwise in this process, unless the shards still to do hold at least `LOCAL_RAY_MIN_IMAGES` images
  and this machine has more than one core: then on an in-process Ray using every core. Starting Ray
  costs about 10 s on a small machine, a tenth of what a second core saves on 20,000 images;
- ``--ray`` / ``--no-ray`` force either way.

Progress goes to stderr as one line every few seconds: images done, the rate, and the time left.
Nothing in this module imports Ray; prepare_ray is imported only when Ray is used.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

from orchestrator.display import clock

LOCAL_RAY_MIN_IMAGES = 20_000
PRINT_EVERY_S = 5.0


def use_ray(images: int, address: str | None, ray: bool | None, cores: int | None = None) -> bool:
    """Whether shards holding `images` images (the ones still to do) run on Ray Data."""
    if ray is not None:
        return ray
    if address:
        return True
    return images >= LOCAL_RAY_MIN_IMAGES and (cores or os.cpu_count() or 1) > 1


class PrepareProgress:
    """The progress line of a preparation: ``prepare-data: 12,288/40,000 images (31%), 850/s, eta 00:33``.

    `done` counts images already in finished shards when the run started (a resumed preparation);
    the rate and the time left count only this run's."""

    def __init__(self, total: int, done: int = 0, where: str = "", stream: TextIO | None = None,
                 every_s: float = PRINT_EVERY_S, now: Callable[[], float] = time.monotonic) -> None:
        self.total, self.done, self.resumed = total, done, done
        self.where = where  # "on 4 CPUs of ray://head:10001", "in this process"
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.now = now
        self.start = now()
        self.last_print = float("-inf")

    def add(self, images: int) -> None:
        self.done += images
        self.tick()

    def tick(self, force: bool = False) -> None:
        if force or self.now() - self.last_print >= self.every_s:
            self.last_print = self.now()
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = self.now() - self.start
        made = self.done - self.resumed
        rate = made / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        share = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"prepare-data: {self.done:,}/{self.total:,} images ({share:.0f}%)", f"{rate:,.0f}/s",
                 f"elapsed {clock(elapsed)}", f"eta {clock(left)}"]
        if self.resumed:
            parts.append(f"{self.resumed:,} resumed")
        return ", ".join(parts) + (f" {self.where}" if self.where else "")


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
