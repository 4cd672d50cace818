"""FID, KID, feature extraction and the reference statistics cache, against references here."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from trainer.fid import (
    cached_reference_stats,
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_of_features,
    kernel_inception_distance,
)


def random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    """A random covariance: full rank, or of the given rank (singular)."""
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0.0 if rank else 0.1 * np.eye(d))


def fid_by_sqrtm(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook formula, float64, scipy's sqrtm."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


def fid_by_eigenvalues(mu1, sigma1, mu2, sigma2) -> float:
    """Same distance without sqrtm of a non-symmetric matrix: tr (S1 S2)^(1/2) is the sum of the
    square roots of the eigenvalues of the PSD matrix S1^(1/2) S2 S1^(1/2)."""
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eigenvalues = np.clip(np.linalg.eigvalsh(root1 @ sigma2 @ root1), 0, None)
    trace_sqrt = np.sqrt(eigenvalues).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2) - 2 * trace_sqrt)


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_distance_matches_the_sqrtm_formula(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    sigma1, sigma2 = random_spd(rng, d), random_spd(rng, d)
    got = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert got == pytest.approx(fid_by_sqrtm(mu1, sigma1, mu2, sigma2), rel=1e-6)
    assert got == pytest.approx(fid_by_eigenvalues(mu1, sigma1, mu2, sigma2), rel=1e-6)


def test_frechet_distance_on_rank_deficient_covariances():
    # 16 images in 64 dimensions: both covariances, and their product, are singular.
    rng = np.random.default_rng(7)
    d = 64
    sigma1, sigma2 = random_spd(rng, d, rank=16), random_spd(rng, d, rank=16)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    got = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(got)
    assert got == pytest.approx(fid_by_eigenvalues(mu1, sigma1, mu2, sigma2), rel=1e-6)
    assert got == pytest.approx(fid_by_sqrtm(mu1, sigma1, mu2, sigma2), rel=1e-6)


@pytest.mark.parametrize("n, d", [(500, 32), (20, 64)], ids=["full-rank", "fewer-images-than-dims"])
def test_frechet_distance_of_a_set_with_itself_is_zero(n, d):
    features = np.random.default_rng(3).standard_normal((n, d)) * 5.0 + 2.0
    mu, sigma = feature_statistics(features)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_frechet_distance_grows_with_a_mean_shift():
    rng = np.random.default_rng(4)
    sigma = random_spd(rng, 8)
    mu = rng.standard_normal(8)
    shift = np.full(8, 0.5)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-6)


def test_frechet_distance_rejects_non_covariances_and_bad_shapes():
    mu = np.zeros(3)
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(mu, np.eye(3), mu, -np.eye(3))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu, np.eye(3), mu, np.eye(4))
    nan_sigma = np.eye(3)
    nan_sigma[0, 1] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        frechet_distance(mu, np.eye(3), mu, nan_sigma)


def test_feature_statistics_are_the_sample_mean_and_covariance():
    features = np.random.default_rng(5).standard_normal((50, 6)).astype(np.float32)
    mu, sigma = feature_statistics(features)
    x = features.astype(np.float64)
    centred = x - x.sum(axis=0) / len(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.sum(axis=0) / len(x), rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(x) - 1), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2 rows"):
        feature_statistics(features[:1])
    _, one_dim_sigma = feature_statistics(features[:, :1])
    assert one_dim_sigma.shape == (1, 1)


# ----------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------


def mmd2_unbiased_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, pair by pair."""
    m, d = x.shape

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_the_pairwise_estimator_on_the_full_sets():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((25, 8))
    y = rng.standard_normal((25, 8)) * 1.3 + 0.2
    mean, std = kernel_inception_distance(x, y, num_subsets=1, subset_size=25)
    assert mean == pytest.approx(mmd2_unbiased_by_loops(x, y), rel=1e-9)
    assert std == 0.0


def test_kid_is_reproducible_and_uses_the_smaller_set_size():
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((40, 6)), rng.standard_normal((30, 6)) + 1.0
    first = kernel_inception_distance(x, y, num_subsets=5, subset_size=1000, seed=3)
    assert kernel_inception_distance(x, y, num_subsets=5, subset_size=1000, seed=3) == first
    assert kernel_inception_distance(x, y, num_subsets=5, subset_size=1000, seed=4) != first
    assert first[0] > 0  # the sets differ by a mean shift
    # subset_size above both set sizes means subsets of min(n1, n2) = 30 rows.
    assert kernel_inception_distance(x, y, num_subsets=5, subset_size=30, seed=3) == first


