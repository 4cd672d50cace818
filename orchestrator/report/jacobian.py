"""The report's two analyses of the paper's opening: Jacobian eigenbases (GAHB) and locality against the gap.

- Jacobian eigenbases (Kadkhodaie et al. 2024, ICLR; `trainer.jacobian`), from each trial's `jacobian.npz`:
  per noise level, the mean eigenvalue spectrum of each configuration (one plot, configurations
  overlaid), the top eigenvectors of the first held-out image side by side across configurations, the
  asymmetry per configuration (mean over its seeds and shuffles with a 95% Student-t interval), and the
  eigenspace alignment ||U_a^T U_b||_F^2 / k of trials trained on disjoint subsets (`data.disjoint`, the
  same configuration otherwise), averaged over images and then over pairs, with its interval and the
  chance level k / d of unrelated subspaces.
- Locality against generalization (An et al. 2024's central observation): each DiT trial's mean attention
  distance over its global blocks (`attn_distance.block_b` where the schedule says G) against its PSNR
  gap, with the Pearson correlation and its 95% interval by Fisher's z transform:
  tanh(atanh(r) -+ z_{0.975} / sqrt(n - 3)) (scipy.stats.pearsonr's confidence_interval does the same);
  and each configuration's mean attention distance per block against the training-set size N (log axis).

- Attention maps of three query tokens of one held-out image per block (trainer.locality.query_maps), one
  panel per configuration (its first trial), so configurations and training-set sizes sit side by side.

`orchestrator.report.fetch` calls `fetch` when it reads a sweep, and `orchestrator.report.pages` hands
`section` (figures, CSV) and `note_lines` (the numbers) its configurations as `Inputs`; `orchestrator.plots`
draws the figures.
"""

from __future__ import annotations

import io
import math
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.compare import CONFIDENCE, PairedDifference, mean_interval
from orchestrator.report.rows import TrialResult
from trainer.metric_names import ATTENTION_DISTANCE, PSNR_GAP
from trainer.records import JACOBIAN_NPZ
from trainer.schedule import GLOBAL

if TYPE_CHECKING:
    from orchestrator.tracking import Tracker
    from trainer.jacobian import JacobianAnalysis  # torch: loaded by `fetch` only for a sweep with analyses

LOCALITY_CSV = "locality_vs_gap.csv"
JACOBIAN_CSV = "jacobian.csv"
FILES = (JACOBIAN_CSV, LOCALITY_CSV)  # the section's files besides its PNG figures


def fetch(tracker: Tracker, trials: list[TrialResult]) -> dict[str, dict]:
    """The report's `jacobians` (run id -> the Jacobian analysis of each finished trial that saved one) and
    `attention_queries` (run id -> its query maps, trainer.locality.query_maps)."""
    from trainer.records import QUERIES_NPZ

    jacobians, queries = {}, {}
    for trial in trials:
        if not (trial.finished and trial.run_id):
            continue
        names = tracker.artifact_names(trial.run_id)
        if JACOBIAN_NPZ in names:
            from trainer.jacobian import JacobianAnalysis

            jacobians[trial.run_id] = JacobianAnalysis.from_npz(tracker.read_bytes(trial.run_id, JACOBIAN_NPZ))
        if QUERIES_NPZ in names:
            with np.load(io.BytesIO(tracker.read_bytes(trial.run_id, QUERIES_NPZ)), allow_pickle=False) as saved:
                queries[trial.run_id] = {"maps": saved["maps"], "queries": saved["queries"].tolist(),
                                         "timestep": int(saved["timestep"])}
    return {"jacobians": jacobians, "attention_queries": queries}


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class Correlation:
    """Pearson r of n points with its Fisher-z interval (None for n < 4 or |r| = 1)."""

    n: int
    r: float
    low: float | None
    high: float | None


def pearson_interval(xs: list[float], ys: list[float], confidence: float = CONFIDENCE) -> Correlation:
    """Pearson's r and its interval tanh(atanh(r) -+ z_{(1+confidence)/2} / sqrt(n - 3)) (Fisher 1921)."""
    from scipy.special import ndtri

    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if x.shape != y.shape or x.size < 3:
        raise ValueError(f"a correlation needs two series of one length >= 3, got {x.size} and {y.size}")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((dx**2).sum() * (dy**2).sum()))
    if denominator == 0:
        raise ValueError("a correlation needs both series to vary")
    r = float((dx * dy).sum() / denominator)
    if x.size < 4 or abs(r) >= 1:
        return Correlation(int(x.size), r, None, None)
    half = float(ndtri(0.5 + confidence / 2)) / math.sqrt(x.size - 3)
    z = math.atanh(r)
    return Correlation(int(x.size), r, math.tanh(z - half), math.tanh(z + half))


def global_block_distance(trial: TrialResult) -> float | None:
    """Mean attention distance over the trial's global blocks (G in its schedule); None without any."""
    schedule = trial.params.get("attention.schedule", "")
    blocks = [i for i, window in enumerate(schedule.split(",")) if window == GLOBAL]
    values = [trial.metrics[f"{ATTENTION_DISTANCE}{b}"] for b in blocks if f"{ATTENTION_DISTANCE}{b}" in trial.metrics]
    return statistics.fmean(values) if values else None


