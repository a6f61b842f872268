"""Benchmark: merging tiled detections, the old dense N×N merge vs ``cellseg.infer.tiling``'s per-band merge.

Scenes of about 1k, 5k and 20k synthetic cells at nuclei density (the 5k scene is 2500×2500 px, the largest
test image's size), a few of them larger than the tile overlap, cut into the default 512-px tiles with 64 px
of overlap. A perfect detector gives each tile exactly the cells (or parts of cells) it shows, so any cell lost
or doubled is the merge's doing. Each merge runs in a forked process whose peak resident memory (VmHWM, reset
before the merge) and time are measured.

    python -m cellseg.bench.tiling [--cells 1000 5000 20000] [--old-up-to 5000]

The old merge is skipped above ``--old-up-to`` cells: its N×N temporaries take about 32 bytes per pair of
detections (2.2 GB at 8k detections), which is tens of GB at 20k cells.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torchvision.ops import box_iou

from cellseg.infer.tiling import SEAM_MARGIN, Window, merge_tiles, tile_windows
from cellseg.instances import Instances

TILE, OVERLAP = 512, 64
SIDE_AT_5K = 2500
"""The 5,000-cell scene is 2500×2500 px; other scenes keep its density."""
SMALL_SPACING = 32.0
"""Grid pitch of the ordinary cells (about 6,000 places in 2500×2500 px; large cells clear some)."""
LARGE_PER_MPX = 6
"""Cells of 90–150 px (wider than the 64-px overlap) per million pixels."""


# ------------------------------------------------------------------------------------------------ the scene
def scene(cells: int, seed: int = 0) -> np.ndarray:
    """A label image (int32, 0 = background) of about ``cells`` non-overlapping ellipses at nuclei density."""
    rng = np.random.default_rng(seed)
    side = int(round(SIDE_AT_5K * np.sqrt(cells / 5000)))
    ids = np.zeros((side, side), np.int32)
    n_large = max(2, int(LARGE_PER_MPX * side**2 / 1e6))
    large = [
        (rng.uniform(80, side - 80), rng.uniform(80, side - 80), rng.uniform(45, 75)) for _ in range(n_large)
    ]
    spacing = SMALL_SPACING
    grid = np.arange(spacing / 2, side, spacing)
    centres = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    centres += rng.uniform(-spacing / 8, spacing / 8, centres.shape)
    small = [
        (cy, cx, rng.uniform(0.3, 0.42) * spacing)
        for cy, cx in centres
        if all(np.hypot(cy - y, cx - x) > r + 0.45 * spacing for y, x, r in large)
    ]
    for n, (cy, cx, r) in enumerate(large + small, start=1):
        y0, y1 = max(int(cy - r) - 1, 0), min(int(cy + r) + 2, side)
        x0, x1 = max(int(cx - r) - 1, 0), min(int(cx + r) + 2, side)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        stretch = 0.75 + 0.25 * ((n * 7919) % 100) / 100
        cell = ((yy - cy) / r) ** 2 + ((xx - cx) / (r * stretch)) ** 2 <= 1.0
        ids[y0:y1, x0:x1][cell] = n
    return ids


def detect_in_tiles(ids: np.ndarray, windows: list[Window]) -> list[Instances]:
    """What a perfect detector finds in each tile: every visible cell (or part), class and score fixed per cell
    and tile, so that two tiles' detections of one cell differ in score."""
    found = []
    for t, w in enumerate(windows):
        tile = ids[w.y0 : w.y0 + w.height, w.x0 : w.x0 + w.width]
        present = np.unique(tile[tile > 0])
        compact = np.searchsorted(present, tile) + 1
        compact[tile == 0] = 0
        slices = ndimage.find_objects(compact)
        crops = [compact[sl] == k + 1 for k, sl in enumerate(slices)]
        offsets = np.asarray([(sl[0].start, sl[1].start) for sl in slices], np.int64).reshape(-1, 2)
        scores = (0.5 + 0.4 * ((present * 37 + t * 11) % 101) / 101).astype(np.float32)
        found.append(Instances(w.height, w.width, (present % 4 + 1).astype(np.int64), scores, offsets, crops))
    return found


def count_errors(ids: np.ndarray, merged: Instances) -> tuple[int, int, int]:
    """``(lost, doubled, spurious)``: cells with no prediction at mask IoU ≥ 0.5, cells with several, and
    predictions matching no cell."""
    areas = np.bincount(ids.ravel())
    matches = np.zeros(len(areas), np.int64)
    spurious = 0
    for (y0, x0), crop in zip(merged.offsets, merged.crops, strict=True):
        under = ids[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]][crop]
        counts = np.bincount(under, minlength=1)
        counts[0] = 0
        cell = int(counts.argmax())
        iou = counts[cell] / (areas[cell] + crop.sum() - counts[cell]) if cell else 0.0
        if iou >= 0.5:
            matches[cell] += 1
        else:
            spurious += 1
    present = areas > 0
    present[0] = False
    return int((matches[present] == 0).sum()), int((matches[present] > 1).sum()), spurious


