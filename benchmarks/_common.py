"""What every benchmark shares: interleaved best-of-N timing and a description of the machine.

Targets are ratios of two things timed in the same process, interleaved (A, B, A, B, ...) and each
taken as the best of N, so a neighbour's burst of load slows both sides alike or neither.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Run as `python benchmarks/x.py` from anywhere: the repository root must be importable.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_times(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    cpu_times: dict[str, float] | None = None,
) -> dict[str, float]:
    """Best wall time (s) of each zero-argument callable, run round-robin `repeats` times.

    With `cpu_times`, also fills in each callable's best process CPU time: on a shared machine a
    process that is descheduled waits in wall time but not in CPU time, so the CPU-time ratio is the
    steadier one under load (the wall-time ratio is the target's).
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    synchronize(device)
    best = {name: float("inf") for name in candidates}
    if cpu_times is not None:
        cpu_times.update({name: float("inf") for name in candidates})
    for _ in range(repeats):
        for name, fn in candidates.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
            if cpu_times is not None:
                cpu_times[name] = min(cpu_times[name], time.process_time() - start_cpu)
    return best


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: torch.device | str = "cpu") -> str:
    """One line naming the hardware, the software and the load it ran under."""
    device = torch.device(device)
    parts = [f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    try:
        load = Path("/proc/loadavg").read_text().split()[:3]
        parts.append(f"load average {' '.join(load)}")
    except OSError:
        pass
    return "; ".join(parts)


def add_device_options(parser: argparse.ArgumentParser, threads_help: str = "torch threads (0 = torch's default)") -> None:
    """The --device and --threads options every single-process benchmark takes; see `device_from`."""
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=0, help=threads_help)


def device_from(args: argparse.Namespace) -> torch.device:
    """Apply --threads and resolve --device (auto = CUDA when there is one)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)
