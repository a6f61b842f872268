"""Pyramidal test slides written with tifffile: white glass with pictures ("tissue") pasted on it.

A tiled, compressed TIFF whose reduced levels are SubIFDs and whose resolution tags give the µm/px, the layout
of generic pyramidal TIFFs (libvips, bfconvert). Written tile by tile, so a 32k² slide needs no 3 GB array.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

GLASS = 244
"""The background grey level (unstained glass)."""


def write_slide(
    path: str | Path,
    height: int,
    width: int,
    mpp: float | None,
    patches: list[tuple[int, int, np.ndarray]],
    levels: int = 3,
    tile: int = 256,
    compression: str = "zlib",
) -> Path:
    """Write ``path``: ``levels`` levels (each half the previous), ``patches`` (y0, x0, uint8 RGB) at level 0.

    ``mpp=None`` writes no resolution tags (a slide without resolution metadata).
    """
    import tifffile

    path = Path(path)
    resolution = {}
    if mpp is not None:
        resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    shapes = [(max(1, math.ceil(height / 2**k)), max(1, math.ceil(width / 2**k))) for k in range(levels)]
    shapes = [s for k, s in enumerate(shapes) if k == 0 or min(s) >= 16]
    with tifffile.TiffWriter(path, bigtiff=height * width * 3 > 2**31) as tif:
        for k, shape in enumerate(shapes):
            scaled = [(y0 // 2**k, x0 // 2**k, _shrink(p, 2**k)) for y0, x0, p in patches]
            kwargs = {"subifds": len(shapes) - 1, **resolution} if k == 0 else {"subfiletype": 1}
            tif.write(
                _tiles(shape, tile, scaled),
                shape=(*shape, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                **kwargs,
            )
    return path


def _shrink(patch: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return patch
    h, w = max(1, patch.shape[0] // factor), max(1, patch.shape[1] // factor)
    return cv2.resize(patch, (w, h), interpolation=cv2.INTER_AREA)


def _tiles(shape: tuple[int, int], tile: int, patches: list) -> Iterator[np.ndarray]:
    height, width = shape
    for ty in range(0, height, tile):
        for tx in range(0, width, tile):
            out = np.full((tile, tile, 3), GLASS, np.uint8)
            for y0, x0, p in patches:
                sy0, sx0 = max(y0, ty), max(x0, tx)
                sy1, sx1 = min(y0 + p.shape[0], ty + tile, height), min(x0 + p.shape[1], tx + tile, width)
                if sy0 < sy1 and sx0 < sx1:
                    out[sy0 - ty : sy1 - ty, sx0 - tx : sx1 - tx] = p[
                        sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0
                    ]
            yield out


def tissue_mosaic(side: int, n: int, seed: int = 7, per_mpx: int = 700):
    """An ``n × n`` mosaic of synthetic annotated images filling ``side`` px: ``(image, truth Instances)``.

    ``per_mpx`` nuclei per megapixel (aimed at): 700 is dense tissue at 0.25 µm/px (CoNSeP's tiles hold 300-1000)
    and leaves a 512-px tile's nuclei under the model's per-image cap (``model.box_detections_per_img``).
    """
    from cellseg.data.synth import ImageSpec, generate
    from cellseg.instances import Instances

    cell = side // n
    image = np.zeros((side, side, 3), np.uint8)
    labels = np.zeros((4, side, side), np.int32)
    next_id = 0
    for i in range(n):
        for j in range(n):
            pixels, rows = generate(
                ImageSpec("train", f"m{i}{j}", cell, cell, cell * cell * per_mpx // 10**6, (seed, i * n + j))
            )
            image[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell] = pixels
            shifted = np.where(rows > 0, rows + next_id, 0)
            labels[:, i * cell : (i + 1) * cell, j * cell : (j + 1) * cell] = shifted
            next_id = max(next_id, int(shifted.max()))
    return image, Instances.from_label_rows(labels)


def write_annotation(
    path: str | Path,
    truth,
    at: tuple[int, int],
    class_names: tuple[str, ...],
    region: tuple[float, float, float, float] | None = None,
) -> Path:
    """Write ``truth`` (Instances placed with their image's top-left at ``at`` = (y0, x0) on level 0) as a
    pathologist's QuPath export: a FeatureCollection of hand-drawn ``annotation`` polygons, classified by
    ``class_names``, plus the ``region`` (x0, y0, x1, y1) where every nucleus was drawn, of class ``Region``."""
    import json
    import uuid

    from shapely.geometry import box, mapping

    from cellseg.outputs.polygons import to_level0

    def feature(geometry, name: str) -> dict:
        return {
            "type": "Feature",
            "id": str(uuid.uuid4()),
            "geometry": mapping(geometry),
            "properties": {"objectType": "annotation", "classification": {"name": name}},
        }

    features = [] if region is None else [feature(box(*region), "Region")]
    for crop, offset, label in zip(truth.crops, truth.offsets, truth.labels, strict=True):
        polygon = to_level0(crop, (int(offset[0]) + at[0], int(offset[1]) + at[1]), 1.0)
        features.append(feature(polygon, class_names[int(label) - 1]))
    path = Path(path)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path
