"""trainer.memorization: nearest-neighbour distances of samples and the d1/d2 < 1/3 copy fraction,
checked on constructed cases and against scipy's brute-force distances."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import cdist

from tests.support.sweeps import tiny_config
from trainer import memorization
from trainer.config import build_config
from trainer.data import load_images
from trainer.pool import load_subsets
from trainer.train import Trainer


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """The built-in digits as uint8 (1797, 8, 8, 1)."""
    return load_images("digits", 8)


def reference(samples: np.ndarray, images: np.ndarray) -> np.ndarray:
    """scipy's Euclidean distances (float64), as RMS on the [0, 1] scale, sorted per sample."""
    flat = lambda a: a.reshape(len(a), -1).astype(np.float64) / 255.0  # noqa: E731
    return np.sort(cdist(flat(samples), flat(images)), axis=1) / np.sqrt(samples[0].size)


def test_exact_copies_of_training_images_are_memorized(digits):
    train, test = digits[:32], digits[1000:1256]
    samples = train[[3, 7, 7, 31, 0]]
    result = memorization.memorization(samples, train, test)
    assert result.copy_fraction == 1.0
    assert np.array_equal(result.nn_train, np.zeros(5))  # exactly 0, not merely small
    assert result.nn_train_index.tolist() == [3, 7, 7, 31, 0]
    assert (result.nn_test > 0.05).all()
    assert result.summary() == {
        "mem_copy_fraction": 1.0,
        "mem_nn_train": 0.0,
        "mem_nn_test": pytest.approx(result.nn_test.mean(), rel=1e-12),
        "mem_closer_to_train": 1.0,
    }


def test_held_out_images_are_not_memorized(digits):
    train, test = digits[:256], digits[1000:1256]
    samples = digits[1500:1564]  # neither training nor held-out images
    result = memorization.memorization(samples, train, test)
    assert result.copy_fraction == 0.0
    held_out = memorization.memorization(test[:64], train, test)  # the held-out images themselves
    assert held_out.copy_fraction == 0.0
    assert np.array_equal(held_out.nn_test, np.zeros(64)) and (held_out.nn_train > 0).all()


