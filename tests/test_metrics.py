"""trainer.metrics: PSNR, the PSNR curve record, and the PSNR gap's noise protocol (each image its own fixed noise)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.diffusion import Schedule, linear_schedule
from trainer.metrics import EVAL_NOISE_SEED, noise_seed, one_step_psnr, psnr, psnr_gap_curve, reproducibility
from trainer.records import PsnrCurve


def images(seed: int, count: int = 6) -> torch.Tensor:
    """Images in [-1, 1], (count, 1, 4, 4)."""
    return torch.rand(count, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def oracle_for(schedule: Schedule, x0: torch.Tensor):
    """A denoiser that believes the clean images are `x0`: exact for them, wrong for any others."""

    def model(x_t, t, y=None):
        abar = schedule.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    return model


def shrinking_model(x_t, t, y=None):
    """A fixed, imperfect denoiser: any deterministic function of its inputs will do."""
    return 0.7 * x_t + 0.001 * t.view(-1, 1, 1, 1)


# ---------------------------------------------------------------------------------------------
# psnr


@pytest.mark.parametrize("error", [0.1, 0.01, 0.5])
def test_psnr_of_a_known_mse(error):
    target = torch.full((2, 3, 4, 4), 0.25)
    estimate = target + error  # MSE = error^2
    expected = 10 * math.log10(1 / error**2)
    assert psnr(estimate, target).tolist() == pytest.approx([expected] * 2, abs=1e-4)


def test_psnr_is_per_image():
    target = torch.zeros(2, 1, 2, 2)
    estimate = torch.stack([torch.full((1, 2, 2), 0.1), torch.full((1, 2, 2), 0.01)])
    assert psnr(estimate, target).tolist() == pytest.approx([20.0, 40.0], abs=1e-4)


def test_psnr_of_identical_images_is_finite():
    x = torch.rand(3, 1, 4, 4)
    assert psnr(x, x).tolist() == pytest.approx([120.0] * 3)  # MSE clamped at 1e-12


# ---------------------------------------------------------------------------------------------
# PsnrCurve


def test_curve_summary_gap_and_csv():
    curve = PsnrCurve(timesteps=[0, 500, 999], train=[30.0, 20.0, 10.0], test=[29.0, 19.5, 10.0])
    assert curve.gap == [1.0, 0.5, 0.0]
    summary = curve.summary()
    assert summary == pytest.approx({"psnr_train": 20.0, "psnr_test": 19.5, "psnr_gap": 0.5})
    assert curve.to_csv().splitlines() == [
        "timestep,psnr_train,psnr_test,psnr_gap",
        "0,30.000000,29.000000,1.000000",
        "500,20.000000,19.500000,0.500000",
        "999,10.000000,10.000000,0.000000",
    ]


# ---------------------------------------------------------------------------------------------
# psnr_gap_curve


def test_same_images_on_both_sides_give_a_gap_of_exactly_zero():
    schedule = linear_schedule(100)
    x = images(0)
    curve = psnr_gap_curve(shrinking_model, schedule, x, x.clone(), num_timesteps=5, batch_size=4)
    assert curve.timesteps == [0, 25, 50, 74, 99]
    assert curve.train == curve.test  # the same noise draws on both sides, bit for bit
    assert curve.summary()["psnr_gap"] == 0.0


def test_gap_curve_is_reproducible_and_ignores_the_global_seed():
    schedule = linear_schedule(100)
    train, test = images(1), images(2)
    torch.manual_seed(0)
    first = psnr_gap_curve(shrinking_model, schedule, train, test, num_timesteps=3)
    torch.manual_seed(123)
    second = psnr_gap_curve(shrinking_model, schedule, train, test, num_timesteps=3)
    assert first == second


def test_gap_curve_does_not_depend_on_the_batch_size():
    schedule = linear_schedule(100)
    train, test = images(1, 7), images(2, 7)
    whole = psnr_gap_curve(shrinking_model, schedule, train, test, 3, batch_size=64)
    pieces = psnr_gap_curve(shrinking_model, schedule, train, test, 3, batch_size=3)
    assert whole.train == pytest.approx(pieces.train, abs=1e-4)
    assert whole.test == pytest.approx(pieces.test, abs=1e-4)


def test_an_oracle_gets_very_high_psnr():
    schedule = linear_schedule(100)
    x = images(3).double()
    scores = one_step_psnr(oracle_for(schedule, x), schedule, x, torch.tensor([0, 50, 99]), list(range(6)), batch_size=64)
    assert min(scores) > 100


def test_a_memorizing_denoiser_has_a_positive_gap():
    # Exact on the training images, wrong on held-out ones: the situation the PSNR gap measures.
    schedule = linear_schedule(100)
    train, test = images(4).double(), images(5).double()
    curve = psnr_gap_curve(oracle_for(schedule, train), schedule, train, test, 4, batch_size=64)
    assert all(gap > 0 for gap in curve.gap)
    assert curve.summary()["psnr_train"] > 100
    assert curve.summary()["psnr_gap"] > 10


def test_reproducibility_of_identical_and_of_unrelated_samples():
    samples = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert reproducibility(samples, samples.clone()) == pytest.approx(1.0)
    # Zero-mean, orthogonal images: cosine 0 after centring.
    a = torch.tensor([[1.0, -1.0], [1.0, -1.0]]).expand(2, 1, 2, 2)  # left half bright
    b = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]).expand(2, 1, 2, 2)  # top half bright
    assert reproducibility(a, b) == pytest.approx(0.0, abs=1e-12)
    assert reproducibility(a, -a) == pytest.approx(-1.0)
    unrelated = torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    other = torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    assert abs(reproducibility(unrelated, other)) < 0.05


def test_reproducibility_ignores_the_pixel_scale_and_a_shared_background():
    import numpy as np

    rng = np.random.default_rng(3)
    unit = rng.random((4, 8, 8, 1))
    as_bytes = np.round(unit * 255).astype(np.uint8)
    as_model_scale = as_bytes.astype(np.float64) / 127.5 - 1.0
    other = rng.random((4, 8, 8, 1))
    assert reproducibility(as_bytes, (other * 255).round().astype(np.uint8)) == pytest.approx(
        reproducibility(as_model_scale, (other * 255).round() / 127.5 - 1.0)
    )
    with pytest.raises(ValueError, match="one shape"):
        reproducibility(unit, unit[:3])


# ---------------------------------------------------------------------------------------------
# clip: raw x0 (Kadkhodaie et al.) or clipped to [-1, 1]


def reference_psnr(model, schedule, x0, t, noise, clip):
    """The one-step PSNR written out in float64: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps,
    x0_hat = (x_t - sqrt(1 - abar) model(x_t)) / sqrt(abar), optionally clipped, scored on [0, 1]."""
    abar = float(schedule.alphas_cumprod[t])
    x_t = abar**0.5 * x0 + (1 - abar) ** 0.5 * noise
    x0_hat = (x_t - (1 - abar) ** 0.5 * model(x_t, torch.full((x0.shape[0],), t))) / abar**0.5
    if clip:
        x0_hat = x0_hat.clamp(-1, 1)
    mse = ((x0_hat - x0) / 2).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def reference_noise(ids: list[int], t: int, shape) -> torch.Tensor:
    """Each image's own draw: a generator seeded by (EVAL_NOISE_SEED, image id, timestep)."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(
        noise_seed(EVAL_NOISE_SEED, i, t))) for i in ids])


