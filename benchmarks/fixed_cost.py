"""What a sweep costs besides its trials: one 1-step trial launched in a fresh folder, split into parts.

    python benchmarks/fixed_cost.py                       # 3 rounds, ~2 min on 2 cores
    python benchmarks/fixed_cost.py --other-tree DIR      # the same, alternating with another checkout

Each round runs, as fresh processes in fresh folders, `ditsweep launch` of a spec with one trial of
one training step (the tests' tiny trial) and `ditsweep train` of the same trial (no Ray, no MLflow),
interleaved; with `--other-tree` also the launch of another checkout of ditsweep (e.g. the commit
before a change), so that before and after are measured in the same run. Each launch is timed part by
part from inside its process (the functions of the launch path are wrapped with timers as their
modules load; a part's time excludes the wrapped parts it calls and includes the imports it triggers,
as in a user's launch):

    interpreter start   process start until the first line of the script (Python, site, the venv)
    ...                 the launch path's parts (spec and checks, tracking store, compute estimate,
                        sweep run, Ray start, Tune, the trial itself, the report)
    other               the rest of the launch call (the CLI's and the launch's own imports among it)
    exit                after the command returned: Ray's shutdown, the interpreter's teardown

The user cache (`$DITSWEEP_CACHE`: data, the migrated empty MLflow store) is a temporary folder,
filled by one launch before the clock starts, as on a machine that has run a sweep before; that
first launch's total is printed too. Prints, last: `fixed_cost_s=... train_s=... extra_s=...` (best
of the rounds; extra = launch - train, the target is half of what it was).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRIAL = {
    "model": {"size": "DiT-T/1"},
    "data": {"num_images": 16, "test_images": 16},
    "train": {"steps": 1, "batch_size": 8, "log_every": 1, "warmup_steps": 0},
    "eval": {"every": 1, "psnr_gap": {"images": 8, "timesteps": 2}, "samples": {"grid": 2, "steps": 2}},
}

# (module, attribute path, part): the functions of the launch path, timed where the launch looks them up.
PARTS = (
    ("orchestrator.launch", "read_grid_file", "spec, configs, memory check"),
    ("orchestrator.launch", "check_fid_weights", "checks (weights, storage, resources)"),
    ("orchestrator.launch", "check_storage", "checks (weights, storage, resources)"),
    ("orchestrator.launch", "check_resources", "checks (weights, storage, resources)"),
    ("orchestrator.launch", "check_storage_is_shared", "checks (weights, storage, resources)"),
    ("orchestrator.tracking", "prepare_sqlite_store", "tracking store: creation (MLflow migrations)"),
    ("orchestrator.tracking", "Tracker.__init__", "tracking store: open, experiment, cache lookup"),
    ("orchestrator.tracking", "Tracker.experiment_id", "tracking store: open, experiment, cache lookup"),
    ("orchestrator.tracking", "Tracker.finished_trials", "tracking store: open, experiment, cache lookup"),
    ("orchestrator.launch", "compute_estimate", "compute estimate (plan.txt)"),
    ("orchestrator.tracking", "Tracker.start_sweep", "sweep's run (tags, params, 4 texts)"),
    ("orchestrator.ray_connect", "init_ray", "Ray start (ray.init; after: waiting for it)"),
    ("orchestrator.sweep", "run_trials", "Tune: worker start, scheduling, results"),
    ("orchestrator.progress", "SweepSink.completed", "trial's artifacts and run (plots, MLflow)"),
    ("orchestrator.progress", "SweepSink.close", "closing the sweep's runs"),
    ("orchestrator.launch", "_refresh_report", "end-of-sweep report"),
)
TRIAL_PART = "the trial itself (Tune's time_total_s)"


# ---------------------------------------------------------------------------------------------
# Inside the launch process


class PartTimer:
    """Exclusive wall time per part: a wrapped call's time minus that of the wrapped calls inside it."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self._nested: list[float] = []  # per open call: time spent in wrapped calls inside it

    def wrap(self, part: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._nested.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                inner = self._nested.pop()
                self.parts[part] = self.parts.get(part, 0.0) + elapsed - inner
                if self._nested:
                    self._nested[-1] += elapsed
        return timed


def install(timer: PartTimer) -> None:
    """Wrap each part's function where the launch looks it up, as soon as its module has run: modules
    loaded already now, the others by an import hook when the launch imports them (nothing is imported
    ahead of the launch, whose own order of imports is part of what is measured)."""
    import importlib.abc
    import importlib.machinery

    by_module: dict[str, list[tuple[str, str]]] = {}
    for module_name, attribute, part in PARTS:
        by_module.setdefault(module_name, []).append((attribute, part))

    def wrap_parts(module) -> None:
        for attribute, part in by_module.pop(module.__name__, []):
            *path, name = attribute.split(".")
            owner = module
            for step in path:
                owner = getattr(owner, step)
            if hasattr(owner, name):
                setattr(owner, name, timer.wrap(part, getattr(owner, name)))

    class TimeOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in by_module:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is None or spec.loader is None:
                return spec
            run_module = spec.loader.exec_module

            def exec_module(module) -> None:
                run_module(module)
                wrap_parts(module)

            spec.loader.exec_module = exec_module
            return spec

    for name in list(by_module):
        if name in sys.modules:
            wrap_parts(sys.modules[name])
    sys.meta_path.insert(0, TimeOnImport())


def child(spec: str, record: Path) -> None:
    """Run `ditsweep launch SPEC` in this process through the CLI's entry point, timing its parts;
    write them to `record` when the command returns (the process then exits as that tree's CLI does)."""
    timings: dict = {"first_line": time.time()}
    from orchestrator import cli

    command = cli.app

    def timed_command() -> None:
        timer = PartTimer()
        install(timer)
        start = time.perf_counter()
        try:
            command()
        finally:
            total = time.perf_counter() - start
            timings["returned"] = time.time()
            timings["parts"] = {**timer.parts, "other": total - sum(timer.parts.values())}
            record.write_text(json.dumps(timings))

    cli.app = timed_command
    sys.argv = ["ditsweep", "launch", spec]
    cli.main()


# ---------------------------------------------------------------------------------------------
# The driver


def write_files(folder: Path) -> tuple[Path, Path]:
    import yaml

    spec = {"name": "fixed-cost", "description": "benchmarks/fixed_cost.py: one 1-step trial",
            "base": TRIAL, "grid": {"seed": [0]}, "resources": {"cpu": 1}, "max_failures": 0}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (folder / "trial.yaml").write_text(yaml.safe_dump(TRIAL, sort_keys=False))
    return folder / "spec.yaml", folder / "trial.yaml"


def run_launch(tree: Path, spec: Path, env: dict, attempts: int = 3) -> dict:
    """One launch in a fresh folder, with `tree` first on the path: its parts, exit and total (s).
    A launch that fails is tried again (up to `attempts` in all), saying so: on a starved machine
    Ray's node can miss its fixed 30 s start-up wait."""
    folder = Path(tempfile.mkdtemp(prefix="ditsweep-fixed-cost-"))
    record = folder / "timings.json"
    start = time.time()
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(spec), "--record", str(record)], cwd=folder,
        env={**env, "PYTHONPATH": str(tree)}, capture_output=True, text=True, timeout=600,
    )
    end = time.time()
    if result.returncode != 0 or not record.exists():
        shutil.rmtree(folder, ignore_errors=True)
        error = (result.stdout[-2000:] + result.stderr[-2000:]).strip()
        if attempts <= 1:
            raise SystemExit(f"the launch failed (exit {result.returncode}):\n{error}")
        print(f"a launch failed (exit {result.returncode}: {error.splitlines()[-1][:200]}); trying again", flush=True)
        return run_launch(tree, spec, env, attempts - 1)
    timings = json.loads(record.read_text())
    parts = {"interpreter start": timings["first_line"] - start, **timings["parts"]}
    trial = trial_seconds(folder / "ditsweep_results")
    if trial is not None:  # the trial ran inside Tune's part
        parts[TRIAL_PART] = trial
        parts["Tune: worker start, scheduling, results"] -= trial
    parts["exit (Ray shutdown, teardown)"] = end - timings["returned"]
    shutil.rmtree(folder, ignore_errors=True)
    return {"parts": parts, "total": end - start}


