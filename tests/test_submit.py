"""The submission (COCO results json + zip) and the folder prediction of ``stages/predict.py``."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import time
import zipfile
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import cellseg
from cellseg import DEFAULT_CLASSES
from cellseg.data.io import DataFormatError, read_label, read_test_mapping, save_test_npz, write_image_tif
from cellseg.fsutil import write_json
from cellseg.infer.folder import list_images, predict_folder, read_any_image
from cellseg.infer.submit import TestImage as _TestImage
from cellseg.infer.submit import load_test_images, submit, write_submission
from cellseg.instances import Instances
from cellseg.model.thresholds import untuned
from cellseg.nuclei import NucleusRule, nuclei
from cellseg.outputs.coco import RESULTS_FILE, ZIP_FILE
from cellseg.outputs.label_tifs import class_label_maps
from cellseg.provenance import PROVENANCE_FILE
from cellseg.rle import decode, encode_mask
from conftest import ROOT, tiny_params


def label_maps(inst: Instances, params) -> dict[int, np.ndarray]:
    """What `cellseg predict` writes for ``inst``: the nuclei by the params' rule, as per-class label maps."""
    return class_label_maps(nuclei(inst, NucleusRule.of(params)))


CPU = torch.device("cpu")


def _stage(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "stages" / f"{name}.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    return stage


def _run_stage(name: str, argv: list[str], tiny_project, workdir: Path) -> None:
    """``stages/<name>.py`` main() run from a directory holding the tiny project's params.yaml, as dvc does."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(tiny_project["params"].to_dict()))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        _stage(name).main(argv)


# ------------------------------------------------------------------------------------------------ submission
@pytest.fixture(scope="module")
def submission(tiny_project, tmp_path_factory) -> Path:
    """The submit stage on the tiny project (its tile size makes the larger test images tiled)."""
    root = tmp_path_factory.mktemp("submit")
    checkpoint, test_dir = tiny_project["models"] / "best.pt", tiny_project["prepared"] / "test"
    write_json(root / "thresholds.json", untuned(tiny_project["params"].predict))
    _run_stage(
        "submit", [str(checkpoint), "thresholds.json", str(test_dir), "submission"], tiny_project, root
    )
    return root / "submission"


def _coco_gt_from_mapping(mapping_path: Path) -> COCO:
    """An annotation-less COCO ground truth holding the images of the test mapping, as the leaderboard has."""
    coco = COCO()
    coco.dataset = {
        "images": [
            {"id": e.image_id, "file_name": e.file_name, "height": e.height, "width": e.width}
            for e in read_test_mapping(mapping_path)
        ],
        "annotations": [],
        "categories": [{"id": k, "name": f"class{k}"} for k in range(1, 5)],
    }
    coco.createIndex()
    return coco


def test_zip_holds_exactly_the_results_file(submission: Path) -> None:
    assert sorted(p.name for p in submission.iterdir()) == sorted([RESULTS_FILE, ZIP_FILE, PROVENANCE_FILE])
    with zipfile.ZipFile(submission / ZIP_FILE) as archive:
        assert archive.namelist() == [RESULTS_FILE]
        assert archive.read(RESULTS_FILE) == (submission / RESULTS_FILE).read_bytes()


def assert_provenance(record: dict, checkpoint: Path, tiny_project, thresholds: str, workdir: Path) -> None:
    """The record names the checkpoint as it was given, by its sha256, with its training params and epochs, and
    the thresholds file (as given, relative to ``workdir``) whose values the run used."""
    assert record["checkpoint"] == str(checkpoint)
    assert record["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert record["checkpoint_bytes"] == checkpoint.stat().st_size
    assert record["cellseg_version"] == cellseg.__version__
    assert record["trained_params"] == tiny_project["params"].to_dict()
    assert record["trained_epochs"] == tiny_project["params"].train.epochs
    assert record["thresholds"] == thresholds
    tuned = json.loads((workdir / thresholds).read_text())
    assert record["predict"]["label_score_threshold"] == tuned["label_score_threshold"]
    assert set(record["postproc"]) >= {"split", "trim", "recover", "rescore", "peak_threshold"}


def test_the_submission_records_its_provenance(submission: Path, tiny_project) -> None:
    record = json.loads((submission / PROVENANCE_FILE).read_text())
    checkpoint = tiny_project["models"] / "best.pt"
    assert_provenance(record, checkpoint, tiny_project, "thresholds.json", submission.parent)


def test_results_load_with_pycocotools_and_match_the_mapping(submission: Path, tiny_project) -> None:
    rows = json.loads((submission / RESULTS_FILE).read_text())
    assert rows, "the tiny model should detect something on the test images"
    mapping = _coco_gt_from_mapping(tiny_project["raw"] / "test_image_name_to_ids.json")
    results = mapping.loadRes(str(submission / RESULTS_FILE))  # asserts every image_id is in the mapping
    assert len(results.anns) == len(rows)
    for row in rows:
        assert set(row) == {"image_id", "category_id", "segmentation", "score", "bbox"}
        assert row["category_id"] in (1, 2, 3, 4)
        assert isinstance(row["score"], float) and 0 < row["score"] <= 1
        assert isinstance(row["segmentation"]["counts"], str)
        image = mapping.imgs[row["image_id"]]
        mask = decode(row["segmentation"])
        assert row["segmentation"]["size"] == [image["height"], image["width"]]
        assert mask.shape == (image["height"], image["width"])
        assert encode_mask(mask) == row["segmentation"]  # round trip
        np.testing.assert_allclose(row["bbox"], mask_utils.toBbox(row["segmentation"]))  # [x, y, w, h]


def test_every_mapped_test_image_is_predicted(tiny_project, tmp_path: Path) -> None:
    """With a stand-in that detects two cells in any image, the submission holds exactly two rows for every
    image of the mapping, at its original size (one tile per image: the stand-in would detect in every tile)."""
    mapping = read_test_mapping(tiny_project["raw"] / "test_image_name_to_ids.json")
    tests = load_test_images(tiny_project["prepared"] / "test")
    assert sorted(t.image_id for t in tests) == sorted(e.image_id for e in mapping)
    params = dataclasses.replace(tiny_params().predict, tile_size=1024)
    summary = submit(FixedDetector(), tiny_project["prepared"] / "test", tmp_path, params, CPU)
    assert summary["images_without_instances"] == 0
    rows = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert Counter(row["image_id"] for row in rows) == {e.image_id: 2 for e in mapping}
    sizes = {e.image_id: [e.height, e.width] for e in mapping}
    assert all(row["segmentation"]["size"] == sizes[row["image_id"]] for row in rows)  # original resolution


def test_no_test_images_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=str(tmp_path)):
        load_test_images(tmp_path)


def test_test_npz_without_image_id_names_the_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", image=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataFormatError, match="a.npz"):
        load_test_images(tmp_path)


def test_duplicate_image_ids_are_an_error(tmp_path: Path) -> None:
    for name in ("a", "b"):
        save_test_npz(tmp_path / f"{name}.npz", np.zeros((8, 8, 3), np.uint8), 7)
    with pytest.raises(DataFormatError, match="7"):
        load_test_images(tmp_path)


def _one_detection(image_id: int) -> tuple[_TestImage, Instances]:
    crop = np.ones((2, 2), bool)
    inst = Instances(4, 4, np.array([2]), np.array([0.9], np.float32), np.array([[1, 1]]), [crop])
    return _TestImage(Path(f"{image_id}.npz"), np.zeros((4, 4, 3), np.uint8), image_id), inst


def test_a_failed_write_leaves_the_previous_submission(tmp_path: Path) -> None:
    out = tmp_path / "submission"
    write_submission([_one_detection(1)], out)

    def failing():
        yield _one_detection(2)
        raise RuntimeError("the model failed on the second image")

    with pytest.raises(RuntimeError):
        write_submission(failing(), out)
    assert [row["image_id"] for row in json.loads((out / RESULTS_FILE).read_text())] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission"]


# ---------------------------------------------------------------------------------------- folder prediction
def _instances(labels: list[int], scores: list[float], boxes: list[tuple[int, int, int, int]]) -> Instances:
    """Rectangles ``(y0, x0, h, w)`` in a 30×40 image."""
    return Instances(
        30,
        40,
        labels=np.asarray(labels, np.int64),
        scores=np.asarray(scores, np.float32),
        offsets=np.asarray([b[:2] for b in boxes], np.int64).reshape(-1, 2),
        crops=[np.ones(b[2:], bool) for b in boxes],
    )


def test_label_maps_follow_the_raw_format() -> None:
    """One id counter across classes (class 1 first), no map for an absent class, same instances back."""
    inst = _instances(
        [3, 1, 3, 1], [0.5, 0.9, 0.8, 0.6], [(0, 0, 5, 5), (10, 0, 4, 6), (20, 20, 5, 5), (0, 30, 3, 3)]
    )
    maps = label_maps(inst, tiny_params(predict__label_score_threshold=0.0).predict)
    assert sorted(maps) == [1, 3] and all(m.dtype == np.float64 for m in maps.values())
    assert sorted(np.unique(maps[1])) == [0, 1, 2] and sorted(np.unique(maps[3])) == [0, 3, 4]
    assert maps[1][10, 0] == 1  # within a class, ids follow decreasing score
    rows = np.zeros((4, 30, 40), np.int32)
    for k, m in maps.items():
        rows[k - 1] = m
    back = Instances.from_label_rows(rows)
    assert sorted(zip(back.labels, map(tuple, back.offsets), strict=True)) == sorted(
        zip(inst.labels, map(tuple, inst.offsets), strict=True)
    )


def test_label_maps_give_overlaps_to_the_higher_score() -> None:
    inst = _instances([2, 2], [0.4, 0.9], [(0, 0, 10, 10), (5, 5, 10, 10)])
    params = tiny_params(predict__label_score_threshold=0.0, predict__min_kept_fraction=0.0).predict
    labels = label_maps(inst, params)[2]
    assert labels[7, 7] == 1 and labels[2, 2] == 2  # id 1 is the 0.9 instance


def test_label_maps_hold_one_nucleus_per_pixel_across_classes_and_no_fragments() -> None:
    """A class-3 detection mostly under a better class-1 one is a fragment: dropped, not painted in class3.tif;
    a low-scored detection is dropped by the score threshold; a lesser overlap keeps its own pixels."""
    inst = _instances(
        [1, 3, 2, 4],
        [0.9, 0.8, 0.7, 0.2],
        [(0, 0, 10, 10), (2, 2, 10, 9), (8, 20, 10, 10), (20, 30, 5, 5)],
    )
    params = tiny_params(predict__label_score_threshold=0.5, predict__min_kept_fraction=0.5).predict
    maps = label_maps(inst, params)
    assert sorted(maps) == [1, 2]  # class 3: a fragment (keeps 26 of its 90 pixels); class 4: score 0.2 < 0.5
    stacked = np.stack([m > 0 for m in maps.values()])
    assert stacked.sum(axis=0).max() == 1  # never two nuclei on one pixel
    assert (maps[1] > 0).sum() == 100 and (maps[2] > 0).sum() == 100


class FixedDetector:
    """Detects the same two boxes (classes 1 and 3) in any image: enough to check the files written."""

    def eval(self) -> FixedDetector:
        return self

    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [
            {
                "boxes": torch.tensor([[2.0, 2, 12, 10], [15, 5, 25, 20]]),
                "labels": torch.tensor([1, 3]),
                "scores": torch.tensor([0.9, 0.7]),
                "mask_probs": torch.ones(2, 28, 28),
            }
            for _ in images
        ]


def _write_images(folder: Path) -> dict[str, tuple[int, int]]:
    """A tif in the dataset's RGBA format, an RGB png and a grayscale png; returns the sizes by stem."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_image_tif(folder / "a.tif", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (33, 35, 3), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(rng.integers(0, 256, (60, 45), dtype=np.uint8)).save(folder / "c.png")
    (folder / "notes.txt").write_text("not an image")
    return {"a": (40, 50), "b": (33, 35), "c": (60, 45)}


def test_predict_folder_writes_raw_format_label_maps(tmp_path: Path) -> None:
    sizes = _write_images(tmp_path / "in")
    params = tiny_params().predict
    counts = predict_folder(
        FixedDetector(),
        tmp_path / "in",
        tmp_path / "out",
        params,
        torch.device("cpu"),
        class_names=DEFAULT_CLASSES,
    )
    assert sorted(counts) == ["a.tif", "b.png", "c.png"]
    for stem, size in sizes.items():
        folder = tmp_path / "out" / stem
        assert sorted(p.name for p in folder.iterdir()) == ["class1.tif", "class3.tif"]  # no class2/4 file
        assert sorted(np.unique(read_label(folder / "class1.tif", size))) == [0, 1]
        assert sorted(np.unique(read_label(folder / "class3.tif", size))) == [0, 2]


def test_predict_cli_with_the_real_model(tiny_project, tmp_path: Path) -> None:
    """The stage on the tiny project's test images (cells the 1-epoch model detects), as tif and png: every
    image gets its folder, and the label files hold exactly the instances the stage reports."""
    (tmp_path / "in").mkdir()
    sizes = {}
    for i, test in enumerate(load_test_images(tiny_project["prepared"] / "test")):
        stem = f"image-{i}"
        if i % 2:
            Image.fromarray(test.image).save(tmp_path / "in" / f"{stem}.png")
        else:
            write_image_tif(tmp_path / "in" / f"{stem}.tif", test.image)
        sizes[stem] = test.image.shape[:2]
    # the 1-epoch model scores low: label maps from every detection the submission would keep
    low = {**untuned(tiny_project["params"].predict), "label_score_threshold": 0.05}
    write_json(tmp_path / "thresholds.json", low)
    argv = [str(tiny_project["models"] / "best.pt"), str(tmp_path / "in"), str(tmp_path / "out")]
    argv += ["--thresholds", str(tmp_path / "thresholds.json")]
    _run_stage("predict", argv, tiny_project, tmp_path / "work")
    record = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())
    checkpoint = tiny_project["models"] / "best.pt"
    assert_provenance(record, checkpoint, tiny_project, str(tmp_path / "thresholds.json"), tmp_path)
    assert record["images"] == sorted(p.name for p in (tmp_path / "in").iterdir())
    found = 0
    for stem, size in sizes.items():
        assert (tmp_path / "out" / stem).is_dir()
        ids = set()
        for path in (tmp_path / "out" / stem).iterdir():
            assert path.name in ("class1.tif", "class2.tif", "class3.tif", "class4.tif")
            labels = read_label(path, size)
            assert labels.max() > 0
            ids |= set(np.unique(labels[labels > 0]).tolist())
        assert len(ids) == sum(
            len(np.unique(read_label(p, size))) - 1 for p in (tmp_path / "out" / stem).iterdir()
        )
        found += len(ids)  # ids are distinct across the classes of an image
    assert found > 0, "the tiny model detects cells in its own test images"


