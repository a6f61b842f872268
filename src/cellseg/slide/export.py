"""A slide's results as files people open: GeoJSON for QuPath, a per-nucleus table, a thumbnail, the tissue mask.

Everything is written nucleus by nucleus (streamed), never from one list of the slide's nuclei.

- **GeoJSON** (QuPath's import format, as ``qupath.lib.io.GsonTools`` and qubalab's ``qubalab.objects.geojson``
  write it): a ``FeatureCollection`` of ``Feature`` s with an ``id`` (a UUID), a ``Polygon`` geometry in level-0
  pixels (closed rings, x then y) and ``properties`` ``{"objectType": "detection", "classification": {"name",
  "color": [r, g, b]}, "measurements": {name: number}}``.
- **Table**: CSV (standard library) or Parquet (pyarrow, one row group per chunk).
- **Thumbnail**: the overview picture with each nucleus's outline in its class colour; **tissue.png**: the mask.
"""

from __future__ import annotations

import csv
import gzip
import json
import uuid
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from cellseg import CLASS_NAMES

CLASS_COLOURS = {1: (230, 25, 75), 2: (60, 180, 75), 3: (0, 130, 200), 4: (245, 130, 48)}
"""One colour per class (RGB); the classes have no real names, so they are class1..class4."""

TABLE_COLUMNS = (
    "id",
    "class",
    "score",
    "centroid_x_px",
    "centroid_y_px",
    "centroid_x_um",
    "centroid_y_um",
    "area_px",
    "area_um2",
    "bbox_x0",
    "bbox_y0",
    "bbox_x1",
    "bbox_y1",
)
"""Per nucleus: level-0 pixels (``_px``, bounding box x1/y1 exclusive) and micrometres (``_um``, ``_um2``)."""

_NAMESPACE = uuid.UUID("6f1c7f3e-8d1a-4c55-9a53-3a4f0c1e2b77")


