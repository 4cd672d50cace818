"""trainer.train: reports, determinism, resume from checkpoints, atomic checkpoints, class labels, the
per-process cache of decoded data.

Every trial is DiT-T/1 (12 blocks, width 64) on 8x8 digits with a handful of steps; one CPU thread
keeps the timings stable on a shared box.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.sweeps import tiny_config
from trainer.config import TrialConfig, apply_overrides, build_config
from trainer.data import DataError, load_images, load_labels
from trainer.records import PsnrCurve
from trainer.pool import POOLS, PoolCache, load_subsets
from trainer.prepare import prepare_images
from trainer.train import (
    CHECKPOINT_FILE,
    PREVIOUS_CHECKPOINT_FILE,
    Trainer,
    load_checkpoint,
    save_checkpoint,
    train,
)

# The factory's tiny config with more images and steps and a warmup, evaluated only at the end.
TINY = tiny_config({"data.num_images": 32, "train.steps": 6, "train.warmup_steps": 2},
                   drop=("train.log_every", "eval.every"))
TIMING_KEYS = {"images_per_sec"}


def tiny(*overrides: str) -> TrialConfig:
    return build_config(apply_overrides(TINY, list(overrides)))


class Recorder:
    """A report callback that keeps every (metrics, checkpoint) pair."""

    def __init__(self):
        self.calls: list[tuple[dict, str | None]] = []

    def __call__(self, metrics: dict, checkpoint: str | None) -> None:
        self.calls.append((dict(metrics), checkpoint))

    @property
    def steps(self) -> list[int]:
        return [metrics["step"] for metrics, _ in self.calls]

    def steps_with(self, key: str) -> list[int]:
        """Steps of the reports that carry `key` (a resume may also announce itself with a report)."""
        return [metrics["step"] for metrics, _ in self.calls if key in metrics]


def without_timing(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key not in TIMING_KEYS}


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """These tests train real models: one thread each keeps them steady on a shared 2-core box."""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Six steps with an evaluation and checkpoint at steps 3 and 6: (final, recorder, out_dir)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    recorder = Recorder()
    final = train(tiny("eval.every=3"), recorder, out_dir=out)
    return final, recorder, out


# ---------------------------------------------------------------------------------------------
# reports and outputs


def test_reports_loss_then_psnr_gap_with_a_checkpoint(tmp_path):
    recorder = Recorder()
    final = train(tiny("train.steps=4", "train.log_every=2"), recorder, out_dir=tmp_path)

    assert recorder.steps == [2, 4]
    (first, first_checkpoint), (last, last_checkpoint) = recorder.calls
    assert set(first) == {"step", "loss", "images_per_sec"} and first_checkpoint is None
    assert {"loss", "images_per_sec", "psnr_gap", "psnr_train", "psnr_test", "psnr_curve"} <= set(last)
    assert first["loss"] > 0 and first["images_per_sec"] > 0
    assert Path(last_checkpoint, CHECKPOINT_FILE).is_file()

    curve = PsnrCurve.from_csv(last["psnr_curve"])
    assert curve.timesteps == [0, 999]
    assert curve.summary() == pytest.approx({k: last[k] for k in ("psnr_train", "psnr_test", "psnr_gap")})
    assert last["psnr_gap"] == pytest.approx(last["psnr_train"] - last["psnr_test"])

    expected = {key: value for key, value in last.items() if key != "psnr_curve"}
    assert final == expected
    assert json.loads((tmp_path / "metrics.json").read_text()) == final
    assert (tmp_path / "psnr_curve.csv").read_text() == curve.to_csv()


def test_loss_falls_on_digits(tmp_path):
    losses: list[float] = []
    config = tiny("train.steps=40", "data.num_images=64", "train.log_every=10", "train.warmup_steps=5")
    train(config, lambda metrics, checkpoint: losses.append(metrics["loss"]), out_dir=tmp_path)
    assert len(losses) == 4
    # At initialization adaLN-Zero outputs 0, so the loss starts near E[eps^2] = 1.
    assert 0.7 < losses[0] < 1.2
    assert losses[-1] < 0.6 * losses[0]


# ---------------------------------------------------------------------------------------------
# determinism and resume


def test_same_seed_same_results_different_seed_different(uninterrupted, tmp_path):
    final_a, recorder_a, _ = uninterrupted
    recorder = Recorder()
    again = train(tiny("eval.every=3"), recorder, out_dir=tmp_path / "again")
    assert without_timing(again) == without_timing(final_a)
    assert [without_timing(m) for m, _ in recorder.calls] == [without_timing(m) for m, _ in recorder_a.calls]

    other = train(tiny("eval.every=3", "seed=1"), out_dir=tmp_path / "other")
    assert other["loss"] != final_a["loss"]
    assert other["psnr_train"] != final_a["psnr_train"]


class Interrupt(Exception):
    pass


def test_resume_after_a_crash_repeats_the_uninterrupted_run(uninterrupted, tmp_path):
    final_a, recorder_a, _ = uninterrupted

    def crash_after_first_checkpoint(metrics: dict, checkpoint: str | None) -> None:
        if checkpoint is not None:
            raise Interrupt

    # eval.every=3 with the default log_every=10: the loss window of step 6 would span the
    # checkpoint at step 3 unless checkpointed reports close it.
    with pytest.raises(Interrupt):
        train(tiny("eval.every=3"), crash_after_first_checkpoint, out_dir=tmp_path)
    assert torch.load(tmp_path / "checkpoint" / CHECKPOINT_FILE, weights_only=True)["step"] == 3
    assert not (tmp_path / "metrics.json").exists()

    recorder = Recorder()
    final = train(tiny("eval.every=3"), recorder, out_dir=tmp_path)
    assert recorder.steps_with("loss")[0] > 3
    assert without_timing(final) == without_timing(final_a)
    assert without_timing(recorder.calls[-1][0]) == without_timing(recorder_a.calls[-1][0])


def test_resume_refuses_a_checkpoint_of_a_different_config(uninterrupted, tmp_path):
    _, _, out = uninterrupted
    with pytest.raises(ValueError, match="different trial config"):
        train(tiny("eval.every=3", "train.steps=7"), out_dir=tmp_path, resume_from=out / "checkpoint")


def test_rerunning_a_finished_trial_reports_its_metrics_again(uninterrupted, tmp_path):
    final_a, _, out = uninterrupted
    shutil.copytree(out / "checkpoint", tmp_path / "checkpoint")
    recorder = Recorder()
    final = train(tiny("eval.every=3"), recorder, out_dir=tmp_path)
    assert recorder.steps_with("psnr_gap") == [6]
    assert recorder.steps_with("loss") == []
    for key in ("step", "psnr_gap", "psnr_train", "psnr_test"):
        assert final[key] == final_a[key]
    assert json.loads((tmp_path / "metrics.json").read_text())["psnr_gap"] == final_a["psnr_gap"]


# ---------------------------------------------------------------------------------------------
# checkpoint files


def test_checkpoints_load_with_weights_only(uninterrupted):
    _, _, out = uninterrupted
    state = torch.load(out / "checkpoint" / CHECKPOINT_FILE, weights_only=True)
    assert {"step", "model", "ema", "optimizer", "generator", "global_rng", "config"} <= set(state)
    assert state["step"] == 6
    assert TrialConfig.model_validate_json(state["config"]) == tiny("eval.every=3")
    previous = torch.load(out / "checkpoint" / PREVIOUS_CHECKPOINT_FILE, weights_only=True)
    assert previous["step"] == 3
    assert [p.name for p in (out / "checkpoint").iterdir() if p.name.startswith(".")] == []  # no temp files


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path, capsys):
    _, _, out = uninterrupted
    folder = shutil.copytree(out / "checkpoint", tmp_path / "checkpoint")
    current = folder / CHECKPOINT_FILE
    current.write_bytes(current.read_bytes()[: current.stat().st_size // 2])
    state = load_checkpoint(folder)
    assert state is not None and state["step"] == 3
    assert "unreadable" in capsys.readouterr().out

    (folder / PREVIOUS_CHECKPOINT_FILE).write_bytes(b"")
    assert load_checkpoint(folder) is None
    assert load_checkpoint(tmp_path / "absent") is None


def test_a_failed_checkpoint_write_keeps_the_old_one(tmp_path):
    save_checkpoint(tmp_path, {"step": 1, "weights": torch.ones(2)})
    # AttributeError for a local object before Python 3.14, PicklingError after
    with pytest.raises((pickle.PicklingError, AttributeError), match="Can't pickle"):
        save_checkpoint(tmp_path, {"step": 2, "weights": lambda: None})  # not picklable: fails mid-write
    assert load_checkpoint(tmp_path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]


# ---------------------------------------------------------------------------------------------
# class labels


def digit_like(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 8, 8, 1), dtype=np.uint8)


def test_load_labels_from_each_kind_of_source(tmp_path):
    digits = load_labels("digits")
    assert digits.shape == (1797,) and digits.dtype == np.int64 and set(digits) == set(range(10))
    assert len(load_images("digits", 8)) == len(digits)

    images, labels = digit_like(5), np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "with.npz", images=images, labels=labels)
    np.savez(tmp_path / "unnamed.npz", x=images, labels=labels)  # the one non-label array is the images
    np.savez(tmp_path / "without.npz", images=images)
    np.save(tmp_path / "plain.npy", images)
    for name in ("with.npz", "unnamed.npz"):
        np.testing.assert_array_equal(load_labels(str(tmp_path / name)), labels)
    np.testing.assert_array_equal(load_images(str(tmp_path / "unnamed.npz"), 8), images)
    assert load_labels(str(tmp_path / "without.npz")) is None
    assert load_labels(str(tmp_path / "plain.npy")) is None

    prepare_images(str(tmp_path / "plain.npy"), str(tmp_path / "prepared"), 8)
    assert load_labels(str(tmp_path / "prepared")) is None
    prepare_images(str(tmp_path / "with.npz"), str(tmp_path / "prepared"), 8)  # labels travel into the pack
    np.testing.assert_array_equal(load_labels(str(tmp_path / "prepared")), labels)

    with pytest.raises(DataError, match="does not exist"):
        load_labels(str(tmp_path / "absent.npz"))


def test_load_labels_from_s3_reads_the_local_copy(tmp_path, s3_bucket, monkeypatch):
    import s3fs

    monkeypatch.setenv("DITSWEEP_CACHE", str(tmp_path / "cache"))
    images, labels = digit_like(5), np.array([3, 1, 4, 1, 5])
    np.savez(tmp_path / "set.npz", images=images, labels=labels)
    prepare_images(str(tmp_path / "set.npz"), str(tmp_path / "prepared"), 8)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put_file(str(tmp_path / "set.npz"), f"{s3_bucket}/set.npz")
    for path in (tmp_path / "prepared").iterdir():
        fs.put_file(str(path), f"{s3_bucket}/prepared/{path.name}")

    for uri in (f"s3://{s3_bucket}/set.npz", f"s3://{s3_bucket}/prepared"):
        with pytest.raises(DataError, match="call load_images"):
            load_labels(uri)
        np.testing.assert_array_equal(load_images(uri, 8), images)
        np.testing.assert_array_equal(load_labels(uri), labels)


@pytest.mark.parametrize("labels", [np.array([0.0, 1.0]), np.array([[0, 1]]), np.array([0, -1])])
def test_malformed_labels_are_refused(tmp_path, labels):
    np.savez(tmp_path / "bad.npz", images=digit_like(2), labels=labels)
    with pytest.raises(DataError, match="bad.npz"):
        load_labels(str(tmp_path / "bad.npz"))


def test_class_conditional_trial_trains_on_labels_and_reports_psnr_gap(tmp_path):
    config = tiny("model.num_classes=10", "train.steps=4")
    recorder = Recorder()
    final = train(config, recorder, out_dir=tmp_path)
    assert np.isfinite(final["psnr_gap"]) and "psnr_gap" in recorder.calls[-1][0]

    # The label table moved away from its (seeded) initialization: labels reached the model.
    fresh = Trainer(config, torch.device("cpu"), load_subsets(config, torch.device("cpu")))
    trained = torch.load(tmp_path / "checkpoint" / CHECKPOINT_FILE, weights_only=True)["model"]
    assert not torch.equal(trained["y_embedder.table.weight"], fresh.model.y_embedder.table.weight)
    assert fresh.model.y_embedder.dropout == config.model.class_dropout
    subsets = fresh.subsets
    assert subsets.train_labels.shape == (32,) and subsets.test_labels.shape == (16,)
    digits = torch.from_numpy(load_labels("digits"))
    assert set(subsets.train_labels.tolist()) <= set(digits.tolist())


def test_class_conditional_resume_repeats_the_uninterrupted_run(tmp_path):
    # Label dropout draws from torch's global generator: the checkpoint must carry its state.
    config = tiny("model.num_classes=10", "model.class_dropout=0.5", "train.steps=4", "eval.every=2")
    reference = train(config, out_dir=tmp_path / "a")

    def crash(metrics: dict, checkpoint: str | None) -> None:
        if checkpoint is not None:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config, crash, out_dir=tmp_path / "b")
    torch.manual_seed(12345)  # whatever ran in between must not matter
    resumed = train(config, out_dir=tmp_path / "b")
    assert without_timing(resumed) == without_timing(reference)


def test_labels_outside_num_classes_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"labels up to 9 but model.num_classes=5"):
        train(tiny("model.num_classes=5"), out_dir=tmp_path)


def test_a_conditional_model_needs_labels(tmp_path):
    np.save(tmp_path / "images.npy", digit_like(40))
    source = str(tmp_path / "images.npy")
    with pytest.raises(DataError) as info:
        train(tiny("model.num_classes=10", f"data.source={source}"), out_dir=tmp_path / "out")
    assert str(info.value).startswith(f"model.num_classes=10 needs labels, but data source '{source}' has none")


def test_label_count_must_match_the_images(tmp_path):
    np.savez(tmp_path / "short.npz", images=digit_like(40), labels=np.zeros(39, dtype=np.int64))
    with pytest.raises(DataError, match="40 images but 39 labels"):
        train(tiny("model.num_classes=10", f"data.source={tmp_path / 'short.npz'}"), out_dir=tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# One decode per source and process: Ray reuses a worker for trial after trial of a sweep.


def touch_later(path: Path) -> None:
    """Move the modification time forward, as an edit a second later would (coarse-mtime file systems)."""
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_trials_on_one_source_decode_it_once_and_an_edit_decodes_it_again(tmp_path):
    first = digit_like(64)
    path = tmp_path / "pool.npy"
    np.save(path, first)
    cache = PoolCache()
    a = tiny(f"data.source={path}", "data.num_images=16")
    b = tiny(f"data.source={path}", "data.num_images=32", "data.shuffle_seed=3", "seed=1")

    pool = cache.get(a)
    assert cache.get(b) is pool and (cache.misses, cache.hits) == (1, 1)
    np.testing.assert_array_equal(pool.read_all(), first)
    assert pool.labels() is None

    second = 255 - first  # same size: only the modification time tells them apart
    np.save(path.with_name("next.npy"), second)
    os.replace(path.with_name("next.npy"), path)
    touch_later(path)
    np.testing.assert_array_equal(cache.get(a).read_all(), second)
    assert cache.misses == 2

    assert cache.get(tiny(f"data.source={path}", "data.image_size=4")).read_all().shape[1:3] == (4, 4)  # another size
    assert cache.get(tiny("data.source=digits")).count == 1797  # another source
    assert cache.misses == 4


def test_an_image_folder_is_decoded_again_when_a_file_is_added(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / "sub" / f"{i:02}.png")
    cache, config = PoolCache(), tiny(f"data.source={folder}", "data.num_images=4", "data.test_images=8")
    assert cache.get(config).count == 20 and cache.get(config).count == 20
    assert (cache.misses, cache.hits) == (1, 1)

    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / "sub" / "20.png")
    assert cache.get(config).count == 21 and cache.misses == 2


def test_labels_are_checked_against_each_trials_num_classes_even_when_cached():
    POOLS.clear()
    assert load_subsets(tiny("model.num_classes=10"), torch.device("cpu")).train_labels.shape == (32,)
    with pytest.raises(DataError, match="num_classes=5"):
        load_subsets(tiny("model.num_classes=5"), torch.device("cpu"))


def test_a_trial_writing_into_its_subsets_leaves_the_shared_pool_alone():
    POOLS.clear()
    config = tiny()
    first = load_subsets(config, torch.device("cpu"))
    expected = first.train.clone()
    first.train.zero_()
    first.test.zero_()
    hits = POOLS.hits
    again = load_subsets(config, torch.device("cpu"))
    assert POOLS.hits == hits + 1  # served from the pool the first trial drew from
    assert torch.equal(again.train, expected) and again.test.any()


def test_a_remote_source_is_served_from_memory_after_its_first_download(tmp_path, s3_bucket, monkeypatch):
    import s3fs

    monkeypatch.setenv("DITSWEEP_CACHE", str(tmp_path / "cache"))
    images = digit_like(40, seed=2)
    np.save(tmp_path / "set.npy", images)
    s3fs.S3FileSystem(skip_instance_cache=True).put_file(str(tmp_path / "set.npy"), f"{s3_bucket}/set.npy")
    cache, config = PoolCache(), tiny(f"data.source=s3://{s3_bucket}/set.npy", "data.num_images=8")
    np.testing.assert_array_equal(cache.get(config).read_all(), images)
    np.testing.assert_array_equal(cache.get(config).read_all(), images)
    assert (cache.misses, cache.hits) == (1, 1)

    monkeypatch.setenv("DITSWEEP_CACHE", str(tmp_path / "elsewhere"))  # another disk cache: read again
    cache.get(config)
    assert cache.misses == 2


# ---------------------------------------------------------------------------------------------
# Evaluation precision: fp32 with autocast off, whatever the training precision.


def cpu_bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# The PSNR gap's fixed held-out set


def test_held_out_psnr_is_the_same_fixed_set_for_every_n_and_shuffle():
    """One trained model, evaluated with training subsets of N = 2, 4, 16 and another shuffle: the held-out
    side is the same eval.psnr_gap.images held-out images with the same noise, so its PSNR is identical; the
    train side scores min(N, images) training images, each with its own noise."""
    trained = Trainer(tiny("data.num_images=2", "train.steps=4"), torch.device("cpu"),
                      load_subsets(tiny("data.num_images=2"), torch.device("cpu")))
    for _ in range(4):
        trained.train_step()
    trainers = {}
    for n, shuffle in ((2, 0), (4, 0), (16, 0), (16, 1)):
        config = tiny(f"data.num_images={n}", f"data.shuffle_seed={shuffle}")
        trainers[(n, shuffle)] = Trainer(config, torch.device("cpu"), load_subsets(config, torch.device("cpu")))
        trainers[(n, shuffle)].ema.load_state_dict(trained.ema.state_dict())
    curves = {key: trainer.evaluate() for key, trainer in trainers.items()}
    held_out = {key: curve.test for key, curve in curves.items()}
    assert len({tuple(v) for v in held_out.values()}) == 1, held_out  # bit for bit, not merely close
    scored = {}
    for key, trainer in trainers.items():
        (train, _), (_, test_ids) = trainer.psnr_gap_images()
        scored[key] = (len(train), test_ids)
    assert {key: count for key, (count, _) in scored.items()} == {(2, 0): 2, (4, 0): 4, (16, 0): 8, (16, 1): 8}
    assert len({tuple(ids) for _, ids in scored.values()}) == 1 and len(scored[(2, 0)][1]) == 8
    # The training subsets differ, so the train side does: the check above could fail.
    assert curves[(16, 0)].train != curves[(16, 1)].train


@pytest.fixture(scope="module")
def bf16_trained() -> Trainer:
    """A tiny model trained under CPU bf16 autocast (the precision CUDA training uses), EMA = the weights."""
    config = tiny("train.steps=20", "train.ema=0.0", "eval.psnr_gap.images=8", "eval.psnr_gap.timesteps=5")
    trainer = Trainer(config, torch.device("cpu"), load_subsets(config, torch.device("cpu")))
    trainer.autocast = cpu_bf16  # training precision: bf16, as on CUDA
    for _ in range(config.train.steps):
        trainer.train_step()
    return trainer


def plain_curve(trainer: Trainer):
    from trainer.metrics import psnr_gap_curve
    from trainer.train import to_model_scale

    cfg = trainer.config.eval.psnr_gap
    (train, train_ids), (test, test_ids) = trainer.psnr_gap_images()
    return psnr_gap_curve(trainer.ema, trainer.schedule, to_model_scale(train), to_model_scale(test),
                          cfg.timesteps, cfg.batch_size, train_ids=train_ids, test_ids=test_ids)


@pytest.mark.slow
def test_a_bf16_trained_model_evaluates_in_fp32_even_inside_bf16_autocast(bf16_trained):
    with cpu_bf16():  # whatever precision surrounds it, evaluation turns autocast off
        evaluated = bf16_trained.evaluate()
    fp32 = plain_curve(bf16_trained)  # the same weights, no autocast anywhere
    assert evaluated.timesteps == fp32.timesteps
    assert evaluated.train == pytest.approx(fp32.train, rel=1e-6)
    assert evaluated.test == pytest.approx(fp32.test, rel=1e-6)

    with cpu_bf16():  # the same evaluation forced into bf16: the curve moves, so the check above can fail
        forced = plain_curve(bf16_trained)
    moved = max(abs(a - b) for a, b in zip(forced.train + forced.test, fp32.train + fp32.test))
    # About 3e-3 dB for this barely trained model, 70x the fp32 tolerance above (1e-6 of ~45 dB).
    assert moved > 1e-3, f"bf16 evaluation moved the PSNR curve by only {moved} dB"


@pytest.mark.slow
def test_locality_and_samples_run_in_fp32_inside_bf16_autocast(bf16_trained, tmp_path):
    seen: list[torch.dtype] = []
    handle = bf16_trained.ema.blocks[0].attn.qkv.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    try:
        with cpu_bf16():
            bf16_trained.locality(tmp_path)
            bf16_trained.save_sample_grid(tmp_path)
        with cpu_bf16():  # the hook does see bf16 when autocast is left on
            bf16_trained.ema(torch.zeros(1, 1, 8, 8), torch.tensor([5]))
    finally:
        handle.remove()
    assert seen[:-1] and set(seen[:-1]) == {torch.float32}
    assert seen[-1] == torch.bfloat16
