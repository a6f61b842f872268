"""A slide's nuclei from its blocks' detections: seams merged, then the model's rule, window by window.

Each block file holds the block's *interior* detections (final as detections: no neighbour sees them) and its
*seam* detections (:mod:`.blocks`). The seams are merged over the slide (:func:`.blocks.resolve_seams`); then the
rule from detections to nuclei (:mod:`cellseg.nuclei`) runs once per block **cell**, the part of the slide the
block answers for (its window with each shared band split down the middle), on every detection within
:func:`cellseg.nuclei.context_margin` of the cell. A nucleus is emitted by the cell holding the centre of its
detection's box. Since the rule looks no farther than that margin, every nucleus comes out as it would on the
slide as one image (:func:`cellseg.infer.predict.predict_image`'s label map), however the slide is cut.

Memory: the merged seam detections, and the interior detections of the blocks within a margin of the cell
being decided (a few rows of blocks at most; older rows are dropped as the cells move down the slide).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cellseg.instances import Instances
from cellseg.nuclei import NucleusRule, context_margin, label_map
from cellseg.slide.blocks import Block, resolve_seams


def pack(inst: Instances, prefix: str) -> dict[str, np.ndarray]:
    """Instances as a few flat arrays (crops as one bit string), for a small ``.npz``."""
    shapes = np.asarray([c.shape for c in inst.crops], np.int32).reshape(-1, 2)
    bits = (
        np.packbits(np.concatenate([c.ravel() for c in inst.crops])) if len(inst) else np.zeros(0, np.uint8)
    )
    return {
        f"{prefix}labels": inst.labels.astype(np.int8),
        f"{prefix}scores": inst.scores.astype(np.float32),
        f"{prefix}offsets": inst.offsets.astype(np.int32),
        f"{prefix}shapes": shapes,
        f"{prefix}bits": bits,
    }


def unpack(arrays, prefix: str, height: int, width: int) -> Instances:
    shapes = arrays[f"{prefix}shapes"]
    sizes = shapes[:, 0].astype(np.int64) * shapes[:, 1]
    flat = np.unpackbits(arrays[f"{prefix}bits"], count=int(sizes.sum())).astype(bool)
    ends = np.cumsum(sizes)
    crops = [flat[e - s : e].reshape(h, w) for e, s, (h, w) in zip(ends, sizes, shapes, strict=True)]
    return Instances(
        height,
        width,
        arrays[f"{prefix}labels"].astype(np.int64),
        arrays[f"{prefix}scores"].astype(np.float32),
        arrays[f"{prefix}offsets"].astype(np.int64).reshape(-1, 2),
        crops,
    )


def cell_of(block: Block) -> tuple[int, int, int, int]:
    """``(y0, x0, y1, x1)``: the block's window with each band it shares with a neighbour split in the middle
    (at the slide's edges, the window's edge). The cells of a grid tile the slide."""
    w = block.window
    iy0, ix0, iy1, ix1 = block.interior
    y1, x1 = w.y0 + w.height, w.x0 + w.width
    return (w.y0 + iy0) // 2, (w.x0 + ix0) // 2, (iy1 + y1) // 2, (ix1 + x1) // 2


def _boxes(inst: Instances) -> np.ndarray:
    """``(N, 4)`` int64 ``y0, x0, y1, x1`` of each crop (its box, x1/y1 exclusive)."""
    shapes = np.asarray([c.shape for c in inst.crops], np.int64).reshape(-1, 2)
    return np.concatenate([inst.offsets, inst.offsets + shapes], axis=1)


def _anchors(boxes: np.ndarray) -> np.ndarray:
    """The centre of each box (integer), which decides the cell that emits its nucleus."""
    return np.stack([(boxes[:, 0] + boxes[:, 2]) // 2, (boxes[:, 1] + boxes[:, 3]) // 2], axis=1)


def _meets(boxes: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    y0, x0, y1, x1 = rect
    return (boxes[:, 0] < y1) & (boxes[:, 2] > y0) & (boxes[:, 1] < x1) & (boxes[:, 3] > x0)


def concat_instances(parts: list[Instances], height: int, width: int) -> Instances:
    """One instance set of ``height × width`` from several whose offsets are already in its frame."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return Instances(height, width)
    return Instances(
        height,
        width,
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.offsets for p in parts]).reshape(-1, 2),
        [c for p in parts for c in p.crops],
    )


