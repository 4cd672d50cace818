"""Generalization metrics.

PSNR gap (Kadkhodaie et al. 2024, used by An et al. 2024): noise a clean image to step t, denoise it
in one step (x0 from the predicted epsilon), and compare PSNR on training versus held-out images.
A model that memorizes its training set denoises those images far better than unseen ones. Each image
is noised with its own fixed noise, a function of its identity (its index in the data source) and the
timestep (`image_noise`), so a fixed set of held-out images scores the same in every trial; in a trial two
different images never share noise (sharing it would not make them a pair).
By default the raw x0 estimate is scored, as Kadkhodaie et al. do; `clip=True` clips it to the data
range [-1, 1] first, which raises PSNR on both sides at high noise (where the raw estimate overshoots).
The curve is meant to be computed in fp32 (`trainer.train.fp32_evaluation`): x0 multiplies the epsilon
error by sqrt(1 - abar) / sqrt(abar), 26x at t=800 of the linear schedule and 157x at t=999, so bf16
rounding of epsilon alone would cap the high-noise PSNR.

Reproducibility (Kadkhodaie et al. 2024): two models trained on disjoint data that generalize produce
nearly the same sample from the same noise; `reproducibility` scores how alike two sample sets are.
"""

from __future__ import annotations


import numpy as np
import torch

from trainer.diffusion import Denoiser, Schedule, predict_x0, q_sample, spread_timesteps
from trainer.records import PsnrCurve

# Evaluation noise is seeded by a constant, not the trial seed: every trial noises its images with
# the same draws, so differences in PSNR come from the model, not from luck.
EVAL_NOISE_SEED = 20240101
_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # odd 64-bit constants (splitmix64)


def noise_seed(seed: int, image_id: int, timestep: int) -> int:
    """The seed of one image's evaluation noise at one timestep: a function of the image's identity (its
    index in the data source), never of its position in a batch or of how many images are scored."""
    mixed = (seed * _MIX[0]) ^ ((image_id + 1) * _MIX[1]) ^ ((timestep + 1) * _MIX[2])
    return mixed & (2**63 - 1)


def image_noise(image_ids: list[int], timestep: int, shape: tuple[int, ...], seed: int = EVAL_NOISE_SEED) -> torch.Tensor:
    """(len(image_ids), *shape) float32 standard normal noise on the CPU, row i drawn from its own
    generator seeded by (seed, image_ids[i], timestep): the same draw for an image whatever else is scored."""
    out = torch.empty((len(image_ids), *shape))
    generator = torch.Generator()
    for row, image_id in enumerate(image_ids):
        generator.manual_seed(noise_seed(seed, int(image_id), timestep))
        torch.randn(shape, generator=generator, out=out[row])
    return out


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
    image_ids: list[int],
    batch_size: int,
    clip: bool = False,
    noise_seed: int = EVAL_NOISE_SEED,
) -> list[float]:
    """Mean PSNR of the one-step x0 estimate at each timestep; images in [-1, 1], (N, C, H, W), with
    `image_ids` (N,) naming each image (its index in the data source): image i is noised with
    `image_noise([image_ids[i]], t)` whatever the other images, the batch size or N, so a fixed set of
    images scores the same in every trial. `clip` clips the estimate to [-1, 1] before scoring (see the
    module docstring)."""
    if len(image_ids) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(image_ids)} image ids")
    ids = [int(i) for i in image_ids]
    means = []
    for t in timesteps.tolist():
        scores = []
        for start in range(0, images.shape[0], batch_size):
            x0 = images[start : start + batch_size]
            # Noise is drawn on the CPU so it is identical on every device.
            noise = image_noise(ids[start : start + batch_size], t, tuple(x0.shape[1:]), noise_seed)
            t_batch = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
            x_t = q_sample(schedule, x0, t_batch, noise.to(x0.device, x0.dtype))
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
    train_ids: list[int] | None = None,
    test_ids: list[int] | None = None,
) -> PsnrCurve:
    """Train and held-out PSNR per timestep. Each image is noised by its own id (default: its position,
    0..n-1 on both sides, so the same images on both sides see the same noise)."""
    timesteps = spread_timesteps(schedule, num_timesteps)
    train_ids = list(range(train_images.shape[0])) if train_ids is None else train_ids
    test_ids = list(range(test_images.shape[0])) if test_ids is None else test_ids
    train = one_step_psnr(model, schedule, train_images, timesteps, train_ids, batch_size, clip)
    test = one_step_psnr(model, schedule, test_images, timesteps, test_ids, batch_size, clip)
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
