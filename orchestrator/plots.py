"""Matplotlib figures as PNG bytes (Agg backend: no display needed)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainer.records import PsnrCurve  # noqa: E402
from trainer.schedule import GLOBAL  # noqa: E402

if TYPE_CHECKING:  # torch: only the Jacobian's figures load trainer.jacobian
    from trainer.jacobian import JacobianAnalysis


def to_png(fig, crop: bool = True) -> bytes:
    """The figure as PNG bytes; `crop` trims it to what was drawn (one more drawing pass)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight" if crop else None)
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
    # Fixed margins (they fit tick labels like -12.5), neither tight_layout nor cropping: each is one
    # more text-measuring pass, and together they more than double the time of a figure the driver
    # draws for every finished trial (0.17 against 0.40 s of CPU here).
    fig.subplots_adjust(left=0.075, right=0.985, bottom=0.15, top=0.9, wspace=0.3)
    return to_png(fig, crop=False)


# ---------------------------------------------------------------------------------------------
# Sweep comparisons (orchestrator.report builds the series; these only draw them)

Point = tuple[float, float, float | None]  # x, mean, error bar half-height (None: one seed)


def _errorbar(ax, points: list, label: str, **style) -> None:
    xs = [p[0] for p in points]
    means = [p[1] for p in points]
    spreads = [p[2] or 0.0 for p in points]
    ax.errorbar(xs, means, yerr=spreads, marker="o", ms=4, capsize=3, label=label, **style)


def _legend(ax, entries: int) -> None:
    if entries > 8:  # many configurations: keep the plot area clear
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize="small")


def psnr_gap_vs_images_png(series: dict[str, list[Point]], xlabel: str) -> bytes:
    """PSNR gap against the training set size, one line per placement (log x), like the paper's Fig. 1."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.items():
        _errorbar(ax, sorted(points), label)
    ax.set_xscale("log")
    sizes = sorted({p[0] for points in series.values() for p in points})
    ax.set_xticks(sizes, [f"{size:g}" for size in sizes])  # label the sizes that were run, not powers of 10
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set(xlabel=f"{xlabel} (log scale)", ylabel="PSNR gap, train - held-out (dB)",
           title="Generalization gap against data size (95% intervals)")
    _legend(ax, len(series))
    fig.tight_layout()
    return to_png(fig)


def forest_png(groups: dict[str, list[tuple[str, float, float | None, float | None, str]]], xlabel: str) -> bytes:
    """A forest plot: one line per comparison (its mean and interval; a hollow dot without an interval),
    grouped by N with the group's name above it, and a zero line. Filled dots: the verdict says the
    comparison differs; grey: it does not."""
    lines = sum(len(rows) + 1 for rows in groups.values())
    fig, ax = plt.subplots(figsize=(7.0, 0.8 + 0.32 * lines))
    y, ticks, labels, headings = 0, [], [], []
    for group, rows in groups.items():
        ticks.append(y)
        labels.append(group)
        headings.append(len(labels) - 1)
        ax.axhline(y, color="#eee", lw=8, zorder=0)  # a band behind the group's name
        y -= 1
        for label, mean, low, high, verdict in rows:
            decided = verdict in ("lower", "higher")
            color = "tab:red" if decided else "tab:grey"
            if low is not None and high is not None:
                ax.plot([low, high], [y, y], color=color, lw=2)
            ax.plot([mean], [y], "o", color=color, mfc=color if low is not None else "white", ms=6)
            ticks.append(y)
            labels.append(label)
            y -= 1
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(ticks, labels, fontsize="small")
    for index in headings:
        ax.get_yticklabels()[index].set_fontweight("bold")
    ax.set_ylim(y + 0.5, 0.5)
    ax.set(xlabel=xlabel, title="Paired differences against the baseline (95% intervals)")
    ax.grid(axis="x", color="#ddd", lw=0.6)
    fig.tight_layout()
    return to_png(fig)


def psnr_per_step_png(panels: dict[str, dict[str, tuple[list[float], list[float], list[float]]]]) -> bytes:
    """Train (solid) and held-out (dashed) PSNR of the one-step denoiser per diffusion step; one panel
    per data size, one colour per configuration, each curve the mean over seeds."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for index, (label, (steps, train, test)) in enumerate(curves.items()):
            color = f"C{index % 10}"
            ax.plot(steps, train, color=color, marker="o", ms=3, label=f"{label} train")
            ax.plot(steps, test, color=color, ls="--", marker="o", ms=3, label=f"{label} held-out")
        ax.set(xlabel="diffusion step t", ylabel="PSNR of one-step x0 (dB)", title=title)
        _legend(ax, 2 * len(curves))
    fig.tight_layout()
    return to_png(fig)


