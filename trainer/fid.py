"""FID and KID from Inception pool features, feature extraction, and cached reference statistics.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to the Inception pool
features of two image sets:  |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).
KID (Binkowski et al. 2018) is the unbiased MMD^2 between the feature sets under the kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets; unlike FID it is unbiased in the number
of images, which matters for the small sample counts of quick sweeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer.storage import atomic_file, default_cache_dir

# The largest imaginary part of diag(sqrtm(S1 S2)), relative to its real part, that is rounding
# noise rather than a sign that the inputs are not covariance matrices.
_IMAG_TOLERANCE = 1e-3
# Images a little outside [0, 1] (float rounding in a sampler) are clamped; further out is a bug.
_RANGE_SLACK = 1e-3


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) of `features` (n, d), in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"features must be (n, d) with at least 2 rows, got shape {features.shape}"
        )
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = 1e-6,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    If sqrtm(sigma1 @ sigma2) is not finite (a singular product), eps * I is added to both
    covariances and it is tried once more. Raises ValueError for mismatched shapes, or when the
    square root has a sizeable imaginary part (the inputs are not covariance matrices).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"frechet_distance needs means of shape (d,) and covariances (d, d) with one d; got "
            f"mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(d)
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError(
                f"sqrtm(sigma1 @ sigma2) is not finite, even with {eps:g} * I added to both "
                "covariances; check the inputs for NaN or inf"
            )
    covmean = _real_part(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def frechet_distance_of_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """`frechet_distance` of the Gaussians fitted to two feature sets (n1, d) and (n2, d).

    With fewer images than dimensions in one set (quick sweeps: a few hundred samples, d = 2048) it
    skips the (d, d) matrix square root, which takes tens of seconds on a CPU: with S = A^T A (A the
    centred features / sqrt(n - 1)), the nonzero eigenvalues of S1 S2 are the squared singular values
    of the (n1, n2) matrix A1 A2^T, so tr (S1 S2)^(1/2) is the sum of those singular values. The
    result is the same, to rounding.
    """
    x, y = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    mu1, sigma1 = feature_statistics(x)
    mu2, sigma2 = feature_statistics(y)
    if min(x.shape[0], y.shape[0]) >= x.shape[1]:
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    a = (x - mu1) / np.sqrt(x.shape[0] - 1)  # (n1, d), S1 = a.T @ a
    b = (y - mu2) / np.sqrt(y.shape[0] - 1)  # (n2, d), S2 = b.T @ b
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    import scipy.linalg  # here, not at the top: every trial worker imports this module, few compute FID

    with warnings.catch_warnings():
        # A singular product is expected (fewer images than dimensions); checked by the caller.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(matrix)


def _real_part(covmean: np.ndarray) -> np.ndarray:
    if not np.iscomplexobj(covmean):
        return covmean
    diagonal = np.diagonal(covmean)
    scale = max(1.0, float(np.abs(diagonal.real).max(initial=0.0)))
    largest_imag = float(np.abs(diagonal.imag).max(initial=0.0))
    if largest_imag > _IMAG_TOLERANCE * scale:
        raise ValueError(
            f"sqrtm(sigma1 @ sigma2) has imaginary diagonal entries up to {largest_imag:.3g} "
            f"(real scale {scale:.3g}): the covariances are not positive semi-definite"
        )
    return covmean.real


def kernel_inception_distance(
    feats1: np.ndarray,
    feats2: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased MMD^2 over `num_subsets` random subsets.

    Each subset draws min(subset_size, n1, n2) rows from each set without replacement, from a
    generator seeded with `seed`, so the result is reproducible.
    """
    x_all, y_all = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise ValueError(
            f"KID needs two (n, d) feature arrays with one d, got {x_all.shape} and {y_all.shape}"
        )
    m = min(subset_size, x_all.shape[0], y_all.shape[0])
    if m < 2 or num_subsets < 1:
        raise ValueError(
            f"KID needs subsets of at least 2 rows and num_subsets >= 1; got subset size {m} "
            f"(from n1={x_all.shape[0]}, n2={y_all.shape[0]}, subset_size={subset_size}) "
            f"and num_subsets={num_subsets}"
        )
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets)
    for i in range(num_subsets):
        x = x_all[rng.choice(x_all.shape[0], m, replace=False)]
        y = y_all[rng.choice(y_all.shape[0], m, replace=False)]
        estimates[i] = _mmd2_unbiased(x, y)
    return float(estimates.mean()), float(estimates.std())


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two (m, d) samples under the cubic polynomial kernel."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    # Within-set terms leave out the diagonal k(x_i, x_i); that is what makes the estimate unbiased.
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def extract_features(
    model: nn.Module, images_unit: torch.Tensor, batch_size: int, device: torch.device | str
) -> np.ndarray:
    """Run `model` (moved to `device`, eval mode) over images in [0, 1], `batch_size` at a time.

    `images_unit` is (N, C, H, W) with C = 3, or C = 1 (repeated to RGB). Returns the model's
    outputs as a float32 array (N, feature_dim); rows do not depend on the batch size.
    """
    images = _as_rgb_unit(images_unit)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = model.to(device).eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device)  # (b, 3, H, W)
            chunks.append(model(batch).float().cpu())  # (b, feature_dim)
    return torch.cat(chunks).numpy()


def _as_rgb_unit(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(
            "images must be a non-empty (N, C, H, W) tensor with C = 1 or 3, "
            f"got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(
            f"images must be floats in [0, 1], got dtype {images.dtype}; divide uint8 by 255"
        )
    low, high = float(images.min()), float(images.max())
    if low < -_RANGE_SLACK or high > 1.0 + _RANGE_SLACK:
        raise ValueError(
            f"images must be in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
            "map samples in [-1, 1] with (x + 1) / 2"
        )
    images = images.float().clamp(0.0, 1.0)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def cached_reference_stats(
    cache_key: dict,
    compute: Callable[[], np.ndarray],
    cache_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu, sigma, features) of a reference image set, computed once and kept on disk.

    `cache_key` names what the features depend on (data source, subset, image size, Inception
    weights digest, ...) as JSON data; its sha256 (keys sorted) names the `.npz` file in
    `cache_dir` (default `<cache>/fid_stats`). `compute()` returns the (n, d) features on a miss.
    The file is written to a temporary name and renamed, so readers never see half a file.
    """
    key_json = _normalized_key(cache_key)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "fid_stats"
    path = folder / f"{hashlib.sha256(key_json.encode()).hexdigest()}.npz"
    cached = _read_stats(path, key_json)
    if cached is not None:
        return cached
    features = np.asarray(compute())
    mu, sigma = feature_statistics(features)
    _write_stats(path, key_json, mu, sigma, features)
    return mu, sigma, features


def _normalized_key(cache_key: dict) -> str:
    if not isinstance(cache_key, dict):
        raise ValueError(f"cache_key must be a dict, got {type(cache_key).__name__}")
    try:
        return json.dumps(cache_key, sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise ValueError(
            "cache_key must hold only JSON values (str, int, float, bool, None, lists, dicts): "
            f"{err}"
        ) from err


def _read_stats(path: Path, key_json: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key_json:
                return None
            return data["mu"], data["sigma"], data["features"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # unreadable: recompute and overwrite


def _write_stats(
    path: Path, key_json: str, mu: np.ndarray, sigma: np.ndarray, features: np.ndarray
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        np.savez(f, key=np.array(key_json), mu=mu, sigma=sigma, features=features)
