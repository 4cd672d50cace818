"""DDPM as pure functions over tensors: schedule, noising, loss, one-step x0, DDPM and DDIM sampling.

The model knows nothing about noise: every function takes it as a callable `model(x_t, t, y) -> eps`.
Images live in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Denoiser = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """Linear-beta DDPM schedule (Ho et al. 2020). Tensors are float64 for exact bookkeeping."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]


def linear_schedule(timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    return Schedule(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))


def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, 1) in like's dtype and device, for broadcasting over images."""
    out = values.to(like.device)[t].to(like.dtype)
    return out.view(-1, *([1] * (like.dim() - 1)))


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    abar = _gather(schedule.alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def predict_x0(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Invert q_sample given an epsilon estimate: the one-step denoised image."""
    abar = _gather(schedule.alphas_cumprod, t, x_t)
    return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()


def training_loss(
    model: Denoiser,
    schedule: Schedule,
    x0: torch.Tensor,
    y: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps."""
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    eps = model(q_sample(schedule, x0, t, noise), t, y)
    return F.mse_loss(eps.float(), noise.float())


def spread_timesteps(schedule: Schedule, count: int) -> torch.Tensor:
    """`count` integer timesteps evenly spread over [0, T-1] (both ends included when count > 1)."""
    if count == 1:
        return torch.tensor([schedule.timesteps // 2])
    return torch.linspace(0, schedule.timesteps - 1, count).round().long().unique()


def _sampling_timesteps(schedule: Schedule, steps: int) -> list[int]:
    if not 1 <= steps <= schedule.timesteps:
        raise ValueError(f"sampling steps must be in [1, {schedule.timesteps}], got {steps}")
    return spread_timesteps(schedule, steps).flip(0).tolist() if steps > 1 else [schedule.timesteps - 1]


def _denoised(model: Denoiser, schedule: Schedule, x: torch.Tensor, t: int, y: torch.Tensor | None) -> torch.Tensor:
    """The model's clamped one-step x0 estimate at timestep t."""
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    eps = model(x, t_batch, y).to(x.dtype)
    return predict_x0(schedule, x, t_batch, eps).clamp(-1.0, 1.0)


def _abar_prev(schedule: Schedule, t_prev: int) -> float:
    """abar at the step a reverse step lands on; t_prev = -1 is the clean image (abar = 1)."""
    return schedule.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0


def ddim_step(
    model: Denoiser,
    schedule: Schedule,
    x: torch.Tensor,
    t: int,
    t_prev: int,
    y: torch.Tensor | None = None,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12; t_prev = -1: to the clean image).

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (eq. 16) and `noise` = z
    (needed when sigma > 0). x0 is the model's estimate clipped to [-1, 1], and eps is re-derived from the
    clipped x0 so the update stays on the data range; where no clipping happens this is eq. 12 exactly.
    """
    a_t, a_prev = schedule.alphas_cumprod[t].item(), _abar_prev(schedule, t_prev)
    x0 = _denoised(model, schedule, x, t, y)
    eps = (x - a_t**0.5 * x0) / (1.0 - a_t) ** 0.5
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
    x_prev = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            raise ValueError(f"a DDIM step with eta={eta} needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev


def ddpm_step(
    model: Denoiser,
    schedule: Schedule,
    x: torch.Tensor,
    t: int,
    t_prev: int,
    y: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One ancestral step x_t -> x_{t_prev} (Ho et al. 2020): a draw from the posterior q(x_prev | x_t, x0)
    at the model's clipped x0 estimate, mean and variance of eq. 6-7 with beta = 1 - abar_t / abar_prev
    (the schedule's beta_t when t_prev = t - 1, the respaced step's beta otherwise). `noise` is the
    standard normal z of the draw (unused on the last step, t_prev = -1, which returns the mean)."""
    a_t, a_prev = schedule.alphas_cumprod[t].item(), _abar_prev(schedule, t_prev)
    x0 = _denoised(model, schedule, x, t, y)
    beta = 1.0 - a_t / a_prev
    mean = (a_prev**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
    if a_prev >= 1.0:
        return mean
    if noise is None:
        raise ValueError("a DDPM step before the last needs noise")
    var = beta * (1 - a_prev) / (1 - a_t)
    return mean + var**0.5 * noise


def _reverse_pairs(schedule: Schedule, steps: int) -> list[tuple[int, int]]:
    """(t, t_prev) from noisiest to cleanest over `steps` respaced timesteps; the last t_prev is -1."""
    ts = _sampling_timesteps(schedule, steps)
    return list(zip(ts, ts[1:] + [-1]))


def _draw(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


@torch.no_grad()
def ddim_sample(
    model: Denoiser,
    schedule: Schedule,
    noise: torch.Tensor,
    steps: int,
    y: torch.Tensor | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) from x_T = noise over `steps` strided timesteps; eta=0 is deterministic."""
    x = noise
    for t, t_prev in _reverse_pairs(schedule, steps):
        z = _draw(x, generator) if eta > 0 and t_prev >= 0 else None
        x = ddim_step(model, schedule, x, t, t_prev, y, eta, z)
    return x


@torch.no_grad()
def ddpm_sample(
    model: Denoiser,
    schedule: Schedule,
    noise: torch.Tensor,
    steps: int | None = None,
    y: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020). With fewer steps than T the schedule is respaced."""
    x = noise
    for t, t_prev in _reverse_pairs(schedule, schedule.timesteps if steps is None else steps):
        z = _draw(x, generator) if t_prev >= 0 else None
        x = ddpm_step(model, schedule, x, t, t_prev, y, z)
    return x
