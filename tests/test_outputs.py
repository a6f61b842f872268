"""Output formats as sinks (:mod:`cellseg.outputs`): the registry, each format from a hand-built batch, and
the all-or-nothing write (a failure leaves no partial file and an earlier output as it was)."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from cellseg import CellsegError
from cellseg.outputs import FORMATS, SinkContext, check_formats, formats_for, open_sinks
from conftest import two_nuclei as _batch


def _context(folder: Path) -> SinkContext:
    return SinkContext(folder, "slide", mpp=0.5, height=80, width=100)


def test_the_registry_names_a_sink_for_every_format() -> None:
    assert formats_for("slide") == ["geojson", "geojson.gz", "csv", "parquet", "zarr"]
    assert formats_for("images") == ["tifs", "coco"]
    for name, fmt in FORMATS.items():
        assert all(hasattr(fmt.sink, m) for m in ("add", "close", "abort")), name
    check_formats(["geojson", "csv"], "slide", "slide.outputs")
    for bad, why in ((["geojson", "nope"], "unknown 'nope'"), (["tifs"], "unknown 'tifs'"),
                     ([], "empty or repeated"), (["csv", "csv"], "empty or repeated")):  # fmt: skip
        with pytest.raises(CellsegError, match=f"slide.outputs: {why}; choose from geojson"):
            check_formats(bad, "slide", "slide.outputs")


def test_geojson_csv_and_parquet_describe_the_same_nuclei(tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    from shapely.geometry import shape

    with open_sinks(["geojson.gz", "csv", "parquet"], _context(tmp_path)) as sinks:
        for sink in sinks:
            sink.add(_batch())
    with gzip.open(tmp_path / "nuclei.geojson.gz", "rt") as f:
        features = json.load(f)["features"]
    rows = list(csv.DictReader(open(tmp_path / "nuclei.csv")))
    table = pq.read_table(tmp_path / "nuclei.parquet").to_pydict()
    assert (
        [f["properties"]["measurements"]["id"] for f in features]
        == [int(r["id"]) for r in rows]
        == table["id"]
    )
    assert [r["class"] for r in rows] == table["class"] == ["class2", "class3"]
    rect = shape(features[0]["geometry"])  # 4×6 model px at 2 level-0 px each, from (x 8, y 6)
    assert rect.is_valid and rect.bounds == pytest.approx((8, 6, 20, 14), abs=0.6)
    assert float(rows[0]["area_px"]) == 24 * 4 and float(rows[0]["area_um2"]) == pytest.approx(24 * 4 * 0.25)
    assert features[0]["properties"]["measurements"]["area_um2"] == pytest.approx(24.0)
    assert table["centroid_x_px"][0] == pytest.approx(14, abs=0.3)
    assert table["centroid_y_um"][0] == pytest.approx(10 * 0.5, abs=0.2)
    assert features[1]["properties"]["classification"] == {"name": "class3", "color": [0, 130, 200]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nuclei.csv", "nuclei.geojson.gz", "nuclei.parquet"]


def test_the_label_image_paints_each_nucleus_with_its_id(tmp_path: Path) -> None:
    import zarr

    with open_sinks(["zarr"], _context(tmp_path)) as (sink,):
        sink.add(_batch(first_id=5))
    labels = np.asarray(zarr.open_group(tmp_path / "labels.zarr", mode="r")["0"][:])
    assert labels.shape == (80, 100)
    assert (labels == 5).sum() == 24 * 4 and set(np.unique(labels)) == {0, 5, 6}
    assert (labels[6:14, 8:20] == 5).all()


def test_label_tifs_and_coco_results_of_an_image(tmp_path: Path) -> None:
    from cellseg.data.io import read_label
    from cellseg.rle import decode

    with open_sinks(["tifs", "coco"], SinkContext(tmp_path)) as sinks:
        for sink in sinks:
            sink.add(_batch(scale=1.0))
    class2 = read_label(tmp_path / "img" / "class2.tif", (40, 50))
    class3 = read_label(tmp_path / "img" / "class3.tif", (40, 50))
    assert set(np.unique(class2)) == {0, 1} and set(np.unique(class3)) == {0, 2}  # one counter, class order
    assert not (tmp_path / "img" / "class1.tif").exists()
    rows = json.loads((tmp_path / "test-results.json").read_text())
    assert [(r["image_id"], r["category_id"], r["score"]) for r in rows] == [(7, 2, pytest.approx(0.91)),
                                                                            (7, 3, pytest.approx(0.55))]  # fmt: skip
    assert decode(rows[0]["segmentation"]).sum() == 24
    assert (tmp_path / "submission.zip").is_file()


def test_a_failure_leaves_no_partial_file_and_the_earlier_output(tmp_path: Path) -> None:
    with open_sinks(["geojson", "csv"], _context(tmp_path)) as sinks:
        for sink in sinks:
            sink.add(_batch())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="model failed"):
        with open_sinks(["geojson", "csv", "parquet", "zarr"], _context(tmp_path)) as sinks:
            for sink in sinks:
                sink.add(_batch(first_id=10))
            raise RuntimeError("the model failed on the next block")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either
