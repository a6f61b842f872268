"""cellseg.eval.coco_metrics against pycocotools' own COCOeval, hand-computed APs and a hand-counted confusion matrix."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cellseg.bench.metric import noisy_predictions, voronoi_ground_truth
from cellseg.eval.coco_metrics import BACKGROUND, Evaluation, confusion_matrix, evaluate
from cellseg.instances import Instances
from cellseg.rle import to_coco_ground_truth, to_coco_results

CAP = 300

K4 = ("class1", "class2", "class3", "class4")


def _instances(height: int, width: int, crops, offsets, labels, scores=None) -> Instances:
    n = len(crops)
    return Instances(
        height,
        width,
        labels=np.asarray(labels, np.int64),
        scores=np.asarray(scores if scores is not None else np.ones(n), np.float32),
        offsets=np.asarray(offsets, np.int64).reshape(n, 2),
        crops=[np.asarray(c, bool) for c in crops],
    )


def _cocoeval(ground_truth, predictions, max_dets=None, keep_bbox=False) -> COCOeval:
    """pycocotools' COCOeval on the same data, through COCO documents (no torchmetrics involved)."""
    gt = to_coco_ground_truth([(i + 1, f"{i}.tif", g) for i, g in enumerate(ground_truth)], K4)
    results = [row for i, p in enumerate(predictions) for row in to_coco_results(p, i + 1)]
    if not keep_bbox:
        # loadRes takes a result's area from its bbox when there is one (the box area, not the mask area), which
        # moves detections between the size ranges; torchmetrics uses the mask area, so compare on that.
        results = [{k: v for k, v in row.items() if k != "bbox"} for row in results]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(results), "segm")
        if max_dets is not None:
            evaluation.params.maxDets = max_dets
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def _mean(values: np.ndarray) -> float:
    return float(values[values > -1].mean()) if (values > -1).any() else -1.0


@pytest.fixture(scope="module")
def scenes() -> tuple[list[Instances], list[Instances]]:
    """Dense images (> 100 cells of a class), big cells (medium/large sizes), no ground truth, no predictions."""
    rng = np.random.default_rng(3)
    gts = [voronoi_ground_truth(rng, (220, 200), 560) for _ in range(2)]
    gts += [voronoi_ground_truth(rng, (150, 160), 6), voronoi_ground_truth(rng, (240, 230), 3)]
    preds = [noisy_predictions(rng, g, shift=1, n_false=15) for g in gts]
    gts.append(Instances(40, 50))  # predictions only: all false positives
    preds.append(noisy_predictions(rng, voronoi_ground_truth(rng, (40, 50), 4), p_miss=0.0, n_false=2))
    gts.append(voronoi_ground_truth(rng, (40, 50), 5))  # ground truth only: all missed
    preds.append(Instances(40, 50))
    return gts, preds


@pytest.fixture(scope="module")
def scored(scenes) -> tuple[Evaluation, COCOeval]:
    gts, preds = scenes
    return evaluate(gts, preds, CAP, 4), _cocoeval(gts, preds, max_dets=[1, 100, CAP])


def test_figures_equal_pycocotools_cocoeval(scenes, scored) -> None:
    gts, preds = scenes
    assert max(np.bincount(g.labels, minlength=5).max() for g in gts) > 100  # caps 100 and CAP differ here
    metrics, dense = scored[0].metrics, scored[1]
    leaderboard = _cocoeval(gts, preds, keep_bbox=True)  # default maxDets [1, 10, 100], results as submitted
    precision = dense.eval["precision"][:, :, :, 0, -1]  # T×R×K at area "all" and the dense cap
    # summarize() uses maxDets[2] for stats 1..11 but hard-codes 100 for stats[0]: the dense mAP is computed here
    expected = {
        "map": _mean(precision),
        "map_50": dense.stats[1],
        "map_75": dense.stats[2],
        "map_small": dense.stats[3],
        "map_medium": dense.stats[4],
        "map_large": dense.stats[5],
        "mar": dense.stats[8],
        "map_at_100": dense.stats[0],
        "map_50_at_100": leaderboard.stats[1],
    }
    for k in range(4):
        expected[f"map_class{k + 1}"] = _mean(precision[:, :, k])
        expected[f"ap50_class{k + 1}"] = _mean(precision[0, :, k])
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, abs=1e-9)
    assert min(expected.values()) > 0  # every figure is defined and non-trivial on this data
    assert metrics["map_50"] > metrics["map_50_at_100"] + 0.05
    assert metrics["n_images"] == 6
    assert metrics["n_ground_truth"] == sum(len(g) for g in gts)
    assert metrics["n_predictions"] == sum(len(p) for p in preds)
    assert metrics["max_detections"] == CAP


