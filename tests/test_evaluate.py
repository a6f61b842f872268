"""The ``evaluate`` stage: its outputs and their schema, re-scoring them with pycocotools, the plot files on a
hand-made case, the map comparisons of the worst samples, all-or-nothing writes, and the stage script end to
end on the tiny project."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import cellseg.eval.report as evaluate_module
from cellseg.bench.metric import noisy_predictions
from cellseg.data.io import DataFormatError, list_samples, load_npz, save_train_npz
from cellseg.eval.plots import save_overlay
from cellseg.eval.report import EvalPaths, evaluate_checkpoint, write_evaluation
from cellseg.eval.score_model import load_labelled, score_predictions
from cellseg.fsutil import write_json
from cellseg.infer.predict import predict_image
from cellseg.infer.prob_maps import ProbMaps
from cellseg.instances import Instances
from cellseg.model.checkpoint import load_trained_model
from cellseg.model.thresholds import untuned
from cellseg.rle import decode, to_coco_ground_truth
from conftest import ROOT, tiny_params

OUTPUT_NAMES = ("predictions", "metrics", "plots")
CPU = torch.device("cpu")


def _paths(root: Path, checkpoint: Path, val_dir: Path) -> EvalPaths:
    return EvalPaths(checkpoint, val_dir, root / "predictions", root / "eval.json", root / "plots")


def _read_csv(path: Path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()]


def _rescore(paths: EvalPaths, max_dets: list[int]) -> COCOeval:
    """pycocotools' COCOeval on the written files, with ground truth rebuilt from the prepared npz labels."""
    images = json.loads((paths.predictions / "val-images.json").read_text())
    results = json.loads((paths.predictions / "val-results.json").read_text())
    gt = to_coco_ground_truth(
        [(im["id"], im["name"], load_labelled(paths.val_dir / f"{im['name']}.npz", 4)[1]) for im in images],
        [f"class{k}" for k in range(1, 5)],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(results), "segm")
        evaluation.params.maxDets = max_dets
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def _ap50_at_last_cap(evaluation: COCOeval) -> float:
    precision = evaluation.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all areas, the last (dense) cap
    return float(precision[precision > -1].mean())


