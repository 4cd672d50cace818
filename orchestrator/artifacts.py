"""The files a trial's run gets when it ends: its config, its PSNR curve (CSV and plot, and as metric
series with step = diffusion timestep, so MLflow's chart view overlays the curves of several runs), the
sample grid of its latest checkpoint (also as MLflow images), its attention-locality plot, and its Jacobian
analysis when enabled (the eigenvector picture and jacobian.npz from the checkpoint, the eigenvalue spectrum
as metric series with step = rank). Built from the trial's state; the sink (orchestrator.progress) hands
them to tracking."""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from orchestrator.trial_state import TrialState
from trainer.memorization import PAIRS_NPY, PAIRS_PNG
from trainer.metric_names import PSNR_CURVE
from trainer.records import (GRID_NPY, GRID_PNG, JACOBIAN_NPZ, JACOBIAN_PNG, PSNR_CURVE_CSV, QUERIES_NPZ, QUERIES_PNG,
                             SPECTRUM_RECORD, PsnrCurve, by_block, parse_spectrum_record)

# Files the trainer writes next to each checkpoint, attached to the trial's run when it ends.
CHECKPOINT_ARTIFACTS = (GRID_PNG, GRID_NPY, PAIRS_PNG, PAIRS_NPY, JACOBIAN_PNG, JACOBIAN_NPZ, QUERIES_PNG, QUERIES_NPZ)
# Of those, the pictures that are also logged as MLflow images (the UI's image views across runs).
IMAGE_ARTIFACTS = (GRID_PNG, PAIRS_PNG, JACOBIAN_PNG, QUERIES_PNG)
# The final evaluation's PSNR per diffusion timestep as metric series: psnr_curve.train, .test, .gap
CURVE_SERIES = ("train", "test", "gap")


@dataclass(frozen=True)
class RunArtifacts:
    texts: dict[str, str]  # file name -> text
    files: dict[str, bytes]  # file name -> bytes (PNG, NPY)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> (timestep, value)
    images: dict[str, bytes] = field(default_factory=dict)  # image key (file name without .png) -> PNG


def trial_artifacts(state: TrialState) -> RunArtifacts:
    texts = {"config.yaml": yaml.safe_dump(state.trial.config.model_dump(mode="json"), sort_keys=False)}
    files: dict[str, bytes] = {}
    series: dict[str, list[tuple[int, float]]] = {}
    if state.curve_record:
        from orchestrator.plots import psnr_curve_png

        curve = PsnrCurve.from_csv(state.curve_record)
        texts[PSNR_CURVE_CSV] = curve.to_csv()
        files["psnr_curve.png"] = psnr_curve_png(curve, state.trial.name)
        series = curve_series(curve)
    if state.spectrum_record:
        series.update(spectrum_series(state.spectrum_record))
    checkpoint = checkpoint_files(state)
    images = {name.removesuffix(".png"): checkpoint[name] for name in IMAGE_ARTIFACTS if name in checkpoint}
    return RunArtifacts(texts, {**files, **checkpoint, **locality_plot(state)}, series, images)


def curve_series(curve: PsnrCurve) -> dict[str, list[tuple[int, float]]]:
    """psnr_curve.train / .test / .gap -> [(diffusion timestep, PSNR in dB)]."""
    values = {"train": curve.train, "test": curve.test, "gap": curve.gap}
    return {f"{PSNR_CURVE}.{part}": [(int(t), float(v)) for t, v in zip(curve.timesteps, values[part])]
            for part in CURVE_SERIES}


def spectrum_series(record: str) -> dict[str, list[tuple[int, float]]]:
    """jacobian_spectrum.t<t> -> [(rank, mean eigenvalue)], rank 0 the largest (trainer.jacobian)."""
    return {f"{SPECTRUM_RECORD}.t{t}": list(enumerate(values)) for t, values in parse_spectrum_record(record).items()}


def checkpoint_files(state: TrialState) -> dict[str, bytes]:
    """The sample grid of the trial's latest checkpoint (absent when sampling is off)."""
    if state.read_checkpoint is None:
        return {}
    files = {}
    for name in CHECKPOINT_ARTIFACTS:
        try:
            payload = state.read_checkpoint(name)
        except Exception as err:  # noqa: BLE001 - a missing picture must not change the trial's outcome
            print(f"[ditsweep] could not read {name} of {state.trial.name}: {type(err).__name__}: {err}", flush=True)
            continue
        if payload is not None:
            files[name] = payload
    return files


def locality_plot(state: TrialState) -> dict[str, bytes]:
    locality = by_block(state.metrics)
    if not locality:
        return {}
    from orchestrator.plots import attention_locality_png

    return {"attn_locality.png": attention_locality_png(locality, state.trial.config.windows, state.trial.name)}
