"""The UNet baseline (model.arch: unet): its config rules, training, checkpoint and resume like the DiT,
and the Jacobian analysis at the end of training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.support.sweeps import invoke, tiny_config
from trainer.config import ConfigError, apply_overrides, build_config
from trainer.jacobian import JacobianAnalysis
from trainer.records import JACOBIAN_NPZ, JACOBIAN_PNG, SPECTRUM_RECORD, parse_spectrum_record
from trainer.footprint import estimate_trial_memory, unet_parameter_count
from trainer.train import CHECKPOINT_FILE, train
from trainer.unet import UNet, build_unet

UNET = ["model.arch=unet", "train.warmup_steps=2", "eval.locality.enabled=true"]
TIMING_KEYS = {"images_per_sec"}


def unet_config(*overrides: str):
    return build_config(apply_overrides(tiny_config({"train.steps": 6}, drop=("model.size",)), UNET + list(overrides)))


@pytest.fixture(scope="module", autouse=True)
def one_thread(one_torch_thread):
    """Real training: one thread keeps it steady on a shared 2-core box."""


def without_timing(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if key not in TIMING_KEYS}


def test_a_unet_config_defaults_to_unet_t_without_attention_and_refuses_windows():
    config = unet_config()
    assert config.model.size == "UNet-T" and config.attention.placement == "none"
    assert config.windows == [] and config.schedule == ""
    with pytest.raises(ConfigError, match=r"model.arch=unet has no attention.*attention.placement must be 'none'"):
        unet_config("attention.placement=head")
    with pytest.raises(ConfigError, match="not a UNet size"):
        unet_config("model.size=DiT-T/1")
    with pytest.raises(ConfigError, match="unconditional"):
        unet_config("model.num_classes=10")
    with pytest.raises(ConfigError, match="divisible by 8"):
        unet_config("model.size=UNet-S", "data.image_size=12")
    assert build_config({}).model.arch == "dit"  # the DiT stays the default


def test_the_cli_refuses_windows_for_a_unet_with_exit_2_and_writes_nothing(tmp_path, monkeypatch):
    (tmp_path / "empty.yaml").write_text("")
    result, created = invoke(tmp_path, monkeypatch, "train", "empty.yaml", "--set", "model.arch=unet", "--set",
                             "attention.placement=head", "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert "attention.placement must be 'none'" in result.output
    assert created == set()


def test_the_unet_trains_checkpoints_and_resumes_to_the_uninterrupted_run(tmp_path):
    config = unet_config("eval.every=3")
    reports: list[dict] = []
    final = train(config, lambda metrics, checkpoint: reports.append(dict(metrics)), out_dir=tmp_path / "a")
    assert final["loss"] > 0 and np.isfinite(final["psnr_gap"])
    assert not any(key.startswith("attn_") for key in final)  # locality is skipped: no attention
    state = torch.load(tmp_path / "a" / "checkpoint" / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] == 6 and "out.weight" in state["ema"]

    class Interrupt(Exception):
        pass

    def crash_at_first_checkpoint(metrics: dict, checkpoint: str | None) -> None:
        if checkpoint is not None:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(config, crash_at_first_checkpoint, out_dir=tmp_path / "b")
    assert torch.load(tmp_path / "b" / "checkpoint" / CHECKPOINT_FILE, weights_only=True)["step"] == 3
    resumed = train(config, out_dir=tmp_path / "b")
    assert without_timing(resumed) == without_timing(final)
    again = torch.load(tmp_path / "b" / "checkpoint" / CHECKPOINT_FILE, weights_only=True)
    for name, tensor in state["ema"].items():
        assert torch.equal(tensor, again["ema"][name]), name


def test_the_jacobian_analysis_runs_at_the_end_of_training_only(tmp_path):
    config = unet_config("eval.every=3", "eval.jacobian.enabled=true", "eval.jacobian.images=2",
                         "eval.jacobian.timesteps=[50,600]", "eval.jacobian.top_k=4")
    reports: list[dict] = []
    final = train(config, lambda metrics, checkpoint: reports.append(dict(metrics)), out_dir=tmp_path)
    evaluations = [m for m in reports if "psnr_gap" in m]
    assert [m["step"] for m in evaluations] == [3, 6]
    assert not any(k.startswith("jac_") for k in evaluations[0])  # not at step 3
    last = evaluations[-1]
    assert {f"jac_{m}.t{t}" for m in ("asymmetry", "trace", "pr") for t in (50, 600)} <= set(last)
    spectrum = parse_spectrum_record(last[SPECTRUM_RECORD])
    assert sorted(spectrum) == [50, 600] and len(spectrum[50]) == 64
    assert SPECTRUM_RECORD not in final and SPECTRUM_RECORD not in json.loads((tmp_path / "metrics.json").read_text())

    checkpoint = tmp_path / "checkpoint"
    analysis = JacobianAnalysis.from_npz((checkpoint / JACOBIAN_NPZ).read_bytes())
    assert analysis.eigenvectors.shape == (2, 2, 4, 1, 8, 8)
    assert (checkpoint / JACOBIAN_PNG).is_file()
    # The logged trace is the mean over images of the eigenvalue sums in the file.
    assert last["jac_trace.t600"] == pytest.approx(float(analysis.eigenvalues[1].sum(axis=1).mean()), rel=1e-5)
    # At low noise a denoiser passes its input through: x0_hat ~ x_t / sqrt(abar), J ~ I / sqrt(abar) (a fresh
    # model's epsilon is near 0), so the trace is near d; at t=600 it is still positive.
    assert last["jac_trace.t50"] > 0.5 * 64


def test_unet_flops_and_memory_estimate_count_its_layers():
    model = build_unet("UNet-T", image_size=8, in_channels=1)
    assert isinstance(model, UNet)
    stem = 2 * 1 * 9 * 32 * 64  # the first conv: 1 -> 32 channels, 3x3, on 8x8 outputs
    assert model.flops_per_image() > stem
    estimate = estimate_trial_memory(unet_config(), 1797, 1)
    params = sum(p.numel() for p in model.parameters())
    assert estimate.terms["model state"] == 5 * 4 * params
    assert estimate.terms["attention scores"] == 0 and estimate.total > 0
    for size, channels in (("UNet-T", 3), ("UNet-S", 1)):
        built = build_unet(size, image_size=16, in_channels=channels)
        assert unet_parameter_count(size, channels) == sum(p.numel() for p in built.parameters())
