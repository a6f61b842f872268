"""What every reader yields (:class:`Annotation`), what it had to fix (:class:`Repairs`), and the fixing.

Hand-drawn polygons are often not valid: rings left open, outlines that cross themselves (14–30% of
MoNuSeg's), slivers of two vertices. A reader builds each shape with :func:`polygon`, then :func:`repair`
makes it valid (``shapely.make_valid``) and keeps only its area. Nothing is dropped silently: each fix and
each left-out shape is counted in :class:`Repairs`, which the caller reports in one warning line per file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon

from cellseg import CellsegError

CLOSED = "unclosed rings closed"
REPAIRED = "invalid polygons repaired (make_valid)"
HOLES_DROPPED = "degenerate holes dropped"
PARTS_DROPPED = "degenerate polygon parts dropped"
NON_AREA_PARTS = "non-area parts of geometry collections dropped"
DEGENERATE = "degenerate shapes left out (under 3 distinct vertices or zero area)"
NON_AREA = "non-area geometries left out (Point/LineString)"
NO_NUCLEUS = "cells without a nucleus geometry left out"
OTHER_OBJECTS = "TMA cores and root objects left out"
NEGATIVE = "negative (excluded) regions left out"

_FIXES = {  # key: (singular, plural) of what was fixed
    REPAIRED: ("repaired {n} invalid polygon (make_valid)", "repaired {n} invalid polygons (make_valid)"),
    CLOSED: ("closed {n} unclosed ring", "closed {n} unclosed rings"),
    HOLES_DROPPED: ("dropped {n} degenerate hole", "dropped {n} degenerate holes"),
    PARTS_DROPPED: ("dropped {n} degenerate polygon part", "dropped {n} degenerate polygon parts"),
    NON_AREA_PARTS: (
        "dropped {n} non-area part of a collection",
        "dropped {n} non-area parts of collections",
    ),
}
_LEFT_OUT = {  # key: (singular, plural) of what was left out
    DEGENERATE: ("{n} degenerate shape", "{n} degenerate shapes"),
    NON_AREA: ("{n} non-area geometry (Point/LineString)", "{n} non-area geometries (Point/LineString)"),
    NO_NUCLEUS: ("{n} cell without a nucleus geometry", "{n} cells without a nucleus geometry"),
    OTHER_OBJECTS: ("{n} TMA core or root object", "{n} TMA cores or root objects"),
    NEGATIVE: ("{n} negative (excluded) region", "{n} negative (excluded) regions"),
}


class AnnotationError(CellsegError, ValueError):
    """Bad annotation file; the message starts with the file's path and says what is wrong (one line)."""


class ShapeError(ValueError):
    """A geometry that cannot be read (coordinates that are not numbers ...); the reader adds the file and the
    feature or region to the message and raises AnnotationError."""


@dataclass(frozen=True)
class Annotation:
    """One shape of an annotation file, in level-0 pixel-corner coordinates (pixel (r, c) spans [c, c+1) x
    [r, r+1)); ``geometry`` is a valid, non-empty shapely Polygon or MultiPolygon."""

    geometry: Any
    class_name: str | None
    object_type: str
    locked: bool = False
    index: int = 0


@dataclass
class Repairs:
    """Counts of what reading had to fix or leave out, reported in ONE warning line."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, what: str, n: int = 1) -> None:
        if n:
            self.counts[what] = self.counts.get(what, 0) + n

    def total(self) -> int:
        return sum(self.counts.values())

    def line(self, path: str | Path) -> str | None:
        """E.g. ``warning: A.xml: repaired 5 invalid polygons (make_valid), closed 3 unclosed rings; left out
        1 degenerate shape``; None when nothing was fixed or left out."""
        counts = {what: n for what, n in self.counts.items() if n > 0}
        fixed = [_FIXES[w][counts[w] != 1].format(n=counts[w]) for w in _FIXES if w in counts]
        fixed += [f"{w}: {n}" for w, n in counts.items() if w not in _FIXES and w not in _LEFT_OUT]
        left = [_LEFT_OUT[w][counts[w] != 1].format(n=counts[w]) for w in _LEFT_OUT if w in counts]
        if not fixed and not left:
            return None
        parts = [", ".join(fixed)] if fixed else []
        if left:
            parts.append("left out " + ", ".join(left))
        return f"warning: {path}: " + "; ".join(parts)


def ring_array(ring: Any) -> np.ndarray:
    """A ring's positions as an (n, 2) float array; x and y only (a third coordinate is ignored)."""
    try:
        arr = np.asarray(ring)
    except ValueError:  # ragged: positions of different lengths or nesting
        raise ShapeError("coordinates are not lists of [x, y] numbers") from None
    if arr.size == 0:
        return np.empty((0, 2))
    if arr.dtype.kind not in "iuf" or (not isinstance(ring, np.ndarray) and _has_bool(ring)):
        raise ShapeError("coordinates are not numbers")
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ShapeError("coordinates are not lists of [x, y] numbers")
    arr = arr[:, :2].astype(np.float64)
    if not np.isfinite(arr).all():
        raise ShapeError("coordinates are not finite numbers")
    return arr


