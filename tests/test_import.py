"""``cellseg import``: annotated images and slides into the raw training layout, exactly and safely.

The importer's parts by hand-built cases (tiles inside regions, pixel-centre filling, classes by name, which
annotation is whose), then whole imports through the command line: the synthetic slide and its annotation give
back their truth pixel for pixel, ``cellseg slide``'s own GeoJSON imports back as the same nuclei, every bad
input is one ``error:`` line with no output left, and the real ImageScope fixture imports at 0.25 µm/px as the
challenge filled it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from shapely.geometry import Polygon, box

from cellseg.data.io import list_train_samples, read_train_sample
from cellseg.importer.classes import REGION, ClassError, ClassMap
from cellseg.importer.pairs import PairError, annotation_beside, parse_source, sources_in
from cellseg.importer.rasterise import fill, paint
from cellseg.importer.regions import region_tiles, tiles_for
from cellseg.instances import Instances
from cellseg.slide.synthetic import tissue_mosaic, write_annotation, write_slide
from conftest import ROOT, run_verb

SHARED = ROOT.parent / "shared"
SVS, XML = SHARED / "fixtures/slides/A9K0_2.svs", SHARED / "fixtures/slides/A9K0_2.xml"


# ----------------------------------------------------------------------------------------------- regions
def test_a_rectangle_region_is_cut_into_equal_tiles_that_cover_it() -> None:
    tiles, left_out = region_tiles(box(10, 20, 610, 320), 1000, 1000, 256)
    assert left_out == 0
    assert {t.height for t in tiles} == {150} and {t.width for t in tiles} == {
        200
    }  # 600 = 3 x 200, 300 = 2 x 150
    covered = np.zeros((1000, 1000), int)
    for t in tiles:
        covered[t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width] += 1
    assert covered[20:320, 10:610].min() == 1 and covered.sum() == 600 * 300


def test_tiles_stay_inside_the_image_and_a_polygon_region_keeps_only_covered_tiles() -> None:
    tiles, _ = region_tiles(box(-50.5, -10, 90.7, 60), 50, 80, 64)
    assert all(t.y0 >= 0 and t.x0 >= 0 and t.y0 + t.height <= 50 and t.x0 + t.width <= 80 for t in tiles)
    triangle = Polygon([(0, 0), (400, 0), (0, 400)])
    kept, left_out = region_tiles(triangle, 400, 400, 100)
    assert left_out > 0 and kept
    for t in kept:
        assert triangle.intersection(t.box()).area >= 0.99 * t.box().area
    again, _ = tiles_for([triangle, triangle], 400, 400, 100)
    assert again == kept  # overlapping regions give each tile once


# ----------------------------------------------------------------------------------------------- filling
def test_a_pixel_belongs_to_a_polygon_when_its_centre_is_inside() -> None:
    rows, cols = fill(box(2, 1, 5, 3), 6, 8)  # corner coordinates: columns 2..4, rows 1..2
    mask = np.zeros((6, 8), bool)
    mask[rows, cols] = True
    expected = np.zeros((6, 8), bool)
    expected[1:3, 2:5] = True
    assert (mask == expected).all()
    ring = Polygon([(0, 0), (7, 0), (7, 6), (0, 6)], [[(2, 2), (5, 2), (5, 4), (2, 4)]])
    rows, cols = fill(ring, 6, 8)
    assert len(rows) == 7 * 6 - 3 * 2  # the hole is taken out
    rows, cols = fill(box(-3, -3, 2, 2), 6, 8)  # cut at the tile's edge
    assert sorted(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_the_smaller_of_two_overlapping_nuclei_keeps_the_shared_pixels_and_ids_run_across_classes() -> None:
    big, small, other = box(0, 0, 10, 10), box(6, 6, 12, 12), box(2, 2, 4, 4)
    labels, sources, stats = paint([(big, 1, 7), (small, 1, 8), (other, 2, 9)], 2, 14, 14)
    assert labels.shape == (2, 14, 14) and labels.dtype == np.int32
    ids = {s: i + 1 for i, s in enumerate(sources)}
    assert sorted(sources) == [7, 8, 9]
    assert (labels[0][6:10, 6:10] == ids[8]).all()  # contested pixels went to the smaller one
    assert np.count_nonzero(labels[0] == ids[7]) == 100 - 16
    assert (labels[1][2:4, 2:4] == ids[9]).all()  # another class overlaps freely
    assert stats.overlapping_nuclei == 1 and stats.contested_pixels == 16
    hidden, _, hidden_stats = paint(
        [(box(0, 0, 4, 4), 1, 0), (box(0, 0, 2, 4), 1, 1), (box(2, 0, 4, 4), 1, 2)], 1, 5, 5
    )
    assert set(np.unique(hidden).tolist()) == {0, 1, 2} and hidden_stats.empty_nuclei == 1  # covered wholly


# ----------------------------------------------------------------------------------------------- classes
def test_class_names_are_mapped_defaulted_or_listed_as_errors() -> None:
    classes = ["tumour", "lymphocyte", "other"]
    m = ClassMap(classes, {"nuclei_tumor": "tumour"}, "other", ["ROI"])
    assert [m.index(n) for n in ("nuclei_tumor", "lymphocyte", None, "ROI")] == [1, 2, 3, REGION]
    assert m.check("a.geojson") is None
    strict = ClassMap(classes)
    for name in ["stroma", "stroma", "necrosis", None]:
        assert strict.index(name) is None
    with pytest.raises(ClassError) as err:
        strict.check("a.geojson")
    message = str(err.value)
    assert message.startswith("a.geojson: ") and "'stroma' (2)" in message and "'necrosis' (1)" in message
    assert "1 nuclei without a classification" in message
    lenient = ClassMap(classes, skip_unknown=True)
    lenient.index("stroma")
    assert "left out" in lenient.check("a.geojson")
    with pytest.raises(ClassError, match="not in `classes`"):
        ClassMap(classes, {"x": "nope"})


# ----------------------------------------------------------------------------------------------- pairs
def test_the_annotation_beside_an_image_is_found_by_its_name(tmp_path) -> None:
    for name in ["a.svs", "a.xml", "b.tif", "b_nuclei.geojson", "b_2.tif", "b_2.geojson.gz", "c.png"]:
        (tmp_path / name).write_bytes(b"")
    assert annotation_beside(tmp_path / "a.svs").name == "a.xml"
    assert annotation_beside(tmp_path / "b.tif").name == "b_nuclei.geojson"  # b_2's file is b_2's
    assert annotation_beside(tmp_path / "b_2.tif").name == "b_2.geojson.gz"
    with pytest.raises(PairError, match="no annotation file beside it"):
        annotation_beside(tmp_path / "c.png")
    (tmp_path / "a.annotations.json").write_bytes(b"")
    assert annotation_beside(tmp_path / "a.svs").name == "a.xml"  # the exact stem wins
    (tmp_path / "b.more.geojson").write_bytes(b"")
    with pytest.raises(PairError, match="several annotation files"):
        annotation_beside(tmp_path / "b.tif")
    assert parse_source(f"{tmp_path / 'c.png'}={tmp_path / 'a.xml'}").annotation.name == "a.xml"
    (tmp_path / "b.more.geojson").unlink()
    with pytest.raises(PairError, match="c.png: no annotation file beside it"):
        sources_in(tmp_path)
    (tmp_path / "c.png").unlink()
    (tmp_path / "a.annotations.json").unlink()  # the exact stem won it: nobody's now
    assert [s.annotation.name for s in sources_in(tmp_path)] == [
        "a.xml",
        "b_nuclei.geojson",
        "b_2.geojson.gz",
    ]
    (tmp_path / "lost.xml").write_bytes(b"")
    with pytest.raises(PairError, match="annotation file\\(s\\) with no image: lost.xml"):
        sources_in(tmp_path)


# ----------------------------------------------------------------------------------------------- whole imports
def _params_file(tmp_path, **overrides) -> str:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _cli(args, capsys) -> tuple[int, str, str]:
    return run_verb("import", args, capsys)


def _raw_truth(raw) -> list[tuple[str, np.ndarray]]:
    return [(s.name, read_train_sample(s)[1]) for s in list_train_samples(raw, 4)]


@pytest.fixture(scope="module")
def annotated_slide(tmp_path_factory):
    """A synthetic slide (0.25 µm/px) with its tissue's nuclei as a QuPath export and a region around them."""
    folder = tmp_path_factory.mktemp("annotated")
    tissue, truth = tissue_mosaic(256, 2, seed=3)
    at = (40, 72)  # (y0, x0) of the tissue on the slide
    write_slide(folder / "s.tif", 400, 420, 0.25, [(at[0], at[1], tissue)], levels=2, tile=128)
    names = ("class1", "class2", "class3", "class4")
    write_annotation(folder / "s.geojson", truth, at, names, (at[1], at[0], at[1] + 256, at[0] + 256))
    return folder, truth, at


