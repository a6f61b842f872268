"""Tiling: cells larger than the overlap are kept (joined from their fragments), pairs are found per band.

Uses the oracle detector of ``test_predict``: it finds exactly the painted cells visible in each tile, so
whatever is lost, doubled or cut is the merge's doing.
"""

from __future__ import annotations

import numpy as np

from cellseg.infer.predict import predict_image
from cellseg.infer.tiling import (
    SEAM_MARGIN,
    Window,
    band_pairs,
    greedy_suppression,
    merge_tiles,
    tile_windows,
)
from cellseg.instances import Instances
from conftest import tiny_params
from test_predict import Oracle, ground_truth, mask_ious, paint_cells

TILE, OVERLAP = 64, 16


def _seen_whole_by_no_tile(boxes: np.ndarray, windows: list[Window], height: int, width: int) -> np.ndarray:
    """Cells that every tile containing part of them cuts at an inner edge."""
    whole = np.zeros(len(boxes), bool)
    for w in windows:
        x0, y0, x1, y1 = w.rect()
        lo_x = x0 + (SEAM_MARGIN if x0 > 0 else 0)
        lo_y = y0 + (SEAM_MARGIN if y0 > 0 else 0)
        hi_x = x1 - (SEAM_MARGIN if x1 < width else 0)
        hi_y = y1 - (SEAM_MARGIN if y1 < height else 0)
        whole |= (boxes[:, 0] >= lo_x) & (boxes[:, 1] >= lo_y) & (boxes[:, 2] <= hi_x) & (boxes[:, 3] <= hi_y)
    return ~whole


def test_cells_larger_than_the_overlap_are_kept_once_with_their_whole_mask() -> None:
    size = 4 * TILE
    image, ids = paint_cells(np.random.default_rng(3), (size, size), 45, (4, 19))
    gt = ground_truth(ids)
    windows = tile_windows(size, size, TILE, OVERLAP)
    large = _seen_whole_by_no_tile(gt.boxes_xyxy(), windows, size, size)
    assert large.sum() >= 5  # the test means something: several cells no tile sees whole

    params = tiny_params(predict__tile_size=TILE, predict__tile_overlap=OVERLAP, predict__max_per_image=1000)
    tiled = predict_image(Oracle(), image, params.predict)
    iou = mask_ious(gt, tiled)
    matches = (iou >= 0.9).sum(axis=1)
    assert (matches == 1).all(), (
        f"cells found {sorted(set(matches))} times; large lost: {(matches[large] == 0).sum()}"
    )
    assert len(tiled) == len(gt)
    assert (tiled.labels[iou.argmax(axis=1)] == gt.labels).all()


def test_band_pairs_are_the_overlapping_pairs_of_different_tiles() -> None:
    rng = np.random.default_rng(0)
    windows = tile_windows(300, 250, 100, 30)
    tile_of = rng.integers(0, len(windows), 400)
    boxes = np.zeros((400, 4), np.float32)
    for i, t in enumerate(tile_of):
        x0, y0, x1, y1 = windows[t].rect()
        a = rng.uniform([x0, y0], [x1 - 2, y1 - 2])
        b = np.minimum(a + rng.uniform(1, 25, 2), [x1, y1])
        boxes[i] = (*a, *b)
    first, second, _ = band_pairs(boxes, tile_of, windows)
    found = {tuple(sorted(p)) for p in zip(first.tolist(), second.tolist(), strict=True)}
    assert len(found) == len(first)  # each pair once

    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    overlap = ((rb - lt) > 0).all(axis=2) & (tile_of[:, None] != tile_of[None, :])
    expected = {(i, j) for i, j in zip(*np.nonzero(np.triu(overlap)), strict=True)}
    assert len(expected) > 50 and found == expected


def test_greedy_suppression_keeps_the_best_of_each_duplicate_chain() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    # 0-1 duplicates, 1-2 duplicates (2 survives: its only better partner was removed), 3 alone
    removed = greedy_suppression(scores, np.array([0, 1]), np.array([1, 2]))
    assert removed.tolist() == [False, True, False, False]


def test_merge_of_no_detections_is_empty() -> None:
    windows = tile_windows(100, 100, 64, 16)
    merged = merge_tiles([Instances(64, 64) for _ in windows], windows, 100, 100)
    assert len(merged) == 0 and (merged.height, merged.width) == (100, 100)
