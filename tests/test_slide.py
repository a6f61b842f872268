"""Whole slides: reading, level choice, tissue, blocks and their seams, resume, exports (fake detector: fast)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from cellseg.infer.tiling import tile_windows
from cellseg.slide.blocks import block_grid
from cellseg.slide.reader import (
    Level,
    Slide,
    SlideError,
    choose_level,
    open_slide,
    parse_mpp_from_description,
    read_window,
)
from cellseg.slide.synthetic import write_slide
from slide_helpers import SVS, fake_detect, painted_tissue, run_slide, slide_settings, use_fake_detector


def fake_slide(mpp: float, downsamples: list[float]) -> Slide:
    levels = [Level(int(4096 / d), int(4096 / d), d) for d in downsamples]
    return Slide(None, levels, mpp, [None] * len(levels))


@pytest.mark.parametrize(
    ("mpp", "downsamples", "target", "level"),
    [
        (0.25, [1, 4, 16], 0.25, 0),  # 40× slide, model at 40×
        (0.25, [1, 2, 4], 0.5, 1),  # model at 20×: the 2× level, exactly
        (0.25, [1, 4, 16], 0.5, 0),  # no 20× level: the finer level, shrunk
        (0.25, [1, 4, 16], 1.1, 1),  # the coarsest level still finer than the model
        (0.1944, [1, 4], 0.25, 0),  # the Aperio fixture: 0.19 µm/px, shrunk by 0.78
        (0.5, [1, 2], 0.25, 0),  # slide coarser than the model: level 0, enlarged
        (0.2525, [1, 2], 0.25, 0),  # within 1 % counts as the same resolution
    ],
)
def test_level_choice_from_mpp(mpp, downsamples, target, level) -> None:
    assert choose_level(fake_slide(mpp, downsamples), target) == level


def test_resolution_from_metadata_and_override(tmp_path) -> None:
    image, _ = painted_tissue(64, 64)
    tagged = write_slide(tmp_path / "tagged.tif", 300, 400, 0.5, [(0, 0, image)], levels=3, tile=64)
    slide = open_slide(tagged)
    assert slide.mpp == pytest.approx(0.5)
    assert [lv.downsample for lv in slide.levels] == pytest.approx([1, 2, 4], rel=0.01)
    assert open_slide(tagged, mpp=0.3).mpp == 0.3  # --mpp wins
    bare = write_slide(tmp_path / "bare.tif", 300, 400, None, [(0, 0, image)], levels=1, tile=64)
    with pytest.raises(SlideError, match=r"bare.tif: no resolution .*--mpp"):
        open_slide(bare)
    assert parse_mpp_from_description("Aperio Image Library|AppMag = 40|MPP = 0.2520") == 0.252


def test_the_aperio_fixture_reads_with_its_resolution() -> None:
    if not SVS.is_file():
        pytest.skip(f"Aperio fixture not available at {SVS} (it lives outside the repo, in ../shared)")
    slide = open_slide(SVS)
    assert (slide.height, slide.width, len(slide.levels)) == (
        763,
        756,
        1,
    )  # thumbnail/label/macro: not levels
    assert slide.mpp == pytest.approx(0.19448)
    region = slide.read_region(0, 200, 300, 50, 60)
    assert region.shape == (50, 60, 3) and region.dtype == np.uint8 and region.std() > 5


def test_overlapping_windows_read_identical_pixels(tmp_path) -> None:
    image, _ = painted_tissue(400, 400)
    path = write_slide(tmp_path / "s.tif", 400, 400, 0.2, [(0, 0, image)], levels=1, tile=64)
    slide = open_slide(path)
    a = read_window(slide, 0, 0.25, 0, 0, 200, 200)  # rescaled by 0.8
    b = read_window(slide, 0, 0.25, 150, 120, 100, 80)
    assert np.array_equal(a[150:200, 120:200], b[:50, :80])
    whole = read_window(slide, 0, 0.25, 0, 0, 320, 320)
    assert np.array_equal(whole[150:250, 120:200], b)


def test_blocks_are_groups_of_the_inference_tiles() -> None:
    blocks = block_grid(1000, 700, 128, 32, 3)
    tiles = {(w.y0, w.x0, w.height, w.width) for w in tile_windows(1000, 700, 128, 32)}
    for b in blocks:
        w = b.window
        inner = {
            (t.y0 + w.y0, t.x0 + w.x0, t.height, t.width) for t in tile_windows(w.height, w.width, 128, 32)
        }
        assert inner <= tiles  # a block predicts exactly the slide's own tiles
    right = {(b.row, b.col): b.window for b in blocks}
    assert right[0, 0].x0 + right[0, 0].width - right[0, 1].x0 == 32  # neighbours share one tile overlap


def _features(path):
    return json.loads(path.read_text())["features"]


def test_a_seam_between_blocks_loses_and_doubles_nothing(tmp_path, monkeypatch) -> None:
    from shapely.geometry import shape

    use_fake_detector(monkeypatch)
    image, n = painted_tissue(600, 560, seed=3)
    path = write_slide(tmp_path / "mosaic.tif", 700, 700, 0.25, [(50, 70, image)], levels=2, tile=128)
    predict, settings = slide_settings()
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"unused by the fake detector")
    summary = run_slide(path, checkpoint, tmp_path / "out", 0.25, predict, settings)
    assert summary.blocks > 4  # several blocks, so nuclei sit on their seams
    features = _features(tmp_path / "out" / "mosaic" / "nuclei.geojson")
    assert len(features) == n == sum(summary.counts.values())
    whole, _ = fake_detect(None, image, predict)  # the painted nuclei, in the patch's pixels
    truth = sorted(zip((whole.offsets[:, 0] + 50).tolist(), (whole.offsets[:, 1] + 70).tolist(), strict=True))
    found = []
    for f in features:
        poly = shape(f["geometry"])
        assert poly.is_valid and poly.geom_type == "Polygon"
        x0, y0, _, _ = poly.bounds
        found.append((round(y0), round(x0)))
    assert sorted(found) == truth  # each nucleus once, with its own outline
    # QuPath's format: detections with a named, coloured class and numeric measurements
    props = features[0]["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"]["name"] in {"class1", "class2", "class3", "class4"}
    assert len(props["classification"]["color"]) == 3
    assert set(props["measurements"]) >= {"score", "area_um2"}
    with open(tmp_path / "out" / "mosaic" / "nuclei.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and {r["id"] for r in rows} == {str(i) for i in range(1, n + 1)}
    area = float(rows[0]["area_um2"])
    assert area == pytest.approx(149 * 0.0625, abs=0.001)  # a disc of radius 7 px: 149 px of 0.0625 µm²
    assert (tmp_path / "out" / "mosaic" / "thumbnail.png").is_file()
    assert (tmp_path / "out" / "mosaic" / "tissue.png").is_file()
    assert not list((tmp_path / "out").glob(".*"))  # the block files are gone


def test_blocks_without_tissue_are_skipped(tmp_path, monkeypatch) -> None:
    use_fake_detector(monkeypatch)
    calls = []
    from cellseg.slide.run import predict_block

    image, n = painted_tissue(200, 200)
    path = write_slide(tmp_path / "corner.tif", 1200, 1200, 0.25, [(900, 900, image)], levels=3, tile=128)
    predict, settings = slide_settings()
    (tmp_path / "m.pt").write_bytes(b"x")
    summary = run_slide(
        path, tmp_path / "m.pt", tmp_path / "out", 0.25, predict, settings,
        task=lambda job, block: calls.append(block) or predict_block(job, block),
    )  # fmt: skip
    all_blocks = block_grid(1200, 1200, 128, 32, 2)
    assert 0 < len(calls) < len(all_blocks) / 3
    assert all(b.window.y0 + b.window.height > 850 and b.window.x0 + b.window.width > 850 for b in calls)
    assert sum(summary.counts.values()) == n
    predicted = sum(len(b.tiles) for b in calls)
    assert predicted < sum(
        len(b.tile_windows(128, 32)) for b in calls
    )  # glass tiles of a tissue block: skipped
    assert summary.tissue_mm2 == pytest.approx(200 * 200 * 0.0625 / 1e6, rel=0.3)


def test_an_empty_slide_gives_an_empty_result_and_a_warning(tmp_path, monkeypatch, capsys) -> None:
    use_fake_detector(monkeypatch)
    path = write_slide(tmp_path / "glass.tif", 500, 500, 0.25, [], levels=2, tile=128)
    predict, settings = slide_settings()
    (tmp_path / "m.pt").write_bytes(b"x")
    summary = run_slide(path, tmp_path / "m.pt", tmp_path / "out", 0.25, predict, settings)
    assert "no tissue" in capsys.readouterr().err
    assert summary.blocks == 0 and sum(summary.counts.values()) == 0
    assert json.loads((tmp_path / "out" / "glass" / "nuclei.geojson").read_text()) == {
        "type": "FeatureCollection",
        "features": [],
    }


def test_an_interrupted_slide_resumes_where_it_stopped(tmp_path, monkeypatch) -> None:
    use_fake_detector(monkeypatch)
    image, n = painted_tissue(500, 500, seed=5)
    path = write_slide(tmp_path / "s.tif", 600, 600, 0.25, [(50, 50, image)], levels=2, tile=128)
    predict, settings = slide_settings()
    (tmp_path / "m.pt").write_bytes(b"x")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_slide(path, tmp_path / "m.pt", out, 0.25, predict, settings, stop_after=3)
    assert not (out / "s").exists()  # nothing that looks like a result
    assert len(list((out / ".s.partial" / "blocks").glob("*.npz"))) == 3
    resumed = run_slide(path, tmp_path / "m.pt", out, 0.25, predict, settings)
    assert resumed.blocks_resumed == 3 and resumed.blocks > 3
    again = run_slide(path, tmp_path / "m.pt", tmp_path / "fresh", 0.25, predict, settings)
    assert (out / "s" / "nuclei.geojson").read_bytes() == (
        tmp_path / "fresh" / "s" / "nuclei.geojson"
    ).read_bytes()
    assert sum(again.counts.values()) == n


def test_a_rescaled_slide_maps_nuclei_back_to_level0(tmp_path, monkeypatch) -> None:
    """A slide at 0.125 µm/px read for a 0.25 µm/px model: nuclei come back at level-0 pixels and true µm²."""
    import cv2

    use_fake_detector(monkeypatch)
    image, n = painted_tissue(300, 300, seed=2, radius=6)
    big = cv2.resize(image, (600, 600), interpolation=cv2.INTER_NEAREST)
    path = write_slide(tmp_path / "fine.tif", 800, 800, 0.125, [(100, 100, big)], levels=3, tile=128)
    predict, settings = slide_settings()
    (tmp_path / "m.pt").write_bytes(b"x")
    summary = run_slide(path, tmp_path / "m.pt", tmp_path / "out", 0.25, predict, settings)
    assert summary.level == 1  # the 2× level is exactly the model's resolution
    features = _features(tmp_path / "out" / "fine" / "nuclei.geojson")
    assert len(features) == n
    xs = [c[0] for f in features for c in f["geometry"]["coordinates"][0]]
    assert 100 <= min(xs) and max(xs) <= 700  # level-0 pixels, inside the pasted patch
    areas = [f["properties"]["measurements"]["area_um2"] for f in features]
    assert np.median(areas) == pytest.approx(np.pi * 36 * 0.0625, rel=0.25)


def test_gzipped_geojson_and_parquet_table(tmp_path, monkeypatch) -> None:
    import gzip

    import pyarrow.parquet as pq

    use_fake_detector(monkeypatch)
    image, n = painted_tissue(300, 300, seed=4)
    path = write_slide(tmp_path / "s.tif", 400, 400, 0.25, [(50, 50, image)], levels=1, tile=128)
    predict, settings = slide_settings(outputs=["geojson.gz", "parquet"])
    (tmp_path / "m.pt").write_bytes(b"x")
    run_slide(path, tmp_path / "m.pt", tmp_path / "out", 0.25, predict, settings)
    with gzip.open(tmp_path / "out" / "s" / "nuclei.geojson.gz", "rt") as f:
        features = json.load(f)["features"]
    table = pq.read_table(tmp_path / "out" / "s" / "nuclei.parquet").to_pydict()
    assert len(features) == len(table["id"]) == n
    assert table["id"] == [f["properties"]["measurements"]["id"] for f in features]
    assert sorted(set(table["class"])) <= ["class1", "class2", "class3", "class4"]


def test_the_label_image_holds_each_nucleus_under_its_table_id(tmp_path, monkeypatch) -> None:
    import zarr

    use_fake_detector(monkeypatch)
    image, n = painted_tissue(300, 260, seed=6)
    path = write_slide(tmp_path / "s.tif", 400, 380, 0.25, [(40, 60, image)], levels=1, tile=128)
    predict, settings = slide_settings(outputs=["geojson", "csv", "zarr"])
    (tmp_path / "m.pt").write_bytes(b"x")
    run_slide(path, tmp_path / "m.pt", tmp_path / "out", 0.25, predict, settings)
    root = zarr.open_group(tmp_path / "out" / "s" / "labels.zarr", mode="r")
    assert root.attrs["ome"]["multiscales"][0]["datasets"][0]["path"] == "0"
    labels = np.asarray(root["0"][:])
    assert labels.shape == (400, 380) and labels.dtype == np.uint32
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    assert len(ids) == n and ids.max() == n
    dark = np.zeros((400, 380), bool)
    dark[40:340, 60:320] = image[..., 1] < 60
    assert ((labels > 0) == dark).mean() > 0.995  # the nuclei's own pixels, nearly exactly


def test_a_png_is_a_one_level_slide_given_its_resolution(tmp_path, monkeypatch) -> None:
    from PIL import Image

    use_fake_detector(monkeypatch)
    image, n = painted_tissue(300, 320, seed=9)
    Image.fromarray(image).save(tmp_path / "field.png")
    with pytest.raises(SlideError, match=r"field.png: no resolution metadata .*--mpp"):
        open_slide(tmp_path / "field.png")
    predict, settings = slide_settings()
    (tmp_path / "m.pt").write_bytes(b"x")
    summary = run_slide(
        tmp_path / "field.png",
        tmp_path / "m.pt",
        tmp_path / "out",
        0.25,
        predict,
        settings,
        mpp=0.25,
    )
    assert sum(summary.counts.values()) == n and summary.level == 0
