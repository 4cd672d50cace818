"""Generalization metrics.

PSNR gap (Kadkhodaie et al. 2024, used by An et al. 2024): noise a clean image to step t, denoise it
in one step (x0 from the predicted epsilon), and compare PSNR on training versus held-out images.
A model that memorizes its training set denoises those images far better than unseen ones.
By default the raw x0 estimate is scored, as Kadkhodaie et al. do; `clip=True` clips it to the data
range [-1, 1] first, which raises PSNR on both sides at high noise (where the raw estimate overshoots).
The curve is meant to be computed in fp32 (`trainer.train.fp32_evaluation`): x0 multiplies the epsilon
error by sqrt(1 - abar) / sqrt(abar), 26x at t=800 of the linear schedule and 157x at t=999, so bf16
rounding of epsilon alone would cap the high-noise PSNR.

Reproducibility (Kadkhodaie et al. 2024): two models trained on disjoint data that generalize produce
nearly the same sample from the same noise; `reproducibility` scores how alike two sample sets are.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np
import torch

from trainer.data import to_unit
from trainer.diffusion import Denoiser, Schedule, predict_x0, q_sample, spread_timesteps
from trainer.fid import frechet_distance, kernel_inception_distance  # noqa: F401 - part of this module's API

# Evaluation noise is seeded by a constant, not the trial seed: every trial noises its images with
# the same draws, so differences in PSNR come from the model, not from luck.
EVAL_NOISE_SEED = 20240101


@dataclass(frozen=True)
class PsnrCurve:
    timesteps: list[int]
    train: list[float]
    test: list[float]

    @property
    def gap(self) -> list[float]:
        return [a - b for a, b in zip(self.train, self.test)]

    def summary(self) -> dict[str, float]:
        n = len(self.timesteps)
        return {
            "psnr_train": sum(self.train) / n,
            "psnr_test": sum(self.test) / n,
            "psnr_gap": sum(self.gap) / n,
        }

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["timestep", "psnr_train", "psnr_test", "psnr_gap"])
        for row in zip(self.timesteps, self.train, self.test, self.gap):
            writer.writerow([row[0], *(f"{v:.6f}" for v in row[1:])])
        return buf.getvalue()


def psnr(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [0, 1]; (B, ...) -> (B,), in float32 at least (float64 stays float64)."""
    error = estimate - target
    mse = error.to(torch.promote_types(error.dtype, torch.float32)).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def one_step_psnr(
    model: Denoiser,
    schedule: Schedule,
    images: torch.Tensor,
    timesteps: torch.Tensor,
    noise_seed: int,
    batch_size: int,
    clip: bool = False,
) -> list[float]:
    """Mean PSNR of the one-step x0 estimate at each timestep; images in [-1, 1], (N, C, H, W).
    `clip` clips the estimate to [-1, 1] before scoring (see the module docstring)."""
    generator = torch.Generator().manual_seed(noise_seed)
    means = []
    for t in timesteps.tolist():
        # Noise is drawn on the CPU so it is identical on every device.
        noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
        scores = []
        for start in range(0, images.shape[0], batch_size):
            x0 = images[start : start + batch_size]
            t_batch = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
            x_t = q_sample(schedule, x0, t_batch, noise[start : start + batch_size])
            x0_hat = predict_x0(schedule, x_t, t_batch, model(x_t, t_batch, None))
            if clip:
                x0_hat = x0_hat.clamp(-1.0, 1.0)
            # Unclamped on purpose (to_unit clamps): the raw estimate is what clip=False scores.
            scores.append(psnr((x0_hat + 1) / 2, (x0 + 1) / 2))
        means.append(torch.cat(scores).mean().item())
    return means


def psnr_gap_curve(
    model: Denoiser,
    schedule: Schedule,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    num_timesteps: int,
    batch_size: int = 256,
    clip: bool = False,
) -> PsnrCurve:
    timesteps = spread_timesteps(schedule, num_timesteps)
    # Both sides share the noise stream: the same draws at the same timestep.
    train = one_step_psnr(model, schedule, train_images, timesteps, EVAL_NOISE_SEED, batch_size, clip)
    test = one_step_psnr(model, schedule, test_images, timesteps, EVAL_NOISE_SEED, batch_size, clip)
    return PsnrCurve(timesteps=timesteps.tolist(), train=train, test=test)


def reproducibility(samples_a, samples_b) -> float:
    """Reproducibility score (Kadkhodaie et al. 2024): how alike two models' samples from the same noise are.

    `samples_a[i]` and `samples_b[i]` must come from the same initial noise (e.g. the `samples.npy` grids of
    two trials, which share the fixed grid noise), typically from models trained on disjoint subsets
    (`data.disjoint`). The score is the mean over i of the cosine similarity of the two samples, each
    flattened and centred on its own mean pixel value, i.e. the Pearson correlation of their pixels:
    1 = the same image, about 0 = unrelated. Centring keeps a shared background (black around every digit)
    from counting as similarity, and makes the score the same for uint8 [0, 255] and float [-1, 1] samples.
    A constant sample (nothing left after centring) scores 0 against anything.
    """
    a = torch.as_tensor(np.asarray(samples_a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(samples_b), dtype=torch.float64)
    if a.shape != b.shape or a.ndim < 2 or a.shape[0] == 0:
        raise ValueError(
            f"reproducibility needs two sample arrays of one shape (n, ...), n >= 1; got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    a, b = a.flatten(1), b.flatten(1)  # (n, pixels)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    cosine = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)  # (n,)
    return float(cosine.mean())
