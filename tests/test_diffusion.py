"""trainer.diffusion: schedule, noising statistics, one-step x0, loss, and the DDIM / DDPM samplers.

Oracle denoisers (which know the clean images) make the exact answers checkable without training.
"""

from __future__ import annotations

import pytest
import torch

from trainer.diffusion import (
    Schedule,
    ddim_sample,
    ddim_step,
    ddpm_sample,
    ddpm_step,
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
    # The loss is a float32 mean of 128 squares; the reference is taken in float64.
    assert loss.item() == pytest.approx(noise.double().pow(2).mean().item(), rel=1e-5)


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


# ---------------------------------------------------------------------------------------------
# Golden single steps: a non-oracle model (eps = 0.5 x_t), against the papers' formulas written out
# here. An oracle cannot catch a wrong coefficient (its x0 is exact at every step), this can.

T = 1000
GOLDEN_STEPS = [(1, 0), (10, 9), (500, 499), (999, 998), (999, 949), (500, 0), (0, -1)]


def half_model(x_t, t, y=None):
    return 0.5 * x_t


def abar_of(schedule: Schedule, t: int) -> float:
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def unclipped_x_t(schedule: Schedule, t: int, seed: int = 21) -> torch.Tensor:
    """x_t small enough that the model's x0 = x_t (1 - 0.5 sqrt(1 - abar)) / sqrt(abar) stays inside
    [-0.9, 0.9]: the sampler's clipping does not act, so the update is the paper's formula exactly."""
    a = abar_of(schedule, t)
    u = torch.rand(2, 1, 4, 4, generator=seeded(seed), dtype=torch.float64) * 2 - 1
    return u * 0.9 * a**0.5 / (1 - 0.5 * (1 - a) ** 0.5)


def fixed_z(seed: int = 22) -> torch.Tensor:
    return torch.randn(2, 1, 4, 4, generator=seeded(seed), dtype=torch.float64)


def ddim_reference(x_t, eps, a_t, a_prev, eta, z, clip=False):
    """Song et al. 2021, eq. 12, with sigma from eq. 16. With `clip`, x0 is clipped to [-1, 1] and eps
    re-derived from it (x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps solved for eps)."""
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - a_t**0.5 * x0) / (1 - a_t) ** 0.5
    sigma = eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5
    return a_prev**0.5 * x0 + (1 - a_prev - sigma**2) ** 0.5 * eps + sigma * z


def ddpm_reference(x_t, eps, beta_t, a_t, a_prev, z, clip=False):
    """Ho et al. 2020, eq. 6-7: posterior mean sqrt(a_prev) beta_t / (1 - a_t) x0 + sqrt(alpha_t) (1 - a_prev) /
    (1 - a_t) x_t and variance (1 - a_prev) / (1 - a_t) beta_t, at x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    (clipped to [-1, 1] with `clip`)."""
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = a_prev**0.5 * beta_t / (1 - a_t) * x0 + (1 - beta_t) ** 0.5 * (1 - a_prev) / (1 - a_t) * x_t
    variance = (1 - a_prev) / (1 - a_t) * beta_t
    return mean + variance**0.5 * z


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("t, t_prev", GOLDEN_STEPS)
def test_one_ddim_step_follows_song_et_al_eq_12(t, t_prev, eta):
    schedule = linear_schedule(T)
    x_t, z = unclipped_x_t(schedule, t), fixed_z()
    a_t, a_prev = abar_of(schedule, t), abar_of(schedule, t_prev)
    expected = ddim_reference(x_t, 0.5 * x_t, a_t, a_prev, eta, z)
    got = ddim_step(half_model, schedule, x_t, t, t_prev, eta=eta, noise=z)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if eta > 0 and t_prev >= 0:  # the noise term is really there: another z gives another step
        other = ddim_step(half_model, schedule, x_t, t, t_prev, eta=eta, noise=fixed_z(23))
        assert not torch.allclose(other, got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [999, 800, 1])
