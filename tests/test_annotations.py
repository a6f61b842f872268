"""Reading annotation files (:mod:`cellseg.annotations`): every QuPath GeoJSON form and ImageScope XML from
tiny hand-written files, the repairs and their one warning line, each bad input's one-line error, the real
exports in ../shared, and that a large GeoJSON is streamed, not loaded whole."""

from __future__ import annotations

import gzip
import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import shapely

from cellseg import CellsegError
from cellseg.annotations import (
    ANNOTATION_SUFFIXES,
    Annotation,
    AnnotationError,
    AnnotationFile,
    Repairs,
    open_annotations,
)
from conftest import ROOT, two_nuclei

SHARED = ROOT.parent / "shared"
GEOJSON_FIXTURES = SHARED / "fixtures" / "annotations"
XML_FIXTURE = SHARED / "fixtures" / "slides" / "A9K0_2.xml"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"real annotation fixture not available at {path} (it lives outside the repo, in ../shared)"
        )
    return path


def square(x: float, y: float, size: float = 4, closed: bool = True) -> list:
    ring = [[x, y], [x + size, y], [x + size, y + size], [x, y + size]]
    return [ring + [ring[0]]] if closed else [ring]


def feature(coordinates, kind: str = "Polygon", **properties) -> dict:
    return {
        "type": "Feature",
        "geometry": {"type": kind, "coordinates": coordinates},
        "properties": properties,
    }


def write(path: Path, data, indent: int | None = None) -> Path:
    path.write_text(json.dumps(data, indent=indent))
    return path


def read(path: Path) -> tuple[list[Annotation], AnnotationFile]:
    f = open_annotations(path)
    return list(f), f


def error_of(path: Path) -> str:
    with pytest.raises(AnnotationError) as info:
        list(open_annotations(path))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


# ---------------------------------------------------------------- GeoJSON: containers


def test_a_feature_collection_reads_the_same_pretty_or_on_one_line_in_any_key_order(tmp_path) -> None:
    features = [
        feature(square(0, 0), objectType="detection"),
        feature(square(10, 0, 2), objectType="detection"),
    ]
    pretty = write(tmp_path / "pretty.geojson", {"type": "FeatureCollection", "features": features}, indent=2)
    other = {"features": features, "bbox": [0, 0, 12, 4], "type": "FeatureCollection", "name": "x"}
    one_line = write(tmp_path / "one_line.geojson", other)
    assert "\n" not in one_line.read_text()
    for path in (pretty, one_line):
        annotations, f = read(path)
        assert f.format == "geojson" and f.mpp is None and f.repairs.total() == 0
        assert [a.geometry.area for a in annotations] == [16, 4]
        assert [a.index for a in annotations] == [0, 1]
        assert all(a.geometry.is_valid and a.object_type == "detection" for a in annotations)


def test_a_plain_list_gzip_and_a_lone_feature_are_read(tmp_path) -> None:
    features = [feature(square(0, 0)), feature(square(5, 5))]
    plain = write(tmp_path / "list.json", features)
    gz = tmp_path / "list.geojson.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    disguised = tmp_path / "gzipped.geojson"  # gzip known by its magic bytes, not its suffix
    disguised.write_bytes(gz.read_bytes())
    not_gz = tmp_path / "plain.geojson.gz"
    not_gz.write_bytes(plain.read_bytes())
    for path in (plain, gz, disguised, not_gz):
        annotations, _ = read(path)
        assert [a.geometry.bounds for a in annotations] == [(0, 0, 4, 4), (5, 5, 9, 9)], path
    lone, _ = read(write(tmp_path / "lone.geojson", feature(square(1, 1), classification="x")))
    assert [(a.class_name, a.geometry.area) for a in lone] == [("x", 16)]
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert len(read(bom)[0]) == 2
    assert read(write(tmp_path / "empty.geojson", {"type": "FeatureCollection", "features": []}))[0] == []


