"""``cellseg slide`` with a trained model: bad inputs in one line, 1 vs 2 Dask workers, loopback-only cluster."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from cellseg.data.synth import ImageSpec, generate
from cellseg.slide.synthetic import write_slide
from conftest import ROOT, run_verb
from slide_helpers import SVS, die_once_then_fake_predict, painted_tissue, run_slide, slide_settings


def _cli(args, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.chdir(ROOT)  # params.yaml
    return run_verb("slide", args, capsys)


@pytest.fixture(scope="module")
def checkpoint(tiny_project):
    return tiny_project["models"] / "best.pt"


def synth_slide(path, mpp=0.25, seed=0):
    image, _ = generate(ImageSpec("train", "s", 300, 340, 60, (seed, 1)))
    return write_slide(path, 400, 420, mpp, [(40, 30, image)], levels=2, tile=128)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not_a_slide", "not a slide"),
        ("truncated", "truncated or corrupt"),
        ("no_mpp", "no resolution (µm/px) in its metadata; give it with --mpp"),
        ("unreadable_level", "level 0 cannot be read"),
        ("unreachable_scheduler", "unreachable"),
    ],
)
def test_bad_input_is_one_error_line_and_no_result(
    case, message, checkpoint, tmp_path, capsys, monkeypatch
) -> None:
    import cellseg.slide.run

    monkeypatch.setattr(cellseg.slide.run, "CONNECT_TIMEOUT", "1s")
    path = tmp_path / "input.tif"
    extra = []
    if case == "not_a_slide":
        path = tmp_path / "notes.svs"
        path.write_text("these are not pixels\n")
    elif case == "no_mpp":
        synth_slide(path, mpp=None)
    else:
        synth_slide(path)
        data = bytearray(path.read_bytes())
        if case == "truncated":
            path.write_bytes(bytes(data[: len(data) // 3]))
        elif case == "unreadable_level":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
            data[offset : offset + count] = b"\x07" * count  # garbage instead of zlib data
            path.write_bytes(bytes(data))
        elif case == "unreachable_scheduler":
            extra = ["--scheduler", "tcp://127.0.0.1:9"]  # the discard port: nothing listens
    code, _, err = _cli([checkpoint, path, "--out", tmp_path / "out", *extra], capsys, monkeypatch)
    lines = err.strip().splitlines()
    assert code == 1 and lines[-1].startswith("error: "), err
    assert len(lines) == 1 and "Traceback" not in err
    assert message in lines[-1]
    assert path.name in lines[-1] or case == "unreachable_scheduler"
    assert not (tmp_path / "out" / path.stem).exists()  # no partial result presented as complete


def test_a_slide_without_tissue_is_an_empty_result_and_a_warning(
    checkpoint, tmp_path, capsys, monkeypatch
) -> None:
    path = write_slide(tmp_path / "glass.tif", 300, 300, 0.25, [], levels=1, tile=128)
    code, out, err = _cli([checkpoint, path, "--out", tmp_path / "out"], capsys, monkeypatch)
    assert code == 0 and "warning:" in err and "no tissue" in err
    assert "glass: 0 nuclei" in out
    assert json.loads((tmp_path / "out" / "glass" / "nuclei.geojson").read_text())["features"] == []


def test_each_slide_result_records_its_model(checkpoint, tmp_path, capsys, monkeypatch) -> None:
    """provenance.json beside the results: the checkpoint's sha256, cellseg's version, the training params."""
    import hashlib

    from cellseg import __version__

    path = synth_slide(tmp_path / "s.tif")
    code, _, err = _cli([checkpoint, path, "--out", tmp_path / "out"], capsys, monkeypatch)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "s" / "provenance.json").read_text())
    assert record["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert record["cellseg_version"] == __version__ and record["trained_params"]["data"]["mpp"] == 0.25
    assert record["slide_file"] == str(path) and record["level"] == 0


def _nuclei(folder):
    """(class, outline) of every nucleus, sorted, and the scores in that order."""
    features = json.loads((folder / "nuclei.geojson").read_text())["features"]
    rows = sorted(
        (
            f["properties"]["classification"]["name"],
            json.dumps(f["geometry"]["coordinates"]),
            f["properties"]["measurements"]["score"],
        )
        for f in features
    )
    return [r[:2] for r in rows], np.array([r[2] for r in rows])


@pytest.mark.slow
def test_one_and_two_workers_give_the_same_nuclei(checkpoint, tmp_path) -> None:
    from cellseg.params import load_params

    params = load_params(ROOT / "params.yaml")
    predict = dataclasses.replace(
        params.predict, tile_size=128, tile_overlap=32, label_score_threshold=0.05, score_threshold=0.05
    )
    settings = dataclasses.replace(params.slide, block_tiles=2)
    path = synth_slide(tmp_path / "s.tif")
    one = run_slide(path, checkpoint, tmp_path / "one", 0.25, predict, settings, workers=1)
    two = run_slide(path, checkpoint, tmp_path / "two", 0.25, predict, settings, workers=2)
    assert one.blocks == two.blocks > 2
    assert one.counts == two.counts
    assert sum(one.counts.values()) > 0
    shapes_one, scores_one = _nuclei(tmp_path / "one" / "s")
    shapes_two, scores_two = _nuclei(tmp_path / "two" / "s")
    assert shapes_one == shapes_two  # the same nuclei, pixel for pixel
    # 1 vs 2 torch threads per process: the scores may differ in float rounding, nothing more
    assert np.allclose(scores_one, scores_two, atol=1e-3)


def test_the_local_cluster_listens_on_loopback_only() -> None:
    from distributed import Client

    from cellseg.slide.run import local_cluster

    with local_cluster(1) as cluster, Client(cluster) as client:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert all(a.startswith("tcp://127.0.0.1:") for a in client.scheduler_info()["workers"])
        assert cluster.dashboard_link.startswith("http://127.0.0.1:")
        http = cluster.scheduler.http_server  # the dashboard's (and /health's) HTTP server
        assert {sock.getsockname()[0] for sock in http._sockets.values()} == {"127.0.0.1"}


@pytest.mark.slow
def test_the_aperio_fixture_runs_end_to_end(checkpoint, tmp_path, capsys, monkeypatch) -> None:
    from shapely.geometry import shape

    if not SVS.is_file():
        pytest.skip(f"Aperio fixture not available at {SVS} (it lives outside the repo, in ../shared)")
    code, out, err = _cli([checkpoint, SVS, "--out", tmp_path / "out"], capsys, monkeypatch)
    assert code == 0, err
    assert "A9K0_2:" in out and "(0.1945 µm/px)" in out
    folder = tmp_path / "out" / "A9K0_2"
    features = json.loads((folder / "nuclei.geojson").read_text())["features"]
    rows = (folder / "nuclei.csv").read_text().strip().splitlines()
    assert len(rows) - 1 == len(features)
    for f in features:
        poly = shape(f["geometry"])
        assert poly.is_valid and poly.geom_type == "Polygon"
        assert poly.bounds[2] <= 756 + 1 and poly.bounds[3] <= 763 + 1  # level-0 pixels of the file
        assert f["properties"]["classification"]["name"].startswith("class")
    assert {"thumbnail.png", "tissue.png"} <= {p.name for p in folder.iterdir()}
    assert np.isfinite([f["properties"]["measurements"]["area_um2"] for f in features]).all()


@pytest.mark.slow
def test_a_block_whose_worker_dies_is_retried(tmp_path) -> None:

    image, n = painted_tissue(300, 300, seed=8)
    path = write_slide(tmp_path / "s.tif", 400, 400, 0.25, [(50, 50, image)], levels=1, tile=128)
    predict, settings = slide_settings()
    (tmp_path / "m.pt").write_bytes(b"unused")
    summary = run_slide(
        path, tmp_path / "m.pt", tmp_path / "out", 0.25, predict, settings, workers=2,
        task=die_once_then_fake_predict,
    )  # fmt: skip
    assert (tmp_path / "died-0_0").is_file()  # the first attempt killed its worker
    assert sum(summary.counts.values()) == n  # and the block was predicted again: nothing missing
