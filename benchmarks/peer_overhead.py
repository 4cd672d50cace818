"""ditsweep against what a researcher would write instead: the same trials through `ditsweep launch`
and through a hand-written Ray Tune script, alternating, each a fresh process in a fresh folder.

    python benchmarks/peer_overhead.py                    # 2 rounds of both grids: ~10 min on 2 cores
    python benchmarks/peer_overhead.py --grids ones --rounds 3

The grids:
    make-run   search_spaces/placement.yaml (the `make run` spec: 8 trials) at --steps 100 (default)
    ones       32 trials of one training step each (the tests' tiny trial, seeds 0-31)

The peer (`peer_sweep` below, run as `python benchmarks/peer_overhead.py --peer ...`) is the script a
Ray Tune user writes: a function trainable that calls the trainer entry point a ditsweep trial calls
(`trainer.train.train(config, report, ...)`), its metrics to `tune.report` (no checkpoints kept), one
CPU per trial, actors reused as ditsweep reuses them, and Ray's `MLflowLoggerCallback` logging every
trial to an sqlite MLflow store in its folder (MLflow creates that store, migrations included, as
ditsweep does in a fresh folder). ditsweep also checks the spec, data and resources, keeps
checkpoints (2 a trial) for resume, caches finished trials, writes each trial's artifacts (plots,
PSNR curves, samples), prints progress and builds the sweep's report at the end.

Each side is timed as a whole process (interpreter start to exit). Per trial overhead, from Tune's
experiment state (each trial's own `time_total_s`), with parallelism = min(trials, 2 CPUs):

    overhead per trial = (wall - total trial time / parallelism) / (trials / parallelism)

The user cache (`$DITSWEEP_CACHE`) is a temporary folder, filled by one launch before the clock
starts. Prints, last: `ratio_make_run=... ratio_ones=...` (ditsweep wall / peer wall, best of the
rounds each; target <= 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

MAKE_RUN_SPEC = "search_spaces/placement.yaml"  # the Makefile's SPEC


# ---------------------------------------------------------------------------------------------
# The hand-written Ray Tune script (the peer), run in a process of its own


def peer_trainable(config: dict) -> None:
    import tempfile

    import torch
    from ray import tune

    from trainer.config import TrialConfig
    from trainer.train import pick_device, train

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        train(TrialConfig.model_validate(config), lambda metrics, checkpoint_dir: tune.report(metrics),
              out_dir=out, device=pick_device())


def peer_sweep(configs: list[dict], folder: Path, name: str) -> None:
    import ray
    from ray import tune
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    ray.init()
    tuner = tune.Tuner(
        tune.with_resources(peer_trainable, {"cpu": 1}),
        param_space=tune.grid_search(configs),
        tune_config=tune.TuneConfig(reuse_actors=True),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(folder / "ray_results"),
            callbacks=[MLflowLoggerCallback(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", experiment_name=name)],
        ),
    )
    results = tuner.fit()
    if results.errors:
        raise SystemExit(f"{len(results.errors)} peer trials failed: {results.errors[0]}")


# ---------------------------------------------------------------------------------------------
# The driver


def grid_spec(grid: str, steps: int, folder: Path) -> tuple[Path, list[str]]:
    """The spec file and --set overrides of a grid, as ditsweep is given them."""
    if grid == "make-run":
        return Path(__file__).resolve().parents[1] / MAKE_RUN_SPEC, [f"train.steps={steps}"]
    return ones_spec(folder, 32), []


def ones_spec(folder: Path, trials: int) -> Path:
    from fixed_cost import TRIAL  # the tests' tiny trial, at one step

    spec = {"name": f"ones{trials}", "description": f"benchmarks/peer_overhead.py: {trials} one-step trials",
            "base": TRIAL, "grid": {"seed": list(range(trials))}, "resources": {"cpu": 1}, "max_failures": 0}
    path = folder / f"ones{trials}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def trial_configs(spec: Path, overrides: list[str]) -> list[dict]:
    """The grid's trials as ditsweep expands them (the same configs for both sides)."""
    from orchestrator.plan import read_grid_file

    return [t.config.model_dump(mode="json") for t in read_grid_file(spec, overrides).trials]


