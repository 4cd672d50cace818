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


def _reverse_steps(schedule: Schedule, steps: int) -> list[tuple[int, float, float]]:
    """(t, abar_t, abar_prev) from noisiest to cleanest over `steps` respaced timesteps."""
    ts = _sampling_timesteps(schedule, steps)
    abar = schedule.alphas_cumprod
    return [(t, abar[t].item(), abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0) for i, t in enumerate(ts)]


def _denoised(model: Denoiser, schedule: Schedule, x: torch.Tensor, t: int, y: torch.Tensor | None) -> torch.Tensor:
    """The model's clamped one-step x0 estimate at timestep t."""
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    eps = model(x, t_batch, y).to(x.dtype)
    return predict_x0(schedule, x, t_batch, eps).clamp(-1.0, 1.0)


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
    for t, a_t, a_prev in _reverse_steps(schedule, steps):
        x0 = _denoised(model, schedule, x, t, y)
        # Re-derive eps from the clamped x0 so the update stays on the data manifold.
        eps = (x - a_t**0.5 * x0) / (1.0 - a_t) ** 0.5
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
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
    for t, a_t, a_prev in _reverse_steps(schedule, schedule.timesteps if steps is None else steps):
        x0 = _denoised(model, schedule, x, t, y)
        beta = 1.0 - a_t / a_prev  # the respaced step's beta
        # Posterior q(x_prev | x_t, x0) mean and variance.
        mean = (a_prev**0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if a_prev < 1.0:
            var = beta * (1 - a_prev) / (1 - a_t)
            x = mean + var**0.5 * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        else:
            x = mean
    return x