class _Interiors:
    """The blocks' interior detections in slide coordinates, loaded from their files on demand and dropped once
    the cells have moved more than ``keep_rows`` rows past them."""

    def __init__(self, work: Path, blocks: list[Block], height: int, width: int, keep_rows: int) -> None:
        self.work, self.height, self.width, self.keep_rows = work, height, width, keep_rows
        self.blocks = blocks
        self._cache: dict[str, tuple[Instances, np.ndarray]] = {}

    def near(self, rect: tuple[int, int, int, int], row: int) -> list[tuple[Instances, np.ndarray]]:
        for name in [n for n, (_, _) in self._cache.items() if int(n.split("_")[0]) < row - self.keep_rows]:
            del self._cache[name]
        found = []
        for block in self.blocks:
            iy0, ix0, iy1, ix1 = block.interior
            if iy0 < rect[2] and iy1 > rect[0] and ix0 < rect[3] and ix1 > rect[1]:
                found.append(self._load(block))
        return found

    def _load(self, block: Block) -> tuple[Instances, np.ndarray]:
        if block.name not in self._cache:
            with np.load(self.work / "blocks" / f"{block.name}.npz") as arrays:
                w = block.window
                inst = unpack(arrays, "interior_", w.height, w.width)
            inst.offsets = inst.offsets + np.array([w.y0, w.x0])
            inst.height, inst.width = self.height, self.width
            self._cache[block.name] = (inst, _boxes(inst))
        return self._cache[block.name]


def slide_nuclei(
    work: Path, grid: list[Block], blocks: list[Block], job, rule: NucleusRule
) -> Iterator[Instances]:
    """The slide's nuclei (slide model pixels, disjoint masks), one batch per cell in raster order.

    ``grid``: every block of the slide; ``blocks``: those predicted, whose files are in ``work/blocks``;
    ``job``: the :class:`.run.SlideJob` (the slide's size in model pixels).
    """
    height, width = job.height, job.width
    seam_parts, extent = [], 0  # extent: the largest side of any detection's box, interior or seam
    for block in blocks:
        with np.load(work / "blocks" / f"{block.name}.npz") as arrays:
            w = block.window
            seam_parts.append(unpack(arrays, "seam_", w.height, w.width))
            shapes = np.concatenate([arrays["interior_shapes"], arrays["seam_shapes"]]).reshape(-1, 2)
            extent = max(extent, int(shapes.max(initial=0)))
    seams = resolve_seams(seam_parts, blocks, height, width) if blocks else Instances(height, width)
    seams = seams.select(rule.candidates(seams))
    seam_boxes = _boxes(seams)
    seam_anchors = _anchors(seam_boxes)
    margin = context_margin(max(extent, int(max((max(c.shape) for c in seams.crops), default=0))))
    block_side = min((b.window.height for b in grid), default=1)
    interiors = _Interiors(work, blocks, height, width, keep_rows=margin // max(block_side, 1) + 1)
    with_tissue = {b.name for b in blocks}
    for block in grid:
        cell = cell_of(block)
        in_cell = _inside(seam_anchors, cell)
        if block.name not in with_tissue and not in_cell.any():
            continue  # no detection can be emitted here
        context = (
            max(cell[0] - margin, 0), max(cell[1] - margin, 0),
            min(cell[2] + margin, height), min(cell[3] + margin, width),
        )  # fmt: skip
        parts = [(inst.select(_meets(boxes, context)), boxes[_meets(boxes, context)])
                 for inst, boxes in interiors.near(context, block.row)]  # fmt: skip
        near_seams = _meets(seam_boxes, context)
        parts.append((seams.select(near_seams), seam_boxes[near_seams]))
        candidates = concat_instances([p for p, _ in parts], height, width)
        if not len(candidates):
            continue
        boxes = np.concatenate([b for _, b in parts]).reshape(-1, 4)
        yield _decide(candidates, boxes, cell, rule)


def _inside(points: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    y0, x0, y1, x1 = rect
    return (points[:, 0] >= y0) & (points[:, 0] < y1) & (points[:, 1] >= x0) & (points[:, 1] < x1)


def _decide(
    candidates: Instances, boxes: np.ndarray, cell: tuple[int, int, int, int], rule: NucleusRule
) -> Instances:
    """The rule on ``candidates`` in a frame holding every one of them whole; the nuclei whose detection's
    anchor lies in ``cell``, in slide coordinates."""
    fy0, fx0 = int(boxes[:, 0].min()), int(boxes[:, 1].min())
    fy1, fx1 = int(boxes[:, 2].max()), int(boxes[:, 3].max())
    local = Instances(
        fy1 - fy0, fx1 - fx0, candidates.labels, candidates.scores,
        candidates.offsets - np.array([fy0, fx0]), candidates.crops,
    )  # fmt: skip
    decided = label_map(local, rule)
    owned = _inside(_anchors(boxes)[decided.source], cell)
    nuclei = decided.instances(local.scores).select(owned)
    nuclei.offsets = nuclei.offsets + np.array([fy0, fx0])
    nuclei.height, nuclei.width = candidates.height, candidates.width
    return nuclei
