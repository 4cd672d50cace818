"""What a trial leaves for the orchestrator, in a module without torch: which reported keys are its
metrics, its two JSON-borne records (the PSNR curve, the Jacobian spectrum) with their one
serialization, and the files it writes next to its checkpoints. The trainer's modules write them and
re-export these names; a sweep's driver (its events, console, artifacts and report) reads them without
loading torch, which is a second of every launch and a few hundred MB of its memory."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

from trainer.metric_names import PSNR_CURVE, STEP, TRIAL_METRICS

# ---------------------------------------------------------------------------------------------
# The PSNR curve (trainer.metrics computes it)

PSNR_CURVE_CSV = "psnr_curve.csv"  # the curve's file: in a trial's folder and on its run


@dataclass(frozen=True)
class PsnrCurve:
    """PSNR of the one-step denoiser per diffusion timestep, on training and held-out images. One
    serialization, read and written here: the CSV of `to_csv` (timestep, psnr_train, psnr_test, psnr_gap
    in dB to 6 decimals), which is the trial's psnr_curve.csv, the record it reports (`PSNR_CURVE`) and
    the artifact of its run."""

    timesteps: list[int]
    train: list[float]
    test: list[float]

    @property
    def gap(self) -> list[float]:
        return [a - b for a, b in zip(self.train, self.test)]

    def summary(self) -> dict[str, float]:
        n = len(self.timesteps)
        return {
            "psnr_train": sum(self.train) / n,
            "psnr_test": sum(self.test) / n,
            "psnr_gap": sum(self.gap) / n,
        }

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["timestep", "psnr_train", "psnr_test", "psnr_gap"])
        for row in zip(self.timesteps, self.train, self.test, self.gap):
            writer.writerow([row[0], *(f"{v:.6f}" for v in row[1:])])
        return buf.getvalue()

    @classmethod
    def from_csv(cls, text: str) -> PsnrCurve:
        """The curve `to_csv` wrote (its gap column is recomputed, not read)."""
        rows = list(csv.DictReader(io.StringIO(text)))
        return cls(timesteps=[int(r["timestep"]) for r in rows], train=[float(r["psnr_train"]) for r in rows],
                   test=[float(r["psnr_test"]) for r in rows])


# ---------------------------------------------------------------------------------------------
# The Jacobian analysis (trainer.jacobian)

JACOBIAN_NPZ = "jacobian.npz"  # per timestep and image: eigenvalues, top-k eigenvectors, asymmetry
JACOBIAN_PNG = "jacobian_eigenvectors.png"  # per timestep and image: clean, noisy, x0_hat, top-k eigenvectors
# The reported record of the mean spectrum per timestep (like the PSNR curve: it travels in the report
# and becomes metric series with step = rank when the trial ends).
SPECTRUM_RECORD = "jacobian_spectrum"
JACOBIAN_PREFIX = "jac_"  # jac_asymmetry.t100, jac_trace.t100, jac_pr.t100


def parse_spectrum_record(record: str) -> dict[int, list[float]]:
    """timestep -> mean eigenvalue by rank (rank 0 = largest), from `JacobianAnalysis.spectrum_record`."""
    data = json.loads(record)
    return {int(t): [float(v) for v in values] for t, values in zip(data["timestep"], data["eigenvalues"])}


# ---------------------------------------------------------------------------------------------
# Attention locality (trainer.locality)

NEIGHBOURHOODS = (3, 7)  # k of the k x k neighbourhoods whose attention share is reported
QUERIES_NPZ = "attention_queries.npz"  # maps (blocks, queries, rows, cols), queries (q, 2), timestep
QUERIES_PNG = "attention_queries.png"  # one row per block, one column per query token


def by_block(metrics: dict[str, float]) -> dict[str, list[float]]:
    """{"distance": [...], "local3": [...], "local7": [...]} in block order, from reported metrics;
    empty when none were reported."""
    names = {"distance": "attn_distance"} | {f"local{k}": f"attn_local{k}" for k in NEIGHBOURHOODS}
    blocks = sorted(int(key.rsplit("_", 1)[1]) for key in metrics if key.startswith("attn_distance.block_"))
    if not blocks:
        return {}
    return {short: [metrics[f"{long}.block_{b}"] for b in blocks] for short, long in names.items()}


# ---------------------------------------------------------------------------------------------
# The sample grid (trainer.sampling)

GRID_PNG = "samples.png"
GRID_NPY = "samples.npy"

# ---------------------------------------------------------------------------------------------
# What `report(metrics, ...)` carries (trainer.train): the metrics a trial logs (TRIAL_METRICS and these
# prefixes), the step counter and the records. Per-block attention locality: attn_distance.block_0,
# attn_local3.block_0, ...; the denoiser's Jacobian per timestep: jac_asymmetry.t100, jac_trace.t100,
# jac_pr.t100.

TRIAL_METRIC_PREFIXES = ("attn_", JACOBIAN_PREFIX)
RECORDS = (PSNR_CURVE, SPECTRUM_RECORD)  # reported JSON records that become artifacts and series, not metrics


def is_trial_metric(key: str) -> bool:
    return key in TRIAL_METRICS or key.startswith(TRIAL_METRIC_PREFIXES)


def reported(values: dict) -> dict:
    """The part of a result dict (e.g. Tune's, full of its own bookkeeping) that the trial reported."""
    return {k: v for k, v in values.items() if is_trial_metric(k) or k in (STEP, *RECORDS)}
