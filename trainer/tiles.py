"""Pictures made of tiles, in numpy and PIL only (no torch), so that the driver's report draws them
without loading the trainer's models: the Jacobian's eigenvector grids (trainer.jacobian) and the
attention maps of a few query tokens (trainer.locality)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

PIXELS = 48  # each picture of a grid is upscaled (nearest) to at least this many pixels


def tiles_png(rows: list[list[np.ndarray]]) -> bytes:
    """uint8 (H, W, C) tiles, one list per row (rows of one length), as one PNG with 2 grey pixels
    between tiles, each tile upscaled (nearest) to at least PIXELS pixels."""
    height, width, channels = rows[0][0].shape
    scale = max(1, -(-PIXELS // max(height, width)))  # ceil
    pad, cell_h, cell_w = 2, height * scale + 2, width * scale + 2
    canvas = np.full((len(rows) * cell_h + pad, len(rows[0]) * cell_w + pad, channels), 128, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            top, left = pad + r * cell_h, pad + c * cell_w
            canvas[top : top + height * scale, left : left + width * scale] = tile.repeat(scale, 0).repeat(scale, 1)
    buffer = io.BytesIO()
    Image.fromarray(canvas[..., 0] if channels == 1 else canvas).save(buffer, format="PNG")
    return buffer.getvalue()


def query_tiles(maps: np.ndarray, queries: list[tuple[int, int]]) -> list[list[np.ndarray]]:
    """uint8 (rows, cols, 1) tiles, one list per block: white = the map's maximum, the query mid-grey."""
    tiles = []
    for block in maps:
        row = []
        for (r, c), heat in zip(queries, block):
            tile = np.rint(255 * heat / max(float(heat.max()), 1e-12)).astype(np.uint8)
            tile[r, c] = 128
            row.append(tile[..., None])
        tiles.append(row)
    return tiles
