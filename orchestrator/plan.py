"""What a sweep will run: the frozen `Plan` (the trials of a spec, which of them the tracking store
already holds, and whether those are rerun), its table, and the compute it needs.

The checks that can refuse a sweep are here too, so that `launch` can run all of them before it
creates a run or starts Ray: every trial config (in `expand`), the data, the FID weights, the storage.
Nothing here imports MLflow or Ray.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from orchestrator.display import duration, format_table, show_value
from orchestrator.fit_check import check_trial_memory, gpu_memory_bytes, gpu_share_bytes, trial_estimates
from orchestrator.spec import SpecError, SweepSpec, Trial, check_tag_value, expand, load_spec, parse_spec
from trainer.footprint import dit_flops_per_image, format_bytes

if TYPE_CHECKING:
    from orchestrator.tracking import TrialRun


@dataclass(frozen=True)
class Grid:
    """A spec read and expanded: every trial config validated, not yet looked up in any store."""

    spec: SweepSpec
    spec_text: str
    overrides: tuple[str, ...]
    trials: tuple[Trial, ...]


@dataclass(frozen=True)
class Plan(Grid):
    """A grid with its cache state: made complete by `build_plan`, never changed."""

    cached: Mapping[str, TrialRun] = field(default_factory=lambda: MappingProxyType({}))  # key -> FINISHED run
    force: bool = False  # rerun the cached trials too

    @property
    def to_run(self) -> list[Trial]:
        return [t for t in self.trials if self.force or t.key not in self.cached]


def read_grid(spec_text: str, source: str, overrides: list[str]) -> Grid:
    """A spec from its text (the copy stored with a sweep's run), its grid expanded and validated."""
    spec = parse_spec(spec_text, source)
    return Grid(spec, spec_text, tuple(overrides), tuple(expand(spec, overrides)))


def read_grid_file(spec_path: str | Path, overrides: list[str], refuse_gpu_memory: bool = True) -> Grid:
    """A spec file, its grid expanded and validated, and every trial's data checked. A trial too big
    for this machine is refused (a GPU trial: too big for this machine's GPU share, or, with no GPU
    here, for its RAM); with `refuse_gpu_memory` False (`plan`, which runs no trial) a spec whose trials
    run on GPU workers is not measured against this machine: `gpu_memory_note` says it."""
    spec = load_spec(spec_path)
    grid = Grid(spec, Path(spec_path).read_text(), tuple(overrides), tuple(expand(spec, overrides)))
    if not spec.resources.gpu:
        check_trial_memory(grid.trials)  # before check_data decodes the images
    elif refuse_gpu_memory:
        _check_gpu_trial_memory(spec, grid.trials)
    check_data(grid.trials)
    return grid


def build_plan(grid: Grid, cached: Mapping[str, TrialRun] | None = None, force: bool = False) -> Plan:
    """The one place a Plan is made: the grid's trials with the store's FINISHED runs by trial key."""
    return Plan(**{f.name: getattr(grid, f.name) for f in fields(Grid)},
                cached=MappingProxyType(dict(cached or {})), force=force)


# ---------------------------------------------------------------------------------------------
# Checks before anything starts


def _check_gpu_trial_memory(spec: SweepSpec, trials: tuple[Trial, ...]) -> None:
    """GPU trials against a GPU share when this machine has a GPU; otherwise (the GPU is unknown here)
    against this machine's RAM, as before the estimate knew GPUs."""
    memory = gpu_memory_bytes()
    if memory is None:
        check_trial_memory(list(trials), device="cuda",
                           where="this machine has in RAM (it has no CUDA GPU, so a GPU's memory is unknown here)")
        return
    share = gpu_share_bytes(spec.resources.gpu, memory)
    check_trial_memory(list(trials), share, device="cuda",
                       where=f"a share of {spec.resources.gpu:g} of this machine's GPU ({format_bytes(memory)})")


def _device(spec: SweepSpec) -> str:
    """Where a trial's tensors live, for the memory estimate: a GPU when the spec asks for one."""
    return "cuda" if spec.resources.gpu else "cpu"


def check_data(trials: tuple[Trial, ...] | list[Trial]) -> None:
    """Load each distinct data source once and check every trial's subset fits it."""
    from trainer.builtins import held_out_region
    from trainer.data import open_source
    from trainer.subsets import split_subsets

    sizes: dict[tuple[str, int], int] = {}
    for trial in trials:
        data = trial.config.data
        source = (data.source, data.image_size)
        if source not in sizes:
            sizes[source] = open_source(data.source, data.image_size).count  # a pack: its manifest only
        split_subsets(
            sizes[source], data.test_images, data.num_images, data.fraction, data.shuffle_seed, disjoint=data.disjoint,
            region=held_out_region(data.source, data.image_size),
        )


def check_fid_weights(trials: tuple[Trial, ...] | list[Trial]) -> None:
    """Trials with FID need the Inception weights: check now that they can be had, not an hour into a trial.

    A local file must exist and have the expected digest; a URI must be cached or answer. On a remote
    Ray cluster the same path or URI must also work on the workers.
    """
    from trainer.fid_weights import WeightsError, fetch_weights, weights_available

    wanted = {(t.config.eval.fid.weights, t.config.eval.fid.weights_sha256) for t in trials if t.config.eval.fid.enabled}
    for weights, sha256_prefix in sorted(wanted):
        ok, explanation = weights_available(weights)
        if not ok:
            raise SpecError(f"eval.fid.enabled=true needs the FID Inception weights (eval.fid.weights): {explanation}")
        if "://" not in weights:  # a local file: its digest is cheap to check here
            try:
                fetch_weights(weights, expected_sha256_prefix=sha256_prefix)
            except WeightsError as err:
                raise SpecError(f"eval.fid.weights: {err}") from None


def check_storage(storage: str | None) -> None:
    """An s3:// storage must be reachable before anything starts; any storage must fit the sweep's tag."""
    check_tag_value("--storage", storage)
    if not storage or not storage.startswith("s3://"):
        return
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(storage)
        fs.ls(path.split("/", 1)[0])
    except Exception as err:  # noqa: BLE001 - any client error means the sweep cannot store results
        raise SpecError(f"storage {storage!r} is not reachable: {type(err).__name__}: {err}") from None


def check_storage_is_shared(storage: str | None, address: str | None, count_nodes: Callable[[str], int]) -> None:
    """On a cluster of several nodes a local --storage cannot work: a trial moved to another node
    (after a failure or a resume) could not read the checkpoints its first node wrote.

    `count_nodes(address)` says how many nodes the cluster has; it is asked only for a local storage
    on a cluster given by --address."""
    if not address or (storage and "://" in storage):
        return
    nodes = count_nodes(address)
    if nodes > 1:
        raise SpecError(
            f"--storage {storage or '(default, local)'!r} is a local folder, but the Ray cluster at {address} has "
            f"{nodes} nodes: a trial retried on another node could not read its checkpoints; give shared "
            f"storage such as --storage s3://bucket/prefix"
        )


# ---------------------------------------------------------------------------------------------
# The plan for people


def plan_table(plan: Plan) -> str:
    axes = list(plan.spec.grid)
    header = ["#", *axes, "schedule", "memory", "key", "state"]
    memory = trial_estimates(plan.trials, device=_device(plan.spec))
    rows = []
    for i, trial in enumerate(plan.trials, 1):
        if trial.key in plan.cached and not plan.force:
            state = "cached"
        else:
            state = "rerun" if trial.key in plan.cached else "run"
        values = [show_value(trial.axes[a], none="None") for a in axes]
        rows.append([str(i), *values, trial.config.schedule, format_bytes(memory[trial.key].total),
                     trial.key[:10], state])
    return format_table([header, *rows], rule=True)


GPU_SIZES_GIB = (16, 24, 40, 80)  # common GPU memory sizes, for the plan's information


def gpu_memory_note(plan: Plan) -> str:
    """For trials on GPU workers: the largest trial's GPU memory estimate (bf16 autocast, the backend
    that runs there) and which GPU sizes it fits, and this machine's GPU share when it has a GPU; all
    information (`launch` refuses against the workers that will run it)."""
    gpu = plan.spec.resources.gpu
    if not gpu:
        return ""
    estimates = trial_estimates(plan.trials, device="cuda")
    largest = max(estimates.values(), key=lambda estimate: estimate.total)
    peak = largest.total

    def fits(limit: float) -> str:
        return "yes" if peak <= limit else "no"

    sizes = ", ".join(f"{size} GiB {fits(gpu_share_bytes(gpu, size * 2**30))}" for size in GPU_SIZES_GIB)
    memory = gpu_memory_bytes()
    here = ("this machine has no CUDA GPU, so its GPU memory is unknown here (not checked)" if memory is None
            else f"this machine's GPU share: {format_bytes(gpu_share_bytes(gpu, memory))} {fits(gpu_share_bytes(gpu, memory))}")
    share = "" if gpu >= 1 else f" (a {gpu:g} share)"
    return (f"GPU workers: up to {format_bytes(peak)} of GPU memory a trial (bf16 autocast; {largest.biggest} the "
            f"largest part) and {format_bytes(largest.host)} of host RAM; fits a GPU{share} of {sizes}; {here}")


def trials_manifest(plan: Plan) -> list[dict[str, Any]]:
    """trials.json of a sweep's run: every trial, and the run it reuses when cached."""
    to_run = {t.key for t in plan.to_run}
    return [
        {
            "key": t.key,
            "name": t.name,
            "axes": t.axes,
            "schedule": t.config.schedule,
            "cached_run": None if t.key in to_run else plan.cached[t.key].run_id,
        }
        for t in plan.trials
    ]


CALIBRATION_STEPS = 5  # training steps `_seconds_per_image` takes: two warm-up steps, best of three


def compute_estimate(plan: Plan, max_share: float | None = None) -> str:
    """Training FLOPs (3x forward per image) for the trials that will run, and the time they take
    on this machine: a few training steps of the first model are timed, the rest scaled by FLOPs.
    `max_share`: time them only when those steps are at most this share of the sweep's training FLOPs
    (`launch` pays for the estimate before every sweep; a sweep of a few steps would pay more for it
    than for its training)."""
    flops_per_image: dict[tuple, float] = {}
    images: dict[tuple, int] = {}
    first = None  # (config, calibration batch, training FLOPs per image) of the first shape
    for trial in plan.to_run:
        cfg = trial.config
        shape = (cfg.model.arch, cfg.model.size, cfg.data.image_size, tuple(cfg.windows))
        if shape not in flops_per_image:
            flops_per_image[shape] = 3.0 * _forward_flops(cfg)
            first = first or (cfg, min(cfg.train.batch_size, 16), flops_per_image[shape])
        images[shape] = images.get(shape, 0) + cfg.train.steps * cfg.train.batch_size
    flops = sum(flops_per_image[s] * n for s, n in images.items())
    work = f"{len(plan.to_run)} of {len(plan.trials)} trials to run, {flops / 1e12:.2f} TFLOP of training"
    if first is None:
        return f"{work}, about {duration(0.0)} of training in one process on this machine (calibrated)"
    cfg, batch, model_flops = first
    if max_share is not None and CALIBRATION_STEPS * batch * model_flops > max_share * flops:
        return f"{work} (not timed: {CALIBRATION_STEPS} calibration steps would be over {max_share:.0%} of it)"
    from trainer.arch import build_model

    seconds = flops * _seconds_per_image(build_model(cfg, in_channels=3), cfg.data.image_size, batch) / model_flops
    return f"{work}, about {duration(seconds)} of training in one process on this machine (calibrated)"


def _forward_flops(config) -> int:
    """Forward FLOPs per image of a trial's model on RGB images: counted from the config for a DiT
    (no torch: an estimate that is not timed never loads it), from the built model for a UNet."""
    if config.model.arch == "dit":
        return dit_flops_per_image(config, channels=3)
    from trainer.arch import build_model

    return build_model(config, in_channels=3).flops_per_image()


def _seconds_per_image(model, image_size: int, batch: int) -> float:
    """Wall time of one training step per image: best of three steps after two warm-up steps
    (the first steps pay for kernel and thread-pool set-up)."""
    step = CalibrationStep(model, image_size, batch)
    best = float("inf")
    for attempt in range(CALIBRATION_STEPS):
        start = time.perf_counter()
        step()
        if attempt >= 2:
            best = min(best, time.perf_counter() - start)
    return best / batch


class CalibrationStep:
    """One training step as the trainer takes it: forward, backward and the trainer's AdamW update
    (trainer.optim, which leaves torch.optim and its compiler imports out of `plan` and `launch`)."""

    def __init__(self, model, image_size: int, batch: int) -> None:
        import torch

        from trainer.diffusion import linear_schedule
        from trainer.optim import AdamW

        self.model = model
        self.schedule = linear_schedule()
        self.optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
        self.x0 = torch.rand(batch, 3, image_size, image_size) * 2 - 1

    def __call__(self) -> None:
        from trainer.diffusion import training_loss

        self.optimizer.zero_grad(set_to_none=True)
        training_loss(self.model, self.schedule, self.x0).backward()
        self.optimizer.step()


def show_plan(spec_path: str | Path, overrides: list[str], tracking_uri: str | None, force: bool = False) -> Plan:
    """`ditsweep plan`: print the trial table and the compute estimate; touches nothing (no run, no new store)."""
    from orchestrator.tracking import Tracker, resolve_tracking_uri, store_missing

    grid = read_grid_file(spec_path, overrides, refuse_gpu_memory=False)
    uri = resolve_tracking_uri(tracking_uri)
    cached = {}
    if not store_missing(uri):
        tracker = Tracker(uri)
        experiment = tracker.experiment_id(grid.spec.name, create=False)
        cached = tracker.finished_trials(experiment) if experiment else {}
    plan = build_plan(grid, cached, force)
    print(f"sweep {plan.spec.name!r}: {plan.spec.description.strip()}".rstrip(": "))
    print(plan_table(plan))
    print(compute_estimate(plan))
    if note := gpu_memory_note(plan):
        print(note)
    return plan
