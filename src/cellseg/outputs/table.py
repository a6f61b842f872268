"""The per-nucleus table's columns and values, shared by its CSV and Parquet forms."""

from __future__ import annotations

from collections.abc import Iterator

from cellseg.outputs.base import Nuclei, SinkContext

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


def table_rows(nuclei: Nuclei, context: SinkContext) -> Iterator[tuple]:
    """One tuple per nucleus, in :data:`TABLE_COLUMNS` order (centroid and box of its polygon)."""
    mpp = context.mpp or 1.0
    areas = nuclei.areas_px
    for k, poly in enumerate(nuclei.polygons):
        cx, cy = poly.centroid.x, poly.centroid.y
        x0, y0, x1, y1 = poly.bounds
        area = float(areas[k])
        yield (
            int(nuclei.ids[k]),
            context.class_names[int(nuclei.instances.labels[k]) - 1],
            float(nuclei.instances.scores[k]),
            cx,
            cy,
            cx * mpp,
            cy * mpp,
            area,
            area * mpp * mpp,
            x0,
            y0,
            x1,
            y1,
        )
