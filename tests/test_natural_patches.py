"""The natural builtins: patches of scikit-learn's two sample photographs, training and held-out patches
from disjoint regions. Checked against the photographs as scikit-learn itself reads them, and the
split by pixel coordinates."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.builtins import held_out_region, natural_patch_boxes
from trainer.data import DataError, load_images
from trainer.subsets import pool_sample, split_subsets


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """The photographs through scikit-learn's own loader (not ditsweep's reader)."""
    from sklearn.datasets import load_sample_image

    return {name: load_sample_image(name) for name in ("china.jpg", "flower.jpg")}


@pytest.mark.parametrize("size", [16, 32])
def test_counts_follow_the_tiling_of_each_stripe(photos, size):
    train = held = 0
    for photo in photos.values():
        height, width = photo.shape[:2]
        periods, rows = width // 128, height // size  # 128 columns: training 0-63, held-out 80-111
        train += periods * rows * (64 // size)
        held += periods * rows * (32 // size)
    images = load_images("natural", size)
    assert len(images) == train + held and held_out_region("natural", size) == held
    # the numbers the module docstring and README state
    assert (train, held) == {16: (1040, 520), 32: (260, 130)}[size]


@pytest.mark.parametrize("source,channels", [("natural", 3), ("builtin:natural-gray", 1)])
@pytest.mark.parametrize("size", [16, 32])
def test_patches_are_the_photographs_pixels(photos, source, channels, size):
    images = load_images(source, size)
    assert images.dtype == np.uint8 and images.shape[1:] == (size, size, channels)
    assert images.min() <= 20 and images.max() >= 235  # full range, not rescaled
    for index, box in enumerate(natural_patch_boxes(size)):
        crop = photos[box.photo][box.top : box.top + size, box.left : box.left + size].astype(np.float64)
        if channels == 1:  # ITU-R 601-2 luma, as PIL's convert("L") defines it
            luma = crop @ np.array([0.299, 0.587, 0.114])
            assert np.abs(images[index, ..., 0] - luma).max() <= 1.0, box
        else:
            assert np.array_equal(images[index], crop.astype(np.uint8)), box
    assert np.array_equal(load_images(source, size), images)  # deterministic


@pytest.mark.parametrize("size", [16, 32])
def test_held_out_patches_share_no_pixel_with_training_patches(photos, size):
    boxes = natural_patch_boxes(size)
    region = held_out_region("natural", size)
    assert [b.held_out for b in boxes] == [False] * (len(boxes) - region) + [True] * region
    for name, photo in photos.items():
        cover = {False: np.zeros(photo.shape[:2], int), True: np.zeros(photo.shape[:2], int)}
        for box in (b for b in boxes if b.photo == name):
            cover[box.held_out][box.top : box.top + size, box.left : box.left + size] += 1
        assert cover[False].max() == 1 and cover[True].max() == 1  # patches do not overlap one another
        assert not np.any(cover[False] & cover[True])
        # and at least 16 columns between a training pixel and a held-out one, in the same rows
        for shift in range(1, 17):
            assert not np.any(cover[False][:, shift:] & cover[True][:, :-shift])
            assert not np.any(cover[True][:, shift:] & cover[False][:, :-shift])
        # both sets reach across the whole width of the photograph
        for held_out in (False, True):
            columns = np.nonzero(cover[held_out].any(axis=0))[0]
            assert columns.min() < 128 and columns.max() > photo.shape[1] - 128


def test_the_split_trains_only_on_training_patches_and_holds_out_a_fixed_set():
    total, region = len(load_images("natural", 16)), held_out_region("natural", 16)
    first_held = total - region
    tests = set()
    for seed in (0, 1, 2):
        for n in (8, 64, 1024):
            train, test = split_subsets(total, 256, n, None, seed, region=region)
            assert len(train) == n and train.max() < first_held
            assert test.min() >= first_held and len(set(test)) == 256
            tests.add(tuple(test))
    assert len(tests) == 1  # the same held-out set for every N and shuffle
    reference = pool_sample(total, 256, 100, region=region)
    assert len(reference) == 100 and reference.max() < first_held


def test_sizes_and_held_out_counts_that_do_not_fit_are_refused():
    with pytest.raises(DataError, match="data.image_size 16 or 32, not 8"):
        load_images("natural", 8)
    region = held_out_region("natural", 32)
    with pytest.raises(DataError, match=f"data.test_images=256 .*the {region} images of its held-out region"):
        split_subsets(390, 256, 8, None, 0, region=region)
    with pytest.raises(DataError, match="data.num_images=512 but only 260 images remain"):
        split_subsets(390, 128, 512, None, 0, region=region)


def test_a_trial_trains_on_training_region_patches_and_scores_held_out_region_ones():
    import torch

    from tests.support.sweeps import tiny_config
    from trainer.config import build_config
    from trainer.pool import load_subsets

    config = build_config(tiny_config({"data.source": "natural-gray", "data.image_size": 16,
                                       "data.num_images": 8, "data.test_images": 64}))
    subsets = load_subsets(config, torch.device("cpu"))
    images = torch.from_numpy(load_images("natural-gray", 16)).permute(0, 3, 1, 2)
    boxes = natural_patch_boxes(16)

    def origin(image: torch.Tensor) -> set[bool]:
        return {boxes[i].held_out for i in torch.nonzero((images == image).flatten(1).all(1)).flatten().tolist()}

    assert subsets.train.shape == (8, 1, 16, 16) and subsets.test.shape == (64, 1, 16, 16)
    assert all(origin(image) == {False} for image in subsets.train)
    assert all(origin(image) == {True} for image in subsets.test)


@pytest.mark.parametrize("scored", [32, 128])
def test_the_scored_held_out_images_sample_both_photographs_in_proportion(scored):
    """The PSNR gap scores the first `eval.psnr_gap.images` of the held-out set: they must be a uniform
    sample of it, not its lowest indices (the region lists china.jpg's patches before flower.jpg's, so a
    sorted held-out set scored only china.jpg: a difficulty offset between the two sides of the gap)."""
    from scipy.stats import hypergeom

    boxes = natural_patch_boxes(16)
    total, region = len(boxes), held_out_region("natural", 16)
    _, test = split_subsets(total, 256, 64, None, 0, region=region)
    in_test_china = sum(boxes[i].photo == "china.jpg" for i in test)
    scored_china = sum(boxes[i].photo == "china.jpg" for i in test[:scored])
    # Drawn without replacement from the 256, `scored_china` follows a hypergeometric law: a 99.9% range.
    law = hypergeom(256, in_test_china, scored)
    assert 0 < in_test_china < 256
    assert law.ppf(0.0005) <= scored_china <= law.ppf(0.9995), (scored_china, scored, in_test_china)
