"""Aperio ImageScope XML (MoNuSAC, MoNuSeg and many older sets), read one region at a time.

``<Annotations MicronsPerPixel=..>`` holds one ``<Annotation>`` per class (named by the first
``<Attributes><Attribute Name=..>`` of the annotation, else by its ``Name``, else unclassified) and one
``<Region>`` per nucleus with its ``<Vertices><Vertex X= Y= Z=/>`` in level-0 pixels. ImageScope's own default
attribute ``Description`` (MoNuSeg's files carry it, empty) names no class and is skipped.

Why +0.5: the vertices are pixel CENTRES: the challenges filled each polygon with
``skimage.draw.polygon(Y, X)``, which puts pixel (r, c) at the point x = c, y = r. Our shapes are in
pixel-CORNER coordinates (pixel (r, c) spans [c, c+1) x [r, r+1), its centre at (c + 0.5, r + 0.5)).
Adding 0.5 to X and Y puts each vertex where the challenge meant it, so a rasteriser that fills the pixels
whose centre lies in the polygon (boundary included, as skimage's does) gives the challenges' masks.

Rings are closed implicitly in this format (the first vertex is not repeated), so closing them is no repair.
Self-intersecting outlines are repaired like any other; vertices past the image's edge are kept (clipping is
the importer's job). Regions marked ``NegativeROA="1"`` are exclusions drawn in ImageScope, no shapes: left
out and counted.

Why iterparse: a slide's file holds 100k+ regions; ``xml.etree.ElementTree.iterparse`` (expat) builds one
region at a time and each is removed from the tree once read. Expat resolves no external entities, and
Python's expat (2.4 and later) refuses runaway entity expansion ("billion laughs").
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cellseg.annotations.shapes import NEGATIVE, Annotation, AnnotationFile, ShapeError, polygon, shape_of

_DEFAULT_ATTRIBUTES = {"description"}
"""ImageScope's default attribute column: names no class."""


def _mpp(value: str | None) -> float | None:
    try:
        mpp = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return mpp if math.isfinite(mpp) and mpp > 0 else None


class ImageScopeFile(AnnotationFile):
    """An Aperio ImageScope XML annotation file."""

    format = "imagescope"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.mpp = self._first_mpp()

    def _first_mpp(self) -> float | None:
        """Check the root; the resolution from it, else from the first ``<Annotation>`` (both come early)."""
        with open(self.path, "rb") as f:
            try:
                for n, (_, element) in enumerate(ET.iterparse(f, events=("start",))):
                    if n == 0:
                        self._check_root(element)
                        if (mpp := _mpp(element.get("MicronsPerPixel"))) is not None:
                            return mpp
                    elif element.tag == "Annotation":
                        return _mpp(element.get("MicronsPerPixel"))
            except ET.ParseError as e:
                raise self.error(f"not XML ({e})") from None
        return None

    def _check_root(self, root: ET.Element) -> None:
        if root.tag != "Annotations":
            raise self.error(f"not ImageScope XML: its root element is <{root.tag}>, not <Annotations>")

    def _read(self) -> Iterator[Annotation]:
        stack: list[ET.Element] = []
        index = 0
        klass: str | None = None
        label = ""
        in_annotation = 0  # regions read in the current <Annotation>
        with open(self.path, "rb") as f:
            try:
                for event, element in ET.iterparse(f, events=("start", "end")):
                    tag = element.tag
                    if event == "start":
                        if not stack:
                            self._check_root(element)
                        stack.append(element)
                        if tag == "Annotation":
                            klass, in_annotation = None, 0
                            label = element.get("Name", "").strip() or f"Id {element.get('Id', '?')}"
                            self.mpp = self.mpp or _mpp(element.get("MicronsPerPixel"))
                        continue
                    stack.pop()
                    parents = [e.tag for e in stack[-2:]]
                    if tag == "Attribute" and parents == ["Annotation", "Attributes"] and klass is None:
                        name = element.get("Name", "").strip()
                        if name and name.lower() not in _DEFAULT_ATTRIBUTES:
                            klass = name
                    elif tag == "Region" and "Annotation" in (e.tag for e in stack):
                        owner = next(e for e in reversed(stack) if e.tag == "Annotation")
                        name = klass or owner.get("Name", "").strip() or None
                        annotation = self._region(element, in_annotation, name or label)
                        stack[-1].remove(element)  # read: drop it from the tree
                        if annotation is not None:
                            yield Annotation(annotation, name, "annotation", False, index)
                        index += 1
                        in_annotation += 1
                    elif tag == "Annotation" and stack:
                        stack[-1].remove(element)
            except ET.ParseError as e:
                raise self.error(f"not well-formed XML ({e})") from None

    def _region(self, region: ET.Element, k: int, label: str) -> Any:
        """Region ``k`` of its annotation as a repaired shape, or None (left out, counted)."""
        where = f"region {k} (Id {region.get('Id', '?')}) of annotation {label!r}"
        vertices = region.findall("Vertices/Vertex")
        if not vertices:
            raise self.error(f"{where} has no vertices")
        if region.get("NegativeROA", "0").strip() == "1":
            self.repairs.add(NEGATIVE)
            return None
        try:
            xy = np.array([(float(v.get("X", "")), float(v.get("Y", ""))) for v in vertices]) + 0.5
        except ValueError:
            bad = next(v for v in vertices if not _is_number(v.get("X")) or not _is_number(v.get("Y")))
            raise self.error(
                f"{where}: a vertex has X={bad.get('X')!r} Y={bad.get('Y')!r}, not numbers"
            ) from None
        try:
            return shape_of([polygon([xy], self.repairs, count_closing=False)], self.repairs)
        except ShapeError as e:
            raise self.error(f"{where}: {e}") from None


def _is_number(text: str | None) -> bool:
    try:
        return text is not None and math.isfinite(float(text))
    except ValueError:
        return False
