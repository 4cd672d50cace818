"""Local (windowed) self-attention on a token grid, as in An et al. 2024.

Each query token attends only to the k x k tokens centred on it (k odd), clipped at the image
border, so a corner token sees ((k + 1) / 2)^2 keys. Tokens are row-major on a (height, width) grid.
This file holds the masks, the per-block window placements and the attention backends; the model
(`trainer/model.py`) only calls `attend`.

Backends, all computing the same masked softmax attention:
- dense:  SDPA with the full (N, N) mask. The reference; costs as much as global attention.
- banded: the query grid is cut into tiles of whole rows, and each tile attends only to the band of
          key rows its windows can reach, with a small mask on that band. Same math as dense, a
          fraction of its work; the fast path on CPU.
- flex:   FlexAttention with a block mask; block-sparse when compiled on CUDA (no CPU backward).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# Re-exported: the schedules and the windows' geometry live in a module without torch, so configs
# validate and a sweep's memory is estimated (orchestrator's checks) without importing it.
from trainer.schedule import (  # noqa: F401
    BAND_ENTRY_COST,
    BAND_TOKEN_COST,
    GLOBAL,
    PLACEMENTS,
    Grid,
    band_rows_per_tile,
    block_windows,
    check_window,
    flex_head_dim,
    is_global,
    schedule_string,
)

BACKENDS = ("auto", "dense", "banded", "flex")


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


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Turn a requested backend name into the one that runs on `device`: "dense", "banded" or "flex".

    auto = flex on CUDA (block-sparse kernels skip masked tiles), banded elsewhere (FlexAttention has
    no backward on CPU, and dense-mask SDPA does all the work of global attention; see
    benchmarks/attention.py).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "flex" if torch.device(device).type == "cuda" else "banded"
    return name


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, grid: Grid, backend: str
) -> torch.Tensor:
    """Windowed attention of q, k, v (B, heads, N, head_dim) on a row-major `grid` of N tokens.

    `backend` is a resolved name ("dense", "banded" or "flex", see `resolve_backend`).
    """
    if is_global(window, grid):
        # A window covering the grid is global attention; no mask lets SDPA use its fused kernels.
        return F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
    if backend == "banded":
        rows = band_rows_per_tile(grid, window)
        if rows is not None:
            return banded_attention(q, k, v, window, grid, rows)  # (B, heads, N, head_dim)
        backend = "dense"  # the band would cover (nearly) the whole grid: nothing to skip
    if backend == "dense":
        mask = _dense_mask(grid, window, q.device)  # (N, N), broadcast over batch and heads
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, head_dim)
    if backend == "flex":
        return flex_windowed(q, k, v, window, grid)  # (B, heads, N, head_dim)
    raise ValueError(f"attend() needs a resolved backend ('dense', 'banded' or 'flex'), got {backend!r}")


# Masks depend only on (grid, window, device): build each once, not on every block call.
@functools.lru_cache(maxsize=64)
def _dense_mask(grid: Grid, window: int, device: torch.device) -> torch.Tensor:
    return window_mask(grid[0], grid[1], window).to(device)


# Block masks, built once per (grid, window, device). A plain table, not functools.lru_cache: dynamo
# traces straight through an lru_cache wrapper (rebuilding the mask inside every compiled forward),
# while an entry already in this table is read as a constant of the graph. `DiT.prepare_attention`
# fills it before `torch.compile` traces the model.
_FLEX_MASKS: dict[tuple[Grid, int, str], BlockMask] = {}


def flex_block_mask(grid: Grid, window: int, device: torch.device | str) -> BlockMask:
    """FlexAttention's block mask for `window` on `grid`, on `device` (built on first use, then kept)."""
    key = (grid, window, str(device))
    mask = _FLEX_MASKS.get(key)
    if mask is None:
        mask = _FLEX_MASKS[key] = _build_flex_block_mask(grid, window, torch.device(device))
    return mask


