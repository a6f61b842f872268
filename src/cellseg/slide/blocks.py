"""The block grid of a slide and the seam rules between blocks.

A block is a group of ``block_tiles × block_tiles`` consecutive tiles of the tiled inference's own grid
(``cellseg.infer.tiling.tile_windows`` over the whole slide, in model pixels). Its window is the union of its
tiles, so neighbouring blocks share exactly one tile overlap (``predict.tile_overlap``, larger than the largest
nucleus, the blocks' margin) and the model sees exactly the tiles it would see on the slide as one image: no
forward pass is repeated because of the blocks.

Between blocks the rules are those between tiles (:func:`cellseg.infer.tiling.merge_tiles`): a nucleus cut by a
block edge inside the slide is dropped where the neighbour sees it whole, fragments nobody sees whole are
joined, and a nucleus seen whole by two blocks is kept once. Only detections that reach into a shared band (or
touch an inner edge) can take part, so each block splits its detections into *interior* ones, final as they
are, and *seam* ones, merged over the slide at the end (:func:`resolve_seams`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellseg.infer.tiling import Window, cut_by_inner_edges, merge_tiles, tile_starts, tile_windows
from cellseg.instances import Instances


@dataclass(frozen=True)
class Block:
    """One block: its grid position, its window and its interior (the part no neighbour's window covers),
    both in model pixels, ``(y0, x0, y1, x1)`` for the interior, and which of its tiles hold tissue."""

    row: int
    col: int
    window: Window
    interior: tuple[int, int, int, int]
    tiles: tuple[int, ...] | None = None  # the tiles (indices into :func:`block_tiles`) to predict; None: all

    def tile_windows(self, tile: int, overlap: int) -> list[Window]:
        """The block's tiles, window-local: exactly the slide grid's tiles that make up the block."""
        return tile_windows(self.window.height, self.window.width, tile, overlap)

    @property
    def name(self) -> str:
        return f"{self.row}_{self.col}"


def _groups(length: int, tile: int, overlap: int, block_tiles: int) -> list[tuple[int, int]]:
    starts = tile_starts(length, tile, overlap)
    return [
        (starts[i], min(starts[min(i + block_tiles, len(starts)) - 1] + tile, length))
        for i in range(0, len(starts), block_tiles)
    ]


def block_grid(height: int, width: int, tile: int, overlap: int, block_tiles: int) -> list[Block]:
    """The blocks of a ``height × width`` (model pixels) slide, row by row."""
    rows = _groups(height, tile, overlap, block_tiles)
    cols = _groups(width, tile, overlap, block_tiles)
    blocks = []
    for i, (y0, y1) in enumerate(rows):
        iy0 = rows[i - 1][1] if i > 0 else y0
        iy1 = rows[i + 1][0] if i + 1 < len(rows) else y1
        for j, (x0, x1) in enumerate(cols):
            ix0 = cols[j - 1][1] if j > 0 else x0
            ix1 = cols[j + 1][0] if j + 1 < len(cols) else x1
            blocks.append(Block(i, j, Window(y0, x0, y1 - y0, x1 - x0), (iy0, ix0, iy1, ix1)))
    return blocks


def seam_detections(inst: Instances, block: Block, height: int, width: int) -> np.ndarray:
    """Which of a block's (window-local) detections may meet a neighbour's: cut by an inner edge of the window,
    or reaching out of the interior into a band the neighbour also predicts."""
    local = inst.boxes_xyxy()
    if not len(local):
        return np.zeros(0, bool)
    w = block.window
    cut = cut_by_inner_edges(local, w, height, width)
    iy0, ix0, iy1, ix1 = block.interior
    x0, y0 = local[:, 0] + w.x0, local[:, 1] + w.y0
    x1, y1 = local[:, 2] + w.x0, local[:, 3] + w.y0
    inside = (x0 >= ix0) & (y0 >= iy0) & (x1 <= ix1) & (y1 <= iy1)
    return cut | ~inside


def resolve_seams(parts: list[Instances], blocks: list[Block], height: int, width: int) -> Instances:
    """One instance set (slide model pixels) from the blocks' seam detections (each window-local), by
    :func:`cellseg.infer.tiling.merge_tiles` over the block windows."""
    return merge_tiles(parts, [b.window for b in blocks], height, width)