# ------------------------------------------------------------------------------- the stage on the tiny project
@pytest.fixture(scope="module")
def stage_run(tiny_project, tmp_path_factory) -> dict:
    """``stages/evaluate.py`` main() run from a directory holding the tiny project's params.yaml, as dvc does."""
    root = tmp_path_factory.mktemp("evaluate")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_project["params"].to_dict()))
    spec = importlib.util.spec_from_file_location("stage_evaluate", ROOT / "stages" / "evaluate.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    checkpoint, val_dir = tiny_project["models"] / "best.pt", tiny_project["prepared"] / "val"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(root)
        tuned = {
            **untuned(tiny_project["params"].predict),
            "label_score_threshold": 0.35,
            "mask_threshold": 0.45,
        }
        write_json("thresholds.json", tuned)
        stage.main(
            [str(checkpoint), "thresholds.json", str(val_dir), "data/predictions", "metrics/eval.json"]
            + ["plots/eval", "metrics/eval_per_image.csv", "--maps", str(tiny_project["maps"] / "val")]
        )
    paths = EvalPaths(
        checkpoint,
        val_dir,
        root / "data/predictions",
        root / "metrics/eval.json",
        root / "plots/eval",
        root / "metrics/eval_per_image.csv",
    )
    return {"paths": paths, "stdout": out.getvalue(), "params": tiny_project["params"]}


def test_stage_writes_every_output_with_its_schema(stage_run) -> None:
    paths, params = stage_run["paths"], stage_run["params"]
    samples = list_samples(paths.val_dir)
    metrics = json.loads(paths.metrics.read_text())
    # the validation split has ground truth, so every overall figure is defined (>= 0), and COCO's orderings hold:
    # a stricter IoU or a lower detection cap never raises AP
    assert 0.0 <= metrics["map_75"] <= metrics["map_50"] <= 1.0
    assert 0.0 <= metrics["map"] <= metrics["map_50"]
    assert 0.0 <= metrics["map_at_100"] <= metrics["map"] and metrics["map_50_at_100"] <= metrics["map_50"]
    assert 0.0 <= metrics["mar"] <= 1.0
    assert metrics["map_small"] == -1.0 or 0.0 <= metrics["map_small"] <= 1.0
    assert metrics["n_ground_truth"] > 0 and metrics["n_predictions"] > 0
    for k in range(1, 5):
        assert {f"ap50_class{k}", f"map_class{k}"} <= metrics.keys()
    assert metrics["max_detections"] == params.predict.max_per_image
    assert metrics["checkpoint_epoch"] == params.train.epochs
    assert metrics["n_images"] == len(samples)
    nuclei_keys = ("pq", "dq", "sq", "mpq_plus", "aji", "aji_plus", "dice2", "precision", "recall", "f1")
    for key in nuclei_keys + tuple(f"{m}_class{k}" for m in ("pq", "f1") for k in range(1, 5)):
        assert -1.0 <= metrics[key] <= 1.0, key
    assert (metrics["pq_score_threshold"], metrics["mask_threshold"]) == (0.35, 0.45)  # the stored thresholds
    per_image = _read_csv(paths.per_image_csv)
    assert per_image[0][:8] == ["name", "n_true", "n_pred", "pq", "dq", "sq", "aji", "aji_plus"]
    assert [row[0] for row in per_image[1:]] == [p.stem for p in samples]

    images = json.loads((paths.predictions / "val-images.json").read_text())
    assert [im["id"] for im in images] == list(range(1, len(samples) + 1))
    assert [im["name"] for im in images] == sorted(p.stem for p in samples)
    for im in images:
        image, _ = load_labelled(paths.val_dir / f"{im['name']}.npz", 4)
        assert (im["height"], im["width"]) == image.shape[:2]

    results = json.loads((paths.predictions / "val-results.json").read_text())
    assert results, "the 1-epoch model predicts something above predict.score_threshold"
    assert len(results) == metrics["n_predictions"]
    size_of = {im["id"]: [im["height"], im["width"]] for im in images}
    for row in results:
        assert set(row) == {"image_id", "category_id", "segmentation", "score", "bbox"}
        assert row["category_id"] in (1, 2, 3, 4)
        assert 0.0 <= row["score"] <= 1.0
        assert row["segmentation"]["size"] == size_of[row["image_id"]]
        mask = decode(row["segmentation"])
        assert mask.shape == tuple(size_of[row["image_id"]])
        ys, xs = np.nonzero(mask)
        x, y, w, h = row["bbox"]
        assert w > 0 and h > 0
        assert [x, y, w, h] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]

    for k in range(1, 5):
        assert _read_csv(paths.plots / "pr" / f"class{k}.csv")[0] == ["recall", "precision"]
    confusion = _read_csv(paths.plots / "confusion.csv")
    assert confusion[0] == ["actual", "predicted"]
    n_ground_truth = sum(1 for actual, _ in confusion[1:] if actual != "background")
    assert n_ground_truth == metrics["n_ground_truth"]
    overlays = sorted((paths.plots / "overlays").iterdir())
    worst = min(per_image[1:], key=lambda row: (row[3] == "", float(row[3] or 0), row[0]))[0]
    assert [p.name for p in overlays] == [f"{worst}.png"]  # the evaluate.n_overlays (1) of lowest PQ
    assert Image.open(overlays[0]).size[0] > 300
    # --maps and a model with heads: the same sample's predicted vs target maps
    assert [p.name for p in (paths.plots / "maps").iterdir()] == [f"{worst}.png"]
    assert "map_50_at_100" in stage_run["stdout"] and "class4" in stage_run["stdout"]
    assert "mpq_plus" in stage_run["stdout"] and "PQ per class" in stage_run["stdout"]


