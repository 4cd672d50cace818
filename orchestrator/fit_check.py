"""Does the grid fit: refuse a sweep whose trials need more memory than a worker has (this machine's RAM or
its GPU share), before anything decodes or allocates; `plan` and `launch` run this check.

The estimate per trial is `trainer.footprint.estimate_trial_memory`; this module finds each data source's
size without decoding it, compares every trial with the memory available and names the numbers.
A trial on a GPU worker (`device="cuda"`) is estimated under bf16 autocast and compared with the memory
of its GPU share (`gpu_share_bytes`) where that GPU is known.
"""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.spec import SpecError, Trial
from trainer.messages import short_text
from trainer.footprint import MemoryEstimate, estimate_trial_memory, format_bytes

# What to change, by the term that dominates the estimate.
_FIXES = {
    "data pool": "lower data.image_size, or pack the source with `ditsweep prepare-data` (a trial then "
    "reads only its subset and held-out images; an image folder is decoded whole, whatever data.num_images)",
    "device data": "lower data.num_images or data.test_images, or data.image_size (both subsets are moved to "
    "the GPU)",
    "model state": "choose a smaller model.size",
    "attention masks": "lower data.image_size, or use attention.backend: banded (or flex on a GPU)",
    "activations": "lower train.batch_size or data.image_size",
    "attention scores": "lower train.batch_size or data.image_size, or use attention.backend: banded "
    "(or flex on a GPU)",
    "evaluation": "lower eval.psnr_gap.batch_size or eval.fid.batch_size, set eval.locality.enabled: false "
    "(it writes out tokens x tokens attention maps), or lower data.image_size",
}


class TrialMemoryError(SpecError):
    """A trial would not fit in a worker's memory; the message names estimate, limit and the fix."""


def machine_memory_bytes() -> int:
    """Total RAM of this machine (what in-process Ray workers share)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return _meminfo_total()


def _meminfo_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


def gpu_memory_bytes() -> int | None:
    """Memory of this machine's first CUDA GPU, or None when it has none (a laptop planning a cluster
    sweep: the GPU is unknown here). torch is imported only to ask."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def gpu_share_bytes(gpu: float, memory: int) -> int:
    """The GPU memory one trial may use: a fraction `gpu` < 1 packs several trials on one GPU; a trial
    asking for more runs its model on one of them."""
    return int(memory * min(gpu, 1.0))


def trial_estimates(trials: list[Trial], device: str = "cpu") -> dict[str, MemoryEstimate]:
    """Trial key -> memory estimate; each data source is sized once, from headers or file names."""
    from trainer.sources import source_shape  # fsspec and PIL: only once a spec is valid

    shapes: dict[str, tuple] = {}
    estimates = {}
    for trial in trials:
        data = trial.config.data
        if data.source not in shapes:
            shapes[data.source] = source_shape(data.source) or _lower_bound_shape(trial)
        estimates[trial.key] = estimate_trial_memory(trial.config, *shapes[data.source], device=device)
    return estimates


def _lower_bound_shape(trial: Trial) -> tuple[int, int]:
    """A source not readable without downloading it: at least its training subset and held-out images."""
    data = trial.config.data
    return (data.num_images or 1) + data.test_images, 3


def check_trial_memory(
    trials: list[Trial], available: int | None = None, *, device: str = "cpu", where: str = "this machine"
) -> dict[str, MemoryEstimate]:
    """The estimates, or TrialMemoryError for the first trial whose estimate exceeds `available` bytes
    (default: this machine's RAM); `where` names the limit in the message (e.g. "a node of the cluster")."""
    available = machine_memory_bytes() if available is None else available
    estimates = trial_estimates(trials, device)
    for trial in trials:
        estimate = estimates[trial.key]
        if estimate.total > available:
            raise TrialMemoryError(_too_big_message(trial, estimate, available, where))
    return estimates


def _too_big_message(trial: Trial, estimate: MemoryEstimate, available: int, where: str) -> str:
    cfg = trial.config
    biggest = estimate.biggest
    return (
        f"trial {short_text(trial.name, 100)} needs about {format_bytes(estimate.total)} of memory, more than the "
        f"{format_bytes(available)} {where} has; the largest part is {biggest} "
        f"({format_bytes(estimate.terms[biggest])}) with data.image_size={cfg.data.image_size}, "
        f"train.batch_size={cfg.train.batch_size}, model.size={cfg.model.size}: {_FIXES[biggest]}"
    )