def test_each_qupath_version_s_object_types_classes_and_locks(tmp_path) -> None:
    v02 = feature(square(0, 0), classification={"name": "Tumor", "colorRGB": -65536}, isLocked=False)
    v02["id"] = "PathDetectionObject"
    v02["properties"]["measurements"] = [{"name": "Area", "value": 16}]
    parent = {"name": "Tumor", "colorRGB": -1}
    v02_derived = feature(
        square(0, 0), classification={"parentClass": parent, "name": "Positive", "colorRGB": -2}
    )
    v02_derived["id"] = "PathAnnotationObject"
    v03 = feature(
        square(0, 0), object_type="annotation", classification={"name": "Stroma", "color": [0, 255, 0]}
    )
    tumour = {"name": "nuclei_tumor", "color": [200, 0, 0]}
    v04 = feature(square(0, 0), objectType="detection", classification=tumour, isLocked=True)
    v04["id"] = "77797017-2159-4289-be43-1c6ad5e07780"
    names = {"names": ["Tumor", "Positive"], "color": [1, 2, 3, 128]}
    derived = feature(square(0, 0), objectType="annotation", classification=names)
    rows = [
        (v02, "Tumor", "detection", False),
        (v02_derived, "Tumor: Positive", "annotation", False),
        (v03, "Stroma", "annotation", False),
        (v04, "nuclei_tumor", "detection", True),
        (derived, "Tumor: Positive", "annotation", False),
        (feature(square(0, 0)), None, "annotation", False),  # no type, no class anywhere
        (feature(square(0, 0), objectType="detection", classification=None), None, "detection", False),
        (feature(square(0, 0), classification={}), None, "annotation", False),
        (feature(square(0, 0), classification="Immune cells"), "Immune cells", "annotation", False),
        (feature(square(0, 0), object_type="DETECTION"), None, "detection", False),  # qubalab's upper case
        (feature(square(0, 0), objectType="tile"), None, "detection", False),
        (feature(square(0, 0), objectType="something new"), None, "annotation", False),
    ]
    annotations, f = read(write(tmp_path / "versions.geojson", [r[0] for r in rows]))
    assert [(a.class_name, a.object_type, a.locked) for a in annotations] == [r[1:] for r in rows]
    assert f.repairs.total() == 0
    core = feature(square(0, 0), objectType="tmaCore")
    annotations, f = read(write(tmp_path / "tma.geojson", [core, feature(square(0, 0))]))
    assert len(annotations) == 1 and annotations[0].index == 1
    assert f.repairs.line("x") == "warning: x: left out 1 TMA core or root object"


def test_a_cell_yields_its_nucleus_from_either_place(tmp_path) -> None:
    cell_04 = feature(
        square(0, 0, 10), objectType="cell", classification={"name": "Tumor", "color": [1, 2, 3]}
    )
    cell_04["nucleusGeometry"] = {"type": "Polygon", "coordinates": square(2, 2, 3)}
    cell_props = feature(square(0, 0, 10), objectType="cell")
    cell_props["properties"]["nucleusGeometry"] = {"type": "Polygon", "coordinates": square(4, 4, 2)}
    cell_02 = feature(square(0, 0, 10))
    cell_02["id"] = "PathCellObject"
    cell_02["nucleusGeometry"] = {"type": "Polygon", "coordinates": square(1, 1, 1)}
    no_nucleus = feature(square(0, 0, 10), objectType="cell")
    annotations, f = read(write(tmp_path / "cells.geojson", [cell_04, cell_props, no_nucleus, cell_02]))
    assert [(a.geometry.area, a.object_type, a.index) for a in annotations] == [
        (9, "cell", 0),
        (4, "cell", 1),
        (1, "cell", 3),
    ]
    assert annotations[0].class_name == "Tumor"
    assert f.repairs.counts == {"cells without a nucleus geometry left out": 1}
    assert f.repairs.line("c.geojson") == "warning: c.geojson: left out 1 cell without a nucleus geometry"