def test_stage_predictions_rescore_to_the_same_map_50(stage_run) -> None:
    paths = stage_run["paths"]
    metrics = json.loads(paths.metrics.read_text())
    dense = _rescore(paths, [1, 100, metrics["max_detections"]])
    assert _ap50_at_last_cap(dense) == pytest.approx(metrics["map_50"], abs=1e-3)


def test_rescoring_agrees_on_non_trivial_predictions(tiny_project, tmp_path: Path) -> None:
    """Ground truth shifted, partly missed and relabelled, plus spurious discs: a mid-range AP50."""
    params = tiny_params()
    files = list_samples(tiny_project["prepared"] / "val")
    ground_truth = [load_labelled(f, 4)[1] for f in files]
    rng = np.random.default_rng(0)
    predictions = [
        noisy_predictions(rng, gt, shift=1, p_miss=0.3, p_relabel=0.3, n_false=4) for gt in ground_truth
    ]
    scored = score_predictions(
        [f.stem for f in files], ground_truth, predictions, params.predict.max_per_image, 4
    )
    paths = _paths(tmp_path, tiny_project["models"] / "best.pt", files[0].parent)
    metrics = write_evaluation(scored, files, paths, params)

    assert 0.2 < metrics["map_50"] < 0.95
    assert json.loads(paths.metrics.read_text()) == metrics
    assert _ap50_at_last_cap(_rescore(paths, [1, 100, params.predict.max_per_image])) == pytest.approx(
        metrics["map_50"], abs=1e-3
    )
    leaderboard = _rescore(paths, [1, 10, 100])  # COCOeval's defaults, as the leaderboard scores
    assert leaderboard.stats[1] == pytest.approx(metrics["map_50_at_100"], abs=1e-3)
    for k in range(1, 5):  # each PR file averages to its class's AP50 (COCO's 101-point interpolation)
        rows = _read_csv(paths.plots / "pr" / f"class{k}.csv")[1:]
        ap50 = metrics[f"ap50_class{k}"]
        if ap50 < 0:
            assert rows == []
        else:
            assert len(rows) == 101
            assert np.mean([float(p) for _, p in rows]) == pytest.approx(ap50, abs=1e-9)


# ----------------------------------------------------------------------------------- a hand-made, known case
H, W = 24, 40
SQUARE = np.ones((5, 5), bool)
A, B, C, D = (2, 2), (2, 12), (12, 2), (12, 22)  # top-left corners of four disjoint 5x5 squares


def _instances(corners: list[tuple[int, int]], labels: list[int], scores: list[float]) -> Instances:
    n = len(corners)
    return Instances(
        H,
        W,
        labels=np.asarray(labels, np.int64),
        scores=np.asarray(scores, np.float32),
        offsets=np.asarray(corners, np.int64).reshape(n, 2),
        crops=[SQUARE] * n,
    )


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[list[Path], Instances, Instances]:
    """Truth: A, B of class1, C of class2. Predictions: A right (0.9); C as class1 (0.8); D, nothing there, as
    class3 (0.7); B right but at 0.1, below evaluate.confusion_score_threshold (0.5)."""
    labels = np.zeros((4, H, W), np.int32)
    for (y, x), (row, instance_id) in zip((A, B, C), ((0, 1), (0, 2), (1, 3)), strict=True):
        labels[row, y : y + 5, x : x + 5] = instance_id
    path = tmp_path / "val" / "sample-a.npz"
    path.parent.mkdir()
    save_train_npz(path, np.full((H, W, 3), 200, np.uint8), labels)
    gt = load_labelled(path, 4)[1]
    pred = _instances([A, C, D, B], [1, 1, 3, 1], [0.9, 0.8, 0.7, 0.1])
    return [path], gt, pred


