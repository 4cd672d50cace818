"""Samples of the EMA model: DDIM from fixed noise, the sample grid (PNG and .npy), FID and KID.

Sampling noise comes from constant seeds, not the trial seed. Every trial of a sweep draws its grid
from the same noise, so two trials' grids can be compared image by image (the reproducibility score,
`trainer.metrics.reproducibility`), and FID samples differ between trials only by the model.
A class-conditional model is sampled unconditionally (the null class), as in the PSNR gap.

FID and KID compare the samples' Inception features with those of reference images: a fixed random
sample of the data's pool (every image but the held-out ones, `trainer.subsets.pool_sample`), the same
for every subset size and shuffle, i.e. FID against the data distribution, not against the training
subset. Reference features are computed once and cached on disk, keyed by the reference images'
content and the weights' sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.diffusion import Denoiser, Schedule, ddim_sample
from trainer.fid import cached_reference_stats, extract_features, frechet_distance_of_features
from trainer.fid import kernel_inception_distance
from trainer.data import to_unit
from trainer.storage import file_sha256, write_atomically
from trainer.fid_weights import fetch_weights
from trainer.records import GRID_NPY, GRID_PNG
from trainer.inception import FIDInceptionV3, load_fid_inception

GRID_NOISE_SEED = 20240303
FID_NOISE_SEED = 20240404
GRID_PIXELS = 64  # each grid image is upscaled (nearest) to at least this many pixels per side
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # Binkowski et al.'s defaults; subsets shrink to the set size

# One Inception network per weights file and process: (weights, sha256 prefix) -> (network, sha256).
_NETWORKS: dict[tuple[str, str], tuple[FIDInceptionV3, str]] = {}


def fixed_noise(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(count, *shape) standard normal noise drawn on the CPU from `seed`: the same on every device."""
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generate(
    model: Denoiser,
    schedule: Schedule,
    noise: torch.Tensor,
    steps: int,
    batch_size: int,
    device: torch.device,
    precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """DDIM samples (eta = 0: deterministic) from CPU `noise` (n, C, H, W), `batch_size` at a time on
    `device`, each batch under the context `precision()` makes (the trainer passes its fp32 evaluation);
    returns float32 (n, C, H, W) in [-1, 1] on the CPU."""
    batches = []
    for start in range(0, noise.shape[0], batch_size):
        x_T = noise[start : start + batch_size].to(device)
        with precision():
            batches.append(ddim_sample(model, schedule, x_T, steps).float().clamp(-1.0, 1.0).cpu())
    return torch.cat(batches)


def quantize(samples: torch.Tensor) -> torch.Tensor:
    """Model scale [-1, 1] (n, C, H, W) -> uint8 [0, 255] (n, C, H, W): what a sample written to PNG and
    read back holds (pytorch-fid and clean-fid measure such files), and the type of the data's images."""
    return to_unit(samples.float()).mul(255.0).round().to(torch.uint8)


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """Model scale [-1, 1] (n, C, H, W) -> uint8 (n, H, W, C), the layout of `trainer.data` images."""
    return quantize(samples).permute(0, 2, 3, 1).numpy()


def grid_png(images: np.ndarray, side: int) -> bytes:
    """uint8 (side * side, H, W, C) images as one PNG: a side x side grid, each image upscaled
    (nearest) to at least GRID_PIXELS pixels, with a 2-pixel mid-grey border between them (visible
    against both black and white backgrounds)."""
    count, height, width, channels = images.shape
    if count != side * side or channels not in (1, 3):
        raise ValueError(f"a {side}x{side} grid needs {side * side} (H, W, 1 or 3) images, got {images.shape}")
    scale = max(1, -(-GRID_PIXELS // max(height, width)))  # ceil
    big = images.repeat(scale, axis=1).repeat(scale, axis=2)  # (n, H*s, W*s, C)
    pad = 2
    cell_h, cell_w = height * scale + pad, width * scale + pad
    canvas = np.full((side * cell_h + pad, side * cell_w + pad, channels), 128, dtype=np.uint8)
    for i, image in enumerate(big):
        top, left = pad + (i // side) * cell_h, pad + (i % side) * cell_w
        canvas[top : top + height * scale, left : left + width * scale] = image
    buffer = io.BytesIO()
    Image.fromarray(canvas[..., 0] if channels == 1 else canvas).save(buffer, format="PNG")
    return buffer.getvalue()


def save_grid(directory: Path, samples: torch.Tensor, side: int) -> None:
    """Write `samples.png` (the grid) and `samples.npy` (uint8 (n, H, W, C)) into `directory`."""
    images = to_uint8(samples)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / GRID_PNG, grid_png(images, side))
    buffer = io.BytesIO()
    np.save(buffer, images, allow_pickle=False)
    write_atomically(directory / GRID_NPY, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# FID and KID


def fid_network(weights: str, sha256_prefix: str) -> tuple[FIDInceptionV3, str]:
    """The FID Inception network for `weights` and the file's full sha256, loaded once per process."""
    key = (weights, sha256_prefix)
    if key not in _NETWORKS:
        path = fetch_weights(weights, expected_sha256_prefix=sha256_prefix)  # cached, digest checked
        network = load_fid_inception(str(path), expected_sha256_prefix=sha256_prefix)
        _NETWORKS[key] = (network, file_sha256(path))
    return _NETWORKS[key]




def _unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1], the one way images reach the Inception network."""
    return images_uint8.float() / 255.0


def fid_and_kid(
    samples_uint8: torch.Tensor,
    reference_uint8: torch.Tensor,
    weights: str,
    sha256_prefix: str,
    batch_size: int,
    device: torch.device,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, float]:
    """`fid`, `kid` and `kid_std` of samples against reference images, both uint8 (n, C, H, W) (`quantize`
    the samples), so both go through one path to Inception: / 255, then the network. The reference features
    are cached (see the module docstring)."""
    if samples_uint8.dtype != torch.uint8 or reference_uint8.dtype != torch.uint8:
        raise ValueError(
            f"FID compares uint8 images; got samples {samples_uint8.dtype} and reference {reference_uint8.dtype} "
            "(quantize samples with trainer.sampling.quantize)"
        )
    network, weights_sha256 = fid_network(weights, sha256_prefix)
    reference = reference_uint8.cpu()
    key = {
        "kind": "fid-reference",
        "images_sha256": hashlib.sha256(reference.contiguous().numpy().tobytes()).hexdigest(),
        "images_shape": list(reference.shape),
        "weights_sha256": weights_sha256,
    }
    _, _, ref_features = cached_reference_stats(
        key, lambda: extract_features(network, _unit(reference), batch_size, device), cache_dir
    )
    features = extract_features(network, _unit(samples_uint8.cpu()), batch_size, device)
    kid, kid_std = kernel_inception_distance(features, ref_features, KID_SUBSETS, KID_SUBSET_SIZE)
    return {"fid": frechet_distance_of_features(features, ref_features), "kid": kid, "kid_std": kid_std}
