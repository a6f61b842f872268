"""Where training tiles are cut: inside the regions a pathologist marked as fully annotated.

Outside such a region an unannotated nucleus is not background, so a tile is kept only when the region covers
nearly all of it (:data:`MIN_INSIDE`); a region is split into equal tiles of at most ``tile_size`` pixels a side
(model pixels, at ``data.mpp``), so no tile is a sliver. An image without regions is one region, up to a size
limit: a whole slide without regions is almost never fully annotated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_INSIDE = 0.99
"""Share of a tile's area a region must cover for the tile to be kept."""


@dataclass(frozen=True)
class Tile:
    """A window in model pixels: rows ``y0 .. y0 + height``, columns ``x0 .. x0 + width``."""

    y0: int
    x0: int
    height: int
    width: int

    def box(self):
        from shapely.geometry import box

        return box(self.x0, self.y0, self.x0 + self.width, self.y0 + self.height)


def _cuts(lo: int, hi: int, tile_size: int) -> list[tuple[int, int]]:
    n = max(1, math.ceil((hi - lo) / tile_size))
    edges = np.linspace(lo, hi, n + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def region_tiles(region, height: int, width: int, tile_size: int) -> tuple[list[Tile], int]:
    """Tiles inside ``region`` (a polygon in model-pixel corner coordinates) within the ``height`` × ``width``
    image: ``(kept tiles, tiles left out because the region does not cover them)``."""
    minx, miny, maxx, maxy = region.bounds
    x0, y0 = max(0, math.ceil(minx - 1e-6)), max(0, math.ceil(miny - 1e-6))
    x1, y1 = min(width, math.floor(maxx + 1e-6)), min(height, math.floor(maxy + 1e-6))
    if x1 <= x0 or y1 <= y0:
        return [], 0
    kept, left_out = [], 0
    for ty0, ty1 in _cuts(y0, y1, tile_size):
        for tx0, tx1 in _cuts(x0, x1, tile_size):
            tile = Tile(ty0, tx0, ty1 - ty0, tx1 - tx0)
            box = tile.box()
            if region.intersection(box).area >= MIN_INSIDE * box.area:
                kept.append(tile)
            else:
                left_out += 1
    return kept, left_out


def tiles_for(regions: list, height: int, width: int, tile_size: int) -> tuple[list[Tile], int]:
    """The tiles of every region, each tile once: ``(tiles, tiles left out)``."""
    seen: dict[Tile, None] = {}
    left_out = 0
    for region in regions:
        kept, dropped = region_tiles(region, height, width, tile_size)
        left_out += dropped
        for tile in kept:
            seen.setdefault(tile)
    return list(seen), left_out