def timed(command: list[str], folder: Path, env: dict, attempts: int = 3) -> float:
    """Wall time of the command in `folder`. A run that fails is tried again in a clean folder (up to
    `attempts` in all), saying so: on a starved machine Ray's node can miss its fixed 30 s start-up wait."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        error = (result.stdout[-2000:] + result.stderr[-2000:]).strip()
        if attempts <= 1:
            raise SystemExit(f"{' '.join(command[:4])} failed (exit {result.returncode}):\n{error}")
        print(f"a run failed (exit {result.returncode}: {error.splitlines()[-1][:200]}); trying again", flush=True)
        for entry in folder.iterdir():
            if entry.name != "configs.json":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return timed(command, folder, env, attempts - 1)
    return elapsed


def run_ditsweep(spec: Path, overrides: list[str], env: dict) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="ditsweep-peer-ours-"))
    sets = [item for value in overrides for item in ("--set", value)]
    wall = timed([sys.executable, "-m", "orchestrator.cli", "launch", str(spec), *sets], folder, env)
    return measured(wall, folder / "ditsweep_results", folder)


def run_peer(configs: list[dict], env: dict) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="ditsweep-peer-theirs-"))
    (folder / "configs.json").write_text(json.dumps(configs))
    wall = timed([sys.executable, __file__, "--peer", str(folder)], folder, env)
    return measured(wall, folder / "ray_results", folder)


def measured(wall: float, storage: Path, folder: Path) -> dict:
    from sweep_overhead import trial_timings  # benchmarks/ is this script's folder

    seconds = [t["seconds"] for t in trial_timings(storage)]
    shutil.rmtree(folder, ignore_errors=True)
    parallelism = min(len(seconds), os.cpu_count() or 1)
    overhead = wall - sum(seconds) / parallelism
    return {"wall": wall, "trials": len(seconds), "trial_mean": sum(seconds) / len(seconds),
            "overhead_per_trial": overhead / (len(seconds) / parallelism)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grids", nargs="+", default=["make-run", "ones"], choices=["make-run", "ones"])
    parser.add_argument("--steps", type=int, default=100, help="training steps of the make-run grid's trials")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (ditsweep, peer) per grid")
    parser.add_argument("--peer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        return peer_sweep(json.loads((args.peer / "configs.json").read_text()), args.peer, "peer")

    from _common import ROOT, machine

    scratch = Path(tempfile.mkdtemp(prefix="ditsweep-peer-"))
    env = {**os.environ, "RAY_ADDRESS": "local", "DITSWEEP_CACHE": str(scratch / "cache"), "PYTHONPATH": str(ROOT)}
    grids = {grid: grid_spec(grid, args.steps, scratch) for grid in args.grids}
    configs = {grid: trial_configs(*grids[grid]) for grid in args.grids}
    run_ditsweep(ones_spec(scratch, 1), [], env)  # fills the user cache, as on a machine that ran a sweep before
    results: dict[str, dict[str, list[dict]]] = {g: {"ditsweep": [], "peer": []} for g in args.grids}
    print(f"machine at start: {machine()}", flush=True)
    for round_ in range(args.rounds):
        for grid in args.grids:
            results[grid]["ditsweep"].append(run_ditsweep(*grids[grid], env))
            results[grid]["peer"].append(run_peer(configs[grid], env))
            ours, theirs = results[grid]["ditsweep"][-1], results[grid]["peer"][-1]
            print(f"round {round_ + 1} {grid}: ditsweep {ours['wall']:.1f} s (trials {ours['trial_mean']:.2f} s, "
                  f"overhead {ours['overhead_per_trial']:.2f} s a trial), peer {theirs['wall']:.1f} s (trials "
                  f"{theirs['trial_mean']:.2f} s, overhead {theirs['overhead_per_trial']:.2f} s a trial); "
                  f"ratio {ours['wall'] / theirs['wall']:.3f}; {machine().split('; ')[-1]}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)

    print(f"machine at end: {machine()}")
    print(f"{'grid':<10}{'side':<10}{'trials':>7}{'trial mean':>12}{'wall (best)':>13}{'all walls':>22}{'overhead/trial':>16}")
    ratios = {}
    for grid in args.grids:
        best = {side: min(runs, key=lambda r: r["wall"]) for side, runs in results[grid].items()}
        for side, runs in results[grid].items():
            walls = " ".join(f"{r['wall']:.1f}" for r in runs)
            b = best[side]
            print(f"{grid:<10}{side:<10}{b['trials']:>7}{b['trial_mean']:>11.2f}s{b['wall']:>12.1f}s{walls:>22}"
                  f"{b['overhead_per_trial']:>15.2f}s")
        ratios[grid] = best["ditsweep"]["wall"] / best["peer"]["wall"]
        per_round = " ".join(f"{o['wall'] / p['wall']:.2f}" for o, p in zip(results[grid]["ditsweep"], results[grid]["peer"]))
        print(f"{grid}: ditsweep / peer wall = {ratios[grid]:.3f} (best of each; per round {per_round})")
    print(" ".join(f"ratio_{grid.replace('-', '_')}={ratio:.3f}" for grid, ratio in ratios.items()))


if __name__ == "__main__":
    main()