def locality_points(trials: list[TrialResult]) -> list[tuple[TrialResult, float, float]]:
    """(trial, global-block attention distance, PSNR gap) of each finished trial that logged both."""
    points = []
    for trial in trials:
        distance = global_block_distance(trial) if trial.finished else None
        if distance is not None and PSNR_GAP in trial.metrics:
            points.append((trial, distance, trial.metrics[PSNR_GAP]))
    return points


def per_trial_asymmetry(analysis: JacobianAnalysis) -> dict[int, float]:
    """Timestep -> the mean asymmetry over the analysed images."""
    return {t: float(analysis.asymmetry[i].mean()) for i, t in enumerate(analysis.timesteps)}


def pair_alignment(a: JacobianAnalysis, b: JacobianAnalysis) -> dict[int, float]:
    """Timestep -> mean over images of the top-k eigenspace alignment of two analyses of the same images."""
    import torch

    from trainer.jacobian import alignment

    out = {}
    for i, t in enumerate(a.timesteps):
        if t not in b.timesteps:
            continue
        j = b.timesteps.index(t)
        k = min(a.eigenvectors.shape[2], b.eigenvectors.shape[2])
        values = []
        for n in range(min(a.images.shape[0], b.images.shape[0])):
            basis_a = torch.from_numpy(a.eigenvectors[i, n, :k].reshape(k, -1).T.astype(np.float64))
            basis_b = torch.from_numpy(b.eigenvectors[j, n, :k].reshape(k, -1).T.astype(np.float64))
            values.append(alignment(basis_a, basis_b))
        out[t] = statistics.fmean(values)
    return out


# ---------------------------------------------------------------------------------------------
# The section


@dataclass(frozen=True)
class Configuration:
    """One configuration of the report: its label, its label without the data size, the size (None when the
    sweep has no size axis), its finished trials, and (block, mean attention distance) over them."""

    label: str
    label_without_size: str
    size: float | None
    trials: list[TrialResult]
    distances: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Inputs:
    """What the section reads from a sweep; built by orchestrator.report."""

    configurations: list[Configuration]
    trials: list[TrialResult]  # all of the sweep's trials
    disjoint_pairs: dict[str, list[tuple[TrialResult, TrialResult]]]  # label -> pairs on disjoint subsets
    jacobians: dict[str, JacobianAnalysis]  # run id -> analysis (`fetch`)
    attention_queries: dict[str, dict]  # run id -> query maps (`fetch`)


@dataclass(frozen=True)
class Number:
    """One reported number: asymmetry of a configuration, or alignment of its disjoint pairs, at timestep t."""

    quantity: str  # "asymmetry" or "alignment"
    label: str  # the configuration
    timestep: int
    result: PairedDifference  # mean over trials (asymmetry) or pairs (alignment), 95% interval
    chance: float | None = None  # alignment of unrelated subspaces, k / d

    def line(self) -> str:
        r = self.result
        unit = "trial" if self.quantity == "asymmetry" else "pair"
        count = f"n = {r.n} {unit}{'s' if r.n != 1 else ''}"
        value = (f"{r.mean:.3f} ({count}, no interval)" if r.low is None
                 else f"{r.mean:.3f}, 95% interval [{r.low:.3f}, {r.high:.3f}] ({count})")
        if self.quantity == "asymmetry":
            return f"Jacobian asymmetry ||J - J^T|| / ||J|| of {self.label} at t={self.timestep}: {value}"
        return (f"eigenspace alignment of {self.label} (pairs trained on disjoint subsets) at t={self.timestep}: "
                f"{value}; 1 = the same top-k subspace, chance k/d = {self.chance:.3f}")

    def csv(self) -> str:
        bounds = ["" if v is None else f"{v:.6f}" for v in (self.result.low, self.result.high)]
        chance = "" if self.chance is None else f"{self.chance:.6f}"
        return ",".join([self.quantity, f'"{self.label}"', str(self.timestep), f"{self.result.mean:.6f}", *bounds,
                         str(self.result.n), chance])


def configuration_analyses(data: Inputs) -> dict[str, list[JacobianAnalysis]]:
    """Configuration label -> the Jacobian analyses of its finished trials (configurations without any left out)."""
    found = {}
    for configuration in data.configurations:
        analyses = [data.jacobians[t.run_id] for t in configuration.trials if t.run_id in data.jacobians]
        if analyses:
            found[configuration.label] = analyses
    return found


