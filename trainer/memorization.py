"""Memorization of generated samples: nearest-neighbour distances in pixel space, the copy fraction and a
size-matched train-versus-held-out comparison.

For each generated sample x (after the uint8 quantization every saved image goes through) we find, by
brute force, in float64 pixel space:

- d1(x), d2(x): the L2 distances to the nearest and the second-nearest of the N *training* images;
- with M = min(N, held-out images), two reference sets of the same size M: the first M training images
  and the first M held-out images (a fixed set, the same for every trial). d_train_M(x) and d_test_M(x)
  are the distances to the nearest image of each.

A sample counts as a **copy** of its nearest training image when d1 / d2 < 1/3: it sits much closer to
one training image than to any other. This ratio test (threshold 1/3) is the one of Yoon et al. 2023,
"Diffusion Probabilistic Models Generalize when They Fail to Memorize" (ICML SPIGM workshop) and Gu et
al. 2023, "On Memorization in Diffusion Models". (Carlini et al. 2023, "Extracting Training Data from
Diffusion Models", USENIX Security, use a different normalisation: the distance to the nearest training
image divided by the mean distance to its n nearest.) Somepalli et al. 2023, "Diffusion Art or Digital
Forgery?" (CVPR) ask the same question with learned (SSCD) features; at 8x8 to 32x32 pixels we stay in
pixel space.

**Train versus held-out without the size confound.** The nearest of more reference images is nearer:
against N = 16 training images and 256 held-out ones, a sample that memorized nothing is nearer to some
held-out image, and the old reading ("as close to held-out as to training images") says nothing. So the
two sides are compared on reference sets of the same size M: `closer_to_train` is the share of samples
with d_train_M < d_test_M (a tie counts one half). Both reference sets are drawn from the same
distribution, so a model that memorized nothing scores about 0.5, whatever N; 1 means every sample is
nearer to a training image. `mem_nn_test` is the mean of d_test_M. When N > M only the first M training
images enter this comparison (the copy test and `mem_nn_train` always use all N).

With a single training image there is no second neighbour and the ratio is undefined: the copy test
is then not made (`copy_fraction` is None and `summary()` leaves `mem_copy_fraction` out), while the
distances are still reported.

Distances are reported as root-mean-square pixel differences on the [0, 1] scale (L2 / sqrt(pixels x
channels)), so they read the same for any image size: 0 is an exact copy, 1/255 is one grey level
everywhere. The ratio d1/d2 is the same in either unit. The squared distances are computed from the
uint8 values as integers held in float64, where the dot-product expansion is exact: an exact copy
scores exactly 0.

Pure numpy; no Ray, no MLflow.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.metric_names import (MEMORIZATION_CLOSER_TO_TRAIN, MEMORIZATION_COPY_FRACTION, MEMORIZATION_NN_TEST,
                                  MEMORIZATION_NN_TRAIN)
from trainer.storage import write_atomically

COPY_RATIO = 1.0 / 3.0  # d1 / d2 below this: a copy (Yoon et al. 2023; Gu et al. 2023)
PAIRS_PNG = "nearest_train.png"
PAIRS_NPY = "nearest_train.npy"
PAIR_PIXELS = 64  # each image of the pair grid is upscaled (nearest) to at least this many pixels
_CHUNK = 4096  # reference images per block of the distance matrix


@dataclass(frozen=True)
class Memorization:
    """Nearest-neighbour distances of n samples (RMS on the [0, 1] scale) and the copy decision.

    nn_train: (n,) distance to the nearest training image; nn_train_index: (n,) its index.
    second_train: (n,) distance to the second-nearest training image (inf with one training image).
    nn_test: (n,) distance to the nearest of the first M held-out images, M = min(N, held-out images).
    nn_train_matched: (n,) distance to the nearest of the first M training images (= nn_train when N <= M).
    """

    nn_train: np.ndarray
    nn_train_index: np.ndarray
    second_train: np.ndarray
    nn_test: np.ndarray
    nn_train_matched: np.ndarray
    matched_size: int  # M, the size of each of the two matched reference sets

    @property
    def closer_to_train(self) -> float:
        """Share of samples nearer to one of M training images than to any of M held-out images (ties: 1/2)."""
        closer = (self.nn_train_matched < self.nn_test).astype(float)
        closer[self.nn_train_matched == self.nn_test] = 0.5
        return float(closer.mean())

    @property
    def copies(self) -> np.ndarray | None:
        """(n,) bool: d1 / d2 < COPY_RATIO; None with a single training image (no second neighbour)."""
        if not np.isfinite(self.second_train).all():
            return None
        # d1 < d2 / 3 rather than d1 / d2 < 1/3: no division by zero when two training images are equal.
        return self.nn_train < COPY_RATIO * self.second_train

    @property
    def copy_fraction(self) -> float | None:
        copies = self.copies
        return None if copies is None else float(copies.mean())

    def summary(self) -> dict[str, float]:
        """mem_copy_fraction (absent with one training image), mem_nn_train, mem_nn_test (size-matched) and
        mem_closer_to_train: means over samples."""
        metrics = {MEMORIZATION_NN_TRAIN: float(self.nn_train.mean()), MEMORIZATION_NN_TEST: float(self.nn_test.mean()),
                   MEMORIZATION_CLOSER_TO_TRAIN: self.closer_to_train}
        if self.copy_fraction is not None:
            metrics[MEMORIZATION_COPY_FRACTION] = self.copy_fraction
        return metrics


def _flat(images: np.ndarray, name: str) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim < 2:
        raise ValueError(f"{name} must be uint8 images (n, ...), got {images.dtype} {images.shape}")
    return images.reshape(images.shape[0], -1).astype(np.float64)


def _two_nearest(samples: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Squared distances of flat float64 samples (n, D) to their nearest and second-nearest rows of
    `reference` (m, D), and the nearest row's index; the second is inf when m == 1."""
    n = samples.shape[0]
    best = np.full(n, np.inf)
    second = np.full(n, np.inf)
    best_index = np.zeros(n, dtype=np.int64)
    sample_norms = (samples * samples).sum(axis=1)
    rows = np.arange(n)
    for start in range(0, reference.shape[0], _CHUNK):
        block = reference[start : start + _CHUNK]
        squared = sample_norms[:, None] + (block * block).sum(axis=1)[None, :] - 2.0 * samples @ block.T
        np.maximum(squared, 0.0, out=squared)  # exact for integer pixels; a guard all the same
        if block.shape[0] >= 2:
            order = np.argpartition(squared, 1, axis=1)[:, :2]
            first, other = squared[rows, order[:, 0]], squared[rows, order[:, 1]]
            swap = other < first
            order[swap] = order[swap][:, ::-1]
            first, other = np.minimum(first, other), np.maximum(first, other)
        else:
            order = np.zeros((n, 2), dtype=np.int64)
            first, other = squared[:, 0], np.full(n, np.inf)
        # Merge this block's two nearest with the running two nearest.
        new_best = first < best
        second = np.where(new_best, np.minimum(best, other), np.minimum(second, first))
        best_index = np.where(new_best, start + order[:, 0], best_index)
        best = np.where(new_best, first, best)
    return best, second, best_index


