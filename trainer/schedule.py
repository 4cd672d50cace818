"""Per-block attention window schedules and the named model sizes: plain Python, no torch, so a
config or a sweep spec is validated (and bad input refused) without importing torch."""

from __future__ import annotations

import functools
import math
import re

PLACEMENTS = ("none", "head", "tail", "mix", "custom")
GLOBAL = "G"  # how a global block is written in a schedule string

Grid = tuple[int, int]  # (height, width) in tokens


def check_window(window: object) -> int:
    """Return `window` if it is an odd int >= 1, else raise ValueError naming it."""
    # bool is an int subclass; True would silently mean a 1x1 window.
    if isinstance(window, bool) or not isinstance(window, int) or window < 1 or window % 2 == 0:
        raise ValueError(f"attention window must be an odd integer >= 1, got {window!r}")
    return window


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


# name -> (depth, width, heads). XS and S are the paper's sizes (An et al. 2024), B is DiT's.
# DiT-T is ours: small enough that a 2-core CPU trains it usefully on 8x8 images in minutes, and
# deep enough (12 blocks) that head / mix / tail placements of six windows all differ. DiT-P ("pico")
# is DiT-T with half the blocks, for `make run`'s laptop budget: three windows still leave head, mix
# and tail distinct.
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    "DiT-T": (12, 64, 2),
    "DiT-XS": (12, 252, 4),
    "DiT-S": (12, 384, 6),
    "DiT-B": (12, 768, 12),
    "DiT-P": (6, 64, 2),
}


def parse_size(name: str) -> tuple[int, int, int, int]:
    """"DiT-XS/1" -> (depth, width, heads, patch). A bare name ("DiT-XS") means patch 1."""
    match = re.fullmatch(r"(?P<base>[^/]+)(?:/(?P<patch>[1-9][0-9]*))?", str(name))
    if match is None or match["base"] not in MODEL_SIZES:
        choices = ", ".join(f"{base}/<patch>" for base in MODEL_SIZES)
        raise ValueError(f"unknown model size {name!r}; choose one of {choices} (e.g. DiT-XS/1)")
    depth, width, heads = MODEL_SIZES[match["base"]]
    return depth, width, heads, int(match["patch"] or 1)


# The UNet baseline (trainer/unet.py): name -> (base channels, channel multiplier per level); level i works
# at image_size / 2^i.
UNET_SIZES: dict[str, tuple[int, tuple[int, ...]]] = {
    "UNet-T": (32, (1, 2, 2)),
    "UNet-S": (64, (1, 2, 2, 4)),
}


def parse_unet_size(name: str) -> tuple[int, tuple[int, ...]]:
    """"UNet-T" -> (base channels, multipliers)."""
    if name not in UNET_SIZES:
        raise ValueError(f"unknown UNet size {name!r}; choose one of {', '.join(UNET_SIZES)}")
    return UNET_SIZES[name]


def check_unet_image_size(name: str, image_size: int) -> None:
    """Every level halves the image: image_size must be divisible by 2^(levels - 1)."""
    levels = len(parse_unet_size(name)[1])
    if image_size % 2 ** (levels - 1):
        raise ValueError(f"data.image_size={image_size} must be divisible by {2 ** (levels - 1)} for the "
                         f"{levels} levels of model.size={name!r}")


# The windows on the token grid (trainer/attention.py runs them; trainer/footprint.py sizes them).


def is_global(window: int | None, grid: Grid) -> bool:
    """True when the window sees every token: None, or at least 2 * max(height, width) - 1 wide.

    From any token the farthest one is max(height, width) - 1 rows/columns away, so a radius
    window // 2 of that size covers the whole grid.
    """
    return window is None or window >= 2 * max(grid) - 1


def flex_head_dim(head_dim: int) -> int:
    """The head dim FlexAttention runs at: `head_dim` rounded up to a power of two (at least 16)."""
    return max(16, 1 << (head_dim - 1).bit_length())


# Cost of banded attention relative to global SDPA, fitted to CPU timings of forward + backward (one
# thread, head_dim 63, grids 16 to 64, windows 3 to 13, tiles of 1 to 16 rows; the resulting choices
# are checked by benchmarks/attention.py, see benchmarks/RESULTS.md): each kept score entry costs about
# BAND_ENTRY_COST global ones (the mask is added to every entry), and every token pays about
# BAND_TOKEN_COST / N global units per key copy for padding, the band views and folding the gradient.
BAND_ENTRY_COST = 1.2
BAND_TOKEN_COST = 75.0


@functools.lru_cache(maxsize=256)  # asked on every block call
def band_rows_per_tile(grid: Grid, window: int) -> int | None:
    """Query rows per tile for the banded backend, or None when dense masking is as cheap.

    Short tiles compute fewer score entries (rows + 2 * radius key rows per query row) but copy every
    key band / rows times; the modelled cost of each tile height is compared with global attention
    and the cheapest is kept when it beats dense masking (which costs about as much as global).
    """
    height, width = grid
    tokens, radius = height * width, window // 2

    def relative_cost(rows: int) -> float:
        band, padded_rows = rows + 2 * radius, math.ceil(height / rows) * rows
        entries = padded_rows * band / (height * height)  # share of the N^2 global score entries
        return BAND_ENTRY_COST * entries + BAND_TOKEN_COST * (band / rows) / tokens

    rows = min(range(1, height + 1), key=relative_cost)
    return rows if relative_cost(rows) < 1.0 else None


def attended_pairs(grid: tuple[int, int], window: int | None) -> int:
    """Number of (query, key) pairs a window keeps on a grid; N^2 for global attention.

    The mask is a product of a row condition and a column condition, so the count factorises.
    """
    if is_global(window, grid):
        return (grid[0] * grid[1]) ** 2
    radius = window // 2

    def pairs_1d(size: int) -> int:  # pairs (i, j) in [0, size) with |i - j| <= radius
        return sum(min(i + radius, size - 1) - max(i - radius, 0) + 1 for i in range(size))

    return pairs_1d(grid[0]) * pairs_1d(grid[1])
