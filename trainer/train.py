"""One trial: data subset -> DiT with per-block windows (or the UNet baseline) -> DDPM training -> evaluation.

`train(config, report)` knows nothing of Ray or MLflow: `report(metrics, checkpoint_dir)` is how
results leave, so the same loop runs alone (`ditsweep train`), in tests and under Ray Tune.

Why one file of about 430 lines: the `Trainer` (model, EMA, optimizer, one step, each evaluation) and
the loop of `train` that drives it read top to bottom as the paper's procedure, and the checkpoint
format they save and resume is theirs alone; the trial's images (`trainer.pool`), the metrics
(`trainer.metrics`, `sampling`, `locality`, `jacobian`) and the model already live elsewhere.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from trainer.pool import Subsets, load_subsets
from trainer.storage import atomic_file
from trainer.config import TrialConfig
from trainer import memorization, sampling
from trainer.diffusion import Schedule, linear_schedule, training_loss
from trainer.jacobian import jacobian_analysis
from trainer.locality import attention_locality, query_maps, save_query_maps
from trainer.metric_names import PSNR_CURVE, RESUMED_FROM_STEP, STEP
from trainer.records import PSNR_CURVE_CSV, RECORDS, SPECTRUM_RECORD, PsnrCurve
from trainer.metrics import psnr_gap_curve
from trainer.arch import build_model
from trainer.model import DiT
from trainer.unet import UNet
from trainer.optim import AdamW

Report = Callable[[dict, "str | None"], None]

CHECKPOINT_DIR = "checkpoint"  # under the trial's output folder
CHECKPOINT_FILE = "state.pt"
PREVIOUS_CHECKPOINT_FILE = "state.prev.pt"

def to_model_scale(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


@contextlib.contextmanager
def fp32_evaluation(device: torch.device):
    """Evaluation precision: autocast off (on the CPU and on `device`) and full-fp32 matmuls and convolutions
    (no TF32), whatever training uses, restored on exit. The one-step x0 estimate multiplies the model's
    epsilon error by sqrt(1 - abar_t) / sqrt(abar_t) (157x at t = 999), so rounding epsilon to bf16 would cap
    the PSNR curve, and CPU (fp32) and GPU (bf16) trials would not compare (`trainer.metrics`)."""
    matmul_precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        with contextlib.ExitStack() as stack:
            for device_type in sorted({"cpu", device.type}):
                stack.enter_context(torch.autocast(device_type, enabled=False))
            yield
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device(device: torch.device) -> dict[str, str]:
    """Where a trial computes, for its record: {"device": "cpu"} or "cuda:0" with the GPU's name and memory."""
    if device.type != "cuda":
        return {"device": device.type}
    index = device.index if device.index is not None else torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return {
        "device": f"cuda:{index}",
        "gpu_name": properties.name,
        "gpu_memory_gb": f"{properties.total_memory / 2**30:.1f}",
    }


# ---------------------------------------------------------------------------------------------
# Checkpoints: written atomically, the previous one kept as a fallback for a truncated write.


def save_checkpoint(directory: Path, state: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / CHECKPOINT_FILE, durable=True, previous=directory / PREVIOUS_CHECKPOINT_FILE) as f:
        torch.save(state, f)


def load_checkpoint(directory: Path) -> dict | None:
    """The newest readable checkpoint in `directory`, or None when there is none."""
    for name in (CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE):
        path = directory / name
        if not path.exists():
            continue
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or corrupt file: fall back to the previous one
            print(f"[ditsweep] checkpoint {path} is unreadable ({type(err).__name__}); trying the previous one")
    return None


# ---------------------------------------------------------------------------------------------


