"""What evaluation costs as a share of a trial at the paper-scale defaults, from measured unit costs.

    python benchmarks/eval_cost.py                                     # search_spaces/paper/placement_xs.yaml
    python benchmarks/eval_cost.py --spec search_spaces/paper/placement_s.yaml --size DiT-S/1

A paper-scale trial (100k steps of batch 128) cannot run here, so this measures the unit costs on
the spec's model in one process, interleaved, best of N:
  - a training step (the trainer's own), per image;
  - a denoiser forward of the EMA model in evaluation (`psnr_gap_curve` and `ddim_sample` on a batch),
    per image and step;
  - the FID Inception network (random weights of the real shapes) on 32x32 images resized inside
    the network, per image;
  - the attention-locality analysis (`trainer.locality`), per timestep;
and multiplies them by the counts the spec's defaults imply per trial:
  - training: train.steps x train.batch_size images;
  - evaluations: at every eval.every steps and at the end;
  - PSNR gap: (the fixed held-out set + min(eval.psnr_gap.images, N) training images) x timesteps forwards;
  - FID: eval.fid.samples x eval.fid.steps DDIM forwards + eval.fid.samples Inception images (the
    reference features are cached on disk across trials; counted once per trial here, to be safe);
  - the sample grid: eval.samples.grid^2 x eval.samples.steps forwards; locality: its timesteps.
The batch sizes of the measurement are smaller than the spec's (CPU memory); per-image costs change
little above a few dozen 1,024-token images. Prints, last: `eval_share=...` (target < 0.15), and the
share under the alternative defaults this script proposes.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import _common  # first: puts the repository root on sys.path
import torch
import yaml
from _common import add_device_options, best_times, device_from, machine
from train_step import build_trainer

from trainer.config import TrialConfig, build_config
from trainer.diffusion import ddim_sample, linear_schedule, spread_timesteps
from trainer.fid import extract_features
from trainer.inception import FIDInceptionV3
from trainer.locality import attention_locality
from trainer.metrics import psnr_gap_curve
from trainer.train import to_model_scale


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per unit, measured."""

    train_image: float  # one image through a training step
    forward_image: float  # one image through one denoiser forward, evaluation (no grad)
    inception_image: float  # one image through the FID Inception network
    locality_timestep: float  # the locality analysis at one timestep


def measure(config: TrialConfig, device: torch.device, args: argparse.Namespace) -> tuple[UnitCosts, dict]:
    """Unit costs of the config's model, and the raw best times they come from."""
    size, image_size = config.model.size, config.data.image_size
    placement, windows = config.attention.placement, list(config.attention.windows)
    compile = config.train.compile and device.type == "cuda"  # on CPU compiling does not pay (RESULTS.md)
    trainer = build_trainer(size, image_size, placement, windows, args.train_batch, "auto", compile, device)
    ema, schedule = trainer.ema, trainer.schedule
    batch = args.eval_batch
    images = to_model_scale(trainer.subsets.train[:batch])  # (b, C, H, W) in [-1, 1]
    noise = torch.randn(images.shape, device=device)
    unit = torch.rand(args.inception_batch, 3, image_size, image_size)
    inception = FIDInceptionV3().eval()
    locality_images = to_model_scale(trainer.subsets.test[:8])

    # Evaluation runs in fp32 with autocast off, whatever the training precision (DESIGN.md's
    # measurement rules; `Trainer.fp32`): on CUDA that is the slower side, and it is what a trial pays.
    def psnr() -> None:  # 2 sides x batch images x 1 timestep
        with trainer.fp32():
            psnr_gap_curve(ema, schedule, images, images, 1, batch)

    def ddim() -> None:  # batch images x 2 steps
        with trainer.fp32():
            ddim_sample(ema, schedule, noise, 2)

    def locality() -> None:
        with trainer.fp32():
            attention_locality(ema, schedule, locality_images, [500])

    candidates = {
        "train": trainer.train_step,
        "psnr": psnr,
        "ddim": ddim,
        "inception": lambda: extract_features(inception, unit, args.inception_batch, device),
        "locality": locality,
    }
    best = best_times(candidates, args.repeats, warmup=1, device=device)
    return UnitCosts(
        train_image=best["train"] / args.train_batch,
        forward_image=min(best["psnr"], best["ddim"]) / (2 * batch),
        inception_image=best["inception"] / args.inception_batch,
        locality_timestep=best["locality"],
    ), best


def evaluations(config: TrialConfig) -> int:
    steps, every = config.train.steps, config.eval.every
    if every == 0:
        return 1
    return steps // every + (1 if steps % every else 0)


def trial_seconds(config: TrialConfig, costs: UnitCosts, num_images: int) -> dict[str, float]:
    """Modelled seconds per trial: training and each part of evaluation."""
    ev = config.eval
    count = evaluations(config)
    # The held-out side is a fixed set of min(images, test_images) images; the train side min(images, N).
    held_out = min(ev.psnr_gap.images, config.data.test_images)
    psnr_forwards = (held_out + min(ev.psnr_gap.images, num_images)) * psnr_timesteps(config)
    parts = {
        "train": config.train.steps * config.train.batch_size * costs.train_image,
        "psnr_gap": count * psnr_forwards * costs.forward_image,
        "fid_sampling": count * ev.fid.samples * ev.fid.steps * costs.forward_image if ev.fid.enabled else 0.0,
        "fid_inception": (count + 1) * ev.fid.samples * costs.inception_image if ev.fid.enabled else 0.0,
        "sample_grid": count * ev.samples.grid**2 * ev.samples.steps * costs.forward_image,
        "locality": count * len(ev.locality.timesteps) * math.ceil(ev.locality.images / 8) * costs.locality_timestep
        if ev.locality.enabled else 0.0,
    }
    return parts