def test_multipolygons_and_holes(tmp_path) -> None:
    holed = [square(0, 0, 10)[0], square(2, 2, 3)[0]]
    multi = [square(0, 0, 2), square(5, 5, 3)]
    members = [{"type": "Polygon", "coordinates": square(0, 0, 2)}, {"type": "Point", "coordinates": [9, 9]}]
    collection = {"type": "GeometryCollection", "geometries": members}
    features = [feature(holed), feature(multi, "MultiPolygon"), {"type": "Feature", "geometry": collection}]
    annotations, f = read(write(tmp_path / "shapes.geojson", features))
    hole, multipolygon, from_collection = (a.geometry for a in annotations)
    assert hole.geom_type == "Polygon" and len(hole.interiors) == 1 and hole.area == 100 - 9
    assert not hole.contains(shapely.Point(3.5, 3.5)) and hole.contains(shapely.Point(1, 1))
    assert multipolygon.geom_type == "MultiPolygon" and multipolygon.area == 4 + 9
    assert from_collection.geom_type == "Polygon" and from_collection.area == 4
    assert f.repairs.line("s") == "warning: s: dropped 1 non-area part of a collection"


# ---------------------------------------------------------------- GeoJSON: repairs


def test_a_bow_tie_is_repaired_and_counted(tmp_path) -> None:
    bow_tie = [[[0, 0], [4, 4], [4, 0], [0, 4], [0, 0]]]
    annotations, f = read(write(tmp_path / "bow.geojson", [feature(bow_tie), feature(square(9, 9))]))
    assert len(annotations) == 2
    repaired = annotations[0].geometry
    assert repaired.is_valid and repaired.area == pytest.approx(8) and repaired.geom_type == "MultiPolygon"
    assert f.repairs.counts == {"invalid polygons repaired (make_valid)": 1}
    assert f.repairs.line(tmp_path / "bow.geojson") == (
        f"warning: {tmp_path / 'bow.geojson'}: repaired 1 invalid polygon (make_valid)"
    )


def test_an_unclosed_ring_is_closed_and_counted(tmp_path) -> None:
    features = [
        feature(square(0, 0, closed=False)),
        feature([square(0, 0, 9, False)[0], square(2, 2, 2, False)[0]]),
    ]
    annotations, f = read(write(tmp_path / "open.geojson", features))
    assert [a.geometry.area for a in annotations] == [16, 81 - 4]
    assert f.repairs.counts == {"unclosed rings closed": 3}
    assert f.repairs.line("o") == "warning: o: closed 3 unclosed rings"


def test_points_lines_and_degenerate_shapes_are_left_out_and_counted(tmp_path) -> None:
    features = [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}},
        feature(square(0, 0)),
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [5, 5]]}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[0, 0], [5, 5]]}},
        feature([[[0, 0], [3, 3], [0, 0]]]),  # two distinct vertices
        feature([[[0, 0], [1, 1], [2, 2], [0, 0]]]),  # collinear: no area
        feature([]),  # no ring at all
        feature([square(0, 0, 2), [[[0, 0], [1, 0], [0, 0]]]], "MultiPolygon"),  # one part degenerate
        feature([square(0, 0, 5)[0], [[1, 1], [2, 2], [1, 1]]]),  # degenerate hole
        {"type": "Feature", "geometry": {"type": "GeometryCollection", "geometries": []}},
    ]
    annotations, f = read(write(tmp_path / "mixed.geojson", features))
    assert [(a.index, a.geometry.area) for a in annotations] == [(1, 16), (7, 4), (8, 25)]
    assert f.repairs.counts == {
        "non-area geometries left out (Point/LineString)": 3,
        "degenerate shapes left out (under 3 distinct vertices or zero area)": 4,
        "degenerate polygon parts dropped": 1,
        "degenerate holes dropped": 1,
    }
    assert f.repairs.total() == 9
    assert f.repairs.line("m") == (
        "warning: m: dropped 1 degenerate hole, dropped 1 degenerate polygon part; "
        "left out 4 degenerate shapes, 3 non-area geometries (Point/LineString)"
    )


