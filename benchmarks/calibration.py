"""The plan's time estimate without torch.optim: its calibration step against a torch.optim AdamW step.

    python benchmarks/calibration.py

`plan` and `launch` time a few training steps to estimate a sweep's duration, with the trainer's own
AdamW (trainer.optim: torch's fused AdamW kernel called without torch.optim, whose first use imports
torch's compiler stack, 2 to 3 s of CPU). This times that step (orchestrator.plan.CalibrationStep)
against forward + backward + `torch.optim.AdamW(fused=True).step()` on the same model shapes,
interleaved, best of N, and prints the ratio per model (target: within 5% of 1).
"""

from __future__ import annotations

import argparse
import copy

import _common  # first: puts the repository root on sys.path
import torch
from _common import best_times, machine

from orchestrator.plan import CalibrationStep
from trainer.diffusion import linear_schedule, training_loss
from trainer.model import build_dit

CASES = [("DiT-P/1", 8, 16, 6), ("DiT-T/1", 8, 8, 12), ("DiT-T/1", 16, 16, 12)]  # size, image, batch, blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(machine())
    for size, image, batch, blocks in CASES:
        model = build_dit(size, image_size=image, in_channels=3, windows=[3, 5, 7] + [None] * (blocks - 3))
        written_out = CalibrationStep(model, image, batch)
        reference = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-4, weight_decay=0.01, fused=True)
        schedule = linear_schedule()

        def torch_step() -> None:
            optimizer.zero_grad(set_to_none=True)
            training_loss(reference, schedule, written_out.x0).backward()
            optimizer.step()

        best = best_times({"calibration": written_out, "torch.optim": torch_step}, repeats=args.repeats, warmup=2)
        ratio = best["calibration"] / best["torch.optim"]
        print(f"{size} {image}x{image} batch {batch}: calibration step {best['calibration'] * 1e3:.1f} ms, "
              f"torch.optim.AdamW step {best['torch.optim'] * 1e3:.1f} ms, ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
