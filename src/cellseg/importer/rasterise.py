"""Nuclei polygons into label images: a pixel belongs to a nucleus when its centre lies inside the polygon.

That is what the challenges did (``skimage.draw.polygon`` on the vertices) once the vertex convention is
accounted for: geometries here are in pixel-corner coordinates, so pixel (r, c) is inside when the point
(c + 0.5, r + 0.5) is. Holes are taken out. Within a class the smaller of two overlapping nuclei keeps the
contested pixels (larger ones are painted first), so a nucleus drawn inside a larger one survives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.draw import polygon as fill_polygon


def _parts(geometry) -> list:
    return list(geometry.geoms) if geometry.geom_type == "MultiPolygon" else [geometry]


def _ring_pixels(ring, y0: int, x0: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    xy = np.asarray(ring.coords, np.float64)
    return fill_polygon(xy[:, 1] - 0.5 - y0, xy[:, 0] - 0.5 - x0, shape=shape)


def fill(geometry, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` of the pixels whose centres lie inside ``geometry`` (tile-local corner coordinates)."""
    minx, miny, maxx, maxy = geometry.bounds
    y0, x0 = max(0, int(np.floor(miny))), max(0, int(np.floor(minx)))
    y1, x1 = min(height, int(np.ceil(maxy)) + 1), min(width, int(np.ceil(maxx)) + 1)
    if y1 <= y0 or x1 <= x0:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    shape = (y1 - y0, x1 - x0)
    mask = np.zeros(shape, bool)
    for part in _parts(geometry):
        mask[_ring_pixels(part.exterior, y0, x0, shape)] = True
        for hole in part.interiors:
            mask[_ring_pixels(hole, y0, x0, shape)] = False
    rows, cols = np.nonzero(mask)
    return rows + y0, cols + x0


@dataclass
class PaintStats:
    """What painting a tile met: pixels two nuclei of one class both claimed, and nuclei too small to hold a
    pixel centre or wholly covered by smaller ones."""

    contested_pixels: int = 0
    overlapping_nuclei: int = 0
    empty_nuclei: int = 0

    def add(self, other: PaintStats) -> None:
        self.contested_pixels += other.contested_pixels
        self.overlapping_nuclei += other.overlapping_nuclei
        self.empty_nuclei += other.empty_nuclei


def paint(
    nuclei: list[tuple[object, int, int]], n_classes: int, height: int, width: int
) -> tuple[np.ndarray, list[int], PaintStats]:
    """Label images ``int32 n_classes × height × width`` of ``nuclei`` (``(geometry, class 1..K, source index)``
    in tile-local corner coordinates): ids 1, 2, ... run across the classes, as the raw layout wants. Returns the
    labels, the source index of each painted id (``sources[id - 1]``) and the stats."""
    labels = np.zeros((n_classes, height, width), np.int32)
    stats = PaintStats()
    order = sorted(range(len(nuclei)), key=lambda i: -nuclei[i][0].area)
    painted: list[tuple[int, int, int]] = []  # (id, class, source)
    for i in order:
        geometry, k, source = nuclei[i]
        rows, cols = fill(geometry, height, width)
        if len(rows) == 0:
            stats.empty_nuclei += 1
            continue
        plane = labels[k - 1]
        taken = int(np.count_nonzero(plane[rows, cols]))
        if taken:
            stats.contested_pixels += taken
            stats.overlapping_nuclei += 1
        nucleus_id = len(painted) + 1
        plane[rows, cols] = nucleus_id
        painted.append((nucleus_id, k, source))
    # a nucleus wholly painted over by smaller ones is gone: renumber the survivors 1..n
    sources: list[int] = []
    remap = np.zeros(len(painted) + 1, np.int32)
    present = np.zeros(len(painted) + 1, bool)
    for k in range(n_classes):
        present[np.unique(labels[k])] = True
    for nucleus_id, _, source in painted:
        if present[nucleus_id]:
            sources.append(source)
            remap[nucleus_id] = len(sources)
        else:
            stats.empty_nuclei += 1
    return remap[labels], sources, stats