def test_repairs_count_and_make_one_line() -> None:
    repairs = Repairs({})
    assert repairs.line("a.xml") is None and repairs.total() == 0
    repairs.add("unclosed rings closed", 3)
    repairs.add("degenerate shapes left out (under 3 distinct vertices or zero area)")
    repairs.add("invalid polygons repaired (make_valid)", 5)
    repairs.add("unclosed rings closed", 0)
    assert repairs.total() == 9
    assert repairs.line("A.xml") == (
        "warning: A.xml: repaired 5 invalid polygons (make_valid), closed 3 unclosed rings; "
        "left out 1 degenerate shape"
    )
    repairs.add("something else")
    assert repairs.line("A.xml").endswith(
        "closed 3 unclosed rings, something else: 1; left out 1 degenerate shape"
    )


def test_iterating_again_reads_again_and_counts_afresh(tmp_path) -> None:
    f = open_annotations(write(tmp_path / "a.geojson", [feature(square(0, 0, closed=False))]))
    assert len(list(f)) == len(list(f)) == 1
    assert f.repairs.counts == {"unclosed rings closed": 1}


# ---------------------------------------------------------------- GeoJSON: bad input

FEATURE = b'{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1]]]}}'


def one(geometry: bytes, properties: bytes = b"{}") -> bytes:
    """A list of one feature with this geometry and these properties (JSON text)."""
    return b'[{"type": "Feature", "geometry": ' + geometry + b', "properties": ' + properties + b"}]"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"type": "FeatureCollection", "features": [}', "not JSON: parse error"),
        (b'{\n  "features": [\n    {"b": tru}\n]}', "at line 3, column 14"),
        (b"hello", "not JSON: lexical error: invalid char in json text. at line 1, column 1"),
        (b'{"type": "FeatureCollection", "features": [', "not JSON: parse error: premature EOF"),
        (b"", "not JSON: the file is empty"),
        (
            b'{"foo": 1}',
            "not GeoJSON: expected a FeatureCollection or a list of Features (found an object with keys",
        ),
        (b"[1, 2]", "not GeoJSON: expected a FeatureCollection or a list of Features (item 0 is a number)"),
        (
            b'[{"type": "Polygon", "coordinates": []}]',
            "not GeoJSON: expected a FeatureCollection or a list of Features (item 0 is a 'Polygon' object)",
        ),  # fmt: skip
        (b"42", "not GeoJSON: expected a FeatureCollection or a list of Features (found a JSON number)"),
        (b'{"type": "FeatureCollection", "features": {}}', "not GeoJSON: its 'features' is not a list"),
        (b'[{"type": "Feature", "properties": {}}]', "feature 0 has no geometry"),
        (
            b'{"features": [' + FEATURE + b', {"type": "Feature", "id": "abc", "geometry": null}]}',
            "feature 1 (id 'abc') has no geometry",
        ),
        (
            one(b'{"type": "Polygon", "coordinates": [[["0", 0], [1, 0], [1, 1]]]}'),
            "feature 0: coordinates are not numbers",
        ),
        (
            one(b'{"type": "Polygon", "coordinates": [[[true, 0], [1, 0], [1, 1]]]}'),
            "feature 0: coordinates are not numbers",
        ),
        (
            one(b'{"type": "Polygon", "coordinates": [[[0], [1, 0], [1, 1]]]}'),
            "feature 0: coordinates are not lists of [x, y] numbers",
        ),
        (one(b'{"type": "Circle", "coordinates": [1, 2]}'), "feature 0: unknown geometry type 'Circle'"),
        (one(b'{"type": "Polygon"}'), "feature 0: its Polygon has no list of coordinates"),
        (
            one(b'{"type": "Polygon", "coordinates": []}', b'{"classification": 7}'),
            "feature 0: its classification is neither an object nor a string",
        ),
        (b"\x1f\x8b\x08\x00garbage", "not a readable gzip file"),
    ],
)
def test_bad_geojson_raises_one_line_naming_the_file_and_the_problem(tmp_path, content, expected) -> None:
    path = tmp_path / "bad.geojson"
    path.write_bytes(content)
    assert expected in error_of(path)
    assert issubclass(AnnotationError, CellsegError) and issubclass(AnnotationError, ValueError)