def test_pr_curves_are_cocoeval_precision(scored) -> None:
    curves, dense = scored[0].pr_curves, scored[1]
    assert curves.shape == (4, 101)
    np.testing.assert_allclose(curves, dense.eval["precision"][0, :, :, 0, -1].T, atol=1e-12)


def _touching_squares(rows: int, cols: int, side: int) -> Instances:
    ids = np.arange(1, rows * cols + 1).reshape(rows, cols).repeat(side, 0).repeat(side, 1)
    return Instances.from_label_rows(np.stack([ids, *np.zeros((3, *ids.shape), np.int64)]))


def test_perfect_dense_image_scores_one_only_at_the_dense_cap() -> None:
    gt = _touching_squares(10, 15, 8)  # 150 touching squares of class 1
    pred = _instances(gt.height, gt.width, gt.crops, gt.offsets, gt.labels, np.linspace(1, 0.1, len(gt)))
    metrics = evaluate([gt], [pred], max_detections=200, num_classes=4).metrics
    assert metrics["map"] == metrics["map_50"] == metrics["map_class1"] == metrics["mar"] == 1.0
    # At 100 detections only the 100 best-scored squares count: recall stops at 100/150 = 0.667 with
    # precision 1, so 67 of the 101 recall thresholds (0.00 .. 0.66) have precision 1 and the rest 0.
    assert metrics["map_50_at_100"] == pytest.approx(67 / 101, abs=1e-12)
    assert metrics["map_at_100"] == pytest.approx(67 / 101, abs=1e-12)
    assert metrics["map_class2"] == metrics["ap50_class4"] == -1.0  # classes without ground truth


def test_hand_computed_average_precision() -> None:
    square = np.ones((10, 10), bool)
    gt = _instances(40, 40, [square, square], [(0, 0), (20, 20)], [1, 1])
    partial = square.copy()
    partial[:2] = False  # 80 of the 100 pixels: IoU exactly 0.8
    pred = _instances(40, 40, [partial, square], [(0, 0), (0, 25)], [1, 1], [0.9, 0.8])
    metrics = evaluate([gt], [pred], max_detections=100, num_classes=4).metrics
    # Ranked: TP (0.9) gives precision 1 at recall 1/2; FP (0.8) gives precision 1/2 at recall 1/2. The
    # interpolated precision is 1 at the recall thresholds 0.00 .. 0.50 (51 of 101) and 0 above:
    ap_matched = 51 / 101
    assert metrics["map_50"] == pytest.approx(ap_matched, abs=1e-12)
    assert metrics["map_75"] == pytest.approx(ap_matched, abs=1e-12)
    # The TP matches at the IoU thresholds 0.50 .. 0.80 (7 of 10) and is a FP at 0.85 .. 0.95, where AP = 0.
    # torchmetrics' float32 default thresholds (0.8 -> 0.80000001) would lose the match at 0.80: 6/10.
    assert metrics["map"] == pytest.approx(0.7 * ap_matched, abs=1e-12)
    assert metrics["mar"] == pytest.approx(0.7 * 0.5, abs=1e-12)


def test_no_predictions_score_zero_as_in_cocoeval() -> None:
    gt = _touching_squares(2, 3, 5)
    metrics = evaluate([gt, gt], [Instances(gt.height, gt.width)] * 2, 100, num_classes=4).metrics
    assert metrics["map"] == metrics["map_50_at_100"] == metrics["ap50_class1"] == 0.0
    assert metrics["ap50_class3"] == -1.0
    assert metrics["n_predictions"] == 0