def test_slightly_noisy_copies_are_copies_and_blends_are_not(digits):
    train, test = digits[:64], digits[1000:1064]
    rng = np.random.default_rng(0)
    noisy = np.clip(train[:16].astype(int) + rng.integers(-3, 4, train[:16].shape), 0, 255).astype(np.uint8)
    assert memorization.memorization(noisy, train, test).copy_fraction == 1.0
    blend = ((train[:16].astype(int) + train[16:32].astype(int)) // 2).astype(np.uint8)  # halfway between two
    assert memorization.memorization(blend, train, test).copy_fraction == 0.0


def test_distances_match_scipy_across_chunks(digits, monkeypatch):
    monkeypatch.setattr(memorization, "_CHUNK", 7)  # several blocks, the two nearest often in different ones
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    samples[:5] = digits[[10, 20, 30, 40, 50]]
    train, test = digits[:100], digits[1000:1050]
    result = memorization.memorization(samples, train, test)
    expected_train, expected_test = reference(samples, train), reference(samples, test)
    np.testing.assert_allclose(result.nn_train, expected_train[:, 0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.second_train, expected_train[:, 1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.nn_test, expected_test[:, 0], rtol=1e-12, atol=1e-12)  # M = 50: all of test
    flat = lambda a: a.reshape(len(a), -1).astype(np.float64)  # noqa: E731
    nearest = cdist(flat(samples), flat(train)).argmin(axis=1)
    assert np.array_equal(result.nn_train_index, nearest)
    copies = expected_train[:, 0] / expected_train[:, 1] < 1 / 3
    assert np.array_equal(result.copies, copies) and copies[:5].all() and not copies[5:].any()


# ---------------------------------------------------------------------------------------------
# Train versus held-out on reference sets of the same size


def grey_levels(levels) -> np.ndarray:
    """Flat grey 8x8 images, one per level: a one-dimensional data set whose geometry is plain."""
    return np.repeat(np.asarray(levels, dtype=np.uint8)[:, None, None, None], 64, axis=1).reshape(-1, 8, 8, 1)


def old_reading(samples: np.ndarray, train: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """The unmatched comparison: mean distance to the nearest of all N training and of all held-out images."""
    return reference(samples, train)[:, 0].mean(), reference(samples, test)[:, 0].mean()


def test_samples_near_training_images_read_as_memorized_whatever_the_held_out_size():
    """16 training grey levels, 1024 held-out ones; every sample is a training level moved by 2. Against all
    1024 held-out images a sample always finds a nearer one, so the unmatched reading says "closer to
    held-out"; against 16 held-out images (as many as the training images) most samples are nearer to training."""
    rng = np.random.default_rng(3)
    train = grey_levels(rng.integers(10, 246, 16))
    test = grey_levels(rng.integers(0, 256, 1024))
    samples = np.clip(train[rng.integers(0, 16, 256)].astype(int) + rng.choice([-2, 2], (256, 1, 1, 1)), 0, 255)
    samples = samples.astype(np.uint8)
    nn_train, nn_test_all = old_reading(samples, train, test)
    assert nn_test_all < nn_train  # the size confound alone flips the old reading
    result = memorization.memorization(samples, train, test)
    assert result.summary()["mem_nn_test"] > result.summary()["mem_nn_train"]  # the matched reading: nearer training
    assert result.matched_size == 16 and result.closer_to_train > 0.7
    np.testing.assert_allclose(result.nn_test, reference(samples, test[:16])[:, 0], rtol=1e-12)


def test_samples_from_the_data_read_as_no_preference(digits):
    """Fresh digits (neither training nor held-out) against 16 training and 1024 held-out digits: the
    unmatched reading puts them far nearer to held-out images; the matched one finds no preference, and
    swapping the two reference sets gives 1 minus the score (both sides are treated alike)."""
    perm = np.random.default_rng(0).permutation(len(digits))
    train, test, fresh = digits[perm[:16]], digits[perm[500:1524]], digits[perm[1524:1780]]
    nn_train, nn_test_all = old_reading(fresh, train, test)
    assert nn_test_all < 0.7 * nn_train
    result = memorization.memorization(fresh, train, test)
    assert 0.3 < result.closer_to_train < 0.7
    swapped = memorization.memorization(fresh, test[:16], train)
    assert swapped.closer_to_train == pytest.approx(1.0 - result.closer_to_train, abs=1e-12)
    # By hand: the share of samples strictly nearer to the training set, ties counting one half.
    d_train, d_test = reference(fresh, train)[:, 0], reference(fresh, test[:16])[:, 0]
    assert result.closer_to_train == pytest.approx(np.mean((d_train < d_test) + 0.5 * (d_train == d_test)))


def test_more_training_than_held_out_images_matches_the_first_m_of_each(digits):
    train, test = digits[:300], digits[1000:1100]
    samples = digits[1500:1532]
    result = memorization.memorization(samples, train, test)
    assert result.matched_size == 100
    np.testing.assert_allclose(result.nn_train_matched, reference(samples, train[:100])[:, 0], rtol=1e-12)
    np.testing.assert_allclose(result.nn_train, reference(samples, train)[:, 0], rtol=1e-12)


def test_rgb_images_and_an_image_size_free_scale():
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    shifted = np.clip(train.astype(int) + 51, 0, 255).astype(np.uint8)  # 0.2 brighter where not saturated
    result = memorization.memorization(shifted, train, train)
    expected = np.sqrt(((shifted.astype(float) - train) / 255.0) ** 2).reshape(10, -1)
    np.testing.assert_allclose(result.nn_train, np.sqrt((expected**2).mean(axis=1)), rtol=1e-12)


def test_one_training_image_reports_distances_but_no_copy_fraction(digits):
    train, test = digits[:1], digits[1000:1100]
    result = memorization.memorization(digits[[0, 0, 500]], train, test)
    assert result.copies is None and result.copy_fraction is None
    assert np.isinf(result.second_train).all()
    summary = result.summary()
    assert set(summary) == {"mem_nn_train", "mem_nn_test", "mem_closer_to_train"}
    assert summary["mem_nn_train"] == pytest.approx(reference(digits[[500]], train)[0, 0] / 3, rel=1e-12)


def test_two_equal_training_images_do_not_make_copies():
    image = np.full((1, 8, 8, 1), 200, np.uint8)
    train = np.concatenate([image, image, np.zeros_like(image)])
    result = memorization.memorization(image, train, train[2:])
    assert result.nn_train[0] == 0 and result.second_train[0] == 0 and result.copy_fraction == 0.0


def test_bad_inputs_are_refused(digits):
    with pytest.raises(ValueError, match="image shape"):
        memorization.memorization(digits[:2], digits[:4, :4], digits[:4])
    with pytest.raises(ValueError, match="uint8"):
        memorization.memorization(digits[:2].astype(np.float32), digits[:4], digits[:4])
    with pytest.raises(ValueError, match="at least one"):
        memorization.memorization(digits[:2], digits[:0], digits[:4])


def test_pair_grid_puts_each_sample_beside_its_nearest_training_image(digits):
    train = digits[:16]
    samples = train[[5, 2, 9]]
    result = memorization.memorization(samples, train, digits[1000:1010])
    pair_images = memorization.pairs(samples, train, result)
    assert pair_images.shape == (3, 2, 8, 8, 1) and pair_images.dtype == np.uint8
    assert np.array_equal(pair_images[:, 0], samples) and np.array_equal(pair_images[:, 1], train[[5, 2, 9]])
    canvas = np.asarray(Image.open(io.BytesIO(memorization.pairs_png(pair_images, columns=2))))
    scale = 8  # 8x8 images upscaled to 64 pixels
    # Two pairs a row, two rows: width 8 + 2 * (2 * 64 + 2 + 8), height 8 + 2 * (64 + 8).
    assert canvas.shape == (8 + 2 * (64 + 8), 8 + 2 * (2 * 64 + 2 + 8))
    second_pair_neighbour = canvas[8 : 8 + 64, 8 + (2 * 64 + 2 + 8) + 64 + 2 :][:, :64]
    assert np.array_equal(second_pair_neighbour[::scale, ::scale], train[2][..., 0])


def test_a_trainer_evaluation_reports_memorization_and_saves_the_pairs(tmp_path, one_torch_thread):
    config = build_config(tiny_config({"data.num_images": 4, "data.test_images": 8, "eval.samples.steps": 3}))
    trainer = Trainer(config, torch.device("cpu"), load_subsets(config, torch.device("cpu")))
    metrics = trainer.save_sample_grid(tmp_path)
    assert set(metrics) == {"mem_copy_fraction", "mem_nn_train", "mem_nn_test", "mem_closer_to_train"}
    samples = np.load(tmp_path / "samples.npy")
    pair_images = np.load(tmp_path / memorization.PAIRS_NPY)
    assert pair_images.shape == (4, 2, 8, 8, 1) and np.array_equal(pair_images[:, 0], samples)
    train = trainer.subsets.train.permute(0, 2, 3, 1).numpy()
    nearest = reference(samples, train)[:, 0]
    assert metrics["mem_nn_train"] == pytest.approx(nearest.mean(), rel=1e-12)
    assert (tmp_path / memorization.PAIRS_PNG).read_bytes().startswith(b"\x89PNG")