def seen_whole_by_no_tile(ids: np.ndarray, windows: list[Window]) -> int:
    """Cells that every tile cuts at an inner edge (wider than the overlap, in the wrong place)."""
    height, width = ids.shape
    boxes = [
        (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        for sl in ndimage.find_objects(ids)
        if sl is not None
    ]
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    whole = np.zeros(len(boxes), bool)
    for w in windows:
        x0, y0, x1, y1 = w.rect()
        lo_x, lo_y = x0 + SEAM_MARGIN * (x0 > 0), y0 + SEAM_MARGIN * (y0 > 0)
        hi_x, hi_y = x1 - SEAM_MARGIN * (x1 < width), y1 - SEAM_MARGIN * (y1 < height)
        whole |= (boxes[:, 0] >= lo_x) & (boxes[:, 1] >= lo_y) & (boxes[:, 2] <= hi_x) & (boxes[:, 3] <= hi_y)
    return int((~whole).sum())


# --------------------------------------------------------------------------------- the old merge, as it was
def old_merge(found: list[Instances], windows: list[Window], height: int, width: int) -> Instances:
    """``predict.merge_tiles`` before ``cellseg.infer.tiling``: cut detections dropped, N×N box IoU over all tiles."""
    parts = [
        (_old_drop_cut(inst, w, height, width), w.y0, w.x0) for inst, w in zip(found, windows, strict=True)
    ]
    tile_ids, labels, scores, offsets, crops = [], [], [], [], []
    for t, (inst, y0, x0) in enumerate(parts):
        tile_ids += [t] * len(inst)
        labels.append(inst.labels)
        scores.append(inst.scores)
        offsets.append(inst.offsets + np.array([y0, x0]))
        crops += inst.crops
    merged = Instances(
        height,
        width,
        np.concatenate(labels),
        np.concatenate(scores),
        np.concatenate(offsets).reshape(-1, 2),
        crops,
    )
    if len(merged) < 2:
        return merged
    tiles = np.asarray(tile_ids)
    boxes = torch.from_numpy(merged.boxes_xyxy())
    iou = box_iou(boxes, boxes).numpy()
    duplicate = (iou > 0.5) & (tiles[:, None] != tiles[None, :])
    order = np.argsort(-merged.scores, kind="stable")
    removed = np.zeros(len(merged), bool)
    for i in order:
        if not removed[i]:
            removed |= duplicate[i]
    return merged.select(~removed)


def _old_drop_cut(inst: Instances, w: Window, height: int, width: int) -> Instances:
    boxes = inst.boxes_xyxy()
    keep = np.ones(len(inst), bool)
    if w.x0 > 0:
        keep &= boxes[:, 0] >= SEAM_MARGIN
    if w.y0 > 0:
        keep &= boxes[:, 1] >= SEAM_MARGIN
    if w.x0 + w.width < width:
        keep &= boxes[:, 2] <= w.width - SEAM_MARGIN
    if w.y0 + w.height < height:
        keep &= boxes[:, 3] <= w.height - SEAM_MARGIN
    return inst.select(keep)


# ---------------------------------------------------------------------------------------------- measuring
def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure_child(merge, found, windows, ids, traced, conn) -> None:
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    merged = merge(found, windows, *ids.shape)
    seconds = time.perf_counter() - start
    peak_mb = (_status_kb("VmHWM") - before) / 1024
    traced_mb = float("nan")
    if traced:  # exact, for Python and numpy (not torch) allocations; a second run, as tracing slows it
        del merged
        tracemalloc.start()
        merged = merge(found, windows, *ids.shape)
        traced_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    conn.send((seconds, peak_mb, traced_mb, *count_errors(ids, merged)))
    conn.close()


def measure(merge, found: list[Instances], windows: list[Window], ids: np.ndarray, traced: bool) -> tuple:
    """``(seconds, peak RSS MB above the inputs, traced peak MB, lost, doubled, spurious)`` of one merge, in a
    forked process (its memory starts as the inputs' and is gone afterwards)."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_measure_child, args=(merge, found, windows, ids, traced, send))
    process.start()
    result = receive.recv()
    process.join()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--old-up-to", type=int, default=5000, help="largest scene (cells) for the old merge")
    args = parser.parse_args(argv)
    print(f"tiles {TILE} px, overlap {OVERLAP} px; peak = resident memory above the merge's inputs")
    ratio_at_5k, errors_at_5k = None, None
    for cells in args.cells:
        ids = scene(cells)
        windows = tile_windows(*ids.shape, TILE, OVERLAP)
        found = detect_in_tiles(ids, windows)
        detections = sum(len(f) for f in found)
        large = seen_whole_by_no_tile(ids, windows)
        print(
            f"\n{ids.shape[0]}×{ids.shape[1]} px, {ids.max()} cells ({large} seen whole by no tile), "
            f"{len(windows)} tiles, {detections} detections"
        )
        new = measure(merge_tiles, found, windows, ids, traced=True)
        print(
            f"  new (per band): {new[0]:7.2f} s, peak RSS {new[1]:8.1f} MB (traced Python+numpy peak "
            f"{new[2]:.1f} MB, {new[2] * 2**20 / detections:.0f} B per detection); "
            f"lost {new[3]}, doubled {new[4]}, spurious {new[5]}"
        )
        if cells <= args.old_up_to:
            old = measure(old_merge, found, windows, ids, traced=False)
            print(
                f"  old (N×N):      {old[0]:7.2f} s, peak RSS {old[1]:8.1f} MB; "
                f"lost {old[3]}, doubled {old[4]}, spurious {old[5]}"
            )
            print(f"  peak RSS {old[1] / max(new[1], 0.1):.1f}× less, time {old[0] / new[0]:.1f}× less")
            if cells == 5000:
                ratio_at_5k = old[1] / max(new[1], 0.1)
        else:
            print(
                f"  old (N×N): skipped above {args.old_up_to} cells (N×N temporaries of about "
                f"{32 * detections**2 / 1e9:.0f} GB at the 32 B per pair measured at 5k)"
            )
        if cells == 5000:
            errors_at_5k = new[3:5]
    if ratio_at_5k is not None and errors_at_5k is not None:
        lost, doubled = errors_at_5k
        print(f"\nmerge peak memory at 5k cells: {ratio_at_5k:.1f}× less; lost {lost}, doubled {doubled}")


if __name__ == "__main__":
    main()
