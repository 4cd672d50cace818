"""orchestrator.report.jacobian: the Jacobian eigenbasis numbers and pictures of a sweep, and the
locality-vs-gap correlation, on sweeps built here; checked against scipy (pearsonr's Fisher-z interval,
Student-t intervals, principal angles)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from scipy import stats

from orchestrator.report import SweepData, TrialResult, build_report, configuration_rows, gahb_inputs, notes
from orchestrator.report.jacobian import distance_by_size, global_block_distance, pearson_interval, section
from trainer.jacobian import JacobianAnalysis

PNG = b"\x89PNG"
D, K, TIMESTEPS = 16, 3, [100, 600]


def orthonormal(rng, d: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, k)))[0]


def analysis(rng, asymmetry: list[float], bases: list[np.ndarray]) -> JacobianAnalysis:
    """One image, two timesteps: eigenvectors from `bases` (d, k) per timestep, descending eigenvalues."""
    eigenvalues = np.sort(rng.uniform(0, 1, (2, 1, D)), axis=-1)[..., ::-1]
    vectors = np.stack([b.T.reshape(1, K, 1, 4, 4) for b in bases])  # (T, n=1, k, C, H, W)
    image = rng.uniform(-1, 1, (1, 1, 4, 4))
    return JacobianAnalysis(timesteps=TIMESTEPS, asymmetry=np.array(asymmetry)[:, None], eigenvalues=eigenvalues,
                            eigenvectors=vectors, images=image, noisy=np.stack([image, image]),
                            denoised=np.stack([image, image]))


def trial(name: str, placement: str, shuffle: int, **metrics) -> TrialResult:
    schedule = "G,G,G,G" if placement == "none" else "3,3,G,G"
    return TrialResult(name=name, axes={"attention.placement": placement, "data.shuffle_seed": shuffle},
                       status="FINISHED", run_id=name, metrics=dict(metrics),
                       params={"attention.placement": placement, "data.shuffle_seed": str(shuffle),
                               "data.disjoint": "True", "attention.schedule": schedule})


def sweep(trials: list[TrialResult], jacobians: dict) -> SweepData:
    return SweepData(sweep_id="s", experiment_id="1", experiment_name="e", parent_run_id="p", status="FINISHED",
                     axes=["attention.placement", "data.shuffle_seed"], trials=trials, jacobians=jacobians)


def inputs(data: SweepData):
    return gahb_inputs(data, configuration_rows(data.trials, data.axes))


def test_pearson_interval_matches_scipy_fisher_z():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(12)
    y = 0.6 * x + rng.standard_normal(12)
    ours = pearson_interval(list(x), list(y))
    reference = stats.pearsonr(x, y)
    interval = reference.confidence_interval(0.95)
    assert ours.r == pytest.approx(reference.statistic, rel=1e-12)
    assert (ours.low, ours.high) == pytest.approx((interval.low, interval.high), rel=1e-10)
    assert pearson_interval([1, 2, 3], [2, 1, 4]).low is None  # n = 3: no interval
    with pytest.raises(ValueError, match="vary"):
        pearson_interval([1, 1, 1, 1], [1, 2, 3, 4])


def test_global_block_distance_averages_the_global_blocks_only():
    t = trial("a", "head", 0, **{f"attn_distance.block_{b}": v for b, v in enumerate([0.5, 0.7, 2.0, 4.0])})
    assert global_block_distance(t) == pytest.approx(3.0)


def test_asymmetry_alignment_and_locality_numbers_and_pictures():
    rng = np.random.default_rng(1)
    shared = [orthonormal(rng, D, K) for _ in TIMESTEPS]
    # none: two disjoint shuffles with the same top-k subspaces (rotated bases); head: unrelated subspaces.
    rotation = [np.linalg.qr(rng.standard_normal((K, K)))[0] for _ in TIMESTEPS]
    none_a = analysis(rng, [0.10, 0.20], shared)
    none_b = analysis(rng, [0.14, 0.30], [b @ r for b, r in zip(shared, rotation)])
    head_bases = [[orthonormal(rng, D, K) for _ in TIMESTEPS] for _ in range(2)]
    head_a, head_b = analysis(rng, [0.5, 0.6], head_bases[0]), analysis(rng, [0.7, 0.4], head_bases[1])
    gaps, distances = [0.1, 0.3, 1.2, 0.9], [3.0, 2.5, 1.0, 1.4]
    names = ["none·sh0", "none·sh1", "head·sh0", "head·sh1"]
    trials = [trial(n, n.split("·")[0], i % 2, psnr_gap=g, **{f"attn_distance.block_{b}": d for b in range(4)})
              for i, (n, g, d) in enumerate(zip(names, gaps, distances))]
    data = sweep(trials, dict(zip(names, [none_a, none_b, head_a, head_b])))

    lines = notes(data)
    # Asymmetry of `none` at t=600: mean of 0.20 and 0.30 with scipy's Student-t interval.
    low, high = stats.t.interval(0.95, 1, loc=0.25, scale=stats.sem([0.20, 0.30]))
    assert (f"Jacobian asymmetry ||J - J^T|| / ||J|| of none at t=600: 0.250, 95% interval [{low:.3f}, {high:.3f}] "
            "(n = 2 trials)") in "\n".join(lines)
    # Alignment: the same subspace is 1; unrelated subspaces give scipy's mean squared cosine of principal angles.
    assert "eigenspace alignment of none (pairs trained on disjoint subsets) at t=100: 1.000 (n = 1 pair, no interval)" in "\n".join(lines)
    expected = np.mean(np.cos(scipy.linalg.subspace_angles(head_bases[0][1], head_bases[1][1])) ** 2)
    assert f"alignment of head (pairs trained on disjoint subsets) at t=600: {expected:.3f}" in "\n".join(lines)
    assert f"chance k/d = {K / D:.3f}" in "\n".join(lines)
    r = stats.pearsonr(distances, gaps)
    ci = r.confidence_interval(0.95)
    assert any(f"Pearson r = {r.statistic:.2f}, 95% interval [{ci.low:.2f}, {ci.high:.2f}]" in line for line in lines)

    extra = section(inputs(data))
    assert [f[0] for f in extra.figures] == ["jacobian_spectra.png", "jacobian_eigenvectors.png",
                                                  "locality_vs_gap.png"]
    assert all(f[2].startswith(PNG) for f in extra.figures)
    rows = extra.files["jacobian.csv"].decode().splitlines()
    assert rows[0] == "quantity,configuration,timestep,mean,low,high,n,chance" and len(rows) == 1 + 4 + 4
    files = build_report(data)
    assert {"jacobian_spectra.png", "locality_vs_gap.png", "jacobian.csv", "locality_vs_gap.csv"} <= set(files)
    assert b"eigenspace alignment of none" in files["report.md"]


def test_a_sweep_without_the_analyses_gets_no_section():
    data = sweep([trial("a", "none", 0, psnr_gap=0.1)], {})
    extra = section(inputs(data))
    assert extra.figures == [] and extra.files == {}
    assert not any("Jacobian" in line or "Pearson" in line for line in notes(data))


def test_attention_distance_per_block_against_n_averages_each_configuration_over_its_shuffles():
    trials = []
    for n, base in ((4, 1.0), (512, 2.0)):
        for shuffle in (0, 1):
            t = trial(f"none·N{n}·sh{shuffle}", "none", shuffle, psnr_gap=0.1,
                      **{f"attn_distance.block_{b}": base + b + shuffle for b in range(4)})
            t.axes["data.num_images"] = n
            trials.append(t)
    data = sweep(trials, {})
    data.axes = ["attention.placement", "data.num_images", "data.shuffle_seed"]
    panels = distance_by_size(inputs(data))
    assert list(panels) == ["none"]
    assert panels["none"][2] == [(4.0, 3.5), (512.0, 4.5)]  # block 2: (base + 2 + 0, base + 2 + 1) averaged
    assert "attention_distance_vs_n.png" in [f[0] for f in section(inputs(data)).figures]


def test_query_maps_of_each_configurations_first_trial_become_one_picture():
    from orchestrator.report.jacobian import query_panels

    trials = [trial("none·sh0", "none", 0), trial("none·sh1", "none", 1), trial("head·sh0", "head", 0)]
    maps = {name: {"maps": np.random.default_rng(i).uniform(0, 1, (4, 3, 8, 8)), "queries": [[4, 4], [2, 2], [6, 4]],
                   "timestep": 500} for i, name in enumerate(["none·sh1", "head·sh0"])}
    data = sweep(trials, {})
    data.attention_queries = maps
    panels = query_panels(inputs(data))
    assert list(panels) == ["none", "head"] and panels["none"] is maps["none·sh1"]  # sh0 saved none
    figure = next(f for f in section(inputs(data)).figures if f[0] == "attention_queries.png")
    assert figure[2].startswith(PNG)