def test_a_synthetic_slide_imports_back_to_its_truth_pixel_for_pixel(
    annotated_slide, tmp_path, capsys
) -> None:
    folder, truth, at = annotated_slide
    params = _params_file(tmp_path, import__tile_size=128)
    code, out, err = _cli([folder / "s.tif", "--out", tmp_path / "raw", "--params", params], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "raw" / "import.json").read_text())
    samples = record["samples"]
    assert len(samples) == 4 and {s["width"] for s in samples} == {128.0} and samples[0]["scale"] == 1.0
    assert {(s["y0"], s["x0"]) for s in samples} == {
        (at[0] + dy, at[1] + dx) for dy in (0, 128) for dx in (0, 128)
    }
    assert samples[0]["annotation_sha256"] and samples[0]["mpp"] == 0.25
    # the raw samples, stitched back, are the truth and the slide's pixels
    stitched = np.zeros((4, 256, 256), np.int64)
    for s, (name, labels) in zip(samples, _raw_truth(tmp_path / "raw"), strict=True):
        assert name == s["sample"]
        y, x = int(s["y0"]) - at[0], int(s["x0"]) - at[1]
        stitched[:, y : y + 128, x : x + 128] = labels
    want = np.zeros((4, 256, 256), bool)
    for crop, (oy, ox), label in zip(truth.crops, truth.offsets, truth.labels, strict=True):
        want[label - 1, oy : oy + crop.shape[0], ox : ox + crop.shape[1]] |= crop
    assert ((stitched > 0) == want).all()
    assert f"{len(truth)} of {len(truth)} nuclei" in out


