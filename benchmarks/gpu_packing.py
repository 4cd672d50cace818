"""Sweep throughput with k small trials packed on one device, against one trial on it alone.

    python benchmarks/gpu_packing.py --device cuda --packed 4     # CUDA: 4 trials share one GPU
    python benchmarks/gpu_packing.py                             # CPU analogue: 2 x 1 thread vs 1 x 2 threads

Ray's fractional GPUs (`resources: {gpu: 0.25}`) start k trial processes on the same GPU; a small
model leaves most of a data-centre GPU idle, so k of them finish more trials per hour. This measures
that directly: k worker processes (each the trainer's own step, `benchmarks/train_step.py`'s
`build_trainer`) are started together, wait at a barrier until all have built and warmed up, then
each trains for --seconds; the images/s of all of them are summed. The same is done with one
process that has the whole device (on CPU: all threads; k processes get threads / k each).
Single and packed runs alternate --rounds times; the best of each is kept.

With several --packed values (`--packed 2 4 8`) each k is measured in every round and the k with the
highest summed throughput is named: the `resources.gpu` fraction a spec should ask for is 1/k.

Prints, last: `packed_over_single=...` for the best k (target on CUDA, DiT-XS/1: >= 2.0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine  # first: puts the repository root on sys.path


def worker(args: argparse.Namespace) -> None:
    """One packed trial: build, warm up, wait for the others, train --seconds, print images/s."""
    import torch
    from train_step import PAPER_WINDOWS, build_trainer

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    trainer = build_trainer(args.size, args.image_size, "head", PAPER_WINDOWS, args.batch_size, "auto", device=device)
    for _ in range(args.warmup):
        trainer.train_step()
    barrier = Path(args.barrier)
    (barrier / f"ready-{os.getpid()}").touch()
    while len(list(barrier.glob("ready-*"))) < args.count:
        time.sleep(0.01)
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        trainer.train_step()  # ends in loss.item(): synchronized
        images += args.batch_size
    print(json.dumps({"images_per_sec": images / (time.perf_counter() - start)}))


def run_group(args: argparse.Namespace, count: int, threads: int) -> float:
    """Summed images/s of `count` concurrent worker processes."""
    with tempfile.TemporaryDirectory(prefix="ditsweep-packing-") as barrier:
        command = [
            sys.executable, __file__, "--worker", "--barrier", barrier, "--count", str(count),
            "--threads", str(threads), "--device", args.device, "--size", args.size,
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--seconds", str(args.seconds), "--warmup", str(args.warmup),
        ]
        processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(count)]
        outputs = [p.communicate()[0] for p in processes]
    if any(p.returncode for p in processes):
        raise SystemExit(f"a packed worker failed: exit codes {[p.returncode for p in processes]}")
    return sum(json.loads(out.strip().splitlines()[-1])["images_per_sec"] for out in outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--packed", type=int, nargs="+", default=[2], help="trials sharing the device (k), one or more")
    parser.add_argument("--size", default="DiT-XS/1")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=0, help="per trial; 0 = 8 on CPU, 128 on CUDA")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed training per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="single/packed alternations (best kept)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads of the single trial (0 = all cores)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.batch_size:
        args.batch_size = 128 if args.device == "cuda" else 8
    if args.worker:
        worker(args)
        return

    threads = args.threads or os.cpu_count() or 1
    # On CUDA each process keeps a thread or two for the host side; on CPU the cores are split.
    def packed_threads(k: int) -> int:
        return 2 if args.device == "cuda" else max(1, threads // k)

    single_threads = 2 if args.device == "cuda" else threads
    best = {k: 0.0 for k in [1, *args.packed]}
    for round_ in range(args.rounds):
        best[1] = max(best[1], run_group(args, 1, single_threads))
        for k in args.packed:
            best[k] = max(best[k], run_group(args, k, packed_threads(k)))
        print(f"round {round_ + 1}: " + ", ".join(f"{k} x {best[k]:.2f} images/s" for k in best)
              + " (summed over the trials, best so far)", flush=True)
    print(f"machine: {machine(args.device)}")
    print(f"{args.size} at {args.image_size}x{args.image_size}, batch {args.batch_size} per trial, "
          f"{args.seconds:.0f} s per run; single: 1 trial x {single_threads} threads; "
          f"packed: k trials x {packed_threads(args.packed[0])} threads each")
    for k in args.packed:
        print(f"  k={k}: {best[k]:.2f} images/s, {best[k] / best[1]:.3f}x one trial alone")
    top = max(args.packed, key=lambda k: best[k])
    print(f"best_k={top} (resources.gpu: {1 / top:g} on this device)")
    print(f"packed_over_single={best[top] / best[1]:.3f}")


if __name__ == "__main__":
    main()