def metric_vs_window_png(windows: list[str], series: dict[str, list[tuple[str, float, float | None]]],
                         baselines: dict[str, tuple[float, float | None]], metric: str = "FID") -> bytes:
    """A metric against the local window size (categorical x: the window of each local block);
    global-attention configurations are dashed horizontal lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    position = {window: i for i, window in enumerate(windows)}
    for index, (label, points) in enumerate(series.items()):
        ordered = sorted(points, key=lambda p: position[p[0]])
        _errorbar(ax, [(position[w], m, s) for w, m, s in ordered], label, color=f"C{index % 10}")
    for index, (label, (mean, _)) in enumerate(baselines.items(), start=len(series)):
        ax.axhline(mean, color=f"C{index % 10}", ls="--", lw=1.2, label=f"{label} (global)")
    ax.set_xticks(range(len(windows)), windows, rotation=20 if max(map(len, windows), default=0) > 6 else 0)
    ax.set(xlabel="window size of the local blocks (tokens per side)", ylabel=f"{metric} (lower is better)",
           title=f"{metric} against window size")
    _legend(ax, len(series) + len(baselines))
    fig.tight_layout()
    return to_png(fig)


def attention_distance_png(series: dict[str, list[tuple[int, float]]]) -> bytes:
    """Mean attention distance of each transformer block, one line per configuration."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.items():
        blocks, distances = zip(*sorted(points))
        ax.plot(blocks, distances, marker="o", ms=4, label=label)
    ax.set(xlabel="transformer block", ylabel="mean attention distance (tokens)", title="Attention distance per block")
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(ax, len(series))
    fig.tight_layout()
    return to_png(fig)


def attention_locality_png(locality: dict[str, list[float]], windows: list[int | None], title: str) -> bytes:
    """One trial's attention locality per block (trainer.locality): the attention-weighted mean distance
    (bars) and the share of attention inside the 3x3 and 7x7 neighbourhoods; each block is labelled
    with its index and window (G = global)."""
    blocks = list(range(len(locality["distance"])))
    labels = [f"{b}\n{GLOBAL if w is None else w}" for b, w in zip(blocks, windows)]
    fig, (ax, share_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax.bar(blocks, locality["distance"], color="tab:blue")
    ax.set(xlabel="block (window)", ylabel="mean attention distance (tokens)", title=title)
    share_ax.plot(blocks, locality["local3"], marker="o", ms=4, label="inside 3x3")
    share_ax.plot(blocks, locality["local7"], marker="o", ms=4, label="inside 7x7")
    share_ax.set(xlabel="block (window)", ylabel="share of attention mass", ylim=(0.0, 1.05),
                 title="attention inside the neighbourhood")
    share_ax.legend(fontsize="small")
    for axis in (ax, share_ax):
        axis.set_xticks(blocks, labels, fontsize="small")
    fig.subplots_adjust(left=0.07, right=0.985, bottom=0.2, top=0.9, wspace=0.25)  # per trial: as psnr_curve_png
    return to_png(fig, crop=False)


# ---------------------------------------------------------------------------------------------
# The Jacobian and locality section of the report (orchestrator.report.jacobian builds the data)


def spectra_png(analyses: dict[str, list[JacobianAnalysis]]) -> bytes:
    timesteps = next(iter(analyses.values()))[0].timesteps
    fig, axes = plt.subplots(1, len(timesteps), figsize=(4 * len(timesteps), 3.4), squeeze=False)
    for ax, t in zip(axes[0], timesteps):
        for label, members in analyses.items():
            spectra = [a.eigenvalues[a.timesteps.index(t)].mean(axis=0) for a in members if t in a.timesteps]
            if spectra:
                ax.plot(np.mean(spectra, axis=0), label=label, lw=1.2)
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set(xlabel="rank", ylabel="eigenvalue", title=f"t = {t}")
    axes[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    return to_png(fig)


def eigenvectors_png(analyses: dict[str, list[JacobianAnalysis]]) -> bytes:
    """One row per configuration (its first trial) and noise level, first held-out image."""
    from trainer.jacobian import eigenvector_row
    from trainer.tiles import tiles_png

    rows = []
    for members in analyses.values():
        first = members[0]
        rows += [eigenvector_row(first, step, 0) for step in range(len(first.timesteps))]
    width = max(len(r) for r in rows)
    blank = np.full_like(rows[0][0], 128)
    return tiles_png([r + [blank] * (width - len(r)) for r in rows])


def distance_vs_size_png(panels: dict[str, dict[int, list[tuple[float, float]]]]) -> bytes:
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, (label, blocks) in zip(axes[0], panels.items()):
        colours = plt.cm.viridis(np.linspace(0, 1, len(blocks)))
        for colour, (block, points) in zip(colours, sorted(blocks.items())):
            points = sorted(points)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, color=colour, label=f"block {block}")
        ax.set_xscale("log")
        ax.set(xlabel="training images N", title=label)
    axes[0][0].set_ylabel("mean attention distance (tokens)")
    axes[0][-1].legend(fontsize="xx-small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return to_png(fig)


def query_panels_png(panels: dict[str, dict]) -> bytes:
    from PIL import Image

    from trainer.tiles import query_tiles, tiles_png

    fig, axes = plt.subplots(1, len(panels), figsize=(1.6 * len(panels) + 1, 5), squeeze=False)
    for ax, (label, saved) in zip(axes[0], panels.items()):
        picture = np.asarray(Image.open(io.BytesIO(tiles_png(query_tiles(saved["maps"], saved["queries"])))))
        ax.imshow(picture, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(f"{label}\nt = {saved['timestep']}", fontsize="x-small")
        ax.axis("off")
    fig.tight_layout()
    return to_png(fig)


def locality_png(points: list[tuple[str, float, float]], r: float) -> bytes:
    """(attention placement, distance, gap) points, one colour per placement; `r` their correlation."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    groups: dict[str, list[tuple[float, float]]] = {}
    for placement, x, y in points:
        groups.setdefault(placement, []).append((x, y))
    for label, values in groups.items():
        ax.scatter([v[0] for v in values], [v[1] for v in values], label=label, s=22)
    ax.set(xlabel="mean attention distance of global blocks (tokens)", ylabel="PSNR gap (dB)",
           title=f"r = {r:.2f} (n = {len(points)})")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return to_png(fig)
