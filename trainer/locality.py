"""How local is each block's attention, measured (An et al. 2024 only show attention maps).

The model's attention maps on noised held-out images, at a few diffusion steps, are summarized per
block b (numbered from 0, as in the schedule string `3,5,7,G,...`):

- `attn_distance.block_b`: the attention-weighted mean distance between a query and its keys, in
  tokens: sum_k P[q, k] * |pos(q) - pos(k)| (Euclidean on the token grid), averaged over queries,
  heads, images and timesteps. Uniform global attention on a 32x32 grid is about 14; a 3x3 window
  is at most sqrt(2).
- `attn_local3.block_b`, `attn_local7.block_b`: the share of the attention mass on keys inside the
  3x3 / 7x7 neighbourhood of the query (at most 1 / 3 rows and columns away), averaged the same way.

A block restricted to a k x k window keeps all its mass inside it, so attn_local3 = 1 for k = 3; a
global block shows where attention goes when nothing restricts it.

`query_maps` keeps the maps themselves for a picture: where a few query tokens of one held-out image
attend, per block (mean over heads), saved as `attention_queries.npz` / `.png` with each evaluation.

Each query row is normalized by its own total mass in float64 (a float32 softmax row sums to 1 only
up to rounding), and a share is computed as 1 - (mass outside) / (total mass): a sum of non-negative
terms subtracted from 1, which IEEE rounding can never push above 1, and whose mean stays <= 1.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from trainer.diffusion import Schedule, q_sample
from trainer.model import DiT
from trainer.records import NEIGHBOURHOODS, QUERIES_NPZ, QUERIES_PNG
from trainer.tiles import query_tiles, tiles_png

# Noise for the analysis is fixed, as for the PSNR gap: trials differ only by their model.
LOCALITY_NOISE_SEED = 20240202
# Images per forward pass: the maps are (images, heads, N, N), 200 MB for 8 images of DiT-S/1 at 32x32.
_CHUNK = 8


def token_geometry(grid: tuple[int, int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(N, N) Euclidean distance in tokens between row-major grid positions, and per k in
    NEIGHBOURHOODS an (N, N) float mask of the pairs at most k // 2 rows and columns apart."""
    rows = torch.arange(grid[0]).repeat_interleave(grid[1]).double()  # (N,)
    cols = torch.arange(grid[1]).repeat(grid[0]).double()  # (N,)
    d_rows = (rows[:, None] - rows[None, :]).abs()  # (N, N)
    d_cols = (cols[:, None] - cols[None, :]).abs()  # (N, N)
    distance = (d_rows**2 + d_cols**2).sqrt()
    near = {k: ((d_rows <= k // 2) & (d_cols <= k // 2)).double() for k in NEIGHBOURHOODS}
    return distance, near


def row_sums(
    probs: torch.Tensor, distance: torch.Tensor, near: dict[int, torch.Tensor]
) -> torch.Tensor:
    """Summed over all query rows of attention maps `probs` (B, heads, N, N): the mean key distance and,
    per k in NEIGHBOURHOODS, the share of mass inside the k x k neighbourhood; float64 (1 + len(NEIGHBOURHOODS),).
    Each row is normalized by its own total in float64, and a share is 1 - outside / total, so no row's
    share exceeds 1 however the float32 softmax rounded (see the module docstring)."""
    probs = probs.double()
    total = probs.sum(dim=-1)  # (B, heads, N)
    out = [(torch.einsum("bhqk,qk->bhq", probs, distance.double()) / total).sum()]
    for k in NEIGHBOURHOODS:
        outside = torch.einsum("bhqk,qk->bhq", probs, 1.0 - near[k].double())  # >= 0: a sum of p >= 0
        out.append((1.0 - outside / total).sum())
    return torch.stack(out).cpu()


@torch.no_grad()
def attention_locality(
    model: DiT, schedule: Schedule, images: torch.Tensor, timesteps: list[int]
) -> dict[str, float]:
    """Per-block locality metrics (see the module docstring) of `model` on clean `images`
    (N, C, H, W) in [-1, 1], noised with fixed noise to each of `timesteps`.

    A class-conditional model is asked for its unconditional prediction (the null class), as in the
    PSNR gap. The maps come from each block's own `attention_probs`, fed the block's actual input by
    a forward pre-hook, so they are exactly what the block applies.
    """
    distance, near = token_geometry(model.grid)
    distance = distance.to(images.device)
    near = {k: mask.to(images.device) for k, mask in near.items()}
    # Per block: summed distance, then summed mass inside each neighbourhood, over all query rows.
    sums = torch.zeros(len(model.blocks), 1 + len(NEIGHBOURHOODS), dtype=torch.float64)
    rows = 0

    def capture(index: int):
        def hook(module, args) -> None:
            sums[index] += row_sums(module.attention_probs(args[0]), distance, near)

        return hook

    handles = [block.attn.register_forward_pre_hook(capture(i)) for i, block in enumerate(model.blocks)]
    try:
        generator = torch.Generator().manual_seed(LOCALITY_NOISE_SEED)
        for t in timesteps:
            # Drawn on the CPU so the noise is the same on every device.
            noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
            for start in range(0, images.shape[0], _CHUNK):
                x0 = images[start : start + _CHUNK]
                t_batch = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
                model(q_sample(schedule, x0, t_batch, noise[start : start + _CHUNK]), t_batch, None)
                rows += x0.shape[0] * model.heads * model.grid[0] * model.grid[1]
    finally:
        for handle in handles:
            handle.remove()
    means = sums / rows
    metrics: dict[str, float] = {}
    for b in range(len(model.blocks)):
        metrics[f"attn_distance.block_{b}"] = float(means[b, 0])
        for j, k in enumerate(NEIGHBOURHOODS, start=1):
            metrics[f"attn_local{k}.block_{b}"] = float(means[b, j])
    return metrics




def query_tokens(grid: tuple[int, int]) -> list[tuple[int, int]]:
    """Three (row, col) query tokens: the centre, the upper-left quarter, and the lower middle."""
    rows, cols = grid
    return [(rows // 2, cols // 2), (rows // 4, cols // 4), (3 * rows // 4, cols // 2)]


@torch.no_grad()
def query_maps(model: DiT, schedule: Schedule, image: torch.Tensor, t: int) -> np.ndarray:
    """Attention of each block (mean over heads) from each of `query_tokens` of one clean `image` (C, H, W)
    in [-1, 1], noised to step t with the fixed locality noise: float32 (blocks, queries, rows, cols)."""
    rows, cols = model.grid
    index = torch.tensor([r * cols + c for r, c in query_tokens(model.grid)])
    maps = [None] * len(model.blocks)

    def capture(i: int):
        def hook(module, args) -> None:
            probs = module.attention_probs(args[0])[0].mean(dim=0)  # (N, N), mean over heads
            maps[i] = probs[index.to(probs.device)].reshape(len(index), rows, cols).float().cpu()

        return hook

    handles = [block.attn.register_forward_pre_hook(capture(i)) for i, block in enumerate(model.blocks)]
    try:
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(LOCALITY_NOISE_SEED))
        t_batch = torch.full((1,), t, device=image.device, dtype=torch.long)
        model(q_sample(schedule, image[None], t_batch, noise[None].to(image.device, image.dtype)), t_batch, None)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(maps).numpy()


def save_query_maps(directory: Path, maps: np.ndarray, grid: tuple[int, int], t: int) -> None:
    """QUERIES_NPZ and QUERIES_PNG (each map scaled to its own maximum, the query token marked mid-grey)."""
    from trainer.storage import write_atomically

    queries = query_tokens(grid)
    buffer = io.BytesIO()
    np.savez(buffer, maps=maps, queries=np.asarray(queries), timestep=np.asarray(t))
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / QUERIES_NPZ, buffer.getvalue())
    write_atomically(directory / QUERIES_PNG, tiles_png(query_tiles(maps, queries)))