def test_kid_of_samples_from_one_distribution_is_near_zero():
    rng = np.random.default_rng(13)
    x, y = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    shifted = y + 1.0
    same, _ = kernel_inception_distance(x, y, num_subsets=10, subset_size=200)
    different, _ = kernel_inception_distance(x, shifted, num_subsets=10, subset_size=200)
    assert abs(same) < 0.05 * different


# ----------------------------------------------------------------------------------------------
# Feature extraction (with a small real network; the Inception one is tested in test_inception)
# ----------------------------------------------------------------------------------------------


class TinyFeatureNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)  # eval mode: a per-sample map, as in Inception

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == 3
        return torch.relu(self.norm(self.conv(2 * x - 1))).mean(dim=(2, 3))  # (B, 8)


def test_extract_features_does_not_depend_on_batch_size():
    images = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = TinyFeatureNet()
    reference = extract_features(model, images, batch_size=7, device="cpu")
    for batch_size in (1, 3, 100):
        np.testing.assert_allclose(
            extract_features(model, images, batch_size=batch_size, device="cpu"),
            reference,
            rtol=1e-5,
            atol=1e-6,
        )
    assert reference.shape == (7, 8) and reference.dtype == np.float32


def test_extract_features_repeats_grayscale_to_rgb():
    gray = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    model = TinyFeatureNet()
    np.testing.assert_allclose(
        extract_features(model, gray, batch_size=2, device="cpu"),
        extract_features(model, gray.repeat(1, 3, 1, 1), batch_size=2, device="cpu"),
        rtol=1e-5,  # float32 features, ReLU means near 0 among them: a relative and an absolute bound
        atol=1e-6,
    )


def test_extract_features_rejects_images_outside_unit_range():
    model = TinyFeatureNet()
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        extract_features(model, torch.rand(2, 3, 8, 8) * 2 - 1, batch_size=2, device="cpu")
    with pytest.raises(ValueError, match="C = 1 or 3"):
        extract_features(model, torch.rand(2, 4, 8, 8), batch_size=2, device="cpu")


# ----------------------------------------------------------------------------------------------
# Reference statistics cache
# ----------------------------------------------------------------------------------------------


def test_reference_stats_are_computed_once_per_key(tmp_path):
    features = np.random.default_rng(9).standard_normal((30, 5)).astype(np.float32)
    calls = []

    def compute():
        calls.append(1)
        return features

    key = {"source": "celeba", "subset": {"num_images": 30, "seed": 0}, "image_size": 32,
           "weights_sha256": "6726825d"}
    mu, sigma, feats = cached_reference_stats(key, compute, tmp_path)
    reordered = dict(reversed(list(key.items())))  # same key, other order
    mu2, sigma2, feats2 = cached_reference_stats(reordered, compute, tmp_path)

    assert len(calls) == 1
    want_mu, want_sigma = feature_statistics(features)
    np.testing.assert_array_equal(mu2, want_mu)
    np.testing.assert_array_equal(sigma2, want_sigma)
    np.testing.assert_array_equal(feats2, features)
    np.testing.assert_array_equal(mu, mu2)
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]  # no temporary files left

    cached_reference_stats({**key, "image_size": 64}, compute, tmp_path)
    assert len(calls) == 2
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_reference_stats_recompute_over_an_unreadable_file(tmp_path):
    features = np.random.default_rng(10).standard_normal((10, 3))
    key = {"source": "x"}
    cached_reference_stats(key, lambda: features, tmp_path)
    (npz,) = tmp_path.glob("*.npz")
    npz.write_bytes(b"truncated")
    mu, _, _ = cached_reference_stats(key, lambda: features, tmp_path)
    np.testing.assert_allclose(mu, features.mean(axis=0))


def test_reference_stats_key_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        cached_reference_stats({"source": object()}, lambda: np.zeros((2, 2)), tmp_path)


@pytest.mark.parametrize("n1, n2, d", [(20, 30, 64), (5, 100, 64), (3, 3, 128), (200, 100, 32)])
def test_frechet_distance_of_features_matches_the_statistics_route(n1, n2, d):
    rng = np.random.default_rng(n1 + n2 + d)
    x = rng.standard_normal((n1, d))
    y = rng.standard_normal((n2, d)) * 1.3 + 0.2
    expected = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert frechet_distance_of_features(x, y) == pytest.approx(expected, rel=1e-7)
    assert frechet_distance_of_features(x, x) == pytest.approx(0.0, abs=1e-7 * d)
