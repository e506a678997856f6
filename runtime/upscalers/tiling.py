"""A1111 1.10's tiled upscale with a model, on the host: the grid of modules/upscaler_utils.py upscale_with_model
(tiles blended with Pillow masks, modules/images.py split_grid and combine_grid) and its tiled_upscale_2 (tiles
averaged in float32, what upscale_2 runs for SwinIR).

`run` is a model call as spandrel's ImageModelDescriptor makes it: float32 BGR [1, 3, h, w] in [0, 1] ->
[1, 3, h * s, w * s] in [0, 1]. Images go in as A1111's pil_image_to_torch_bgr makes them (uint8 / 255 in float64,
then float32: the model's dtype) and come out as its torch_bgr_to_pil_image does (clamped, times 255 in float32,
rounded half to even).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import InvalidRequestError

ModelCall = Callable[[np.ndarray], np.ndarray]


def to_bgr(image: Image.Image) -> np.ndarray:
    """A PIL image -> float32 BGR [1, 3, H, W] in [0, 1]."""
    pixels = np.asarray(image.convert("RGB"))[:, :, ::-1]  # [H, W, 3] BGR
    return (np.ascontiguousarray(pixels.transpose(2, 0, 1)) / 255)[None].astype(np.float32)


def from_bgr(bgr: np.ndarray) -> Image.Image:
    """float BGR [1, 3, H, W] -> an RGB PIL image: clamped to [0, 1], scaled by 255 in float32, rounded."""
    values = np.float32(255.0) * np.clip(bgr[0].astype(np.float32), 0, 1).transpose(1, 2, 0)  # [H, W, 3]
    return Image.fromarray(np.ascontiguousarray(values.round().astype(np.uint8)[:, :, ::-1]), "RGB")


@dataclass
class Grid:
    """modules/images.py Grid: rows of (y, h, [(x, w, tile)]) and the sizes they were cut with."""

    tiles: list
    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> Grid:
    """Cut `image` into tiles of tile_w x tile_h spread evenly with at least `overlap` pixels shared; an image
    smaller than a tile gives one tile, padded with black on the left/top (PIL crops outside the image)."""
    w, h = image.size
    cols = math.ceil((w - overlap) / (tile_w - overlap))
    rows = math.ceil((h - overlap) / (tile_h - overlap))
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = Grid([], tile_w, tile_h, w, h, overlap)
    for row in range(rows):
        y = int(row * dy)
        y = h - tile_h if y + tile_h >= h else y
        cells = []
        for col in range(cols):
            x = int(col * dx)
            x = w - tile_w if x + tile_w >= w else x
            cells.append((x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))))
        grid.tiles.append((y, tile_h, cells))
    return grid


def _ramp(overlap: int, length: int, vertical: bool) -> Image.Image:
    """A1111's blend mask: 0 .. 255 * (overlap - 1) / overlap across the overlap (uint8 by truncation)."""
    ramp = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    mask = np.repeat(ramp[:, None], length, axis=1) if vertical else np.repeat(ramp[None, :], length, axis=0)
    return Image.fromarray(mask, "L")


def combine_grid(grid: Grid) -> Image.Image:
    """Paste the tiles back: each tile's first `overlap` columns (rows) blend into what lies left of (above) it."""
    mask_w = _ramp(grid.overlap, grid.tile_h, vertical=False)  # [tile_h, overlap]
    mask_h = _ramp(grid.overlap, grid.image_w, vertical=True)  # [overlap, image_w]
    combined = Image.new("RGB", (grid.image_w, grid.image_h))
    for y, h, cells in grid.tiles:
        row = Image.new("RGB", (grid.image_w, h))
        for x, w, tile in cells:
            if x == 0:
                row.paste(tile, (0, 0))
                continue
            row.paste(tile.crop((0, 0, grid.overlap, h)), (x, 0), mask=mask_w)
            row.paste(tile.crop((grid.overlap, 0, w, h)), (x + grid.overlap, 0))
        if y == 0:
            combined.paste(row, (0, 0))
            continue
        combined.paste(row.crop((0, 0, row.width, grid.overlap)), (0, y), mask=mask_h)
        combined.paste(row.crop((0, grid.overlap, row.width, h)), (0, y + grid.overlap))
    return combined


def check_tiling(tile_size: int, tile_overlap: int) -> None:
    """InvalidRequestError unless 0 <= overlap < tile size (a tile size of 0: no tiling)."""
    if tile_size < 0 or tile_overlap < 0 or (tile_size > 0 and tile_overlap >= tile_size):
        raise InvalidRequestError(
            f"tile size {tile_size} with overlap {tile_overlap}: the overlap must be at least 0 and smaller than the "
            "tile (tile size 0: no tiling)"
        )


def upscale_grid(run: ModelCall, image: Image.Image, tile_size: int, tile_overlap: int, progress=None) -> Image.Image:
    """upscale_with_model: every tile_size x tile_size tile through the model, pasted back with A1111's blend;
    tile_size 0: the whole image at once. `progress(done, total)` after each tile."""
    if tile_size <= 0:
        return from_bgr(run(to_bgr(image)))
    if min(image.size) <= tile_overlap:
        raise InvalidRequestError(
            f"a {image.width}x{image.height} image is too small to tile with overlap {tile_overlap}"
        )
    grid = split_grid(image, tile_size, tile_size, tile_overlap)
    total, done, scale = sum(len(cells) for _, _, cells in grid.tiles), 0, 1
    rows = []
    for y, h, cells in grid.tiles:
        row = []
        for x, w, tile in cells:
            output = from_bgr(run(to_bgr(tile)))
            scale = output.width // tile.width
            row.append((x * scale, w * scale, output))
            done += 1
            if progress is not None:
                progress(done, total)
        rows.append((y * scale, h * scale, row))
    return combine_grid(Grid(rows, grid.tile_w * scale, grid.tile_h * scale, grid.image_w * scale,
                             grid.image_h * scale, grid.overlap * scale))  # fmt: skip


def upscale_weighted(
    run: ModelCall, image: Image.Image, tile_size: int, tile_overlap: int, scale: int, progress=None
) -> Image.Image:
    """upscale_2 / tiled_upscale_2: square tiles of min(tile_size, H, W) at a stride of tile - overlap (the last
    one flush with the edge), each model output added into a float32 canvas and divided by how many tiles covered
    each pixel."""
    bgr = to_bgr(image)  # [1, 3, H, W]
    _, channels, h, w = bgr.shape
    tile = min(tile_size, h, w)
    if tile_size <= 0:
        return from_bgr(run(bgr))
    stride = tile - tile_overlap
    if stride <= 0:
        raise InvalidRequestError(f"a {w}x{h} image is too small to tile with overlap {tile_overlap}")
    rows = [*range(0, h - tile, stride), h - tile]
    cols = [*range(0, w - tile, stride), w - tile]
    result = np.zeros((1, channels, h * scale, w * scale), dtype=np.float32)
    weights = np.zeros_like(result)
    done = 0
    for top in rows:
        for left in cols:
            patch = run(np.ascontiguousarray(bgr[:, :, top : top + tile, left : left + tile]))
            region = (..., slice(top * scale, (top + tile) * scale), slice(left * scale, (left + tile) * scale))
            result[region] += patch
            weights[region] += 1
            done += 1
            if progress is not None:
                progress(done, len(rows) * len(cols))
    return from_bgr(result / weights)
