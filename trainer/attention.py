"""Local (windowed) self-attention on a token grid, as in An et al. 2024.

Each query token attends only to the k x k tokens centred on it (k odd), clipped at the image
border, so a corner token sees ((k + 1) / 2)^2 keys. Tokens are row-major on a (height, width) grid.
This file holds the masks, the per-block window placements and the attention backends; the model
(`trainer/model.py`) only calls `attend`.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

PLACEMENTS = ("none", "head", "tail", "mix", "custom")
BACKENDS = ("auto", "dense", "flex")
GLOBAL = "G"  # how a global block is written in a schedule string

Grid = tuple[int, int]  # (height, width) in tokens


def check_window(window: object) -> int:
    """Return `window` if it is an odd int >= 1, else raise ValueError naming it."""
    # bool is an int subclass; True would silently mean a 1x1 window.
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"attention window must be an odd integer >= 1, got {window!r}")
    return window


def is_global(window: int | None, grid: Grid) -> bool:
    """True when the window sees every token: None, or at least 2 * max(height, width) - 1 wide.

    From any token the farthest one is max(height, width) - 1 rows/columns away, so a radius
    window // 2 of that size covers the whole grid.
    """
    return window is None or window >= 2 * max(grid) - 1


def window_mask(height: int, width: int, window: int) -> torch.BoolTensor:
    """(N, N) mask, N = height * width: True where query (row) may attend key (column).

    Query (r, c) sees key (r2, c2) iff |r - r2| <= window // 2 and |c - c2| <= window // 2.
    """
    radius = check_window(window) // 2
    rows = torch.arange(height).repeat_interleave(width)  # (N,) row of each row-major token
    cols = torch.arange(width).repeat(height)  # (N,)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= radius  # (N, N)
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius  # (N, N)
    return near_rows & near_cols


def block_windows(depth: int, placement: str, windows: list) -> list[int | None]:
    """Per-block windows for a `depth`-block model (None = global attention).

    none:   all global; `windows` is ignored.
    head:   windows on the first len(windows) blocks, in order (the paper's default).
    tail:   windows on the last len(windows) blocks, in order.
    mix:    local and global interleaved: windows on blocks 0, 2, 4, ... in order.
    custom: `windows` is the explicit per-block list, odd ints or None, length `depth`.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown attention placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"model depth must be an integer >= 1, got {depth!r}")
    if placement == "none":
        return [None] * depth
    windows = list(windows)
    if placement == "custom":
        return _custom_windows(depth, windows)
    for window in windows:
        check_window(window)
    slots = math.ceil(depth / 2) if placement == "mix" else depth
    if len(windows) > slots:
        where = " (mix puts windows on every other block)" if placement == "mix" else ""
        raise ValueError(
            f"placement {placement!r} puts {len(windows)} windows on a {depth}-block model; "
            f"use at most {slots}{where}"
        )
    schedule: list[int | None] = [None] * depth
    if placement == "head":
        schedule[: len(windows)] = windows
    elif placement == "tail":
        schedule[depth - len(windows) :] = windows
    else:  # mix
        schedule[0 : 2 * len(windows) : 2] = windows
    return schedule


def _custom_windows(depth: int, windows: list) -> list[int | None]:
    if len(windows) != depth:
        raise ValueError(
            f"placement 'custom' needs one window (or null for global) per block: "
            f"got {len(windows)} entries for a {depth}-block model"
        )
    return [None if window is None else check_window(window) for window in windows]


def schedule_string(windows: list[int | None]) -> str:
    """Readable per-block schedule, e.g. "3,5,7,9,11,13,G,G,G,G,G,G" (G = global)."""
    return ",".join(GLOBAL if window is None else str(window) for window in windows)


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Turn a requested backend name into the one that runs on `device`: "dense" or "flex".

    auto = flex on CUDA (block-sparse kernels skip masked tiles), dense elsewhere (FlexAttention
    has no backward on CPU, and dense-mask SDPA trains fine there).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "flex" if torch.device(device).type == "cuda" else "dense"
    return name


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, grid: Grid, backend: str
) -> torch.Tensor:
    """Windowed attention of q, k, v (B, heads, N, head_dim) on a row-major `grid` of N tokens.

    `backend` is a resolved name ("dense" or "flex", see `resolve_backend`).
    """
    if is_global(window, grid):
        # A window covering the grid is global attention; no mask lets SDPA use its fused kernels.
        return F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
    if backend == "dense":
        mask = _dense_mask(grid, window, q.device)  # (N, N), broadcast over batch and heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, head_dim)
    if backend == "flex":
        block_mask = _flex_block_mask(grid, window, q.device)
        return _flex_kernel(q.device.type)(q, k, v, block_mask=block_mask)  # (B, heads, N, head_dim)
    raise ValueError(f"attend() needs a resolved backend ('dense' or 'flex'), got {backend!r}")


# Masks depend only on (grid, window, device): build each once, not on every block call.
@functools.lru_cache(maxsize=64)
def _dense_mask(grid: Grid, window: int, device: torch.device) -> torch.Tensor:
    return window_mask(grid[0], grid[1], window).to(device)


@functools.lru_cache(maxsize=64)
def _flex_block_mask(grid: Grid, window: int, device: torch.device) -> BlockMask:
    width, radius = grid[1], window // 2

    def local(batch, head, q_idx, kv_idx):  # same rule as window_mask, on flat token indices
        near_rows = (q_idx // width - kv_idx // width).abs() <= radius
        near_cols = (q_idx % width - kv_idx % width).abs() <= radius
        return near_rows & near_cols

    tokens = grid[0] * grid[1]
    # B=None, H=None: one mask shared by every image and head.
    return create_block_mask(local, None, None, tokens, tokens, device=device)


@functools.lru_cache(maxsize=None)
def _flex_kernel(device_type: str):
    # Eager flex_attention materializes the full score matrix; only the compiled kernel is
    # block-sparse. Compile on CUDA; on CPU eager is kept for forward-only checks against dense.
    return torch.compile(flex_attention) if device_type == "cuda" else flex_attention
