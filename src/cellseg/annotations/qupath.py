"""QuPath GeoJSON (0.2, 0.3, 0.4 and later) and cellseg's own ``nuclei.geojson``, read one feature at a time.

Checked in QuPath's source (the qupath/qupath repository read with git: ``PathObjectTypeAdapters.java`` at
tags v0.2.0 and v0.3.0, ``QuPathTypeAdapters.java`` at v0.4.0 and on main,
``GsonTools.PathClassTypeAdapter``), and in qubalab's ``qubalab/objects/image_feature.py``
(``create_from_feature``):

- A cell's nucleus: every QuPath version writes it as ``nucleusGeometry``, a member of the Feature beside
  ``geometry`` (which is the whole cell); qubalab looks for it there and in ``properties``, and keeps it as
  ``properties.extra_geometries.nucleus``. All three places are read; a cell without one is left out
  (counted).
- The object type: 0.2 wrote it as the feature's ``id`` (``PathDetectionObject`` ...), 0.3 as
  ``properties.object_type``, 0.4+ as ``properties.objectType`` (QuPath also reads ``properties.type``;
  qubalab writes upper-case names). As QuPath does, an absent or unknown type is an annotation; a tile is a
  detection; TMA cores and the root object are no drawn shapes and are left out (counted).
- The classification: 0.4+ ``{"name", "color": [r, g, b(, a)]}``, or ``{"names": [...]}`` for a derived class
  (QuPath joins the names with ": "); 0.2 and 0.3 Gson's own ``{"name", "colorRGB": int}`` with an optional
  ``parentClass`` of the same form; a plain string; ``{}`` or null for none.
- ``isLocked``: 0.2 always wrote it, 0.4+ only when true. A geometry's ``plane`` (z, t) is ignored.

Coordinates are level-0 pixels on pixel corners already (QuPath's convention and cellseg's): none is shifted.

Why ijson: QuPath parses a whole file into memory; a slide's 100k+ features need not be. ``ijson.items`` (its
yajl2 C backend) yields one feature at a time from ``features.item`` (a FeatureCollection, keys in any order)
or ``item`` (a plain list). A file that starts with gzip's magic bytes is read through gzip, whatever its
suffix.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import ijson

from cellseg.annotations.shapes import (
    DEGENERATE,
    NO_NUCLEUS,
    NON_AREA,
    NON_AREA_PARTS,
    OTHER_OBJECTS,
    Annotation,
    AnnotationFile,
    ShapeError,
    polygon,
    shape_of,
)

_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_NOT_GEOJSON = "not GeoJSON: expected a FeatureCollection or a list of Features"
_OBJECT_TYPES: dict[str, str | None] = {  # lower-cased type names of all versions -> ours (None: left out)
    "annotation": "annotation",
    "pathannotationobject": "annotation",
    "detection": "detection",
    "pathdetectionobject": "detection",
    "tile": "detection",
    "pathtileobject": "detection",
    "cell": "cell",
    "pathcellobject": "cell",
    "tmacore": None,
    "tma_core": None,
    "tmacoreobject": None,
    "root": None,
    "pathrootobject": None,
}
_LEGACY_IDS = {  # 0.2's object types, written as the feature's id
    "PathAnnotationObject", "PathDetectionObject", "PathTileObject", "PathCellObject", "TMACoreObject",
    "PathRootObject",
}  # fmt: skip
_NON_AREA_TYPES = {"Point", "MultiPoint", "LineString", "MultiLineString"}
_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", float: "a number",
               int: "a number", type(None): "null"}  # fmt: skip


class _Tracker:
    """A binary reader that counts what it hands out (bytes, lines). From byte ``slow_from`` on it hands out
    one byte per read, so that the parser fails at the very byte that is wrong: its line and column."""

    def __init__(self, raw: BinaryIO, slow_from: int | None = None) -> None:
        self.raw, self.slow_from = raw, slow_from
        self.pos = self.last = 0
        self.line, self.line_start = 1, 0

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        if self.slow_from is not None:
            n = 1 if self.pos >= self.slow_from else min(n if n > 0 else 1 << 16, self.slow_from - self.pos)
        data = self.raw.read(n)
        newline = data.rfind(b"\n")
        if newline >= 0:
            self.line += data.count(b"\n")
            self.line_start = self.pos + newline + 1
        self.last = len(data)
        self.pos += len(data)
        return data


class GeoJsonFile(AnnotationFile):
    """A QuPath / cellseg GeoJSON file (plain or gzipped)."""

    format = "geojson"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._top = self._first_char()
        if self._top not in "{[":
            self._check_json()
            raise self.error(f"{_NOT_GEOJSON} (found a JSON {_scalar_name(self._top)})")

    def _open(self) -> BinaryIO:
        """The file's bytes, through gzip when they start with its magic, past a UTF-8 byte-order mark."""
        with open(self.path, "rb") as f:
            magic = f.read(2)
        stream: Any = gzip.open(self.path, "rb") if magic == _GZIP_MAGIC else open(self.path, "rb")
        try:
            if stream.read(3) != _BOM:
                stream.seek(0)
        except (OSError, EOFError, zlib.error) as e:
            stream.close()
            raise self.error(f"not a readable gzip file ({e})") from None
        return stream

    def _first_char(self) -> str:
        try:
            with self._open() as f:
                while chunk := f.read(1 << 16):
                    if rest := chunk.lstrip(b" \t\r\n"):
                        return rest[:1].decode("latin-1")
        except (OSError, EOFError, zlib.error) as e:
            raise self.error(f"not a readable gzip file ({e})") from None
        raise self.error("not JSON: the file is empty")

    def _check_json(self) -> None:
        """Raise "not JSON" (with the error's line and column) unless the whole file parses."""
        tracker = None
        try:
            with self._open() as raw:
                tracker = _Tracker(raw)
                for _ in ijson.basic_parse(tracker):
                    pass
        except ijson.JSONError as e:
            raise self._json_error(e, tracker) from None

    def _json_error(self, error: Exception, tracker: _Tracker | None) -> Exception:
        what = (str(error).strip().splitlines() or [type(error).__name__])[0]
        where = ""
        if tracker is not None:  # parse again, one byte at a time from the chunk that failed
            slow = _Tracker(self._open(), slow_from=tracker.pos - tracker.last)
            try:
                for _ in ijson.basic_parse(slow):
                    pass
            except ijson.JSONError:
                where = f" at line {slow.line}, column {slow.pos - slow.line_start}"
            finally:
                slow.raw.close()
        return self.error(f"not JSON: {what}{where}")

    def _read(self) -> Iterator[Annotation]:
        prefix = "item" if self._top == "[" else "features.item"
        seen, tracker = 0, None
        try:
            with self._open() as raw:
                tracker = _Tracker(raw)
                for feature in ijson.items(tracker, prefix, use_float=True):
                    annotation = self._annotation(feature, seen)
                    seen += 1
                    if annotation is not None:
                        yield annotation
        except ijson.JSONError as e:
            raise self._json_error(e, tracker) from None
        except (OSError, EOFError, zlib.error) as e:
            raise self.error(f"cannot be read ({e})") from None
        if seen == 0 and self._top == "{":
            lone = self._lone_feature()
            if lone is not None:
                annotation = self._annotation(lone, 0)
                if annotation is not None:
                    yield annotation

    def _lone_feature(self) -> dict | None:
        """An object that gave no feature: an empty collection (None), one lone Feature, or no GeoJSON."""
        keys: dict[str, tuple[str, Any]] = {}
        key = None
        with self._open() as f:
            for prefix, event, value in ijson.parse(f):
                if key is not None:
                    keys[key], key = (event, value), None
                elif prefix == "" and event == "map_key":
                    key = value
        if "features" in keys:
            if keys["features"][0] != "start_array":
                raise self.error("not GeoJSON: its 'features' is not a list")
            return None
        if keys.get("type") == ("string", "Feature"):
            with self._open() as f:
                return next(ijson.items(f, "", use_float=True))
        shown = ", ".join(repr(k) for k in list(keys)[:5]) + (" ..." if len(keys) > 5 else "")
        raise self.error(f"{_NOT_GEOJSON} (found an object with keys {shown or 'none'})")

    def _annotation(self, feature: Any, n: int) -> Annotation | None:
        if not isinstance(feature, dict):
            raise self.error(f"{_NOT_GEOJSON} (item {n} is {_JSON_NAMES.get(type(feature), 'a value')})")
        kind = feature.get("type")
        if kind != "Feature" and (kind is not None or "geometry" not in feature):
            found = f"a {kind!r} object" if isinstance(kind, str) else "an object with no 'type'"
            raise self.error(f"{_NOT_GEOJSON} (item {n} is {found})")
        fid = feature.get("id")
        legacy = isinstance(fid, str) and fid in _LEGACY_IDS
        where = f"feature {n}" + (f" (id {fid!r})" if fid is not None and not legacy else "")
        props = feature.get("properties")
        props = {} if props is None else props
        if not isinstance(props, dict):
            raise self.error(f"{where}: its 'properties' is not an object")
        object_type = _object_type(props, fid)
        if object_type is None:
            self.repairs.add(OTHER_OBJECTS)
            return None
        try:
            class_name = _class_name(props.get("classification"))
        except ShapeError as e:
            raise self.error(f"{where}: {e}") from None
        if object_type == "cell":
            geometry = _nucleus(feature, props)
            if geometry is None:
                self.repairs.add(NO_NUCLEUS)
                return None
        else:
            geometry = feature.get("geometry")
            if geometry is None:
                raise self.error(f"{where} has no geometry")
        try:
            shape = self._shape(geometry)
        except ShapeError as e:
            raise self.error(f"{where}: {e}") from None
        if shape is None:
            return None
        return Annotation(shape, class_name, object_type, props.get("isLocked") is True, n)

    def _shape(self, geometry: Any) -> Any:
        parts, non_area = self._parts(geometry)
        if not parts:
            self.repairs.add(NON_AREA if non_area else DEGENERATE)
            return None
        self.repairs.add(NON_AREA_PARTS, non_area)
        return shape_of(parts, self.repairs)

    def _parts(self, geometry: Any) -> tuple[list, int]:
        """A GeoJSON geometry's polygons (None for a degenerate one) and how many non-area members it has."""
        if not isinstance(geometry, dict) or not isinstance(geometry.get("type"), str):
            raise ShapeError("its geometry is not a GeoJSON geometry (an object with a 'type')")
        kind = geometry["type"]
        if kind in _NON_AREA_TYPES:
            return [], 1
        if kind == "GeometryCollection":
            members = geometry.get("geometries")
            if not isinstance(members, list):
                raise ShapeError("its GeometryCollection has no list of 'geometries'")
            parts, non_area = [], 0
            for member in members:
                p, k = self._parts(member)
                parts += p
                non_area += k
            return parts, non_area
        if kind not in ("Polygon", "MultiPolygon"):
            raise ShapeError(f"unknown geometry type {kind!r}")
        coordinates = geometry.get("coordinates")
        if not isinstance(coordinates, list):
            raise ShapeError(f"its {kind} has no list of coordinates")
        if kind == "Polygon":
            return [polygon(coordinates, self.repairs)], 0
        return [polygon(rings, self.repairs) for rings in coordinates], 0