def _build_flex_block_mask(grid: Grid, window: int, device: torch.device) -> BlockMask:
    width, radius = grid[1], window // 2

    def local(batch, head, q_idx, kv_idx):  # same rule as window_mask, on flat token indices
        near_rows = (q_idx // width - kv_idx // width).abs() <= radius
        near_cols = (q_idx % width - kv_idx % width).abs() <= radius
        return near_rows & near_cols

    tokens = grid[0] * grid[1]
    # B=None, H=None: one mask shared by every image and head.
    return create_block_mask(local, None, None, tokens, tokens, device=device)


def flex_windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, grid: Grid) -> torch.Tensor:
    """Windowed attention through FlexAttention; q, k, v (B, heads, N, head_dim).

    Head dims that are not a power of two (DiT-XS/1: 252 / 4 = 63) are zero-padded to the next one:
    FlexAttention's kernels tile the head dim in powers of two, and some torch releases in our range
    refuse other sizes outright. Zero columns change no dot product q.k, and the padded output
    columns (zero weights times zero values) are dropped; the softmax scale stays 1/sqrt(head_dim).
    """
    head_dim = q.shape[-1]
    padded = flex_head_dim(head_dim)
    block_mask = flex_block_mask(grid, window, q.device)
    # Inside a model being compiled, flex_attention is compiled with the rest of the graph; called
    # eagerly (evaluation, an uncompiled model) it goes through our own compiled kernel.
    kernel = flex_attention if torch.compiler.is_compiling() else _flex_kernel(q.device.type)
    if padded == head_dim:
        return kernel(q, k, v, block_mask=block_mask)
    q, k, v = (F.pad(t, (0, padded - head_dim)) for t in (q, k, v))
    out = kernel(q, k, v, block_mask=block_mask, scale=1.0 / math.sqrt(head_dim))
    return out[..., :head_dim]


# Each window is its own mask function, so the compiled kernel is specialized once per window,
# dtype (bf16 training, fp32 evaluation) and grad mode: the paper's six windows need 24 variants,
# beyond dynamo's default budget of 8 per function, past which it would silently run eager
# FlexAttention (the full score matrix, every tile computed).
FLEX_RECOMPILE_LIMIT = 64


@functools.lru_cache(maxsize=None)
def _flex_kernel(device_type: str):
    # Eager flex_attention materializes the full score matrix; only the compiled kernel is
    # block-sparse. Compile on CUDA; on CPU eager is kept for forward-only checks against dense.
    if device_type != "cuda":
        return flex_attention
    import torch._dynamo  # only on CUDA: importing the compiler costs seconds of CPU per process

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    return torch.compile(flex_attention)


# ---- banded: row tiles against the key rows they can reach -------------------------------------
#
# Cut the grid into tiles of `rows` query rows (padded at the bottom when `rows` does not divide the
# height). Tile i holds query rows [i*rows, (i+1)*rows); its windows reach key rows
# [i*rows - radius, (i+1)*rows + radius), a band of rows + 2*radius rows. With the keys padded by
# `radius` zero rows above and below, band i starts at padded row i*rows: the bands are overlapping,
# evenly strided views of one tensor, so gathering them copies nothing. SDPA then runs on
# (tiles, rows*width) queries x (band*width) keys with a small mask per tile that applies the exact
# window rule and hides the padding; the work drops from N^2 to N * band * width score entries.