def test_one_ddim_step_with_clipping_rederives_eps_from_the_clipped_x0(t):
    schedule = linear_schedule(T)
    x_t, z = 3 * fixed_z(24), fixed_z()  # x0 = 0.5 x_t / sqrt(abar) ... far outside [-1, 1] at high t
    a_t, a_prev = abar_of(schedule, t), abar_of(schedule, t - 1)
    raw_x0 = (x_t - (1 - a_t) ** 0.5 * 0.5 * x_t) / a_t**0.5
    assert (raw_x0.abs() > 1).any()  # clipping acts
    for eta in (0.0, 1.0):
        expected = ddim_reference(x_t, 0.5 * x_t, a_t, a_prev, eta, z, clip=True)
        got = ddim_step(half_model, schedule, x_t, t, t - 1, eta=eta, noise=z)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_one_ddpm_step_follows_the_posterior_of_ho_et_al_eq_6_7(t):
    schedule = linear_schedule(T)
    x_t, z = unclipped_x_t(schedule, t), fixed_z()
    beta_t = float(schedule.betas[t])  # the schedule's own beta, not 1 - abar_t / abar_{t-1}
    expected = ddpm_reference(x_t, 0.5 * x_t, beta_t, abar_of(schedule, t), abar_of(schedule, t - 1), z)
    got = ddpm_step(half_model, schedule, x_t, t, t - 1, noise=z)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # The stochastic part: the variance term moves the result by sqrt(beta_tilde) * (z' - z).
    other = ddpm_step(half_model, schedule, x_t, t, t - 1, noise=fixed_z(23))
    beta_tilde = (1 - abar_of(schedule, t - 1)) / (1 - abar_of(schedule, t)) * beta_t
    torch.testing.assert_close(other - got, beta_tilde**0.5 * (fixed_z(23) - z), rtol=1e-9, atol=1e-12)


def test_the_last_ddpm_step_returns_the_posterior_mean_at_abar_one():
    schedule = linear_schedule(T)
    x_t = unclipped_x_t(schedule, 0)
    a_t = abar_of(schedule, 0)
    expected = (x_t - (1 - a_t) ** 0.5 * 0.5 * x_t) / a_t**0.5  # abar_prev = 1: the mean is x0
    torch.testing.assert_close(ddpm_step(half_model, schedule, x_t, 0, -1), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [1, 500, 999])
def test_ddim_with_eta_one_is_the_ddpm_step(t):
    """Song et al. 2021, sec. 4.1: eta = 1 makes the DDIM step the DDPM posterior draw, same mean and variance."""
    schedule = linear_schedule(T)
    x_t, z = unclipped_x_t(schedule, t), fixed_z()
    torch.testing.assert_close(
        ddim_step(half_model, schedule, x_t, t, t - 1, eta=1.0, noise=z),
        ddpm_step(half_model, schedule, x_t, t, t - 1, noise=z),
        rtol=1e-10,
        atol=1e-12,
    )


def test_one_ddim_step_in_float32_matches_the_float64_formula_to_float32_precision():
    schedule = linear_schedule(T)
    for t in (1, 500, 999):
        x_t, z = unclipped_x_t(schedule, t), fixed_z()
        expected = ddim_reference(x_t, 0.5 * x_t, abar_of(schedule, t), abar_of(schedule, t - 1), 1.0, z)
        got = ddim_step(half_model, schedule, x_t.float(), t, t - 1, eta=1.0, noise=z.float())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_the_samplers_chain_the_golden_steps_with_their_generator_draws(sampler):
    schedule = linear_schedule(T)
    seen: list[int] = []

    def model(x_t, t, y=None):
        seen.append(int(t[0]))
        return 0.5 * x_t

    x_T = fixed_z(25)  # the sampler clips x0 to [-1, 1] on the way; so does the reference
    if sampler == "ddim":
        got = ddim_sample(model, schedule, x_T, 4, eta=1.0, generator=seeded(5))
    else:
        got = ddpm_sample(model, schedule, x_T, 4, generator=seeded(5))
    assert seen[0] == T - 1 and seen[-1] == 0 and seen == sorted(seen, reverse=True) and len(seen) == 4
    draws, x = seeded(5), x_T
    for t, t_prev in zip(seen, seen[1:] + [-1]):
        a_t, a_prev = abar_of(schedule, t), abar_of(schedule, t_prev)
        z = torch.randn(x.shape, generator=draws, dtype=x.dtype) if t_prev >= 0 else torch.zeros_like(x)
        if sampler == "ddim":
            x = ddim_reference(x, 0.5 * x, a_t, a_prev, 1.0, z, clip=True)
        else:  # a respaced step: beta = 1 - abar_t / abar_prev
            x = ddpm_reference(x, 0.5 * x, 1 - a_t / a_prev, a_t, a_prev, z, clip=True)
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-12)