def _has_bool(ring: Any) -> bool:
    """JSON's true and false among the numbers (numpy would read them as 1 and 0)."""
    return any(type(v) is bool for position in ring for v in position)


def _closed(arr: np.ndarray, repairs: Repairs, count: bool) -> np.ndarray | None:
    """The ring closed (first vertex repeated at the end), or None when under 3 vertices are left."""
    if len(arr) and not (arr[0] == arr[-1]).all():
        if len(arr) >= 3 and count:
            repairs.add(CLOSED)
        arr = np.vstack([arr, arr[:1]])
    return arr if len(arr) >= 4 else None


def polygon(rings: Sequence[Any], repairs: Repairs, count_closing: bool = True) -> Polygon | None:
    """A Polygon of an exterior ring and holes (lists of positions), rings closed; None when the exterior has
    under 3 distinct vertices. The result may still be invalid: :func:`repair` sees to that.

    ``count_closing`` False for formats whose rings are closed implicitly (ImageScope never repeats the first
    vertex), so that closing them is no repair worth a warning."""
    if not isinstance(rings, (list, tuple)):
        raise ShapeError("Polygon coordinates are not a list of rings")
    if not rings:
        return None
    shell = _closed(ring_array(rings[0]), repairs, count_closing)
    if shell is None:
        return None
    holes = []
    for ring in rings[1:]:
        hole = _closed(ring_array(ring), repairs, count_closing)
        if hole is None:
            repairs.add(HOLES_DROPPED)
        else:
            holes.append(hole)
    return Polygon(shell, holes)


def polygonal(geom: Any) -> Polygon | MultiPolygon | None:
    """Only the area of ``geom``: a Polygon or MultiPolygon as it is, the union of the polygonal parts of a
    collection (lines and points that ``make_valid`` returns for collapsed pieces are dropped), else None."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [p for p in shapely.get_parts(geom) if isinstance(p, (Polygon, MultiPolygon)) and not p.is_empty]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else polygonal(shapely.union_all(parts))


def repair(geom: Polygon | MultiPolygon, repairs: Repairs) -> Polygon | MultiPolygon | None:
    """``geom`` made valid (counted), or None (counted as degenerate) when it has no area."""
    fixed = False
    if not geom.is_valid:
        geom, fixed = polygonal(shapely.make_valid(geom)), True
    if geom is None or geom.is_empty or geom.area <= 0:
        repairs.add(DEGENERATE)
        return None
    if fixed:
        repairs.add(REPAIRED)
    return geom


def shape_of(parts: Sequence[Polygon | None], repairs: Repairs) -> Polygon | MultiPolygon | None:
    """One valid shape of polygon parts (None for degenerate ones: dropped, counted); None if none is left."""
    kept = [p for p in parts if p is not None]
    if not kept:
        repairs.add(DEGENERATE)
        return None
    repairs.add(PARTS_DROPPED, len(parts) - len(kept))
    return repair(kept[0] if len(kept) == 1 else MultiPolygon(kept), repairs)


class AnnotationFile:
    """An opened annotation file: iterate it for its Annotations, streamed. Each iteration reads the file
    afresh and refills :attr:`repairs`; :attr:`mpp` is known once it is opened (ImageScope) or None."""

    format = ""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.mpp: float | None = None
        self.repairs = Repairs()

    def __iter__(self) -> Iterator[Annotation]:
        self.repairs.counts.clear()
        return self._read()

    def _read(self) -> Iterator[Annotation]:
        raise NotImplementedError

    def error(self, what: str) -> AnnotationError:
        """The error for this file: its path, then ``what`` on the same line."""
        return AnnotationError(f"{self.path}: " + " ".join(str(what).split()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, format={self.format!r}, mpp={self.mpp})"