def test_pr_and_confusion_files_of_a_known_case(crafted, tmp_path: Path) -> None:
    files, gt, pred = crafted
    params = tiny_params()
    assert params.evaluate.confusion_score_threshold == 0.5
    scored = score_predictions(["sample-a"], [gt], [pred], params.predict.max_per_image, 4)
    paths = _paths(tmp_path / "out", tmp_path / "unused.pt", files[0].parent)
    write_evaluation(scored, files, paths, params)

    confusion = Counter(tuple(row) for row in _read_csv(paths.plots / "confusion.csv")[1:])
    assert confusion == {
        ("class1", "class1"): 1,  # A
        ("class2", "class1"): 1,  # C, matched by a prediction of the wrong class
        ("background", "class3"): 1,  # D, a false positive
        ("class1", "background"): 1,  # B: its only prediction scores below the threshold
    }
    class1 = _read_csv(paths.plots / "pr" / "class1.csv")[1:]
    # class1: A (TP, 0.9), C-as-class1 (FP, 0.8), B (TP, 0.1); interpolated precision 1 up to recall 0.5, then 2/3
    expected = [1.0] * 51 + [2 / 3] * 50
    assert [float(r) for r, _ in class1] == pytest.approx(np.linspace(0, 1, 101))
    assert [float(p) for _, p in class1] == pytest.approx(expected, abs=1e-9)
    assert [float(p) for _, p in _read_csv(paths.plots / "pr" / "class2.csv")[1:]] == [0.0] * 101
    for empty in ("class3", "class4"):  # no ground truth: header only
        assert _read_csv(paths.plots / "pr" / f"{empty}.csv") == [["recall", "precision"]]
    results = json.loads((paths.predictions / "val-results.json").read_text())
    assert sorted(tuple(r["bbox"]) for r in results) == sorted((x, y, 5, 5) for y, x in (A, B, C, D))


def test_nuclei_metrics_and_worst_overlays_of_a_known_case(crafted, tmp_path: Path) -> None:
    files, gt, pred = crafted
    perfect_path = files[0].with_name("sample-0-perfect.npz")  # first by name, but PQ 1
    shutil.copy(files[0], perfect_path)
    params = tiny_params(
        predict__label_score_threshold=0.05
    )  # every crafted prediction enters the label maps
    assert params.evaluate.n_overlays == 1
    scored = score_predictions(
        ["sample-0-perfect", "sample-a"], [gt, gt], [gt, pred], params.predict.max_per_image, 4
    )
    paths = _paths(tmp_path / "out", tmp_path / "unused.pt", files[0].parent)
    metrics = write_evaluation(scored, [perfect_path, files[0]], paths, params)
    # sample-a, all four predictions in its label map: A, B, C matched (IoU 1), D spurious: TP 3, FP 1, FN 0
    # -> DQ 3/3.5, SQ 1; with the perfect sample, PQ = (1 + 6/7) / 2
    assert metrics["pq"] == pytest.approx((1 + 6 / 7) / 2) and metrics["sq"] == 1.0
    assert metrics["f1"] == pytest.approx(2 * 6 / (6 + 7))
    # class-wise, pooled: class1 TP 4 (A, B twice), FP 1 (C called class1) -> 4/4.5; class2 TP 1, FN 1 -> 1/1.5;
    # class3 FP 1 -> 0; mPQ+ over the three classes present
    assert metrics["pq_class1"] == pytest.approx(4 / 4.5) and metrics["pq_class2"] == pytest.approx(1 / 1.5)
    assert metrics["pq_class3"] == 0.0 and metrics["pq_class4"] == -1.0
    assert metrics["mpq_plus"] == pytest.approx((4 / 4.5 + 1 / 1.5 + 0) / 3)
    assert [p.name for p in (paths.plots / "overlays").iterdir()] == [
        "sample-a.png"
    ]  # the worst, not the first
    rows = _read_csv(paths.per_image_csv)
    assert [(r[0], r[1], r[2], float(r[3])) for r in rows[1:]] == [
        ("sample-0-perfect", "3", "3", 1.0),
        ("sample-a", "3", "4", pytest.approx(6 / 7)),
    ]


