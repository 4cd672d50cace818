"""trainer.diffusion: schedule, noising statistics, one-step x0, loss, and the DDIM / DDPM samplers.

Oracle denoisers (which know the clean images) make the exact answers checkable without training.
"""

from __future__ import annotations

import pytest
import torch

from trainer.diffusion import (
    Schedule,
    ddim_sample,
    ddpm_sample,
    linear_schedule,
    predict_x0,
    q_sample,
    spread_timesteps,
    training_loss,
)


def abar_at(schedule: Schedule, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return schedule.alphas_cumprod[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def oracle_for(schedule: Schedule, x0: torch.Tensor):
    """A denoiser that knows x0: the epsilon that explains x_t exactly, (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""

    def model(x_t: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        abar = abar_at(schedule, t, x_t)
        return (x_t - abar.sqrt() * x0) / (1.0 - abar).sqrt()

    return model


def clean_images(batch: int = 3, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(batch, 1, 4, 4, generator=generator, dtype=dtype) * 1.8 - 0.9)  # inside [-1, 1]


def zero_model(x_t, t, y=None):
    return torch.zeros_like(x_t)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# schedule


def test_linear_schedule_matches_ddpm():
    schedule = linear_schedule()
    assert schedule.timesteps == 1000
    assert schedule.betas.dtype == torch.float64
    assert schedule.betas[0].item() == pytest.approx(1e-4)
    assert schedule.betas[-1].item() == pytest.approx(0.02)
    assert torch.all(schedule.betas[1:] > schedule.betas[:-1])
    abar = schedule.alphas_cumprod
    assert torch.allclose(abar, torch.cumprod(1 - schedule.betas, 0))
    assert torch.all(abar[1:] < abar[:-1])  # strictly decreasing: more noise at every step
    assert 0 < abar[-1].item() < 1e-4 and abar[0].item() == pytest.approx(1 - 1e-4)


def test_spread_timesteps_covers_both_ends():
    schedule = linear_schedule(100)
    assert spread_timesteps(schedule, 1).tolist() == [50]
    assert spread_timesteps(schedule, 2).tolist() == [0, 99]
    assert spread_timesteps(schedule, 4).tolist() == [0, 33, 66, 99]
    assert spread_timesteps(schedule, 100).tolist() == list(range(100))


# ---------------------------------------------------------------------------------------------
# noising and one-step x0


def test_q_sample_noise_statistics():
    schedule = linear_schedule()
    t = torch.tensor([0, 100, 500, 999])
    noise = torch.randn(4, 1, 100, 100, generator=seeded(0), dtype=torch.float64)
    abar = schedule.alphas_cumprod[t]

    x_t = q_sample(schedule, torch.zeros_like(noise), t, noise)
    variance = x_t.flatten(1).var(dim=1)
    assert torch.allclose(variance, 1 - abar, rtol=0.05)

    x0 = torch.full_like(noise, 0.5)
    mean = q_sample(schedule, x0, t, noise).flatten(1).mean(dim=1)
    assert torch.allclose(mean, abar.sqrt() * 0.5, atol=0.03)


def test_q_sample_is_exact_at_the_formula():
    schedule = linear_schedule()
    x0, noise, t = clean_images(), torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.tensor([0, 10, 999])
    abar = abar_at(schedule, t, x0)
    assert torch.equal(q_sample(schedule, x0, t, noise), abar.sqrt() * x0 + (1 - abar).sqrt() * noise)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_predict_x0_inverts_q_sample_given_the_true_noise(dtype):
    schedule = linear_schedule()
    x0 = clean_images(4, dtype)
    noise = torch.randn(x0.shape, generator=seeded(2), dtype=dtype)
    t = torch.tensor([0, 1, 500, 999])
    recovered = predict_x0(schedule, q_sample(schedule, x0, t, noise), t, noise)
    assert recovered.dtype == dtype
    atol = 1e-12 if dtype == torch.float64 else 1e-4  # at t=999, sqrt(abar) ~ 0.006 magnifies fp32 rounding
    assert torch.allclose(recovered, x0, atol=atol)
    assert torch.allclose(recovered[:3], x0[:3], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# training loss


def test_training_loss_is_zero_for_a_model_that_predicts_the_drawn_noise():
    schedule = linear_schedule()
    x0 = clean_images(8)
    loss = training_loss(oracle_for(schedule, x0), schedule, x0, generator=seeded(3))
    assert loss.item() < 1e-12


def test_training_loss_is_the_mse_to_the_noise_drawn_from_the_generator():
    schedule = linear_schedule()
    x0 = clean_images(8, torch.float32)
    loss = training_loss(zero_model, schedule, x0, generator=seeded(4))
    # The same generator draws t first, then the noise: replay it.
    replay = seeded(4)
    torch.randint(0, schedule.timesteps, (8,), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    assert loss.item() == pytest.approx(noise.pow(2).mean().item(), rel=1e-6)


def test_training_loss_passes_labels_and_is_deterministic_under_a_seed():
    schedule = linear_schedule()
    x0 = clean_images(8, torch.float32)
    seen = []

    def model(x_t, t, y=None):
        seen.append(y)
        return 0.1 * x_t

    labels = torch.arange(8)
    first = training_loss(model, schedule, x0, labels, generator=seeded(5))
    second = training_loss(model, schedule, x0, labels, generator=seeded(5))
    other = training_loss(model, schedule, x0, labels, generator=seeded(6))
    assert first.item() == second.item() != other.item()
    assert all(y is labels for y in seen)


# ---------------------------------------------------------------------------------------------
# samplers


@pytest.mark.parametrize("steps", [1, 5, 50])
def test_ddim_with_an_oracle_lands_on_x0(steps):
    schedule = linear_schedule(50)
    x0 = clean_images()
    noise = torch.randn(x0.shape, generator=seeded(7), dtype=x0.dtype)
    out = ddim_sample(oracle_for(schedule, x0), schedule, noise, steps)
    assert out.shape == x0.shape
    assert torch.allclose(out, x0, atol=1e-10)


def test_ddim_with_an_oracle_lands_on_x0_in_float32():
    schedule = linear_schedule(50)
    x0 = clean_images(dtype=torch.float32)
    noise = torch.randn(x0.shape, generator=seeded(7))
    assert torch.allclose(ddim_sample(oracle_for(schedule, x0), schedule, noise, 10), x0, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 7, None])
def test_ddpm_with_an_oracle_lands_on_x0(steps):
    schedule = linear_schedule(50)
    x0 = clean_images()
    noise = torch.randn(x0.shape, generator=seeded(8), dtype=x0.dtype)
    out = ddpm_sample(oracle_for(schedule, x0), schedule, noise, steps, generator=seeded(9))
    assert torch.allclose(out, x0, atol=1e-10)


def test_ddim_eta_zero_ignores_the_generator():
    schedule = linear_schedule(50)
    noise = torch.randn(2, 1, 4, 4, generator=seeded(10))
    model = lambda x, t, y=None: 0.5 * x  # noqa: E731 - any deterministic denoiser
    a = ddim_sample(model, schedule, noise, 10, generator=seeded(1))
    b = ddim_sample(model, schedule, noise, 10, generator=seeded(2))
    c = ddim_sample(model, schedule, noise, 10)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert a.shape == noise.shape and torch.isfinite(a).all()


def test_ddim_with_eta_follows_the_generator():
    schedule = linear_schedule(50)
    noise = torch.randn(2, 1, 4, 4, generator=seeded(10))
    model = lambda x, t, y=None: 0.5 * x  # noqa: E731
    a = ddim_sample(model, schedule, noise, 10, eta=1.0, generator=seeded(1))
    b = ddim_sample(model, schedule, noise, 10, eta=1.0, generator=seeded(1))
    c = ddim_sample(model, schedule, noise, 10, eta=1.0, generator=seeded(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddpm_is_deterministic_under_a_seed():
    schedule = linear_schedule(50)
    noise = torch.randn(2, 3, 4, 4, generator=seeded(11))
    model = lambda x, t, y=None: 0.5 * x  # noqa: E731
    a = ddpm_sample(model, schedule, noise, 10, generator=seeded(1))
    b = ddpm_sample(model, schedule, noise, 10, generator=seeded(1))
    c = ddpm_sample(model, schedule, noise, 10, generator=seeded(2))
    assert a.shape == (2, 3, 4, 4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_samplers_pass_labels_to_the_model():
    schedule = linear_schedule(20)
    seen = []

    def model(x, t, y=None):
        seen.append(y)
        return torch.zeros_like(x)

    labels = torch.tensor([1, 2])
    ddim_sample(model, schedule, torch.randn(2, 1, 4, 4), 3, y=labels)
    ddpm_sample(model, schedule, torch.randn(2, 1, 4, 4), 3, y=labels, generator=seeded(0))
    assert len(seen) == 6 and all(y is labels for y in seen)


@pytest.mark.parametrize("steps", [0, -1, 51])
def test_invalid_ddim_steps_raise(steps):
    noise = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\[1, 50\]"):
        ddim_sample(zero_model, linear_schedule(50), noise, steps)


@pytest.mark.parametrize("steps", [0, -1, 51])
def test_invalid_ddpm_steps_raise(steps):
    noise = torch.randn(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"\[1, 50\]"):
        ddpm_sample(zero_model, linear_schedule(50), noise, steps)