def banded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, grid: Grid, rows: int
) -> torch.Tensor:
    """Windowed attention computed tile by tile against key bands; q, k, v (B, heads, N, head_dim)."""
    B, heads, N, head_dim = q.shape
    height, width = grid
    radius = window // 2
    tiles = math.ceil(height / rows)
    q = q.reshape(B * heads, N, head_dim)  # (BH, N, hd)
    if tiles * rows > height:  # pad the query grid to whole tiles; those outputs are dropped below
        q = F.pad(q, (0, 0, 0, (tiles * rows - height) * width))
    q = q.view(B * heads, tiles, rows * width, head_dim)  # (BH, tiles, rows*W, hd)
    k = _KeyBands.apply(k.reshape(B * heads, N, head_dim), grid, rows, radius)  # (BH, tiles, band*W, hd)
    v = _KeyBands.apply(v.reshape(B * heads, N, head_dim), grid, rows, radius)  # (BH, tiles, band*W, hd)
    mask = _band_mask(grid, window, rows, q.device, q.dtype)  # (1, tiles, rows*W, band*W)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (BH, tiles, rows*W, hd)
    return out.reshape(B, heads, tiles * rows * width, head_dim)[:, :, :N]  # (B, heads, N, hd)


class _KeyBands(torch.autograd.Function):
    """(BH, N, hd) keys -> (BH, tiles, band*W, hd) overlapping row bands, as a view of the padded keys.

    autograd's own backward for an overlapping view (as_strided) or for index_select (index_add) is
    slow on CPU; the bands are evenly strided, so their gradient folds back in band/rows slab adds.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, grid: Grid, rows: int, radius: int) -> torch.Tensor:
        height, width = grid
        tiles, band = math.ceil(height / rows), rows + 2 * radius
        ctx.geometry = (grid, rows, radius)
        BH, _, hd = x.shape
        # radius zero rows above; below, radius plus the rows that pad the grid to whole tiles
        # reshape, not view: k arrives as a view of the qkv projection, not contiguous for a batch of one
        padded = F.pad(x.reshape(BH, height, width * hd), (0, 0, radius, tiles * rows - height + radius))
        return padded.as_strided((BH, tiles, band * width, hd), (padded.stride(0), rows * width * hd, hd, 1))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (height, width), rows, radius = ctx.geometry
        BH, tiles, _, hd = grad.shape
        band = rows + 2 * radius
        grad = grad.reshape(BH, tiles, band, width * hd)  # (BH, tiles, band, W*hd)
        # Padded row p receives band row j of tile i where p = i*rows + j: fold the bands back
        # `rows` band rows at a time, each slab landing on consecutive tiles.
        folded = grad.new_empty(BH, (tiles + math.ceil(band / rows)) * rows, width * hd)
        folded[:, : tiles * rows] = grad[:, :, :rows].reshape(BH, tiles * rows, width * hd)
        folded[:, tiles * rows :] = 0
        for start in range(rows, band, rows):
            count = min(rows, band - start)
            slab = folded[:, start : start + tiles * rows].view(BH, tiles, rows, width * hd)
            slab[:, :, :count] += grad[:, :, start : start + count]
        return folded[:, radius : radius + height].reshape(BH, height * width, hd), None, None, None


@functools.lru_cache(maxsize=64)
def _band_mask(grid: Grid, window: int, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, tiles, rows*W, band*W) additive mask: 0 where the window rule lets a query see a key."""
    height, width = grid
    radius = window // 2
    tiles, band = math.ceil(height / rows), rows + 2 * radius
    query_row = torch.arange(tiles)[:, None] * rows + torch.arange(rows)  # (tiles, rows)
    key_row = torch.arange(tiles)[:, None] * rows - radius + torch.arange(band)  # (tiles, band)
    near_rows = (query_row[:, :, None] - key_row[:, None, :]).abs() <= radius  # (tiles, rows, band)
    near_rows &= ((key_row >= 0) & (key_row < height))[:, None, :]  # padding keys are never seen
    # Queries that only pad the grid see their whole band: their outputs are dropped, and a fully
    # masked row would put NaN into the gradients of the keys.
    near_rows |= (query_row >= height)[:, :, None]
    cols = torch.arange(width)
    near_cols = (cols[:, None] - cols[None, :]).abs() <= radius  # (W, W)
    allowed = near_rows[:, :, None, :, None] & near_cols[None, None, :, None, :]  # (tiles, rows, W, band, W)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return mask.reshape(1, tiles, rows * width, band * width).to(device)
