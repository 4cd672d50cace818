"""Matplotlib figures as PNG bytes (Agg backend: no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainer.metrics import PsnrCurve  # noqa: E402


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def psnr_curve_png(curve: PsnrCurve, title: str) -> bytes:
    """Train and held-out PSNR of the one-step denoiser against the diffusion step."""
    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax.plot(curve.timesteps, curve.train, marker="o", ms=3, label="train")
    ax.plot(curve.timesteps, curve.test, marker="o", ms=3, label="held-out")
    ax.set(xlabel="diffusion step t", ylabel="PSNR of one-step x0 (dB)", title=title)
    ax.legend()
    gap_ax.plot(curve.timesteps, curve.gap, marker="o", ms=3, color="tab:red")
    gap_ax.axhline(0.0, color="grey", lw=0.8)
    gap_ax.set(xlabel="diffusion step t", ylabel="PSNR gap (dB)", title="generalization gap")
    fig.tight_layout()
    return to_png(fig)