def trial_seconds(storage: Path) -> float | None:
    from sweep_overhead import trial_timings  # benchmarks/ is this script's folder

    try:
        return sum(t["seconds"] for t in trial_timings(storage))
    except (ValueError, KeyError, OSError):
        return None


def run_train(config: Path, env: dict) -> float:
    folder = Path(tempfile.mkdtemp(prefix="ditsweep-fixed-cost-train-"))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(config)], cwd=folder,
                            env=env, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    shutil.rmtree(folder, ignore_errors=True)
    if result.returncode != 0:
        raise SystemExit(f"`ditsweep train` failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return elapsed


def best_parts(runs: list[dict]) -> tuple[dict[str, float], float]:
    """Per part, the run with the best total (parts of one run add up to its total)."""
    best = min(runs, key=lambda r: r["total"])
    return best["parts"], best["total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (launch, train[, other tree's launch])")
    parser.add_argument("--other-tree", type=Path, help="another checkout of ditsweep, launched alternately")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.record)

    from _common import ROOT, machine  # not in the child: it puts this tree first on the path

    cache = Path(tempfile.mkdtemp(prefix="ditsweep-fixed-cost-cache-"))
    files = Path(tempfile.mkdtemp(prefix="ditsweep-fixed-cost-spec-"))
    spec, config = write_files(files)
    env = {**os.environ, "RAY_ADDRESS": "local", "DITSWEEP_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    trees = {"this tree": ROOT} | ({"other tree": args.other_tree.resolve()} if args.other_tree else {})
    first = {name: run_launch(tree, spec, env)["total"] for name, tree in trees.items()}  # fills the cache
    launches: dict[str, list[dict]] = {name: [] for name in trees}
    trains: list[float] = []
    for _ in range(args.rounds):
        for name, tree in trees.items():
            launches[name].append(run_launch(tree, spec, env))
        trains.append(run_train(config, env))
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(files, ignore_errors=True)

    print(f"machine: {machine()}")
    best = {name: best_parts(runs) for name, runs in launches.items()}
    names = list(dict.fromkeys(part for parts, _ in best.values() for part in parts))
    print(f"{'part (best launch of ' + str(args.rounds) + ')':<48}" + "".join(f"{n:>14}" for n in trees))
    for part in names:
        print(f"{part:<48}" + "".join(f"{best[n][0].get(part, 0.0):>13.2f}s" for n in trees))
    print(f"{'launch total':<48}" + "".join(f"{best[n][1]:>13.2f}s" for n in trees))
    rounds = {n: " ".join(f"{r['total']:.1f}" for r in launches[n]) for n in trees}
    print(f"{'  all rounds':<48}" + "".join(f"{rounds[n]:>14}" for n in trees))
    print(f"{'  first launch (empty user cache)':<48}" + "".join(f"{first[n]:>13.2f}s" for n in trees))
    train = min(trains)
    print(f"`ditsweep train` of the same trial: best {train:.2f} s (all: {' '.join(f'{t:.1f}' for t in trains)})")
    for name in trees:
        print(f"{name}: launch - train = {best[name][1] - train:.2f} s; launch / train = {best[name][1] / train:.2f}x")
    if args.other_tree:
        mine, other = best["this tree"][1] - train, best["other tree"][1] - train
        print(f"extra over train, this tree / other tree: {mine / other:.2f}")
    print(f"fixed_cost_s={best['this tree'][1]:.2f} train_s={train:.2f} extra_s={best['this tree'][1] - train:.2f}")


if __name__ == "__main__":
    main()
