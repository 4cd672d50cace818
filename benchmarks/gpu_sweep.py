"""A short real sweep of the paper's DiT-XS/1 placement spec on a CUDA machine, end to end.

    python benchmarks/gpu_sweep.py --workdir /tmp/gpu-sweep --steps 500   # about 3 minutes on one H200

`search_spaces/paper/placement_xs.yaml` shrunk: 2 placements (none, head), one data size, one
shuffle, --steps steps at the paper's batch 128 (two trials sharing an H200 each trained about 6 steps/s,
after about 80 s of start-up and compilation) with bf16 autocast, `torch.compile` and
FlexAttention, then the PSNR gap and FID in fp32. The data is generated here (smooth random images,
32x32 RGB, written as a .npy), and so are the FID weights: random values in the exact layout of
pt_inception-2015-12-05-6726825d.pth (no machine of ours can download the real file), with the spec's
`eval.fid.weights_sha256` set to that file's own digest. FID values from them are not comparable to
published ones; the point is that every code path of a GPU trial runs.

The two trials share the GPU (`resources.gpu: 0.5`). It runs `ditsweep launch` in a subprocess (local
Ray, a sqlite MLflow store in --workdir) and then reads the store back: every trial run must be
FINISHED, carry psnr_gap, fid and images_per_sec, and name the GPU it ran on. Prints, last:
`sweep_ok=1` or the reason it is not.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from _common import ROOT, machine  # first: puts the repository root on sys.path

from orchestrator.tracking import Tracker

SPEC = ROOT / "search_spaces/paper/placement_xs.yaml"


def smooth_images(count: int, side: int, seed: int) -> np.ndarray:
    """(count, side, side, 3) uint8: a few random low-frequency waves per channel, so that images are
    structured (learnable) and distinct."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 2.0 * np.pi, side, endpoint=False)
    ys, xs = np.meshgrid(grid, grid, indexing="ij")
    freq = rng.integers(0, 4, size=(count, 3, 4, 2))  # 4 waves per channel
    phase = rng.uniform(0, 2 * np.pi, size=(count, 3, 4))
    amp = rng.uniform(0.2, 1.0, size=(count, 3, 4))
    waves = amp[..., None, None] * np.cos(
        freq[..., 0, None, None] * ys + freq[..., 1, None, None] * xs + phase[..., None, None]
    )  # (count, 3, 4, side, side)
    images = waves.sum(axis=2)  # (count, 3, side, side)
    images = (images - images.min()) / (images.max() - images.min())
    return (images.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def fid_weights(path: Path) -> str:
    """Random weights in the FID file's layout, saved at `path`; returns their sha256."""
    sys.path.insert(0, str(ROOT))
    from tests.support.weights import random_fid_state_dict

    torch.save(random_fid_state_dict(seed=0), path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shrunk_spec(workdir: Path, args: argparse.Namespace) -> Path:
    spec = yaml.safe_load(SPEC.read_text())
    data = workdir / "images.npy"
    np.save(data, smooth_images(args.num_images + args.test_images, 32, seed=0))
    weights = workdir / "pt_inception-random-layout.pth"
    digest = fid_weights(weights)
    base = spec["base"]
    base["data"].update({"source": str(data), "test_images": args.test_images})
    # EMA 0.999 instead of the paper's 0.9999: over a few thousand steps the slower average would still
    # be mostly the initial weights, and the PSNR gap and FID below are of the EMA model.
    base["train"].update({"steps": args.steps, "warmup_steps": min(100, args.steps // 10), "log_every": 100,
                          "ema": 0.999})
    base["eval"] = {
        "every": args.steps,
        "psnr_gap": {"images": 256, "timesteps": 50, "batch_size": 256},
        "fid": {"enabled": True, "samples": args.fid_samples, "steps": 50, "batch_size": 256,
                "weights": str(weights), "weights_sha256": digest[:16]},
    }
    spec.update({
        "name": "gpu-check-placement-xs",
        "description": f"{SPEC.name} shrunk to 2 placements x 1 data size x 1 shuffle, {args.steps} steps, "
                       "generated data and random-layout FID weights (benchmarks/gpu_sweep.py)",
        "grid": {"attention.placement": ["none", "head"], "data.num_images": [args.num_images],
                 "data.shuffle_seed": [0]},
        "resources": {"cpu": 4, "gpu": 0.5},
        "max_failures": 0,
    })
    if args.smoke:  # the script's own flow on a CPU in about a minute: nothing here is a measurement
        base["model"]["size"] = "DiT-T/1"
        base["train"].update({"steps": 2, "batch_size": 2, "compile": False, "warmup_steps": 0})
        base["eval"].update({"every": 2, "psnr_gap": {"images": 4, "timesteps": 2, "batch_size": 4}})
        base["eval"]["fid"].update({"samples": 4, "steps": 2, "batch_size": 4})
        base["eval"]["locality"] = {"enabled": False}
        base["eval"]["samples"] = {"grid": 2, "steps": 2}
        spec["resources"] = {"cpu": 1, "gpu": 0}
    path = workdir / "gpu_check.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def check_store(uri: str, args: argparse.Namespace) -> list[str]:
    """What is wrong with the sweep's runs (empty when every trial finished with every metric)."""
    problems = []
    tracker = Tracker(uri, create=False)
    sweeps = tracker.list_sweeps()
    if len(sweeps) != 1:
        return [f"expected one sweep in the store, found {len(sweeps)}"]
    trials = tracker.sweep_trials(sweeps[0])
    if len(trials) != 2:
        problems.append(f"expected 2 trial runs, found {len(trials)}")
    for run in trials:
        where = run.location
        print(f"  {run.name}: {run.status}; " + ", ".join(
            f"{k}={run.metrics[k]:.4g}" for k in ("step", "loss", "psnr_gap", "psnr_test", "fid", "kid", "images_per_sec")
            if k in run.metrics) + f"; ran on {where}")
        if run.status != "FINISHED":
            problems.append(f"{run.name} is {run.status}")
        missing = [k for k in ("psnr_gap", "fid", "images_per_sec") if k not in run.metrics]
        if missing:
            problems.append(f"{run.name} has no {', '.join(missing)}")
        if not args.smoke and (not where.get("device", "").startswith("cuda") or not where.get("gpu_name")):
            problems.append(f"{run.name} does not say it ran on a GPU: {where}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="an empty folder for data, store and results")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--test-images", type=int, default=512)
    parser.add_argument("--fid-samples", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the launch is stopped")
    parser.add_argument("--smoke", action="store_true", help="a tiny CPU run of this script's flow (no GPU)")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine('cuda' if torch.cuda.is_available() else 'cpu')}", flush=True)
    spec = shrunk_spec(workdir, args)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    command = [sys.executable, "-m", "orchestrator.cli", "launch", str(spec), "--tracking-uri", uri,
               "--storage", str(workdir / "results")]
    start = time.perf_counter()
    launch = subprocess.Popen(command, cwd=workdir)
    try:
        code = launch.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        # Past the limit: stop it as Ctrl-C does (runs KILLED, resumable), not with SIGKILL, which would
        # leave them RUNNING in the store; then wait a bounded time for that.
        print(f"launch still running after {args.timeout:.0f} s: interrupting it", flush=True)
        launch.send_signal(signal.SIGINT)
        try:
            code = launch.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launch.kill()
            code = launch.wait()
    print(f"launch exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
    problems = [] if code == 0 else [f"launch exited {code}"]
    try:
        problems += check_store(uri, args)
    except Exception as error:  # a store that was never made, or cannot be read: say so, do not crash
        problems.append(f"cannot read the store {uri}: {error}")
    print("sweep_ok=1" if not problems else "sweep_ok=0: " + "; ".join(problems))


if __name__ == "__main__":
    main()
