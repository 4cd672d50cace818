"""What the sweep machinery costs on top of the trials it runs, through the real launch path.

    python benchmarks/sweep_overhead.py               # 8 trials of ~35 s, 1 CPU each: ~2.5 min on 2 cores

Launches a grid of 8 small DiT-T/1 trials (placement x seed on the built-in digits) with
`orchestrator.launch.launch` on in-process Ray, with MLflow (sqlite) and Ray storage in a temporary
folder. Trial time is each trial's own reported time (Tune's `time_total_s` at its last report: the
trainable's wall time from its start, data loading and model building included). Then

    overhead share     = (sweep wall time - total trial time / parallelism) / sweep wall time
    overhead per trial = (sweep wall time - total trial time / parallelism) / (trials / parallelism)

where parallelism = min(trials, Ray CPUs // CPUs per trial) and the sweep wall time is the whole
`launch` call (spec, data check, MLflow, Ray start, trials, final writes). The MLflow store is
created before the clock starts, as a sweep normally finds it in place.
Prints, last: `overhead_share=... overhead_per_trial_s=...` (targets < 0.10 and < 1 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from _common import machine  # first: puts the repository root on sys.path

# Placement x seed on one subset size: eight trials of the same work, so the wall time measures the
# machinery, not how unevenly trial lengths happen to pack onto the workers.
TRIALS_GRID = {"attention.placement": ["none", "head", "mix", "tail"], "seed": [0, 1]}


def write_spec(folder: Path, steps: int) -> Path:
    spec = {
        "name": "bench-sweep-overhead",
        "description": "benchmarks/sweep_overhead.py: 8 small trials to measure the sweep's own overhead",
        "base": {
            "model": {"size": "DiT-T/1"},
            "attention": {"windows": [3, 5, 7, 9, 11, 13]},
            "data": {"source": "digits", "image_size": 8, "num_images": 1024, "test_images": 256},
            "train": {"steps": steps, "batch_size": 32, "lr": 0.002, "warmup_steps": 20, "ema": 0.99,
                      "log_every": 25},
            "eval": {"every": steps // 2, "psnr_gap": {"images": 128, "timesteps": 10}},
        },
        "grid": TRIALS_GRID,
        "resources": {"cpu": 1, "gpu": 0},
        "max_failures": 0,
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def trial_timings(storage: Path) -> list[dict]:
    """Per trial, from Tune's experiment state: its own time (time_total_s at the last report: the
    trainable's wall time, data loading and model building included), and its start and end (epoch s)."""
    (state_file,) = storage.glob("*/experiment_state-*.json")
    timings = []
    for trial, runtime in json.loads(state_file.read_text())["trial_data"]:
        trial = json.loads(trial) if isinstance(trial, str) else trial
        runtime = json.loads(runtime) if isinstance(runtime, str) else runtime
        last = runtime["last_result"]
        last = json.loads(last) if isinstance(last, str) else last
        timings.append({
            "trial": trial.get("custom_dirname") or trial["trial_id"],
            "seconds": float(last["time_total_s"]),
            "start": float(runtime["start_time"]),
            "end": float(runtime["last_result_time"]),
        })
    return sorted(timings, key=lambda t: t["start"])


def slot_gaps(timings: list[dict], parallelism: int) -> list[float]:
    """Idle seconds between one trial's end and the next trial's start on the same worker slot."""
    slots: list[float] = []  # end time of the last trial on each slot
    gaps = []
    for t in timings:
        free = [i for i, end in enumerate(slots) if end <= t["start"] + 1e-3]
        if len(slots) < parallelism and not free:
            slots.append(t["end"])
            continue
        i = max(free, key=lambda j: slots[j]) if free else min(range(len(slots)), key=lambda j: slots[j])
        gaps.append(max(0.0, t["start"] - slots[i]))
        slots[i] = t["end"]
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="training steps per trial (~35 s with its evaluations, one core)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="ditsweep-bench-sweep-"))
    os.environ.setdefault("RAY_ADDRESS", "local")  # never join someone else's `ray start` cluster
    os.chdir(folder)  # MLflow's default artifact folder lands here too
    spec = write_spec(folder, args.steps)
    storage = folder / "results"

    import ray

    from orchestrator.launch import launch

    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    # A sweep normally finds its tracking store in place (./mlflow.db); creating a fresh one runs the
    # schema migrations (about 4 s, once per store), which is not a cost of this sweep.
    from orchestrator.tracking import Tracker

    Tracker(tracking_uri)
    start = time.time()
    code = launch(spec, [], tracking_uri=tracking_uri, storage=str(storage))
    wall = time.time() - start
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ray.shutdown()

    timings = trial_timings(storage)
    trials = len(timings)
    if code != 0 or trials == 0:
        raise SystemExit(f"the benchmark sweep failed (exit {code}, {trials} trials in {storage})")
    parallelism = min(trials, cpus)  # one CPU per trial
    total = sum(t["seconds"] for t in timings)
    overhead = wall - total / parallelism
    gaps = slot_gaps(timings, parallelism)
    first_start, last_end = timings[0]["start"], max(t["end"] for t in timings)
    busy_end = sorted(t["end"] for t in timings)[-parallelism]  # until here every slot had work

    print(f"machine: {machine()}")
    for t in timings:
        print(f"  {t['trial']}: {t['seconds']:.1f} s (from +{t['start'] - start:.1f} s)")
    print(f"{trials} trials, {cpus} Ray CPUs, 1 CPU per trial -> parallelism {parallelism}")
    print(f"sweep wall {wall:.1f} s; trial time {total:.1f} s in all, {total / trials:.1f} s mean; "
          f"ideal wall {total / parallelism:.1f} s; overhead {overhead:.1f} s, of which:")
    print(f"  before the first trial started: {first_start - start:.1f} s (spec, data check, MLflow, Ray start)")
    print(f"  between trials on a worker (actor reuse): {sum(gaps):.1f} s over {len(gaps)} hand-overs, "
          f"{sum(gaps) / max(len(gaps), 1):.2f} s each")
    print(f"  last round, fewer trials than workers: {last_end - busy_end:.1f} s "
          f"(trial lengths differ: {min(t['seconds'] for t in timings):.0f}-{max(t['seconds'] for t in timings):.0f} s)")
    print(f"  after the last trial ended: {start + wall - last_end:.1f} s (final MLflow writes, report, Ray)")
    if args.keep:
        print(f"kept {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"overhead_share={overhead / wall:.3f} overhead_per_trial_s={overhead / (trials / parallelism):.2f}")


if __name__ == "__main__":
    main()