def psnr_timesteps(config: TrialConfig) -> int:
    """How many distinct timesteps the PSNR gap is measured at (spread over the schedule)."""
    schedule = linear_schedule(config.diffusion.timesteps)
    return len(spread_timesteps(schedule, config.eval.psnr_gap.timesteps))


def share(parts: dict[str, float]) -> float:
    evaluation = sum(v for k, v in parts.items() if k != "train")
    return evaluation / (evaluation + parts["train"])


def with_overrides(base: dict, overrides: dict) -> TrialConfig:
    tree = yaml.safe_load(yaml.safe_dump(base))  # deep copy
    for dotted, value in overrides.items():
        node = tree
        *path, leaf = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return build_config(tree)


# Alternatives that keep the science (the same PSNR-gap curve at fewer checkpoints, FID of the same
# 10k samples with fewer DDIM steps) and cut the evaluation bill; the first that meets the target is
# proposed. Each maps the spec's config to overrides.
ALTERNATIVES = {
    "current defaults": lambda c: {},
    "evaluate half as often (eval.every x2)": lambda c: {"eval.every": 2 * c.eval.every},
    "FID with half the DDIM steps": lambda c: {"eval.fid.steps": max(1, c.eval.fid.steps // 2)},
    "both": lambda c: {"eval.every": 2 * c.eval.every, "eval.fid.steps": max(1, c.eval.fid.steps // 2)},
}


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(_common.ROOT / "search_spaces/paper/placement_xs.yaml"))
    parser.add_argument("--placement", default="head", help="the grid point to price (placement axis)")
    parser.add_argument("--num-images", type=int, default=10000, help="the grid point to price (N)")
    parser.add_argument("--train-batch", type=int, default=0,
                        help="training batch of the measurement (0 = 8 on CPU, the spec's on CUDA)")
    parser.add_argument("--eval-batch", type=int, default=0,
                        help="evaluation batch of the measurement (0 = 16 on CPU, the spec's PSNR batch on CUDA)")
    parser.add_argument("--inception-batch", type=int, default=0, help="0 = 16 on CPU, the spec's FID batch on CUDA")
    parser.add_argument("--repeats", type=int, default=3)
    add_device_options(parser)
    args = parser.parse_args()
    device = device_from(args)

    with open(args.spec) as handle:
        base = yaml.safe_load(handle)["base"]
    base.setdefault("attention", {})["placement"] = args.placement
    base.setdefault("data", {})["num_images"] = args.num_images
    config = build_config(base)
    # A GPU at batch 8 measures kernel launches, not work: there the spec's own batch sizes are used.
    on_gpu = device.type == "cuda"
    args.train_batch = args.train_batch or (config.train.batch_size if on_gpu else 8)
    args.eval_batch = args.eval_batch or (config.eval.psnr_gap.batch_size if on_gpu else 16)
    args.inception_batch = args.inception_batch or (config.eval.fid.batch_size if on_gpu else 16)
    costs, _ = measure(config, device, args)

    print(f"machine: {machine(device)}")
    print(f"spec {args.spec}: {config.model.size}, placement {args.placement}, N={args.num_images}, "
          f"{config.train.steps} steps x batch {config.train.batch_size}, {evaluations(config)} evaluations")
    print(f"unit costs (best of {args.repeats}, interleaved): training {costs.train_image * 1e3:.1f} ms/image "
          f"(batch {args.train_batch}); denoiser forward {costs.forward_image * 1e3:.2f} ms/image "
          f"(batch {args.eval_batch}); Inception {costs.inception_image * 1e3:.2f} ms/image; "
          f"locality {costs.locality_timestep:.2f} s/timestep")
    print(f"forward / training cost per image: {costs.forward_image / costs.train_image:.3f} (3x FLOPs would be 0.333)")
    parts = trial_seconds(config, costs, args.num_images)
    total = sum(parts.values())
    print("modelled trial on this machine: " + ", ".join(f"{k} {duration(v)} ({v / total:.1%})" for k, v in parts.items()))
    fid = config.eval.fid
    fid_text = (f"FID {fid.samples} samples x {fid.steps} DDIM steps (batch {fid.batch_size})" if fid.enabled
                else "FID off")
    print(f"  chosen: PSNR gap at {psnr_timesteps(config)} timesteps x {config.eval.psnr_gap.images} images "
          f"per side (batch {config.eval.psnr_gap.batch_size}); {fid_text}; sample grid "
          f"{config.eval.samples.grid}x{config.eval.samples.grid} x {config.eval.samples.steps} DDIM steps; "
          f"every {config.eval.every} steps")
    proposed = None
    for name, overrides in ALTERNATIVES.items():
        alternative = with_overrides(base, overrides(config))
        value = share(trial_seconds(alternative, costs, args.num_images))
        marker = ""
        if proposed is None and value < 0.15:
            proposed, marker = name, "  <- proposed" if overrides(config) else "  <- meets the target"
        print(f"  {name}: eval_share={value:.3f}{marker}")
    print(f"eval_share={share(parts):.3f} (target < 0.15)")


if __name__ == "__main__":
    main()