def test_the_geojson_cellseg_writes_imports_back_as_the_same_nuclei(tmp_path, capsys) -> None:
    """``cellseg slide``'s sink → ``cellseg import``: each nucleus comes back with its pixels and class."""
    from cellseg.outputs.base import Nuclei, SinkContext
    from cellseg.outputs.geojson import GeoJsonSink

    tissue, truth = tissue_mosaic(200, 1, seed=5)
    write_slide(tmp_path / "t.tif", 200, 200, 0.25, [(0, 0, tissue)], levels=1, tile=128)
    sink = GeoJsonSink(SinkContext(tmp_path, stem="t", mpp=0.25, height=200, width=200))
    sink.add(Nuclei(truth, np.arange(1, len(truth) + 1)))
    sink.close()
    params = _params_file(tmp_path, import__tile_size=512)
    code, _, err = _cli(
        [
            f"{tmp_path / 't.tif'}={tmp_path / 'nuclei.geojson'}",
            "--out",
            tmp_path / "raw",
            "--params",
            params,
        ],
        capsys,
    )
    assert code == 0, err
    ((_, labels),) = _raw_truth(tmp_path / "raw")
    back = Instances.from_label_rows(labels)
    assert len(back) == len(truth)
    for k in range(4):
        mine = np.zeros((200, 200), bool)
        for crop, (oy, ox), label in zip(truth.crops, truth.offsets, truth.labels, strict=True):
            if label == k + 1:
                mine[oy : oy + crop.shape[0], ox : ox + crop.shape[1]] |= crop
        assert ((labels[k] > 0) == mine).all(), f"class {k + 1}"


