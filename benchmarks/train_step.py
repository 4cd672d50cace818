"""Training throughput of one DiT configuration, as a share of this machine's matmul peak.

    python benchmarks/train_step.py --size DiT-XS/1 --image-size 32 --placement head
    python benchmarks/train_step.py --size DiT-S/1 --image-size 32 --placement none --batch-size 16

The steps are the trainer's own (`trainer.train.Trainer.train_step`: batch gathered from a uint8
subset already on the device, forward, loss, backward, gradient clipping, fused AdamW, EMA) on
random images. Each step is timed alone, interleaved with a large matmul (fp32 on CPU, bf16 on
CUDA), and each is the best of N: the share of peak is a ratio of two things measured in one
process. Achieved FLOP/s counts 3x the model's forward FLOPs (`DiT.flops_per_image`) per image.
The fused AdamW step is also timed against the foreach AdamW it replaced.

Prints, last: `images_per_sec=... peak_share=...`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import (  # first: puts the repository root on sys.path
    add_device_options,
    best_times,
    device_from,
    machine,
)
from pydantic import ValidationError

from trainer.attention import BACKENDS, resolve_backend
from trainer.config import TrialConfig
from trainer.pool import Subsets
from trainer.train import Trainer

PAPER_WINDOWS = [3, 5, 7, 9, 11, 13]


def build_trainer(
    size: str,
    image_size: int,
    placement: str,
    windows: list[int | None],
    batch_size: int,
    backend: str = "auto",
    compile: bool = False,
    device: torch.device | str = "cpu",
    num_images: int = 1024,
) -> Trainer:
    """A `Trainer` on `num_images` random uint8 images already on `device`."""
    device = torch.device(device)
    tree = {
        "model": {"size": size},
        "attention": {"placement": placement, "windows": windows, "backend": backend},
        "data": {"image_size": image_size},
        "train": {"batch_size": batch_size, "compile": compile, "warmup_steps": 0},
    }
    try:
        config = TrialConfig.model_validate(tree)
    except ValidationError:  # a backend the config does not list (yet): build with auto, then set it
        tree["attention"]["backend"] = "auto"
        config = TrialConfig.model_validate(tree)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (num_images, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    trainer = Trainer(config, device, Subsets(train=images.to(device), test=images[:64].to(device)))
    if config.attention.backend != backend:
        trainer.model.use_attention_backend(backend)
    return trainer


def flops_per_step(trainer: Trainer) -> float:
    """Training FLOPs of one step: forward + backward (twice the forward) for every image."""
    return 3.0 * trainer.model.flops_per_image() * trainer.config.train.batch_size


def optimizer_step_times(trainer: Trainer, steps: int, device: torch.device) -> dict[str, float]:
    """Best time of the trainer's AdamW step (fused) and of the foreach AdamW it replaced, interleaved,
    on the trainer's parameters and their current gradients (run after a training step)."""
    params = [p for p in trainer.model.parameters() if p.grad is not None]
    lr, weight_decay = trainer.config.train.lr, trainer.config.train.weight_decay
    foreach = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    return best_times({"fused": trainer.optimizer.step, "foreach": foreach.step}, steps, warmup=1, device=device)


def parse_windows(values: list[str]) -> list[int | None]:
    return [None if value.upper() in ("G", "NULL", "NONE") else int(value) for value in values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="DiT-XS/1", help="model size, e.g. DiT-XS/1, DiT-S/1")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--placement", default="head", choices=["none", "head", "mix", "tail", "custom"])
    parser.add_argument("--windows", nargs="+", default=[str(w) for w in PAPER_WINDOWS],
                        help="odd window sizes; with --placement custom one per block, G = global")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (best of these is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    add_device_options(parser)
    args = parser.parse_args()
    device = device_from(args)
    trainer = build_trainer(
        args.size, args.image_size, args.placement, parse_windows(args.windows), args.batch_size,
        args.backend, args.compile, device,
    )
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    step_times: list[float] = []

    def step() -> None:
        start = time.perf_counter()
        trainer.train_step()  # ends in loss.item(): the step is finished when it returns
        step_times.append(time.perf_counter() - start)

    compile_start = time.perf_counter()
    for _ in range(args.warmup):
        trainer.train_step()
    warmup_s = time.perf_counter() - compile_start
    step_times.clear()
    best = best_times({"step": step, "matmul": lambda: a @ a}, args.steps, warmup=0, device=device)
    peak = 2 * size**3 / best["matmul"]
    achieved = flops_per_step(trainer) / best["step"]
    images_per_sec = args.batch_size / best["step"]

    print(f"machine: {machine(device)}")
    print(
        f"model: {args.size} at {args.image_size}x{args.image_size}, schedule {trainer.model.schedule}, "
        f"attention backend {args.backend} -> {resolve_backend(args.backend, device)}, batch {args.batch_size}, "
        f"compile {args.compile}, {torch.get_num_threads()} threads"
    )
    print(f"warmup: {args.warmup} steps in {warmup_s:.1f} s")
    print(f"step: best {best['step']:.3f} s, median {statistics.median(step_times):.3f} s over {args.steps} steps")
    print(f"training FLOPs per step: {flops_per_step(trainer) / 1e9:.1f} GFLOP (3x forward, matmuls only)")
    print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s ({'bf16' if device.type == 'cuda' else 'fp32'} {size}^3, best of {args.steps})")
    print(f"achieved: {achieved / 1e9:.1f} GFLOP/s")
    optimizer = optimizer_step_times(trainer, args.steps, device)
    print(
        f"optimizer step: fused AdamW {optimizer['fused'] * 1e3:.1f} ms, foreach AdamW "
        f"{optimizer['foreach'] * 1e3:.1f} ms ({optimizer['foreach'] / optimizer['fused']:.2f}x), "
        f"{optimizer['fused'] / best['step']:.1%} of the step"
    )
    print(f"images_per_sec={images_per_sec:.2f} peak_share={achieved / peak:.3f}")


if __name__ == "__main__":
    main()
