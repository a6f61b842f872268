"""Tiled inference on large images: where the tiles go, and how their detections become one instance set.

Apart from the forward pass and the mask paste (``cellseg.infer.predict``), because the merge has rules of its own:

- **Cut detections.** A detection touching a tile edge that lies inside the image is a cell cut by that tile.
  It is kept only when no other tile sees the cell whole (a *large cell*, wider than the overlap); the
  fragments of such a cell from neighbouring tiles are joined into one instance (union of their masks).
- **Duplicates.** A cell seen whole by two tiles is kept once: greedy NMS, higher score first, at box
  IoU > 0.5 between detections of *different* tiles, as before.
- **Linear memory.** Two detections of different tiles can only overlap inside the band where their tiles
  overlap, so pairs are looked for within each band (a few dozen detections) instead of in one N×N matrix
  over all tiles' detections (2 GB of IoU temporaries at 5,000 detections).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellseg.instances import Instances

SEAM_MARGIN = 2
"""A detection whose box comes within this many pixels of an inner tile edge counts as cut by it."""

DUPLICATE_IOU = 0.5
"""Box IoU above which detections of two tiles are the same cell (the higher score is kept)."""

COVERED = 0.5
"""A cut fragment whose mask lies at least this much inside a whole detection of another tile is dropped."""

SAME_CELL_IOU = 0.5
"""Fragments of two tiles whose masks agree this well (IoU inside the tiles' shared band) are one cell."""


@dataclass(frozen=True)
class Window:
    """One tile: top-left corner and size."""

    y0: int
    x0: int
    height: int
    width: int

    def rect(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.width, self.y0 + self.height


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` shared pixels."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def tile_windows(height: int, width: int, tile: int, overlap: int) -> list[Window]:
    """The tiles of a ``height × width`` image, row by row."""
    return [
        Window(y0, x0, min(tile, height), min(tile, width))
        for y0 in tile_starts(height, tile, overlap)
        for x0 in tile_starts(width, tile, overlap)
    ]


def cut_by_inner_edges(boxes: np.ndarray, window: Window, height: int, width: int) -> np.ndarray:
    """Which tile-local boxes touch a tile edge lying inside the image (their cell goes on past the tile)."""
    cut = np.zeros(len(boxes), bool)
    if window.x0 > 0:
        cut |= boxes[:, 0] < SEAM_MARGIN
    if window.y0 > 0:
        cut |= boxes[:, 1] < SEAM_MARGIN
    if window.x0 + window.width < width:
        cut |= boxes[:, 2] > window.width - SEAM_MARGIN
    if window.y0 + window.height < height:
        cut |= boxes[:, 3] > window.height - SEAM_MARGIN
    return cut


def _concat(found: list[Instances], windows: list[Window], height: int, width: int) -> Instances:
    """All tiles' instances in image coordinates, tile after tile."""
    offsets = [inst.offsets + np.array([w.y0, w.x0]) for inst, w in zip(found, windows, strict=True)]
    return Instances(
        height,
        width,
        np.concatenate([inst.labels for inst in found]).astype(np.int64),
        np.concatenate([inst.scores for inst in found]),
        np.concatenate(offsets).reshape(-1, 2).astype(np.int64),
        [crop for inst in found for crop in inst.crops],
    )


def _intersects(boxes: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    x0, y0, x1, y1 = rect
    return (boxes[:, 0] < x1) & (boxes[:, 2] > x0) & (boxes[:, 1] < y1) & (boxes[:, 3] > y0)


def _band(a: Window, b: Window) -> tuple[int, int, int, int] | None:
    ax0, ay0, ax1, ay1 = a.rect()
    bx0, by0, bx1, by1 = b.rect()
    rect = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    return rect if rect[0] < rect[2] and rect[1] < rect[3] else None


def _overlapping_tiles(windows: list[Window]) -> list[tuple[int, int]]:
    """Pairs of tiles sharing pixels: grid neighbours, and also the tile two before the last one in a row or
    column, since the last tile is shifted back to end at the image edge."""
    rects = np.asarray([w.rect() for w in windows]).reshape(-1, 4)
    x = np.minimum(rects[:, None, 2], rects[None, :, 2]) > np.maximum(rects[:, None, 0], rects[None, :, 0])
    y = np.minimum(rects[:, None, 3], rects[None, :, 3]) > np.maximum(rects[:, None, 1], rects[None, :, 1])
    first, second = np.nonzero(np.triu(x & y, k=1))
    return list(zip(first.tolist(), second.tolist(), strict=True))


def band_pairs(
    boxes: np.ndarray, tile_of: np.ndarray, windows: list[Window]
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int, int]]]:
    """Every pair ``(i, j)`` of detections of different tiles whose boxes overlap, and the band they share.

    Two such boxes overlap only inside their tiles' common band, so each band compares just the detections
    that reach into it: memory grows with the detections, not with their square.
    """
    members = [np.flatnonzero(tile_of == t) for t in range(len(windows))]
    firsts, seconds, bands = [], [], []
    for t, u in _overlapping_tiles(windows):
        rect = _band(windows[t], windows[u])
        a = members[t][_intersects(boxes[members[t]], rect)]
        b = members[u][_intersects(boxes[members[u]], rect)]
        if not len(a) or not len(b):
            continue
        ba, bb = boxes[a][:, None], boxes[b][None]
        overlap = (np.minimum(ba[..., 2], bb[..., 2]) > np.maximum(ba[..., 0], bb[..., 0])) & (
            np.minimum(ba[..., 3], bb[..., 3]) > np.maximum(ba[..., 1], bb[..., 1])
        )
        ia, ib = np.nonzero(overlap)
        firsts.append(a[ia])
        seconds.append(b[ib])
        bands += [rect] * len(ia)
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), []
    return np.concatenate(firsts), np.concatenate(seconds), bands


def box_iou_pairs(boxes: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Box IoU of each listed pair (no matrix)."""
    a, b = boxes[first], boxes[second]
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area[first] + area[second] - inter, 1e-9)


def greedy_suppression(scores: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """NMS over a list of duplicate pairs: highest score first, each kept detection removes its partners."""
    removed = np.zeros(len(scores), bool)
    if not len(first):
        return removed
    src, dst = np.concatenate([first, second]), np.concatenate([second, first])
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    starts = np.searchsorted(src, np.arange(len(scores) + 1))
    for i in np.argsort(-scores, kind="stable"):
        if not removed[i] and starts[i] < starts[i + 1]:
            removed[dst[starts[i] : starts[i + 1]]] = True
    return removed


def _mask_in(inst: Instances, i: int, rect: tuple[int, int, int, int]) -> np.ndarray:
    """Instance ``i``'s mask inside ``rect`` (x0, y0, x1, y1), as a bool array of the rect's size."""
    x0, y0, x1, y1 = rect
    out = np.zeros((y1 - y0, x1 - x0), bool)
    (oy, ox), crop = inst.offsets[i], inst.crops[i]
    sy0, sx0 = max(oy, y0), max(ox, x0)
    sy1, sx1 = min(oy + crop.shape[0], y1), min(ox + crop.shape[1], x1)
    if sy0 < sy1 and sx0 < sx1:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = crop[sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox]
    return out


def _covered_fraction(inst: Instances, fragment: int, whole: int) -> float:
    """Share of ``fragment``'s pixels that ``whole`` also covers."""
    (y0, x0), crop = inst.offsets[fragment], inst.crops[fragment]
    rect = (x0, y0, x0 + crop.shape[1], y0 + crop.shape[0])
    return float((crop & _mask_in(inst, whole, rect)).sum()) / max(int(crop.sum()), 1)


def _band_iou(inst: Instances, i: int, j: int, rect: tuple[int, int, int, int]) -> float:
    a, b = _mask_in(inst, i, rect), _mask_in(inst, j, rect)
    return float((a & b).sum()) / max(int((a | b).sum()), 1)


def _union_groups(n: int, first: np.ndarray, second: np.ndarray) -> list[list[int]]:
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(first.tolist(), second.tolist(), strict=True):
        parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _join(inst: Instances, members: list[int]) -> tuple[int, float, tuple[int, int], np.ndarray]:
    """One instance from a large cell's fragments: union of masks, the best fragment's label and score."""
    y0 = min(int(inst.offsets[i][0]) for i in members)
    x0 = min(int(inst.offsets[i][1]) for i in members)
    y1 = max(int(inst.offsets[i][0]) + inst.crops[i].shape[0] for i in members)
    x1 = max(int(inst.offsets[i][1]) + inst.crops[i].shape[1] for i in members)
    crop = np.zeros((y1 - y0, x1 - x0), bool)
    for i in members:
        (oy, ox), part = inst.offsets[i], inst.crops[i]
        crop[oy - y0 : oy - y0 + part.shape[0], ox - x0 : ox - x0 + part.shape[1]] |= part
    best = max(members, key=lambda i: inst.scores[i])
    return int(inst.labels[best]), float(inst.scores[best]), (y0, x0), crop


def merge_tiles(found: list[Instances], windows: list[Window], height: int, width: int) -> Instances:
    """One instance set for the image from each tile's (tile-local) instances; see the module docstring."""
    if not found:
        return Instances(height, width)
    merged = _concat(found, windows, height, width)
    if not len(merged):
        return merged
    tile_of = np.repeat(np.arange(len(found)), [len(inst) for inst in found])
    local = np.concatenate([inst.boxes_xyxy() for inst in found]).reshape(-1, 4)
    cut = np.concatenate(
        [cut_by_inner_edges(local[tile_of == t], w, height, width) for t, w in enumerate(windows)]
    )
    boxes = merged.boxes_xyxy()
    first, second, bands = band_pairs(boxes, tile_of, windows)

    whole_pair = ~cut[first] & ~cut[second]
    iou = box_iou_pairs(boxes, first[whole_pair], second[whole_pair])
    dup = iou > DUPLICATE_IOU
    removed = greedy_suppression(merged.scores, first[whole_pair][dup], second[whole_pair][dup])
    keep = ~cut & ~removed

    # Fragments: dropped when a whole detection of another tile covers them; otherwise they are a large cell.
    covered = np.zeros(len(merged), bool)
    same_cell = []
    for i, j, rect in zip(first.tolist(), second.tolist(), bands, strict=True):
        if cut[i] and not cut[j]:
            covered[i] |= _covered_fraction(merged, i, j) >= COVERED
        elif cut[j] and not cut[i]:
            covered[j] |= _covered_fraction(merged, j, i) >= COVERED
        elif cut[i] and cut[j] and _band_iou(merged, i, j, rect) > SAME_CELL_IOU:
            same_cell.append((i, j))
    fragments = np.flatnonzero(cut & ~covered)
    if not len(fragments):
        return merged.select(keep)
    index = {int(f): k for k, f in enumerate(fragments)}
    pairs = np.asarray([(index[i], index[j]) for i, j in same_cell if i in index and j in index], np.int64)
    pairs = pairs.reshape(-1, 2)
    joined = [_join(merged, [int(fragments[k]) for k in g]) for g in _union_groups(len(fragments), *pairs.T)]
    kept = merged.select(keep)
    return Instances(
        height,
        width,
        np.concatenate([kept.labels, np.asarray([j[0] for j in joined], np.int64)]),
        np.concatenate([kept.scores, np.asarray([j[1] for j in joined], kept.scores.dtype)]),
        np.concatenate([kept.offsets, np.asarray([j[2] for j in joined], np.int64)]).reshape(-1, 2),
        [*kept.crops, *(j[3] for j in joined)],
    )