def test_same_stem_twice_is_an_error(tmp_path: Path) -> None:
    for name in ("x.tif", "x.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    with pytest.raises(DataFormatError, match="x"):
        list_images(tmp_path)


# ------------------------------------------------------------------------------- images of any kind (issue 13)
def test_a_12bit_png_keeps_its_contrast(tmp_path: Path) -> None:
    """Pillow opens a 16-bit grayscale PNG as I;16: 12-bit data must come out with its real contrast."""
    gray12 = np.array([[0, 4095, 2048]], np.uint16)
    Image.fromarray(gray12).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as image:
        assert image.mode == "I;16"
    np.testing.assert_array_equal(read_any_image(tmp_path / "g.png")[..., 1], [[0, 255, 128]])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A JPEG whose EXIF says "rotate 90°" is predicted (and its label maps written) upright, as viewers show it."""
    pixels = np.zeros((20, 30, 3), np.uint8)
    pixels[:, :10] = 255  # a white band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=100)
    upright = read_any_image(tmp_path / "r.jpg")
    assert upright.shape == (30, 20, 3)
    assert upright[:5].mean() > 200 and upright[-5:].mean() < 50  # the band is now at the top
    counts = predict_folder(
        FixedDetector(),
        tmp_path,
        tmp_path / "out",
        tiny_params().predict,
        torch.device("cpu"),
        class_names=("tumour", "lymphocyte", "stroma", "other"),
    )
    assert counts["r.jpg"]["tumour"] == 1  # counted under the model's class names
    assert read_label(tmp_path / "out" / "r" / "class1.tif", (30, 20)).max() == 1


def test_the_same_results_give_a_byte_identical_zip(tmp_path: Path) -> None:
    """The zip carries no write time, so rerunning the submit stage on the same predictions leaves its DVC
    output unchanged."""
    rows = [_one_detection(3), _one_detection(1)]
    first = write_submission(rows, tmp_path / "a").read_bytes()
    time.sleep(2.1)  # zip times have a 2-second resolution
    second = write_submission(rows, tmp_path / "b").read_bytes()
    assert first == second
    with zipfile.ZipFile(tmp_path / "a" / ZIP_FILE) as archive:
        results = json.loads(archive.read(RESULTS_FILE))
    assert [r["image_id"] for r in results] == [1, 3]  # image_id order, whatever the order of prediction
    assert results[0]["bbox"] == [1.0, 1.0, 2.0, 2.0] and results[0]["category_id"] == 2


def test_images_at_another_resolution_are_predicted_at_the_models_and_written_at_their_own(
    tmp_path: Path, capsys
) -> None:
    """The detector finds the same nuclei in model pixels whatever the image. An image at 0.5 µm/px for a 0.25
    µm/px model is enlarged 2x to be predicted, and its nuclei come back at the image's pixels: every other model
    pixel (nearest neighbour); at the model's resolution an image keeps the detector's pixels. A TIFF's own
    resolution tags count unless --mpp is given; a PNG records none and says so."""
    (tmp_path / "in").mkdir()
    pixels = np.full((40, 50, 3), 128, np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in" / "p.png")
    import tifffile

    tifffile.imwrite(
        tmp_path / "in" / "t.tif", pixels, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER"
    )
    params = tiny_params().predict

    def class1(out: Path, stem: str) -> np.ndarray:
        return read_label(out / stem / "class1.tif", (40, 50)) > 0

    predict_folder(FixedDetector(), tmp_path / "in", tmp_path / "a", params, torch.device("cpu"),
                   class_names=DEFAULT_CLASSES, model_mpp=0.25)  # fmt: skip
    assert "1 of 2 images record no resolution (e.g. p.png)" in capsys.readouterr().err
    as_is = class1(tmp_path / "a", "p")  # no resolution: predicted as it is, in model pixels
    model_pixels = np.zeros((80, 100), bool)
    model_pixels[:40, :50] = as_is
    assert as_is.sum() > 50 and (class1(tmp_path / "a", "t") == model_pixels[::2, ::2]).all()
    predict_folder(FixedDetector(), tmp_path / "in", tmp_path / "b", params, torch.device("cpu"),
                   class_names=DEFAULT_CLASSES, model_mpp=0.25, image_mpp=0.25)  # fmt: skip
    assert (class1(tmp_path / "b", "t") == as_is).all() and (class1(tmp_path / "b", "p") == as_is).all()
    assert "record no resolution" not in capsys.readouterr().err


def test_a_print_resolution_is_not_taken_for_a_microscopes(tmp_path: Path) -> None:
    import tifffile

    from cellseg.infer.folder import recorded_mpp

    tifffile.imwrite(
        tmp_path / "scan.tif", np.zeros((8, 8, 3), np.uint8), resolution=(300, 300), resolutionunit="INCH"
    )
    tifffile.imwrite(
        tmp_path / "aperio.tif", np.zeros((8, 8, 3), np.uint8), description="Aperio Image |MPP = 0.2520"
    )
    assert recorded_mpp(tmp_path / "scan.tif") is None  # 84.7 µm/px: a document scanner's 300 dpi
    assert recorded_mpp(tmp_path / "aperio.tif") == pytest.approx(0.252)