def jacobian_numbers(data: Inputs) -> list[Number]:
    """Asymmetry per configuration and timestep (over its trials), alignment per disjoint group (over its pairs)."""
    numbers = []
    for label, members in configuration_analyses(data).items():
        per_trial = [per_trial_asymmetry(a) for a in members]
        for t in members[0].timesteps:
            numbers.append(Number("asymmetry", label, t, mean_interval([p[t] for p in per_trial if t in p])))
    for label, pairs in data.disjoint_pairs.items():
        scores: dict[int, list[float]] = {}
        chance = None
        for a, b in pairs:
            if a.run_id in data.jacobians and b.run_id in data.jacobians:
                first = data.jacobians[a.run_id]
                chance = first.eigenvectors.shape[2] / first.eigenvalues.shape[-1]
                for t, value in pair_alignment(first, data.jacobians[b.run_id]).items():
                    scores.setdefault(t, []).append(value)
        numbers += [Number("alignment", label, t, mean_interval(values), chance) for t, values in scores.items()]
    return numbers


def locality_correlation(data: Inputs) -> tuple[list[tuple[TrialResult, float, float]], Correlation] | None:
    """The trials' (distance, gap) points and their correlation; None with fewer than 3 or no spread."""
    points = locality_points(data.trials)
    if len(points) < 3:
        return None
    try:
        return points, pearson_interval([p[1] for p in points], [p[2] for p in points])
    except ValueError:
        return None


def _correlation_text(result: Correlation) -> str:
    interval = "no interval" if result.low is None else f"95% interval [{result.low:.2f}, {result.high:.2f}] (Fisher z)"
    return f"Pearson r = {result.r:.2f}, {interval}, n = {result.n} trials"


def distance_by_size(data: Inputs) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """Configuration without its size -> block -> (N, mean attention distance over its trials), for
    configurations logged at two sizes or more; empty otherwise."""
    panels: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for configuration in data.configurations:
        if configuration.size is None:
            continue
        for block, value in configuration.distances:
            panel = panels.setdefault(configuration.label_without_size, {})
            panel.setdefault(block, []).append((configuration.size, value))
    return {label: blocks for label, blocks in panels.items() if len(next(iter(blocks.values()))) > 1}


def query_panels(data: Inputs) -> dict[str, dict]:
    """Configuration label -> the saved query maps of its first trial that has them."""
    panels = {}
    for configuration in data.configurations:
        found = (data.attention_queries[t.run_id] for t in configuration.trials if t.run_id in data.attention_queries)
        saved = next(found, None)
        if saved is not None:
            panels[configuration.label] = saved
    return panels


def note_lines(data: Inputs) -> list[str]:
    """The numbers of both analyses, one line each, for the report's notes."""
    lines = [number.line() for number in jacobian_numbers(data)]
    found = locality_correlation(data)
    if found is not None:
        lines.append("locality vs gap (mean attention distance of the global blocks against the PSNR gap): "
                     + _correlation_text(found[1]))
    return lines


@dataclass
class Section:
    figures: list[tuple[str, str, bytes]] = field(default_factory=list)  # (file name, caption, PNG)
    files: dict[str, bytes] = field(default_factory=dict)  # CSV files


def section(data: Inputs) -> Section:
    """The figures and CSV files of both analyses, for what the sweep logged (empty otherwise)."""
    from orchestrator import plots  # matplotlib: only when a report is drawn

    out = Section()
    analyses = configuration_analyses(data)
    if analyses:
        out.figures.append((
            "jacobian_spectra.png", "Eigenvalues of the symmetric part of the one-step denoiser's Jacobian by rank "
            "(largest first), mean over held-out images and trials, one panel per noise level (Kadkhodaie et al. "
            "2024)", plots.spectra_png(analyses)))
        out.figures.append((
            "jacobian_eigenvectors.png", "Top eigenvectors of the first held-out image, one row per configuration "
            "and noise level (" + "; ".join(analyses) + "): clean image, noisy input, one-step estimate, then "
            "eigenvectors by decreasing eigenvalue (grey = 0)", plots.eigenvectors_png(analyses)))
        header = "quantity,configuration,timestep,mean,low,high,n,chance"
        out.files[JACOBIAN_CSV] = "\n".join([header] + [n.csv() for n in jacobian_numbers(data)]).encode() + b"\n"
    panels = query_panels(data)
    if panels:
        out.figures.append((
            "attention_queries.png", "Where three query tokens of the first held-out image attend (grey dot: the "
            "query), one row per block (first at the top), mean over heads; one panel per configuration (its first "
            "trial), each map scaled to its maximum", plots.query_panels_png(panels)))
    by_size = distance_by_size(data)
    if by_size:
        out.figures.append((
            "attention_distance_vs_n.png", "Mean attention distance per block against the number of training "
            "images N (log axis), one panel per configuration; mean over seeds and shuffles", plots.distance_vs_size_png(by_size)))
    found = locality_correlation(data)
    if found is not None:
        points, result = found
        out.figures.append((
            "locality_vs_gap.png", "Each trial's mean attention distance over its global blocks against its PSNR "
            f"gap; {_correlation_text(result)}", plots.locality_png([(t.placement or "trial", x, y) for t, x, y in points], result.r)))
        lines = ["trial,global_attention_distance,psnr_gap"] + [f'"{t.name}",{x:.6f},{y:.6f}' for t, x, y in points]
        out.files[LOCALITY_CSV] = ("\n".join(lines) + "\n").encode()
    return out
