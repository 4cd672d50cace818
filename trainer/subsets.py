"""Which images a trial trains on and which it holds out: `split_subsets`, and the FID reference sample.

Indices only: nothing here reads an image, so a trial can gather just its subset and held-out set from
a sharded pack (`trainer.packs`).
"""

from __future__ import annotations

import numpy as np

from trainer.storage import DataError

# The held-out test set is drawn with this seed, whatever data.shuffle_seed is, so every trial of a
# sweep measures PSNR on the same held-out images.
TEST_SPLIT_SEED = 0
# With data.disjoint, the pool is cut into shards in an order drawn with this seed.
DISJOINT_SHARD_SEED = 1


def split_subsets(
    num_total: int,
    test_images: int,
    num_images: int | None,
    fraction: float | None,
    shuffle_seed: int,
    disjoint: bool = False,
    region: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx) into a data set of `num_total` images.

    The test set is the last `test_images` of a permutation with a fixed seed, so it is the same for
    every shuffle_seed and subset size. With `region` (`held_out_region`: the data set's last `region`
    images are its own held-out region, e.g. the natural patches), the test set is `test_images` of
    those, drawn with the same fixed seed, and the pool is the images before them: no image of the
    region is ever trained on, whether it is in the test set or not. The remaining pool is shuffled by `shuffle_seed` and the
    training subset is its first `num_images` (or round(fraction * pool), at least 1; the whole pool
    when neither is given): with one seed, a smaller subset is a prefix of a larger one. train_idx
    keeps the shuffled order; test_idx keeps the fixed random order it was drawn in, so its first k images
    (what the PSNR gap scores) are a uniform sample of the held-out set, not its k lowest indices (a sorted
    test set would score only the first photograph's patches, or an image folder's first classes).

    With `disjoint`, subsets of different shuffle seeds share no image (for the reproducibility score
    of Kadkhodaie et al., two models trained on non-overlapping data): the pool is permuted with the
    fixed DISJOINT_SHARD_SEED and cut into consecutive shards of the subset size, and shuffle_seed s
    takes shard s. Subsets of different sizes are then no longer nested.
    """
    pool, test_idx = _held_out_split(num_total, test_images, region)
    size = _subset_size(len(pool), test_images, num_images, fraction)
    if disjoint:
        return _disjoint_shard(pool, size, shuffle_seed), test_idx
    train_idx = np.random.default_rng(shuffle_seed).permutation(pool)[:size]
    return train_idx, test_idx


def _disjoint_shard(pool: np.ndarray, size: int, shuffle_seed: int) -> np.ndarray:
    shards = len(pool) // size
    if shuffle_seed >= shards:
        raise DataError(
            f"data.disjoint=true gives each data.shuffle_seed its own {size} images, but the pool of "
            f"{len(pool)} images holds only {shards} such shard(s) (shuffle seeds 0..{shards - 1}), not "
            f"data.shuffle_seed={shuffle_seed}; lower data.shuffle_seed, data.num_images or data.fraction, or use more data"
        )
    shuffled = np.random.default_rng(DISJOINT_SHARD_SEED).permutation(pool)
    return shuffled[shuffle_seed * size : (shuffle_seed + 1) * size]


def _held_out_split(num_total: int, test_images: int, region: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(pool, test_idx): the held-out set drawn with TEST_SPLIT_SEED from the whole data set, or from its
    last `region` images when it has a held-out region (the pool is then the rest). The pool is sorted (so
    a shuffle depends only on which images are in it); test_idx is in the fixed order it was drawn in."""
    candidates = num_total if region is None else region
    if not 1 <= test_images <= candidates or test_images >= num_total:
        where = "the data set" if region is None else "its held-out region (kept apart from the training images)"
        raise DataError(
            f"data.test_images={test_images} must be at least 1 and at most the {candidates} images of {where}, "
            f"leaving images to train on; lower data.test_images"
        )
    if region is None:
        fixed = np.random.default_rng(TEST_SPLIT_SEED).permutation(num_total)
        return np.sort(fixed[: num_total - test_images]), fixed[num_total - test_images :]
    held_out = np.random.default_rng(TEST_SPLIT_SEED).permutation(np.arange(num_total - region, num_total))
    return np.arange(num_total - region), held_out[:test_images]


def pool_sample(num_total: int, test_images: int, count: int, region: int | None = None) -> np.ndarray:
    """`count` images of the pool (everything but the held-out set, or its region) in a fixed random
    order, the same for every subset and shuffle: the reference images that FID compares samples with."""
    pool, _ = _held_out_split(num_total, test_images, region)
    if region is not None:
        return pool[np.sort(np.random.default_rng(TEST_SPLIT_SEED).permutation(len(pool))[:count])]
    fixed = np.random.default_rng(TEST_SPLIT_SEED).permutation(num_total)
    return np.sort(fixed[: min(count, len(pool))])


def _subset_size(pool_size: int, test_images: int, num_images: int | None, fraction: float | None) -> int:
    if num_images is not None and fraction is not None:
        raise DataError(f"give data.num_images ({num_images}) or data.fraction ({fraction}), not both")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise DataError(f"data.fraction={fraction} must be in (0, 1]")
        return max(1, round(fraction * pool_size))
    if num_images is None:
        return pool_size
    if num_images < 1:
        raise DataError(f"data.num_images={num_images} must be at least 1")
    if num_images > pool_size:
        raise DataError(
            f"data.num_images={num_images} but only {pool_size} images remain after {test_images} "
            f"held-out test images; lower data.num_images or data.test_images, or use more data"
        )
    return num_images