def _object_type(props: dict, fid: Any) -> str | None:
    for key in ("objectType", "object_type", "type"):
        value = props.get(key)
        if isinstance(value, str):
            return _OBJECT_TYPES.get(value.lower(), "annotation")
    if isinstance(fid, str) and fid in _LEGACY_IDS:
        return _OBJECT_TYPES[fid.lower()]
    return "annotation"


def _class_name(classification: Any) -> str | None:
    if classification is None:
        return None
    if isinstance(classification, str):
        return classification.strip() or None
    if not isinstance(classification, dict):
        raise ShapeError("its classification is neither an object nor a string")
    name, names = classification.get("name"), classification.get("names")
    if name is None and isinstance(names, list) and names and all(isinstance(s, str) for s in names):
        return ": ".join(names)
    if name is None:
        return None
    if not isinstance(name, str):
        raise ShapeError("its classification's name is not a string")
    parent = _class_name(classification.get("parentClass"))
    if parent and name:
        return f"{parent}: {name}"
    return name.strip() or parent


def _nucleus(feature: dict, props: dict) -> Any:
    for holder in (feature, props):
        if holder.get("nucleusGeometry") is not None:
            return holder["nucleusGeometry"]
    extra = props.get("extra_geometries")
    return extra.get("nucleus") if isinstance(extra, dict) else None


def _scalar_name(first: str) -> str:
    return {'"': "string", "t": "boolean", "f": "boolean", "n": "null"}.get(first, "number")
