"""A label image of a slide's nuclei (format ``zarr``), written chunk by chunk: OME-Zarr.

``labels.zarr`` is a Zarr v3 group with OME-NGFF 0.5 metadata (``ome.multiscales``, axes y/x in micrometres,
one scale) and one array ``0``: uint32 at level-0 pixels, 0 = background, each nucleus painted with its table
id, chunks of ``CHUNK`` px. Nuclei arrive block by block, so only the chunks of the blocks being written are in
memory (a bounded write-back cache); the whole image never is. The nuclei are disjoint (:mod:`cellseg.nuclei`);
where two outlines' rasterisations meet, the pixel keeps the nucleus painted first.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np

from cellseg.outputs.base import Nuclei, SinkContext, TempOutput

CHUNK = 512
CACHE_CHUNKS = 96
"""Chunks held in memory at most (96 × 1 MB): a block's footprint at the defaults is about 25-40 chunks."""


class LabelImage:
    """The uint32 label image of ``height × width`` level-0 pixels at ``path``."""

    def __init__(self, path: Path, height: int, width: int, mpp: float) -> None:
        import zarr

        root = zarr.open_group(path, mode="w", zarr_format=3)
        root.attrs["ome"] = {
            "version": "0.5",
            "multiscales": [
                {
                    "name": "nuclei",
                    "axes": [
                        {"name": "y", "type": "space", "unit": "micrometer"},
                        {"name": "x", "type": "space", "unit": "micrometer"},
                    ],
                    "datasets": [
                        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [mpp, mpp]}]}
                    ],
                }
            ],
            "image-label": {"version": "0.5"},
        }
        self.array = root.create_array(
            "0", shape=(height, width), chunks=(CHUNK, CHUNK), dtype="uint32", fill_value=0
        )
        self.height, self.width = height, width
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _chunk(self, cy: int, cx: int) -> np.ndarray:
        key = (cy, cx)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        y0, x0 = cy * CHUNK, cx * CHUNK
        chunk = np.asarray(self.array[y0 : min(y0 + CHUNK, self.height), x0 : min(x0 + CHUNK, self.width)])
        self._cache[key] = chunk
        if len(self._cache) > CACHE_CHUNKS:
            self._write(*self._cache.popitem(last=False))
        return chunk

    def _write(self, key: tuple[int, int], chunk: np.ndarray) -> None:
        y0, x0 = key[0] * CHUNK, key[1] * CHUNK
        self.array[y0 : y0 + chunk.shape[0], x0 : x0 + chunk.shape[1]] = chunk

    def paint(self, polygon, nucleus_id: int) -> None:
        """Fill a level-0 polygon with ``nucleus_id`` where no earlier nucleus is (pixel centres inside)."""
        bx0, by0, bx1, by1 = polygon.bounds
        x0, y0 = max(int(math.floor(bx0)), 0), max(int(math.floor(by0)), 0)
        x1, y1 = min(int(math.ceil(bx1)), self.width), min(int(math.ceil(by1)), self.height)
        if x0 >= x1 or y0 >= y1:
            return
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        points = np.asarray(polygon.exterior.coords)[:, :2] - np.array([x0 + 0.5, y0 + 0.5])
        cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
        for cy in range(y0 // CHUNK, (y1 - 1) // CHUNK + 1):
            for cx in range(x0 // CHUNK, (x1 - 1) // CHUNK + 1):
                chunk = self._chunk(cy, cx)
                oy, ox = cy * CHUNK, cx * CHUNK
                sy0, sy1 = max(y0, oy), min(y1, oy + chunk.shape[0])
                sx0, sx1 = max(x0, ox), min(x1, ox + chunk.shape[1])
                part = chunk[sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox]
                paint = (mask[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] > 0) & (part == 0)
                part[paint] = nucleus_id

    def close(self) -> None:
        while self._cache:
            self._write(*self._cache.popitem(last=False))


class ZarrLabelSink:
    """``labels.zarr``: each nucleus painted with its id (the table's and the GeoJSON's)."""

    def __init__(self, context: SinkContext) -> None:
        self.output = TempOutput(context.folder / "labels.zarr")
        self.image = LabelImage(self.output.path, context.height, context.width, context.mpp or 1.0)

    def add(self, nuclei: Nuclei) -> None:
        for nucleus_id, polygon in zip(nuclei.ids, nuclei.polygons, strict=True):
            self.image.paint(polygon, int(nucleus_id))

    def close(self) -> None:
        self.image.close()
        self.output.commit()

    def abort(self) -> None:
        self.output.discard()
