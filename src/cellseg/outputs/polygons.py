"""A nucleus's mask as a polygon: the outline every vector format writes (GeoJSON, tables, label images)."""

from __future__ import annotations

import cv2
import numpy as np


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