def memorization(samples: np.ndarray, train: np.ndarray, test: np.ndarray) -> Memorization:
    """Nearest-neighbour distances of uint8 samples (n, H, W, C) to uint8 training and held-out images
    of the same shape (any layout, as long as all three share it). The held-out reference is the first
    M = min(len(train), len(test)) held-out images; pass them in a fixed order."""
    if not (samples.shape[1:] == train.shape[1:] == test.shape[1:]):
        raise ValueError(f"samples {samples.shape}, train {train.shape} and test {test.shape} differ in image shape")
    if len(train) == 0 or len(test) == 0:
        raise ValueError("memorization needs at least one training and one held-out image")
    flat = _flat(samples, "samples")
    scale = 255.0 * np.sqrt(flat.shape[1])  # uint8 L2 -> RMS on the [0, 1] scale
    matched = min(len(train), len(test))
    train_flat = _flat(train, "train")
    d1, d2, index = _two_nearest(flat, train_flat)
    d_train_matched = d1 if matched == len(train) else _two_nearest(flat, train_flat[:matched])[0]
    d_test, _, _ = _two_nearest(flat, _flat(test[:matched], "test"))
    return Memorization(
        nn_train=np.sqrt(d1) / scale,
        nn_train_index=index,
        second_train=np.sqrt(d2) / scale,
        nn_test=np.sqrt(d_test) / scale,
        nn_train_matched=np.sqrt(d_train_matched) / scale,
        matched_size=matched,
    )