def test_open_annotations_checks_the_suffix_and_that_the_file_exists(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("[]")
    with pytest.raises(AnnotationError) as info:
        open_annotations(tmp_path / "a.txt")
    assert str(info.value).startswith(f"{tmp_path / 'a.txt'}: ")
    assert all(s in str(info.value) for s in ANNOTATION_SUFFIXES)
    with pytest.raises(AnnotationError, match="no such file"):
        open_annotations(tmp_path / "missing.geojson")
    assert ANNOTATION_SUFFIXES == (".geojson", ".geojson.gz", ".json", ".xml")


def test_cellseg_s_own_geojson_reads_back(tmp_path) -> None:
    """The outputs' sink (as tests/test_outputs.py builds it): detections named by class, the same pixels."""
    from cellseg.outputs import SinkContext, open_sinks

    nuclei = two_nuclei()
    with open_sinks(
        ["geojson", "geojson.gz"], SinkContext(tmp_path, "slide", mpp=0.5, height=80, width=100)
    ) as s:
        for sink in s:
            sink.add(nuclei)
    for name in ("nuclei.geojson", "nuclei.geojson.gz"):
        annotations, f = read(tmp_path / name)
        assert [(a.class_name, a.object_type, a.index) for a in annotations] == [
            ("class2", "detection", 0),
            ("class3", "detection", 1),
        ]
        assert f.repairs.total() == 0
        # the rectangle's 8 x 12 level-0 pixels from (x 8, y 6), filled by pixel centres (edge included)
        yy, xx = np.mgrid[:20, :30]
        filled = shapely.covers(annotations[0].geometry, shapely.points(xx + 0.5, yy + 0.5))
        expected = np.zeros((20, 30), bool)
        expected[6:14, 8:20] = True
        assert (filled == expected).all()


# ---------------------------------------------------------------- ImageScope XML


def imagescope(annotations: list[str], root: str = '<Annotations MicronsPerPixel="0.252100">') -> str:
    return root + "".join(annotations) + "</Annotations>"


def layer(regions: list[list[tuple]], attribute: str | None = None, name: str = "", extra: str = "") -> str:
    attributes = (
        f'<Attributes><Attribute Name="{attribute}" Id="0" Value=""/></Attributes>' if attribute else ""
    )
    body = "".join(
        f'<Region Id="{k + 1}" Type="0" {extra}><Attributes/><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in vertices)
        + "</Vertices></Region>"
        for k, vertices in enumerate(regions)
    )
    headers = '<RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region"/></RegionAttributeHeaders>'
    regions = f"<Regions>{headers}{body}</Regions>"
    return f'<Annotation Id="1" Name="{name}" Type="4">{attributes}{regions}</Annotation>'


SQUARE = [(0, 0), (3, 0), (3, 3), (0, 3)]


def test_imagescope_classes_by_attribute_by_name_or_none(tmp_path) -> None:
    path = tmp_path / "a.xml"
    path.write_text(
        imagescope([
            layer([SQUARE, [(10, 10), (14, 10), (14, 14)]], attribute="Epithelial", name="Layer 1"),
            layer([], attribute="Neutrophil"),  # a class with no nucleus
            layer([SQUARE], name="Tumour"),
            layer([SQUARE], attribute="Description"),  # ImageScope's default attribute (MoNuSeg): no class
            layer([SQUARE]),
        ])
    )  # fmt: skip
    annotations, f = read(path)
    assert f.format == "imagescope" and f.mpp == pytest.approx(0.2521)
    assert [(a.class_name, a.index, a.object_type, a.locked) for a in annotations] == [
        ("Epithelial", 0, "annotation", False),
        ("Epithelial", 1, "annotation", False),
        ("Tumour", 2, "annotation", False),
        (None, 3, "annotation", False),
        (None, 4, "annotation", False),
    ]
    assert annotations[1].geometry.area == 8
    assert f.repairs.total() == 0  # rings are closed implicitly in this format: no repair


@pytest.mark.parametrize(
    ("root", "inner", "mpp"),
    [
        ('<Annotations MicronsPerPixel="0.194480">', "", 0.19448),
        ("<Annotations>", ' MicronsPerPixel="0.5"', 0.5),
        ("<Annotations>", "", None),
        ('<Annotations MicronsPerPixel="0">', "", None),
        ('<Annotations MicronsPerPixel="abc">', "", None),
    ],
)
def test_imagescope_resolution_from_the_root_or_the_annotation(tmp_path, root, inner, mpp) -> None:
    path = tmp_path / "a.xml"
    path.write_text(imagescope([layer([SQUARE]).replace('Id="1" ', f'Id="1"{inner} ', 1)], root))
    f = open_annotations(path)
    assert f.mpp == (pytest.approx(mpp) if mpp else None)
    assert len(list(f)) == 1


def test_imagescope_vertices_are_pixel_centres_made_corners(tmp_path) -> None:
    """+0.5: a square of vertex centres 0..3 fills exactly pixels 0..3, as skimage.draw.polygon fills the raw
    vertices; so does a diamond."""
    from skimage.draw import polygon as fill

    diamond = [(6, 2), (10, 6), (6, 10), (2, 6)]
    path = tmp_path / "a.xml"
    path.write_text(imagescope([layer([SQUARE, diamond], attribute="Lymphocyte")]))
    annotations, _ = read(path)
    assert annotations[0].geometry.bounds == (0.5, 0.5, 3.5, 3.5)
    yy, xx = np.mgrid[:12, :12]
    centres = shapely.points(xx + 0.5, yy + 0.5)
    for annotation, vertices in zip(annotations, [SQUARE, diamond], strict=True):
        ours = shapely.covers(annotation.geometry, centres)
        theirs = np.zeros((12, 12), bool)
        xs, ys = np.array(vertices, float).T
        theirs[fill(ys, xs)] = True
        assert (ours == theirs).all()
    square_mask = shapely.covers(annotations[0].geometry, centres)
    assert square_mask[:4, :4].all() and square_mask.sum() == 16


def test_imagescope_repairs_and_leaves_out(tmp_path) -> None:
    bow_tie = [(0, 0), (4, 4), (4, 0), (0, 4)]
    path = tmp_path / "a.xml"
    path.write_text(
        imagescope([
            layer([bow_tie, [(1, 1), (5, 5)], [(2.5, 2.5)], SQUARE + [(0, 0)]], attribute="Lymphocyte"),
            layer([SQUARE], attribute="Tumour", extra='NegativeROA="1"'),
        ])
    )  # fmt: skip
    annotations, f = read(path)
    assert [a.index for a in annotations] == [0, 3]
    assert annotations[0].geometry.is_valid and annotations[0].geometry.area > 0
    assert f.repairs.counts == {
        "invalid polygons repaired (make_valid)": 1,
        "degenerate shapes left out (under 3 distinct vertices or zero area)": 2,
        "negative (excluded) regions left out": 1,
    }
    assert f.repairs.line("a.xml") == (
        "warning: a.xml: repaired 1 invalid polygon (make_valid); "
        "left out 2 degenerate shapes, 1 negative (excluded) region"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not xml at all", "not XML (syntax error: line 1, column 0)"),
        ("", "not XML (no element found"),
        ('<Annotations><Annotation Id="1"><Regions><Region Id="1">', "not well-formed XML (no element found"),
        (
            '<?xml version="1.0"?><svg><g/></svg>',
            "not ImageScope XML: its root element is <svg>, not <Annotations>",
        ),
        (
            imagescope([layer([SQUARE, SQUARE, SQUARE, SQUARE, SQUARE, []], attribute="Lymphocyte")]),
            "region 5 (Id 6) of annotation 'Lymphocyte' has no vertices",
        ),
        (
            imagescope([layer([[(0, 0), ("a", 1), (2, 2)]], name="T")]),
            "region 0 (Id 1) of annotation 'T': a vertex has X='a' Y='1', not numbers",
        ),  # fmt: skip
        (
            imagescope([layer([[(0, 0), (1, "nan"), (2, 2)]])]),
            "of annotation 'Id 1': coordinates are not finite",
        ),
    ],
)
def test_bad_imagescope_raises_one_line_naming_the_file_and_the_problem(tmp_path, text, expected) -> None:
    path = tmp_path / "bad.xml"
    path.write_text(text)
    assert expected in error_of(path)