def test_confusion_matrix_hand_counted() -> None:
    sq = np.ones((10, 10), bool)
    #            A (1)   B (2)    C (3)     D (1)     E (2)
    gt = _instances(60, 60, [sq] * 5, [(0, 0), (0, 20), (0, 40), (20, 0), (20, 20)], [1, 2, 3, 1, 2])
    shifted_far = (23, 5)  # over D with IoU 35/165 < 0.5
    shifted_near = (22, 20)  # over E with IoU 80/120 = 0.67
    pred = _instances(
        60,
        60,
        [sq] * 7,
        [(0, 0), (0, 20), (0, 40), shifted_far, shifted_near, (20, 20), (45, 45)],
        [1, 4, 3, 1, 2, 3, 2],
        [0.9, 0.8, 0.3, 0.85, 0.95, 0.6, 0.7],
    )
    expected = np.zeros((5, 5), np.int64)
    expected[0, 0] = 1  # A found as class 1
    expected[1, 3] = 1  # B taken for class 4
    expected[2, BACKGROUND] = 1  # C: its prediction scores 0.3 < 0.5 and is dropped, so C is missed
    expected[0, BACKGROUND] = 1  # D: the only prediction over it has IoU < 0.5
    expected[BACKGROUND, 0] = 1  # ... and that prediction is a false positive
    expected[1, 1] = 1  # E: the better-scored prediction (0.95, IoU 0.67) wins over the exact one (0.6) ...
    expected[BACKGROUND, 2] = 1  # ... which is left as a false positive
    expected[BACKGROUND, 1] = 1  # a prediction over empty tissue
    matrix = confusion_matrix([gt], [pred], 4)
    np.testing.assert_array_equal(matrix, expected)
    assert matrix[:4].sum(1).tolist() == [2, 2, 1, 0]  # row sums: ground truth per class

    low = confusion_matrix([gt, gt], [pred, Instances(60, 60)], 4, score_threshold=0.0)
    assert low[2, 2] == 1 and low[2, BACKGROUND] == 1  # C found in image 1, missed in image 2
    assert low[:4, BACKGROUND].sum() == 1 + len(gt)  # D, and all of image 2


def test_inputs_are_checked() -> None:
    gt = _touching_squares(2, 2, 4)
    with pytest.raises(ValueError, match="prediction images"):
        evaluate([gt], [], max_detections=100, num_classes=4)
    with pytest.raises(ValueError, match="image size"):
        evaluate([gt], [Instances(3, 3)], max_detections=100, num_classes=4)
    background = _instances(gt.height, gt.width, gt.crops[:1], gt.offsets[:1], [0])  # a torchvision "0" label
    with pytest.raises(ValueError, match="class ids"):
        evaluate([gt], [background], max_detections=100, num_classes=4)


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_crop_rles_give_the_same_figures_as_full_masks(scenes, scored, backend) -> None:
    """RLEs encoded from the crops change nothing against pycocotools' encoding of full masks, on either backend."""
    gts, preds = scenes
    through_update = evaluate(gts, preds, CAP, 4, backend=backend, full_masks=True)
    assert through_update.metrics == pytest.approx(scored[0].metrics, abs=1e-12)
    np.testing.assert_allclose(through_update.pr_curves, scored[0].pr_curves, atol=1e-12)


def test_evaluation_uses_cocoeval_alone_without_torchmetrics() -> None:
    """The figures come through COCOeval's public API: no torchmetrics (and none of its private state)."""
    code = (
        "import sys, numpy as np\n"
        "from cellseg.bench.metric import noisy_predictions, voronoi_ground_truth\n"
        "from cellseg.eval.coco_metrics import evaluate\n"
        "rng = np.random.default_rng(0)\n"
        "gt = voronoi_ground_truth(rng, (64, 64), 12)\n"
        "assert evaluate([gt], [noisy_predictions(rng, gt)], 300, 4).metrics['map_50'] > 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchmetrics'))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert run.stdout.strip() == "[]"