def test_overlay_counts_each_outcome(crafted, tmp_path: Path) -> None:
    files, gt, pred = crafted
    image, _ = load_labelled(files[0], 4)
    counts = save_overlay(tmp_path / "o.png", image, gt, pred, "sample-a", 0.5, 0.5, ("a", "b", "c", "d"))
    assert counts == {"true positive": 1, "wrong class": 1, "false positive": 1, "missed (ground truth)": 1}
    assert Image.open(tmp_path / "o.png").format == "PNG"


# ------------------------------------------------------------------------------------ maps of the worst samples
def _worst_names(per_image_csv: Path, n: int) -> list[str]:
    """The ``n`` samples of lowest PQ in a per-image CSV (no PQ last, ties by name), as overlays pick them."""
    rows = _read_csv(per_image_csv)[1:]
    return [r[0] for r in sorted(rows, key=lambda r: (r[3] == "", float(r[3] or 0), r[0]))[:n]]


def test_map_comparisons_of_exactly_the_worst_samples(tiny_project, tmp_path: Path) -> None:
    files = list_samples(tiny_project["prepared"] / "val")
    assert len(files) >= 2, "the tiny validation split must hold a sample that is not among the worst"
    params = tiny_params(evaluate__n_overlays=len(files) - 1)
    paths = dataclasses.replace(
        _paths(tmp_path, tiny_project["models"] / "best.pt", files[0].parent),
        maps_dir=tiny_project["maps"] / "val",
    )
    evaluate_checkpoint(paths, params, CPU)

    worst = _worst_names(paths.per_image_csv, len(files) - 1)
    maps = sorted(p.name for p in (paths.plots / "maps").iterdir())
    assert maps == sorted(f"{name}.png" for name in worst)
    assert maps == sorted(p.name for p in (paths.plots / "overlays").iterdir())  # the same samples
    for name in maps:
        with Image.open(paths.plots / "maps" / name) as picture:
            picture.verify()  # a whole, valid PNG
        with Image.open(paths.plots / "maps" / name) as picture:
            assert picture.format == "PNG" and picture.size[0] > 500  # five panels side by side
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary sibling left