class Trainer:
    """Holds the moving parts of one trial; `train()` below is the entry point."""

    def __init__(self, config: TrialConfig, device: torch.device, subsets: Subsets):
        self.config = config
        self.device = device
        self.subsets = subsets
        torch.manual_seed(config.seed)
        self.model: DiT | UNet = build_model(config, subsets.channels).to(device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        # Fused AdamW: one kernel over all parameters instead of a chain of foreach ops, the same
        # update rule; 2.6x faster on CPU for DiT-XS/1 (benchmarks/train_step.py, RESULTS.md). Run
        # without torch.optim, which would import torch's compiler in every trial (trainer/optim.py).
        self.optimizer = AdamW(self.model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)
        self.schedule: Schedule = linear_schedule(
            config.diffusion.timesteps, config.diffusion.beta_start, config.diffusion.beta_end
        )
        # Batches and training noise come from one generator so a seeded run is repeatable.
        self.generator = torch.Generator(device=device).manual_seed(config.seed)
        self.step = 0
        # Compile only on CUDA: on CPU compiling DiT-S/1 took 200 s for a 2% faster step
        # (benchmarks/RESULTS.md). Each window schedule is one more graph, so allow many.
        self.forward = self.model
        if config.train.compile and device.type == "cuda":
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.model.prepare_attention(device)
            self.forward = torch.compile(self.model)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "global_rng": self._global_rng_state(),
            "config": self.config.model_dump_json(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.config.model_dump_json():
            raise ValueError("checkpoint was written by a different trial config; refusing to resume from it")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        if "global_rng" in state:  # absent from checkpoints written before labels were supported
            self._set_global_rng_state(state["global_rng"])
        self.step = int(state["step"])

    # The model's label dropout draws from torch's default generator on the device, so a resumed
    # class-conditional run repeats an uninterrupted one only if that state is checkpointed too.
    def _global_rng_state(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set_global_rng_state(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    # -- training -------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        warmup = self.config.train.warmup_steps
        return self.config.train.lr * min(1.0, (step + 1) / warmup) if warmup else self.config.train.lr

    def train_step(self) -> float:
        cfg = self.config.train
        idx = torch.randint(0, self.subsets.train.shape[0], (cfg.batch_size,), device=self.device, generator=self.generator)
        x0 = to_model_scale(self.subsets.train[idx])  # (B, C, H, W)
        y = None if self.subsets.train_labels is None else self.subsets.train_labels[idx]  # (B,)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        with self.autocast():
            loss = training_loss(self.forward, self.schedule, x0, y, generator=self.generator)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.step}: training diverged; lower train.lr ({cfg.lr})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.update_ema()
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def update_ema(self) -> None:
        ema_params = list(self.ema.parameters())
        params = [p.detach() for p in self.model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.config.train.ema)

    def autocast(self):
        """Training precision: bf16 autocast on CUDA, none elsewhere. Evaluation never uses it (`fp32`)."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def fp32(self):
        """Evaluation precision, whatever the training precision: see `fp32_evaluation`."""
        return fp32_evaluation(self.device)

    # -- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> PsnrCurve:
        """PSNR gap of the EMA model, in fp32. The held-out side is always the first `eval.psnr_gap.images`
        held-out images in their fixed random order (a uniform sample; one fixed set per data source, image
        size and data.test_images: the same for every trial, N and shuffle); the train side is the first min(N, eval.psnr_gap.images) training images.
        Each image is noised by its own identity (`trainer.metrics.image_noise`), so an image scores the same
        noise in every trial that scores it. A class-conditional model is evaluated unconditionally (the null
        class, as psnr_gap_curve calls model(x_t, t, None)), so its gap compares with unconditional trials."""
        cfg = self.config.eval.psnr_gap
        train, test = self.psnr_gap_images()
        with self.fp32():
            return psnr_gap_curve(
                self.ema,
                self.schedule,
                to_model_scale(train[0]),
                to_model_scale(test[0]),
                cfg.timesteps,
                cfg.batch_size,
                cfg.clip,
                train_ids=train[1],
                test_ids=test[1],
            )

    def psnr_gap_images(self) -> tuple[tuple[torch.Tensor, list[int]], tuple[torch.Tensor, list[int]]]:
        """((train images, their ids), (held-out images, their ids)) that the PSNR gap scores."""
        images = self.config.eval.psnr_gap.images
        sides = []
        for side, ids in ((self.subsets.train, self.subsets.train_ids), (self.subsets.test, self.subsets.test_ids)):
            count = min(images, side.shape[0])
            sides.append((side[:count], list(range(count)) if ids is None else ids[:count]))
        return sides[0], sides[1]

    def save_sample_grid(self, directory: Path) -> dict[str, float]:
        """DDIM samples of the EMA model from the fixed grid noise (fp32), as samples.png and samples.npy; returns
        their memorization metrics (stored as mem_*), with each sample beside its nearest training image saved as
        nearest_train.png and nearest_train.npy (empty and nothing saved when the grid is off)."""
        side, cfg = self.config.eval.samples.grid, self.config.eval
        if side == 0:
            return {}
        noise = sampling.fixed_noise(side * side, self.image_shape, sampling.GRID_NOISE_SEED)
        samples = sampling.generate(
            self.ema, self.schedule, noise, cfg.samples.steps, cfg.fid.batch_size, self.device, self.fp32
        )
        sampling.save_grid(directory, samples, side)
        return memorization.save_memorization(
            directory, sampling.to_uint8(samples), self.subsets.train, self.subsets.test, side
        )

    def fid(self) -> dict[str, float]:
        """FID and KID of eval.fid.samples DDIM samples of the EMA model (empty when disabled). Sampling and
        Inception features run in fp32; the samples are quantized to uint8 first, like the reference images."""
        cfg = self.config.eval.fid
        if not cfg.enabled:
            return {}
        noise = sampling.fixed_noise(cfg.samples, self.image_shape, sampling.FID_NOISE_SEED)
        samples = sampling.generate(self.ema, self.schedule, noise, cfg.steps, cfg.batch_size, self.device, self.fp32)
        with self.fp32():
            return sampling.fid_and_kid(
                sampling.quantize(samples),
                self.subsets.fid_reference,
                cfg.weights,
                cfg.weights_sha256,
                cfg.batch_size,
                self.device,
            )

    def locality(self, directory: Path) -> dict[str, float]:
        """Per-block attention locality of the EMA model on held-out images, in fp32, with the attention maps of
        a few query tokens of the first one at the middle timestep saved into `directory` (empty when disabled)."""
        cfg = self.config.eval.locality
        if not cfg.enabled or not isinstance(self.ema, DiT):  # a UNet has no attention to measure
            return {}
        images = to_model_scale(self.subsets.test[: cfg.images])
        t = sorted(cfg.timesteps)[len(cfg.timesteps) // 2]
        with self.fp32():
            save_query_maps(directory, query_maps(self.ema, self.schedule, images[0], t), self.ema.grid, t)
            return attention_locality(self.ema, self.schedule, images, list(cfg.timesteps))

    def jacobian(self, directory: Path) -> dict:
        """At the end of training: the Jacobian analysis of the EMA model's one-step denoiser on the first
        held-out images, in fp32 (trainer.jacobian), saved into `directory` (jacobian.npz and the eigenvector
        picture); returns its jac_* metrics and the spectrum record (empty when disabled or not at the end)."""
        cfg = self.config.eval.jacobian
        if not cfg.enabled or self.step < self.config.train.steps:
            return {}
        images = to_model_scale(self.subsets.test[: cfg.images])
        backend = getattr(self.ema, "attention_backend", None)
        if backend is not None:  # vmapped VJPs run through dense attention (flex has no batching rule)
            self.ema.use_attention_backend("dense")
        try:
            with self.fp32():
                analysis = jacobian_analysis(self.ema, self.schedule, images, list(cfg.timesteps), cfg.top_k, cfg.chunk)
        finally:
            if backend is not None:
                self.ema.use_attention_backend(backend)
        analysis.save(directory)
        return {**analysis.metrics(), SPECTRUM_RECORD: analysis.spectrum_record()}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.subsets.test.shape[1:])


def _is_due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train(
    config: TrialConfig,
    report: Report | None = None,
    *,
    out_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    device: torch.device | None = None,
) -> dict:
    """Train one trial and return its final metrics.

    Checkpoints go to `out_dir/checkpoint` at every evaluation. `resume_from` (a checkpoint folder)
    or an existing checkpoint in `out_dir` continues training from that step.
    """
    device = device or pick_device()
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="ditsweep-trial-"))
    checkpoint_dir = out / CHECKPOINT_DIR
    report = report or (lambda metrics, checkpoint: None)

    if config.eval.fid.enabled:  # fetch and check the weights now, not at the first evaluation an hour in
        sampling.fid_network(config.eval.fid.weights, config.eval.fid.weights_sha256)
    trainer = Trainer(config, device, load_subsets(config, device))
    state = load_checkpoint(Path(resume_from)) if resume_from else None
    state = state or load_checkpoint(checkpoint_dir)
    if state is not None:
        trainer.load_state_dict(state)
        report({STEP: trainer.step, RESUMED_FROM_STEP: trainer.step}, None)

    total, cfg = config.train.steps, config.train
    losses: list[float] = []
    window_start, window_images = time.perf_counter(), 0
    final: dict = {STEP: trainer.step}
    if trainer.step >= total:  # resumed from a finished trial: report its (deterministic) evaluation again
        metrics, checkpoint = evaluate_and_save(trainer, out)
        final.update(metrics)
        report(metrics, checkpoint)
    while trainer.step < total:
        losses.append(trainer.train_step())
        window_images += cfg.batch_size
        step = trainer.step
        metrics: dict = {}
        evaluate_now = _is_due(step, config.eval.every, total)
        # A checkpointed report also closes the loss window: no window spans a checkpoint, so a resumed
        # run reports exactly the losses of an uninterrupted one.
        if evaluate_now or _is_due(step, cfg.log_every, total):
            elapsed = time.perf_counter() - window_start
            metrics.update(
                step=step,
                loss=sum(losses) / len(losses),
                images_per_sec=window_images / max(elapsed, 1e-9),
            )
            losses.clear()
        checkpoint = None
        if evaluate_now:
            evaluation, checkpoint = evaluate_and_save(trainer, out)
            metrics.update(evaluation)
        if metrics:
            final.update(metrics)
            report(metrics, checkpoint)
            window_start, window_images = time.perf_counter(), 0
    for record in RECORDS:
        final.pop(record, None)
    (out / "metrics.json").write_text(json.dumps(final, indent=2))
    return final


def evaluate_and_save(trainer: Trainer, out: Path) -> tuple[dict, str]:
    """Evaluate, checkpoint to out/checkpoint and write out/psnr_curve.csv; returns (metrics, checkpoint dir).

    The sample grid (samples.png, samples.npy) goes into the checkpoint folder, so it travels with the
    checkpoint to the sweep's storage, where the driver picks it up for the trial's run.
    """
    curve = trainer.evaluate()
    checkpoint_dir = out / CHECKPOINT_DIR
    save_checkpoint(checkpoint_dir, trainer.state_dict())
    memorized = trainer.save_sample_grid(checkpoint_dir)
    (out / PSNR_CURVE_CSV).write_text(curve.to_csv())
    metrics = {STEP: trainer.step, **curve.summary(), **memorized, **trainer.fid(), **trainer.locality(checkpoint_dir),
               **trainer.jacobian(checkpoint_dir)}
    return {**metrics, PSNR_CURVE: curve.to_csv()}, str(checkpoint_dir)