# ---------------------------------------------------------------------------------------------
# Samples beside their nearest training images


def pairs(samples: np.ndarray, train: np.ndarray, result: Memorization) -> np.ndarray:
    """uint8 (n, 2, H, W, C): each sample and its nearest training image."""
    return np.stack([samples, train[result.nn_train_index]], axis=1)


def pairs_png(pair_images: np.ndarray, columns: int) -> bytes:
    """uint8 (n, 2, H, W, C) pairs as one PNG: `columns` pairs per row, sample left and its nearest
    training image right, each upscaled (nearest) to at least PAIR_PIXELS pixels; 2 grey pixels within
    a pair, 8 between pairs."""
    count, two, height, width, channels = pair_images.shape
    if two != 2 or channels not in (1, 3) or columns < 1:
        raise ValueError(f"pairs must be (n, 2, H, W, 1 or 3) with columns >= 1, got {pair_images.shape}, {columns}")
    scale = max(1, -(-PAIR_PIXELS // max(height, width)))  # ceil
    big = pair_images.repeat(scale, axis=2).repeat(scale, axis=3)
    inner, outer = 2, 8
    cell_h, cell_w = height * scale, width * scale
    pair_w = 2 * cell_w + inner
    rows = -(-count // columns)
    canvas = np.full((rows * (cell_h + outer) + outer, columns * (pair_w + outer) + outer, channels), 128, np.uint8)
    for i, (sample, neighbour) in enumerate(big):
        top = outer + (i // columns) * (cell_h + outer)
        left = outer + (i % columns) * (pair_w + outer)
        canvas[top : top + cell_h, left : left + cell_w] = sample
        canvas[top : top + cell_h, left + cell_w + inner : left + pair_w] = neighbour
    buffer = io.BytesIO()
    Image.fromarray(canvas[..., 0] if channels == 1 else canvas).save(buffer, format="PNG")
    return buffer.getvalue()


def pairs_npy(pair_images: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, pair_images, allow_pickle=False)
    return buffer.getvalue()


def save_memorization(directory: Path, samples: np.ndarray, train, test, columns: int) -> dict[str, float]:
    """Memorization metrics (`Memorization.summary`) of uint8 samples (n, H, W, C) against the
    trainer's uint8 (N, C, H, W) training and held-out images (tensors on any device, or arrays), with
    the pairs written to `directory` as nearest_train.png (`columns` pairs a row) and nearest_train.npy
    (uint8 (n, 2, H, W, C): sample, nearest training image)."""
    train_images, test_images = _channels_last(train), _channels_last(test)
    result = memorization(samples, train_images, test_images)
    pair_images = pairs(samples, train_images, result)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / PAIRS_PNG, pairs_png(pair_images, columns))
    write_atomically(directory / PAIRS_NPY, pairs_npy(pair_images))
    return result.summary()


def _channels_last(images) -> np.ndarray:
    """(N, C, H, W) tensor or array -> numpy (N, H, W, C)."""
    array = np.asarray(images.cpu() if hasattr(images, "cpu") else images)
    return array.transpose(0, 2, 3, 1)