def _without_heads(checkpoint: Path, path: Path) -> Path:
    """The checkpoint's detector alone: aux heads switched off in its params and their weights dropped."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["params"]["aux"]["enabled"] = False
    heads = ("center_head.", "boundary_head.")
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith(heads)}
    torch.save(state, path)
    return path


def test_no_map_comparisons_without_heads(tiny_project, tmp_path: Path) -> None:
    checkpoint = _without_heads(tiny_project["models"] / "best.pt", tmp_path / "plain.pt")
    assert not load_trained_model(checkpoint, CPU)[0].has_aux
    val_dir = tiny_project["prepared"] / "val"
    paths = dataclasses.replace(_paths(tmp_path, checkpoint, val_dir), maps_dir=tiny_project["maps"] / "val")
    evaluate_checkpoint(paths, tiny_params(), CPU)
    assert len(list((paths.plots / "overlays").iterdir())) == 1  # the overlays are still drawn
    assert list((paths.plots / "maps").iterdir()) == []  # an empty folder, so that DVC finds its output


def _write_maps(folder: Path, name: str, center: np.ndarray, boundary: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{name}.npz", center=center, boundary=boundary)
    return folder


def test_map_comparison_draws_the_predicted_maps_against_the_stored_targets(
    crafted, tmp_path: Path, monkeypatch
) -> None:
    """Two samples, one overlay: only the worst is predicted again and drawn, against its own target file."""
    files, gt, pred = crafted
    perfect = files[0].with_name("sample-0-perfect.npz")
    shutil.copy(files[0], perfect)
    rng = np.random.default_rng(0)
    center = rng.random((H, W)).astype(np.float32)
    boundary = (rng.random((H, W)) > 0.7).astype(np.uint8)  # as the maps stage stores it
    maps_dir = _write_maps(tmp_path / "maps", "sample-a", center, boundary)
    _write_maps(maps_dir, "sample-0-perfect", np.zeros((H, W), np.float32), np.zeros((H, W), np.uint8))
    predicted = ProbMaps(np.full((H, W), 0.25, np.float32), np.full((H, W), 0.75, np.float32))
    seen, drawn = [], []

    def predict_maps(image: np.ndarray) -> ProbMaps:
        seen.append(image)
        return predicted

    def record(path: Path, image, predicted_maps, target_maps, title: str) -> None:
        drawn.append((path.name, predicted_maps, target_maps, title))
        path.write_bytes(b"png")

    monkeypatch.setattr(evaluate_module, "save_map_comparison", record)
    scored = score_predictions(["sample-0-perfect", "sample-a"], [gt, gt], [gt, pred], 100, 4)
    paths = dataclasses.replace(
        _paths(tmp_path / "out", tmp_path / "unused.pt", files[0].parent), maps_dir=maps_dir
    )
    write_evaluation(scored, [perfect, files[0]], paths, tiny_params(), predict_maps=predict_maps)

    assert len(seen) == 1 and np.array_equal(seen[0], load_npz(files[0])["image"])
    ((name, predicted_maps, target_maps, title),) = drawn
    assert name == "sample-a.png" and title.startswith("sample-a")
    assert predicted_maps[0] is predicted.center and predicted_maps[1] is predicted.boundary
    np.testing.assert_array_equal(target_maps[0], center)
    np.testing.assert_array_equal(target_maps[1], boundary.astype(np.float32))
    assert [p.name for p in (paths.plots / "maps").iterdir()] == ["sample-a.png"]

    # no maps folder given: nothing is predicted again, the folder is written empty
    seen.clear()
    write_evaluation(
        scored,
        [perfect, files[0]],
        dataclasses.replace(paths, maps_dir=None),
        tiny_params(),
        predict_maps=predict_maps,
    )
    assert seen == [] and list((paths.plots / "maps").iterdir()) == []


# ---------------------------------------------------------------------------------------------------- failures
SENTINELS = (
    "predictions/old.txt",
    "plots/pr/old.txt",
    "plots/overlays/old.txt",
    "plots/maps/old.txt",
    "plots/confusion.csv",
    "eval.json",
)
"""Files of a previous run, relative to the output root of :func:`_paths`."""


def _write_previous(paths: EvalPaths) -> None:
    """The :data:`SENTINELS` of a previous run under the output root of :func:`_paths`."""
    for name in SENTINELS:
        (paths.metrics.parent / name).parent.mkdir(parents=True, exist_ok=True)
        (paths.metrics.parent / name).write_text(f"previous {name}")


def _assert_untouched(paths: EvalPaths, previous: bool) -> None:
    """Each output holds exactly its previous content (or does not exist); no temporary file is left."""
    root = paths.metrics.parent
    if previous:
        for name in SENTINELS:
            assert (root / name).read_text() == f"previous {name}"
    else:
        assert not any(getattr(paths, n).exists() for n in OUTPUT_NAMES)
    assert not [p for p in root.rglob(".*")]


def test_missing_checkpoint_is_named_and_writes_nothing(tiny_project, tmp_path: Path) -> None:
    paths = _paths(tmp_path, tmp_path / "models" / "best.pt", tiny_project["prepared"] / "val")
    with pytest.raises(FileNotFoundError, match=re.escape(str(paths.checkpoint))):
        evaluate_checkpoint(paths, tiny_params(), CPU)
    _assert_untouched(paths, previous=False)


def test_corrupt_sample_is_named_and_writes_nothing(tiny_project, tmp_path: Path) -> None:
    val_dir = tmp_path / "val"
    shutil.copytree(tiny_project["prepared"] / "val", val_dir)
    bad = val_dir / "zzz-last.npz"  # sorted last: the others are predicted before it fails
    bad.write_bytes(b"not an npz")
    paths = _paths(tmp_path, tiny_project["models"] / "best.pt", val_dir)
    with pytest.raises(DataFormatError, match=re.escape(f"{bad}: cannot read as npz")):
        evaluate_checkpoint(paths, tiny_params(), CPU)
    _assert_untouched(paths, previous=False)


def test_empty_validation_split_is_named(tiny_project, tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    paths = _paths(tmp_path, tiny_project["models"] / "best.pt", tmp_path / "val")
    with pytest.raises(DataFormatError, match=re.escape(f"{tmp_path / 'val'}: no prepared samples")):
        evaluate_checkpoint(paths, tiny_params(), CPU)


def test_failure_while_writing_keeps_the_previous_outputs(crafted, tmp_path: Path, monkeypatch) -> None:
    files, gt, pred = crafted
    paths = _paths(tmp_path / "out", tmp_path / "unused.pt", files[0].parent)
    _write_previous(paths)

    def broken_overlay(path: Path, *args, **kwargs) -> None:
        path.write_bytes(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(evaluate_module, "save_overlay", broken_overlay)
    scored = score_predictions(["sample-a"], [gt], [pred], 100, 4)
    with pytest.raises(OSError, match="disk full"):
        write_evaluation(scored, files, paths, tiny_params())
    _assert_untouched(paths, previous=True)


def test_stale_target_maps_are_named_and_keep_the_previous_outputs(crafted, tmp_path: Path) -> None:
    files, gt, pred = crafted
    maps_dir = _write_maps(tmp_path / "maps", "sample-a", np.zeros((H, W + 1)), np.zeros((H, W + 1)))
    paths = dataclasses.replace(
        _paths(tmp_path / "out", tmp_path / "unused.pt", files[0].parent), maps_dir=maps_dir
    )
    _write_previous(paths)
    scored = score_predictions(["sample-a"], [gt], [pred], 100, 4)
    maps = ProbMaps(np.zeros((H, W), np.float32), np.zeros((H, W), np.float32))
    with pytest.raises(DataFormatError, match=re.escape(f"{maps_dir / 'sample-a.npz'}: 'center' map")):
        write_evaluation(scored, files, paths, tiny_params(), predict_maps=lambda image: maps)
    _assert_untouched(paths, previous=True)


# ------------------------------------------------------------------------------------------- order independence
def test_predictions_do_not_depend_on_the_samples_before_them(tiny_project) -> None:
    """torchvision's RoI poolers guess their scales from the first image they see and keep them: a tiny first
    sample (a 40-px image gives stride 2 for 4) must not spoil the samples after it (``model.set_roi_scales``)."""
    params = dataclasses.replace(tiny_params().predict, score_threshold=0.0)
    files = list_samples(tiny_project["prepared"] / "val")
    large = max((load_labelled(f, 4)[0] for f in files), key=lambda im: im.shape[0] * im.shape[1])
    assert min(large.shape[:2]) >= 128
    tiny = large[:40, :40]  # the real test set has images from 33x35 px
    fresh, _ = load_trained_model(tiny_project["models"] / "best.pt", CPU)
    fresh.roi_heads.score_thresh = 0.0  # known to detect: every proposal gives a detection
    alone = predict_image(fresh, large, params)
    warmed, _ = load_trained_model(tiny_project["models"] / "best.pt", CPU)
    warmed.roi_heads.score_thresh = 0.0
    predict_image(warmed, tiny, params)
    after_tiny = predict_image(warmed, large, params)
    assert len(alone) >= 10 and len(after_tiny) == len(alone)
    np.testing.assert_allclose(after_tiny.scores, alone.scores, atol=1e-5)