def mask_polygon(crop: np.ndarray):
    """The outline of a boolean mask as one valid shapely Polygon in the crop's pixel-corner coordinates."""
    from shapely import make_valid
    from shapely.geometry import MultiPolygon, Polygon, box

    padded = np.pad(crop.astype(np.uint8), 1)
    # On a 2× upsampled mask the contour runs a quarter pixel inside the mask's edges instead of through the
    # centres of its border pixels: the outline encloses nearly whole pixels and a one-pixel-wide part keeps
    # a non-zero width.
    big = cv2.resize(padded, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    best = None
    for contour in contours:
        points = contour[:, 0, :].astype(np.float64)
        if len(points) < 3:
            continue
        # a contour point (X, Y) on the 2× grid marks the pixel [X/2, X/2 + 0.5): its outer corner is the edge
        points = (points + 0.5) / 2.0 - 1.0
        poly = Polygon(points)
        if not poly.is_valid:
            poly = make_valid(poly)
        if isinstance(poly, MultiPolygon) or poly.geom_type == "GeometryCollection":
            polys = [g for g in getattr(poly, "geoms", []) if g.geom_type == "Polygon"]
            poly = max(polys, key=lambda g: g.area) if polys else None
        if poly is not None and poly.geom_type == "Polygon" and not poly.is_empty:
            if best is None or poly.area > best.area:
                best = poly
    if best is None:
        rows, cols = np.nonzero(crop)
        best = box(cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    return best


class Nucleus:
    """One nucleus in level-0 pixels, ready for export."""

    __slots__ = ("id", "label", "score", "polygon", "area_px", "mask_pixels")

    def __init__(self, id_: int, label: int, score: float, polygon, area_px: float, mask_pixels: int) -> None:
        self.id, self.label, self.score, self.polygon = id_, label, score, polygon
        self.area_px, self.mask_pixels = area_px, mask_pixels


def to_level0(crop: np.ndarray, offset: tuple[int, int], scale: float):
    """The polygon of a model-pixel crop at ``offset`` (y0, x0), in level-0 pixels (``scale`` level-0 px per model
    px), rounded to 1/100 px and still valid."""
    from shapely import affinity, set_precision

    poly = mask_polygon(crop)
    simpler = poly.simplify(0.3, preserve_topology=True)  # drops the staircase's collinear-ish points
    if simpler.geom_type == "Polygon" and simpler.is_valid and not simpler.is_empty:
        poly = simpler
    poly = affinity.affine_transform(poly, [scale, 0, 0, scale, offset[1] * scale, offset[0] * scale])
    rounded = set_precision(poly, 0.01)
    if rounded.geom_type == "Polygon" and rounded.is_valid and not rounded.is_empty:
        return rounded
    return poly


class Writers:
    """The GeoJSON and table files of one slide, written one nucleus at a time."""

    def __init__(self, folder: Path, stem: str, mpp: float, gzip_geojson: bool, table_format: str) -> None:
        self.mpp, self.stem = mpp, stem
        self.geojson_path = folder / ("nuclei.geojson.gz" if gzip_geojson else "nuclei.geojson")
        self._geo = (
            gzip.open(self.geojson_path, "wt", encoding="utf-8", compresslevel=6)
            if gzip_geojson
            else open(self.geojson_path, "w", encoding="utf-8")
        )
        self._geo.write('{"type": "FeatureCollection", "features": [\n')
        self._first = True
        self.table_format = table_format
        self.table_path = folder / f"nuclei.{table_format}"
        self._rows: list[tuple] = []
        if table_format == "csv":
            self._csv_file = open(self.table_path, "w", newline="", encoding="utf-8")
            self._csv = csv.writer(self._csv_file)
            self._csv.writerow(TABLE_COLUMNS)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self._schema = pa.schema(
                [("id", pa.int64()), ("class", pa.string()), ("score", pa.float32())]
                + [(c, pa.float64()) for c in TABLE_COLUMNS[3:]]
            )
            self._parquet = pq.ParquetWriter(self.table_path, self._schema)
        self.counts = dict.fromkeys(CLASS_NAMES, 0)

    def add(self, nucleus: Nucleus) -> None:
        from shapely.geometry import mapping

        name = CLASS_NAMES[nucleus.label - 1]
        self.counts[name] += 1
        poly = nucleus.polygon
        area_um2 = nucleus.area_px * self.mpp * self.mpp
        feature = {
            "type": "Feature",
            "id": str(uuid.uuid5(_NAMESPACE, f"{self.stem}/{nucleus.id}")),
            "geometry": mapping(poly),
            "properties": {
                "objectType": "detection",
                "name": f"nucleus {nucleus.id}",
                "classification": {"name": name, "color": list(CLASS_COLOURS[nucleus.label])},
                "measurements": {
                    "id": nucleus.id,
                    "score": round(float(nucleus.score), 4),
                    "area_um2": round(area_um2, 3),
                },
            },
        }
        self._geo.write(("" if self._first else ",\n") + json.dumps(feature, separators=(",", ":")))
        self._first = False
        cx, cy = poly.centroid.x, poly.centroid.y
        x0, y0, x1, y1 = poly.bounds
        row = (
            nucleus.id,
            name,
            float(nucleus.score),
            cx,
            cy,
            cx * self.mpp,
            cy * self.mpp,
            nucleus.area_px,
            area_um2,
            x0,
            y0,
            x1,
            y1,
        )
        if self.table_format == "csv":
            self._csv.writerow(
                [
                    row[0],
                    row[1],
                    f"{row[2]:.4f}",
                    *(f"{v:.2f}" for v in row[3:8]),
                    f"{row[8]:.3f}",
                    *(f"{v:.2f}" for v in row[9:]),
                ]
            )
        else:
            self._rows.append(row)
            if len(self._rows) >= 65536:
                self._flush()

    def _flush(self) -> None:
        if self.table_format != "parquet" or not self._rows:
            return
        import pyarrow as pa

        columns = list(zip(*self._rows, strict=True))
        self._parquet.write_table(pa.Table.from_arrays([pa.array(c) for c in columns], schema=self._schema))
        self._rows = []

    def close(self) -> None:
        self._geo.write("\n]}\n")
        self._geo.close()
        if self.table_format == "csv":
            self._csv_file.close()
        else:
            self._flush()
            self._parquet.close()


def draw_outline(image: np.ndarray, polygon, label: int, scale_y: float, scale_x: float) -> None:
    """Draw a level-0 polygon onto the overview picture (``scale_*``: level-0 px per picture pixel)."""
    points = np.asarray(polygon.exterior.coords)[:, :2] / np.array([scale_x, scale_y])
    points = np.round(points).astype(np.int32)
    if len(np.unique(points, axis=0)) <= 2:
        cx, cy = points.mean(axis=0).round().astype(int)
        if 0 <= cy < image.shape[0] and 0 <= cx < image.shape[1]:
            image[cy, cx] = CLASS_COLOURS[label]
        return
    cv2.polylines(image, [points[:, None, :]], True, CLASS_COLOURS[label], 1, lineType=cv2.LINE_8)


def write_picture(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path)