# ---------------------------------------------------------------- the real exports (../shared)


@pytest.mark.parametrize(
    ("name", "classes", "multi", "holed"),
    [
        (
            "training_set_metastatic_roi_001_nuclei.geojson",
            {"nuclei_tumor": 502, "nuclei_apoptosis": 120, "nuclei_lymphocyte": 8, "nuclei_endothelium": 3},
            5,
            3,
        ),
        (
            "training_set_metastatic_roi_088_nuclei.geojson",
            {
                "nuclei_tumor": 189,
                "nuclei_lymphocyte": 124,
                "nuclei_histiocyte": 30,
                "nuclei_apoptosis": 5,
                "nuclei_stroma": 9,
            },  # fmt: skip
            0,
            0,
        ),
    ],
)
def test_real_qupath_exports(name, classes, multi, holed) -> None:
    annotations, f = read(_need(GEOJSON_FIXTURES / name))
    assert len(annotations) == sum(classes.values())
    assert Counter(a.class_name for a in annotations) == classes
    assert sum(a.geometry.geom_type == "MultiPolygon" for a in annotations) == multi
    assert sum(any(p.interiors for p in shapely.get_parts(a.geometry)) for a in annotations) == holed
    assert {a.object_type for a in annotations} == {"annotation"}
    assert all(a.geometry.is_valid and a.geometry.area > 0 for a in annotations)
    assert [a.index for a in annotations] == list(range(len(annotations)))
    assert f.repairs.line(name) is None
    x0, y0, x1, y1 = shapely.union_all([a.geometry for a in annotations]).bounds
    assert 0 <= x0 and 0 <= y0 and x1 <= 1024 and y1 <= 1024


