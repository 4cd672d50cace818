"""trainer.sampling: fixed-noise DDIM samples and the sample grid a trial saves at each evaluation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.sweeps import tiny_config
from trainer import sampling
from trainer.config import apply_overrides, build_config
from trainer.diffusion import linear_schedule
from trainer.model import DiT
from trainer.pool import load_subsets
from trainer.train import Trainer

TINY = tiny_config({"data.test_images": 8, "eval.samples.steps": 3})


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """These tests train real models: one thread each keeps them steady on a shared 2-core box."""


def trainer(*overrides: str) -> Trainer:
    config = build_config(apply_overrides(TINY, list(overrides)))
    return Trainer(config, torch.device("cpu"), load_subsets(config, torch.device("cpu")))


def random_dit() -> DiT:
    torch.manual_seed(3)
    model = DiT(image_size=8, in_channels=1, depth=2, width=32, heads=2, windows=[3, None]).eval()
    for parameter in model.parameters():  # leave adaLN-Zero's all-zero start, so samples depend on the weights
        torch.nn.init.normal_(parameter, std=0.05)
    return model


def test_the_grid_is_the_same_for_every_trial_seed_and_global_rng_state(tmp_path):
    first, second = trainer("seed=0"), trainer("seed=1")
    second.ema.load_state_dict(first.ema.state_dict())  # same weights, different trial seed
    first.save_sample_grid(tmp_path / "a")
    torch.manual_seed(123)  # the grid noise does not come from the global generator
    second.save_sample_grid(tmp_path / "b")
    for name in (sampling.GRID_PNG, sampling.GRID_NPY):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    images = np.load(tmp_path / "a" / sampling.GRID_NPY)
    assert images.dtype == np.uint8 and images.shape == (4, 8, 8, 1)  # grid^2 (H, W, C) images, as in trainer.data
    assert [p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".")] == []  # no temporary files


def test_no_grid_when_disabled(tmp_path):
    trainer("eval.samples.grid=0").save_sample_grid(tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_samples_do_not_depend_on_the_batch_size():
    model, schedule = random_dit(), linear_schedule(50)
    noise = sampling.fixed_noise(5, (1, 8, 8), sampling.GRID_NOISE_SEED)
    torch.testing.assert_close(noise, sampling.fixed_noise(5, (1, 8, 8), sampling.GRID_NOISE_SEED))
    whole = sampling.generate(model, schedule, noise, 4, batch_size=5, device=torch.device("cpu"))
    pieces = sampling.generate(model, schedule, noise, 4, batch_size=2, device=torch.device("cpu"))
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
    assert whole.shape == (5, 1, 8, 8) and whole.min() >= -1 and whole.max() <= 1
    assert whole.std() > 0.01  # not a constant image


@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_grid_png_lays_images_out_upscaled_with_borders(channels, mode):
    images = np.zeros((4, 8, 8, channels), dtype=np.uint8)
    images[3] = 200  # bottom right
    image = Image.open(io.BytesIO(sampling.grid_png(images, 2)))
    assert image.mode == mode
    cell = 8 * 8 + 2  # 8x8 upscaled to 64 pixels, plus a 2-pixel border
    assert image.size == (2 * cell + 2, 2 * cell + 2)
    pixels = np.asarray(image).reshape(image.size[1], image.size[0], -1)
    assert (pixels[2:66, 2:66] == 0).all() and (pixels[cell + 2 : cell + 66, cell + 2 : cell + 66] == 200).all()
    assert (pixels[:2] == 128).all()  # border
    with pytest.raises(ValueError, match="2x2 grid needs 4"):
        sampling.grid_png(images[:3], 2)


def test_to_uint8_maps_the_model_scale_to_bytes():
    x = torch.tensor([-1.0, 0.0, 1.0, 1.5]).view(4, 1, 1, 1)
    assert sampling.to_uint8(x).ravel().tolist() == [0, 128, 255, 255]


@pytest.mark.slow
def test_train_reports_fid_and_kid_and_computes_the_reference_once(tmp_path, monkeypatch, fid_weights):
    from trainer.train import train

    weights, prefix = fid_weights
    monkeypatch.setenv("DITSWEEP_CACHE", str(tmp_path / "cache"))
    featurized: list[int] = []
    extract = sampling.extract_features

    def counting(model, images, batch_size, device):
        featurized.append(images.shape[0])
        return extract(model, images, batch_size, device)

    monkeypatch.setattr(sampling, "extract_features", counting)
    config = build_config(apply_overrides(TINY, [
        "train.steps=2", "train.batch_size=4", "eval.every=1", "eval.psnr_gap.images=2", "eval.psnr_gap.timesteps=1",
        "eval.fid.enabled=true", "eval.fid.samples=2", "eval.fid.steps=2", f"eval.fid.weights={weights}",
        f"eval.fid.weights_sha256={prefix}",
    ]))
    reports = []
    train(config, lambda metrics, checkpoint: reports.append(metrics), out_dir=tmp_path / "out")

    evaluations = [m for m in reports if "fid" in m]
    assert [m["step"] for m in evaluations] == [1, 2]
    assert all(np.isfinite([m["fid"], m["kid"], m["kid_std"]]).all() for m in evaluations)
    assert featurized == [2, 2, 2]  # reference and samples, then only the samples: the reference is cached
    assert len(list((tmp_path / "cache" / "fid_stats").glob("*.npz"))) == 1


def test_quantize_is_the_uint8_a_png_round_trip_holds():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5]).view(6, 1, 1, 1)
    expected = np.clip(np.round((x.numpy() + 1) / 2 * 255), 0, 255).astype(np.uint8)  # written to PNG, read back
    q = sampling.quantize(x)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert q.numpy().tolist() == expected.tolist()


@pytest.mark.slow
def test_fid_of_real_images_through_the_sample_path_against_themselves_is_zero(tmp_path, monkeypatch, fid_weights):
    """Real images sent the way samples go (model scale, quantized, / 255) and the way the reference goes
    (uint8 / 255) reach Inception as the same tensor, so FID is ~0; a sub-quantum float jitter, which
    unquantized samples would carry into Inception, is removed by the quantization."""
    from trainer.train import to_model_scale

    weights, prefix = fid_weights
    monkeypatch.setenv("DITSWEEP_CACHE", str(tmp_path / "cache"))
    real = trainer().subsets.test[:6].cpu()  # uint8 (6, 1, 8, 8) digits
    jitter = (torch.rand(real.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * (0.8 / 127.5)
    as_samples = to_model_scale(real) + jitter  # model scale, within 0.4 of a quantum of the real bytes

    metrics = sampling.fid_and_kid(sampling.quantize(as_samples), real, str(weights), prefix, 3, torch.device("cpu"))
    network, _ = sampling.fid_network(str(weights), prefix)
    reference = sampling.extract_features(network, real.float() / 255.0, 3, "cpu")
    scale = float(np.trace(np.cov(reference.astype(np.float64), rowvar=False)))
    assert abs(metrics["fid"]) < 1e-9 * scale  # float64 rounding of the same features

    # The same images unquantized (the old path) do not reach Inception as the reference does.
    unquantized = sampling.extract_features(network, ((as_samples + 1) / 2).clamp(0, 1), 3, "cpu")
    old_path_fid = sampling.frechet_distance_of_features(unquantized, reference)
    assert old_path_fid > 1e-6 * scale  # about 1e-4 * scale on x86-64: a hundred times the bound


def test_fid_refuses_float_samples(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        sampling.fid_and_kid(torch.rand(2, 1, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "w", "00000000", 2, "cpu")
