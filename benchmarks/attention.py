"""Local attention must never cost more than global attention: measured, op by op and per training step.

    python benchmarks/attention.py                 # CPU: about 3 minutes on 2 cores
    python benchmarks/attention.py --device cuda   # CUDA: adds FlexAttention (block-sparse)

1. The attention op alone, forward + backward, for windows 3 to 13 on 16x16, 32x32 and 64x64 token
   grids (DiT-XS/1 heads: 4 x 63; the batch keeps about 8k tokens per call). For each window, global
   SDPA, dense-mask SDPA and the local backend `auto` picks on this device run interleaved, best of N;
   on CUDA FlexAttention is timed too. Prints time / global time for each.
2. A DiT-XS/1 training step at 32x32 (the trainer's own step) with the paper's head windows
   (3,5,7,9,11,13 on the first six blocks), with `auto` and with `dense`, against the same model with
   global attention, all interleaved in one process.

Prints, last, the ratios the targets are about:
  CPU:  step_local_over_global (target <= 1.05)
  CUDA: step_local_over_global (<= 1.0) and step_dense_over_blocksparse (>= 1.3)
"""

from __future__ import annotations

import argparse

import torch
from _common import (  # first: puts the repository root on sys.path
    add_device_options,
    best_times,
    device_from,
    machine,
)
from train_step import PAPER_WINDOWS, build_trainer

from trainer.attention import attend, band_rows_per_tile, resolve_backend

WINDOWS = (3, 5, 7, 9, 11, 13)
GRIDS = (16, 32, 64)
HEADS, HEAD_DIM = 4, 63  # DiT-XS/1: width 252, 4 heads
TOKENS_PER_CALL = 8192


def op_candidates(side: int, window: int, device: torch.device) -> dict:
    """Forward + backward closures over one set of q, k, v for each backend worth timing."""
    batch = max(1, TOKENS_PER_CALL // (side * side))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (
        torch.randn(batch, HEADS, side * side, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
        for _ in range(3)
    )
    grid = (side, side)

    def run(backend: str | None):
        def step() -> None:
            out = attend(q, k, v, None if backend is None else window, grid, backend or "dense")
            out.backward(torch.ones_like(out))
            q.grad = k.grad = v.grad = None

        return step

    candidates = {"global": run(None), "dense": run("dense")}
    local = resolve_backend("auto", device)
    if local != "dense":
        candidates[local] = run(local)
    return candidates


def describe(side: int, window: int, backend: str) -> str:
    if backend == "banded":
        rows = band_rows_per_tile((side, side), window)
        return f"banded({rows} rows/tile)" if rows else "banded(-> dense)"
    return backend


def attention_ops(device: torch.device, repeats: int, grids: tuple[int, ...] = GRIDS) -> None:
    local = resolve_backend("auto", device)
    print(f"attention op, forward + backward, {HEADS} heads x {HEAD_DIM}, ~{TOKENS_PER_CALL} tokens per call; "
          f"time / global time (best of {repeats}, interleaved); auto = {local}")
    print(f"{'grid':>6} {'window':>6} {'global ms':>10} {'dense':>7} {'auto':>7}  auto path")
    worst = 0.0
    for side in grids:
        for window in WINDOWS:
            best = best_times(op_candidates(side, window, device), repeats, warmup=1, device=device)
            auto = best.get(local, best["dense"]) / best["global"]
            worst = max(worst, auto)
            print(
                f"{side:>4}^2 {window:>6} {best['global'] * 1e3:>10.1f} {best['dense'] / best['global']:>7.2f} "
                f"{auto:>7.2f}  {describe(side, window, local)}",
                flush=True,
            )
    print(f"op_auto_over_global_worst={worst:.2f}")


def training_steps(device: torch.device, repeats: int, batch_size: int) -> tuple[dict[str, float], dict[str, float]]:
    """Best step time (wall, CPU) of DiT-XS/1 at 32x32: head windows with auto and dense, and global."""
    trainers = {
        "global": build_trainer("DiT-XS/1", 32, "none", [], batch_size, "auto", device=device),
        "local_auto": build_trainer("DiT-XS/1", 32, "head", PAPER_WINDOWS, batch_size, "auto", device=device),
        "local_dense": build_trainer("DiT-XS/1", 32, "head", PAPER_WINDOWS, batch_size, "dense", device=device),
    }
    steps = {name: trainer.train_step for name, trainer in trainers.items()}
    cpu: dict[str, float] = {}
    wall = best_times(steps, repeats, warmup=1, device=device, cpu_times=cpu)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each op (best is kept)")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps of each model")
    parser.add_argument("--batch-size", type=int, default=4, help="training batch for the step comparison")
    parser.add_argument("--skip-ops", action="store_true", help="only the training-step comparison")
    parser.add_argument("--grids", type=int, nargs="+", default=list(GRIDS), help="grid sides of the op table")
    add_device_options(parser, threads_help="torch threads (0 = torch's default; 1 = a 1-CPU trial)")
    args = parser.parse_args()
    device = device_from(args)

    print(f"machine: {machine(device)}")
    if not args.skip_ops:
        attention_ops(device, args.repeats, tuple(args.grids))
    best, cpu = training_steps(device, args.steps, args.batch_size)
    local = resolve_backend("auto", device)
    print(f"DiT-XS/1 32x32 training step, batch {args.batch_size}, best of {args.steps} (interleaved): "
          f"global {best['global']:.3f} s, head windows auto ({local}) {best['local_auto']:.3f} s, "
          f"head windows dense {best['local_dense']:.3f} s")
    if device.type == "cpu":  # CPU time: steadier under other tenants' load (see _common.best_times)
        print(f"  by process CPU time: local auto / global {cpu['local_auto'] / cpu['global']:.3f}, "
              f"local dense / global {cpu['local_dense'] / cpu['global']:.3f}")
    print(f"step_dense_over_global={best['local_dense'] / best['global']:.3f}")
    if device.type == "cuda":
        print(f"step_dense_over_blocksparse={best['local_dense'] / best['local_auto']:.3f} (target >= 1.3)")
    print(f"step_local_over_global={best['local_auto'] / best['global']:.3f} "
          f"(target <= {'1.0' if device.type == 'cuda' else '1.05'})")

if __name__ == "__main__":
    main()