def test_real_imagescope_file_gives_the_challenge_s_masks() -> None:
    """A9K0_2.xml: 314 nuclei (Epithelial 15, Lymphocyte 299, Neutrophil and Macrophage none); their shapes,
    filled by pixel centres, are the masks MoNuSAC's skimage.draw.polygon makes of the raw vertices (a
    self-crossing outline may differ by a few pixels where make_valid and skimage part ways)."""
    from skimage.draw import polygon as fill

    annotations, f = read(_need(XML_FIXTURE))
    assert len(annotations) == 314 and f.mpp == pytest.approx(0.19448)
    assert Counter(a.class_name for a in annotations) == {"Epithelial": 15, "Lymphocyte": 299}
    assert f.repairs.total() == f.repairs.counts["invalid polygons repaired (make_valid)"] > 0
    regions = [
        np.array([(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")])
        for region in ET.parse(XML_FIXTURE).iter("Region")
    ]
    same, ious = 0, []
    for annotation, vertices in zip(annotations, regions, strict=True):
        x0, y0 = np.floor(vertices.min(0)).astype(int) - 2
        x1, y1 = np.ceil(vertices.max(0)).astype(int) + 3
        yy, xx = np.mgrid[y0:y1, x0:x1]
        ours = shapely.covers(annotation.geometry, shapely.points(xx + 0.5, yy + 0.5))
        theirs = np.zeros_like(ours)
        rr, cc = fill(vertices[:, 1] - y0, vertices[:, 0] - x0, ours.shape)
        theirs[rr, cc] = True
        same += (ours == theirs).all()
        ious.append((ours & theirs).sum() / (ours | theirs).sum())
    assert same >= 0.9 * len(annotations) and min(ious) > 0.95 and np.mean(ious) > 0.999


# ---------------------------------------------------------------- streaming


@pytest.mark.slow
def test_a_large_geojson_is_streamed_not_loaded_whole(tmp_path) -> None:
    import tracemalloc

    features = [
        feature(square((i % 200) * 5, (i // 200) * 5), objectType="detection", classification={"name": "c"})
        for i in range(20_000)
    ]
    path = write(tmp_path / "big.geojson", {"type": "FeatureCollection", "features": features})
    del features

    def peak(fn) -> int:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    count = []
    ours = peak(lambda: count.append(sum(1 for _ in open_annotations(path))))

    def load() -> None:
        with open(path) as fh:
            json.load(fh)

    whole = peak(load)
    assert count == [20_000]
    assert ours < 0.1 * whole, (ours, whole)