def test_a_slide_at_another_resolution_is_imported_at_the_models(annotated_slide, tmp_path, capsys) -> None:
    folder, truth, at = annotated_slide
    params = _params_file(tmp_path, data__mpp=0.5, import__tile_size=512)  # the model: half the resolution
    code, out, err = _cli([folder / "s.tif", "--out", tmp_path / "raw", "--params", params], capsys)
    assert code == 0, err
    (sample,) = json.loads((tmp_path / "raw" / "import.json").read_text())["samples"]
    assert sample["scale"] == 0.5 and sample["width"] == 256.0 and sample["mpp"] == 0.5
    ((_, labels),) = _raw_truth(tmp_path / "raw")
    assert labels.shape == (4, 128, 128)
    found = Instances.from_label_rows(labels)
    assert abs(len(found) - len(truth)) <= 0.05 * len(truth)  # a few tiny nuclei hold no pixel centre at 0.5
    area_ratio = found.areas().sum() / truth.areas().sum()
    assert 0.2 < area_ratio < 0.3  # a quarter of the pixels


def _bad_inputs(tmp_path, annotated_slide):
    folder, _, _ = annotated_slide
    slide, good = folder / "s.tif", folder / "s.geojson"
    cases = {}
    (tmp_path / "notjson.geojson").write_text("{nope")
    cases["not_json"] = ([f"{slide}={tmp_path / 'notjson.geojson'}"], "notjson.geojson")
    (tmp_path / "other.geojson").write_text(json.dumps({"type": "Topology"}))
    cases["not_geojson"] = ([f"{slide}={tmp_path / 'other.geojson'}"], "other.geojson")
    feature = {"type": "Feature", "properties": {"classification": {"name": "class1"}}}
    (tmp_path / "nogeom.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    cases["no_geometry"] = ([f"{slide}={tmp_path / 'nogeom.geojson'}"], "geometry")
    (tmp_path / "novertex.xml").write_text(
        '<Annotations MicronsPerPixel="0.25"><Annotation Id="1"><Attributes><Attribute Name="class1"/>'
        '</Attributes><Regions><Region Id="1"><Vertices/></Region></Regions></Annotation></Annotations>'
    )
    cases["no_vertices"] = ([f"{slide}={tmp_path / 'novertex.xml'}"], "vertices")
    (tmp_path / "alone.tif").write_bytes(slide.read_bytes())
    cases["no_annotation"] = ([tmp_path / "alone.tif"], "no annotation file beside it")
    far = {
        "type": "Feature",
        "geometry": box(5000, 5000, 5010, 5010).__geo_interface__,
        "properties": {"classification": {"name": "class1"}},
    }
    (tmp_path / "far.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [far]}))
    cases["outside"] = ([f"{slide}={tmp_path / 'far.geojson'}"], "lie outside")
    data = json.loads(good.read_text())
    data["features"][3]["properties"]["classification"]["name"] = "nuclei_stroma"
    (tmp_path / "unknown.geojson").write_text(json.dumps(data))
    cases["unknown_class"] = ([f"{slide}={tmp_path / 'unknown.geojson'}"], "'nuclei_stroma' (1)")
    write_slide(tmp_path / "nompp.tif", 100, 100, None, [], levels=1, tile=64)
    cases["no_mpp"] = ([f"{tmp_path / 'nompp.tif'}={good}"], "give it with --mpp")
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "not_json",
        "not_geojson",
        "no_geometry",
        "no_vertices",
        "no_annotation",
        "outside",
        "unknown_class",
        "no_mpp",
    ],
)
def test_bad_input_is_one_error_line_naming_the_file_and_no_output(
    case, annotated_slide, tmp_path, capsys
) -> None:
    args, needle = _bad_inputs(tmp_path, annotated_slide)[case]
    out = tmp_path / "raw"
    code, _, err = _cli([*args, "--out", out], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and lines[-1].startswith("error: ") and needle in lines[-1], err
    assert "Traceback" not in err
    assert not out.exists() and not any(p.name.startswith(".raw") for p in tmp_path.iterdir())


def test_an_existing_folder_is_never_replaced_silently(annotated_slide, tmp_path, capsys) -> None:
    folder, _, _ = annotated_slide
    mine = tmp_path / "raw"
    mine.mkdir()
    (mine / "precious.txt").write_text("mine")
    code, _, err = _cli([folder / "s.tif", "--out", mine], capsys)
    assert code == 1 and "already exists" in err
    code, _, err = _cli([folder / "s.tif", "--out", mine, "--overwrite"], capsys)
    assert code == 1 and "not an earlier import" in err and (mine / "precious.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------- real data
@pytest.mark.slow
def test_the_imagescope_fixture_imports_at_the_models_resolution_as_the_challenge_filled_it(
    tmp_path, capsys
) -> None:
    import cv2
    from skimage.draw import polygon as draw_polygon

    if not (SVS.is_file() and XML.is_file()):
        pytest.skip(f"Aperio fixture not available at {SVS.parent} (it lives outside the repo, in ../shared)")
    class_map = {
        "Epithelial": "class1",
        "Lymphocyte": "class2",
        "Neutrophil": "class3",
        "Macrophage": "class4",
    }
    params = _params_file(tmp_path, import__tile_size=1024, import__class_map=class_map)
    code, out, err = _cli([SVS, "--out", tmp_path / "raw", "--params", params], capsys)
    assert code == 0, err
    ((_, labels),) = _raw_truth(tmp_path / "raw")
    (sample,) = json.loads((tmp_path / "raw" / "import.json").read_text())["samples"]
    scale = sample["scale"]
    assert abs(scale - 0.19448 / 0.25) < 1e-3
    found = Instances.from_label_rows(labels)
    assert len(found) == 314 and np.bincount(found.labels, minlength=5)[1:].tolist() == [15, 299, 0, 0]
    # the challenge's masks: skimage.draw.polygon on the vertices at level 0, then warped to 0.25 µm/px as the
    # slide mode warps pixels (pixel centres map exactly)
    import xml.etree.ElementTree as ET

    h, w = labels.shape[1:]
    s = 1 / scale
    matrix = np.array([[s, 0, 0.5 * s - 0.5], [0, s, 0.5 * s - 0.5]])
    good = total = 0
    for region in ET.parse(XML).getroot().iter("Region"):
        xy = np.array([[float(v.get("X")), float(v.get("Y"))] for v in region.iter("Vertex")])
        mask0 = np.zeros((763, 756), np.float32)
        mask0[draw_polygon(xy[:, 1], xy[:, 0], shape=mask0.shape)] = 1
        small = cv2.warpAffine(mask0, matrix, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP) > 0.5
        if not small.any():
            continue
        total += 1
        ids = np.concatenate([labels[k][small] for k in range(2)])
        ids = ids[ids > 0]
        if len(ids) == 0:
            continue
        best = np.bincount(ids).argmax()
        mine = (labels[0] == best) | (labels[1] == best)
        iou = np.count_nonzero(mine & small) / np.count_nonzero(mine | small)
        good += iou > 0.5
    assert total >= 310 and good >= 0.97 * total, (good, total)


def test_an_annotated_image_without_nuclei_is_background_with_a_warning(
    annotated_slide, tmp_path, capsys
) -> None:
    folder, _, _ = annotated_slide
    (tmp_path / "empty.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    code, out, err = _cli(
        [f"{folder / 's.tif'}={tmp_path / 'empty.geojson'}", "--out", tmp_path / "raw"], capsys
    )
    assert code == 0, err
    assert "no nuclei; its tiles are imported as background" in err
    samples = list_train_samples(tmp_path / "raw", 4)
    assert samples and all(path is None for s in samples for path in s.class_paths)