def test_each_image_keeps_its_noise_whatever_else_is_scored():
    """An image's noise follows its id, not its position or the set's size: the mean PSNR over a set is the
    count-weighted mean of the PSNR over its parts, in any order and any batch size."""
    schedule = linear_schedule(100)
    x = images(9, 7).double()
    ids = [5, 11, 2, 30, 4, 6, 7]
    timesteps = torch.tensor([10, 60, 95])
    whole = one_step_psnr(shrinking_model, schedule, x, timesteps, ids, batch_size=3)
    head = one_step_psnr(shrinking_model, schedule, x[:2], timesteps, ids[:2], batch_size=64)
    tail = one_step_psnr(shrinking_model, schedule, x[2:], timesteps, ids[2:], batch_size=2)
    assert whole == pytest.approx([(2 * a + 5 * b) / 7 for a, b in zip(head, tail)], rel=1e-12)
    order = [6, 0, 3, 1, 5, 2, 4]
    shuffled = one_step_psnr(shrinking_model, schedule, x[order], timesteps, [ids[i] for i in order], batch_size=64)
    assert shuffled == pytest.approx(whole, rel=1e-12)
    renamed = one_step_psnr(shrinking_model, schedule, x, timesteps, [i + 1 for i in ids], batch_size=64)
    assert renamed != pytest.approx(whole, rel=1e-6)  # other ids, other noise: the checks above could fail
    with pytest.raises(ValueError, match="image ids"):
        one_step_psnr(shrinking_model, schedule, x, timesteps, ids[:3], batch_size=64)


@pytest.mark.parametrize("clip", [False, True])
def test_one_step_psnr_scores_the_raw_or_the_clipped_estimate(clip):
    schedule = linear_schedule(100)
    x = images(6).double()
    timesteps = torch.tensor([5, 60, 99])
    ids = [40, 3, 17, 8, 0, 99]
    scores = one_step_psnr(shrinking_model, schedule, x, timesteps, ids, batch_size=4, clip=clip)
    expected = [reference_psnr(shrinking_model, schedule, x, t, reference_noise(ids, t, x.shape[1:]).double(), clip)
                for t in timesteps.tolist()]
    assert scores == pytest.approx(expected, rel=1e-9)  # all float64


def test_clipping_raises_psnr_at_high_noise_and_the_default_is_raw():
    schedule = linear_schedule(100)
    train, test = images(7, 64).double(), images(8, 64).double()  # 64 images: the mean gain is about 0.45 dB
    raw = psnr_gap_curve(shrinking_model, schedule, train, test, 3, batch_size=64)
    clipped = psnr_gap_curve(shrinking_model, schedule, train, test, 3, batch_size=64, clip=True)
    assert raw == psnr_gap_curve(shrinking_model, schedule, train, test, 3, batch_size=64, clip=False)
    assert clipped.train[-1] > raw.train[-1] + 0.3 and clipped.test[-1] > raw.test[-1] + 0.3
    assert all(c >= r - 1e-9 for c, r in zip(clipped.train + clipped.test, raw.train + raw.test))
