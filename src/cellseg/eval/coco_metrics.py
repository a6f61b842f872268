"""Mask mAP in the COCO way (COCOeval on the faster-coco-eval backend), PR curves and a confusion matrix.

The ground truth and the predictions become COCO documents (``rle.to_coco_ground_truth``/``to_coco_results``,
RLEs encoded from the box-local crops) and go through COCOeval's public API: ``COCOeval_faster`` from
faster-coco-eval, or pycocotools' ``COCOeval`` (same arrays, slower). Every figure is read from COCOeval's
accumulated ``precision`` array (``T×R×K×A×M``: IoU thresholds × 101 recall thresholds × classes × area ranges
all/small/medium/large × max-detection caps) and averaged the way ``COCOeval.summarize`` does (mean over the
entries > -1), because ``summarize`` itself cannot be trusted here:

- pycocotools' ``summarize`` hard-codes maxDets=100 for ``stats[0]`` and uses the last cap for the others;
  faster-coco-eval reports all of them at the last cap.
- The cap is per image **and per class** (``useCats=1``): the leaderboard, which scores AP50 with COCOeval's
  default ``maxDets=[1, 10, 100]``, counts the 100 best-scored masks of each class in each image.

Every image is listed in the ground-truth document, so false positives on an image without ground truth count,
and a class without ground truth is -1 (undefined, as in COCO). A result's area is its mask area (no ``bbox`` is
given to ``loadRes``, which would otherwise take the box area and move detections between size ranges).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cellseg.instances import Instances
from cellseg.rle import encode_instances, encode_mask, to_coco_ground_truth, to_coco_results

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
LEADERBOARD_MAX_DETECTIONS = 100
AREA_RANGES = ("all", "small", "medium", "large")
BACKENDS = {"faster_coco_eval": (FasterCOCO, COCOeval_faster), "pycocotools": (COCO, COCOeval)}
_T50, _T75 = (int(np.argmin(np.abs(IOU_THRESHOLDS - t))) for t in (0.5, 0.75))
BACKGROUND = -1
"""Index of the "no instance" row/column of :func:`confusion_matrix`: the last (classes 1..K are 0..K-1)."""


def class_key(k: int) -> str:
    """The metric-key name of class ``k`` (``map_class3``, ``pq_class3``): numbered whatever the class names,
    so that ``dvc metrics diff`` lines up runs with other names."""
    return f"class{k}"


@dataclass(frozen=True)
class Evaluation:
    """The flat, JSON-friendly ``metrics`` and the PR curves that plots need, from one COCO evaluation.

    ``pr_curves[k]`` is the precision of class ``k + 1`` at each of ``RECALL_THRESHOLDS`` (IoU 0.5, all areas,
    dense cap); a class without ground truth has a row of -1. ``num_classes``: K, the classes scored.
    """

    metrics: dict[str, float | int]
    pr_curves: np.ndarray
    num_classes: int


def _full_mask_results(inst: Instances, image_id: int) -> list[dict]:
    """Results rows with RLEs encoded from full ``H×W`` masks (pycocotools' documented way; the baseline)."""
    rows = to_coco_results(inst, image_id)
    for row, mask in zip(rows, inst.full_masks(), strict=True):
        row["segmentation"] = encode_mask(mask)
    return rows


def _documents(
    ground_truth: list[Instances], predictions: list[Instances], full_masks: bool, num_classes: int
) -> tuple[dict, list[dict]]:
    """The COCO ground-truth dataset and results list (without ``bbox``: the mask gives the area)."""
    images = [(i, f"{i}", inst) for i, inst in enumerate(ground_truth, start=1)]
    gt = to_coco_ground_truth(images, [class_key(k) for k in range(1, num_classes + 1)])
    results_of = _full_mask_results if full_masks else to_coco_results
    results = [row for i, inst in enumerate(predictions, start=1) for row in results_of(inst, i)]
    for row in results:
        del row["bbox"]
    return gt, results


def _coco_arrays(
    ground_truth: list[Instances],
    predictions: list[Instances],
    caps: list[int],
    backend: str,
    full_masks: bool,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's ``precision`` (T×R×K×A×M) and ``recall`` (T×K×A×M) with K = classes 1..K (-1 where absent)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    coco_class, eval_class = BACKENDS[backend]
    gt_document, results = _documents(ground_truth, predictions, full_masks, num_classes)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = coco_class()
        coco_gt.dataset = gt_document
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results) if results else _empty_results(coco_class, gt_document)
        evaluation = eval_class(coco_gt, coco_dt, "segm")
        evaluation.params.iouThrs = IOU_THRESHOLDS.copy()
        evaluation.params.recThrs = RECALL_THRESHOLDS.copy()
        evaluation.params.maxDets = list(caps)
        evaluation.evaluate()
        evaluation.accumulate()
    return np.asarray(evaluation.eval["precision"]), np.asarray(evaluation.eval["recall"])


def _empty_results(coco_class: type, gt_document: dict):
    """A results object without any detection (pycocotools' ``loadRes`` cannot take an empty list)."""
    results = coco_class()
    results.dataset = {
        "images": gt_document["images"],
        "categories": gt_document["categories"],
        "annotations": [],
    }
    results.createIndex()
    return results


def _mean(values: np.ndarray) -> float:
    """COCO's summary average: the mean over defined entries, -1 if there are none."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else -1.0


def _summaries(precision: np.ndarray, recall: np.ndarray, dense: int, at_100: int) -> dict[str, float]:
    out = {
        "map": _mean(precision[..., 0, dense]),
        "map_50": _mean(precision[_T50, ..., 0, dense]),
        "map_75": _mean(precision[_T75, ..., 0, dense]),
        "map_at_100": _mean(precision[..., 0, at_100]),
        "map_50_at_100": _mean(precision[_T50, ..., 0, at_100]),
    }
    for a, name in enumerate(AREA_RANGES[1:], start=1):
        out[f"map_{name}"] = _mean(precision[..., a, dense])
    for k in range(precision.shape[2]):
        out[f"map_{class_key(k + 1)}"] = _mean(precision[:, :, k, 0, dense])
        out[f"ap50_{class_key(k + 1)}"] = _mean(precision[_T50, :, k, 0, dense])
    out["mar"] = _mean(recall[..., 0, dense])
    return out


def evaluate(
    ground_truth: list[Instances],
    predictions: list[Instances],
    max_detections: int,
    num_classes: int,
    backend: str = "faster_coco_eval",
    full_masks: bool = False,
) -> Evaluation:
    """COCO mask metrics at the dense cap ``max_detections`` and at the leaderboard's 100, per image and class,
    for classes 1..``num_classes`` (K).

    ``metrics`` keys: ``map``, ``map_50``, ``map_75``, ``map_small|medium|large``, ``map_class1..K``,
    ``ap50_class1..K`` and ``mar`` (all at the dense cap); ``map_at_100`` and ``map_50_at_100`` (at most 100
    detections per image and class: the leaderboard's AP50); counts and the cap. ``mar`` has no cap in its name
    so that experiments with different caps stay comparable in ``dvc metrics diff``. ``backend`` is the
    COCOeval implementation: "faster_coco_eval" or "pycocotools" (same numbers, slower: ``cellseg.bench.metric``).
    ``full_masks`` encodes each mask from a full ``H×W`` array instead of its crop: same numbers, slower.
    """
    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(predictions)} prediction images")
    for gt, pred in zip(ground_truth, predictions, strict=True):
        if (gt.height, gt.width) != (pred.height, pred.width):
            raise ValueError(
                f"image size {gt.height}x{gt.width} but predictions for {pred.height}x{pred.width}"
            )
        if not all(np.isin(inst.labels, np.arange(1, num_classes + 1)).all() for inst in (gt, pred)):
            raise ValueError(f"labels must be class ids 1..{num_classes}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be at least 1, got {max_detections}")
    caps = sorted([1, LEADERBOARD_MAX_DETECTIONS, int(max_detections)])
    precision, recall = _coco_arrays(ground_truth, predictions, caps, backend, full_masks, num_classes)
    metrics: dict[str, float | int] = _summaries(
        precision, recall, caps.index(max_detections), caps.index(LEADERBOARD_MAX_DETECTIONS)
    )
    metrics |= {
        "n_images": len(ground_truth),
        "n_ground_truth": sum(len(gt) for gt in ground_truth),
        "n_predictions": sum(len(p) for p in predictions),
        "max_detections": int(max_detections),
    }
    return Evaluation(metrics, precision[_T50, :, :, 0, caps.index(max_detections)].T.copy(), num_classes)


def match_instances(gt: Instances, pred: Instances, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Class-agnostic greedy matching, best score first: ``(gt_index, pred_index)`` of the matched pairs.

    Each prediction takes the still unmatched ground truth of highest mask IoU above ``iou_threshold``
    (``nuclei_metrics.MATCH_IOU``'s rule, the one the PQ and F1 figures use; COCOeval itself counts ≥).
    ``pycocotools.mask.iou`` compares boxes first and skips the masks of pairs whose boxes do not overlap.
    """
    if len(gt) == 0 or len(pred) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ious = np.asarray(mask_utils.iou(encode_instances(pred), encode_instances(gt), [0] * len(gt)))
    free = np.ones(len(gt), bool)
    gt_idx, pred_idx = [], []
    for d in np.argsort(-pred.scores, kind="stable"):
        candidates = np.where(free & (ious[d] > iou_threshold), ious[d], -1.0)
        g = int(np.argmax(candidates))
        if candidates[g] >= 0:
            free[g] = False
            gt_idx.append(g)
            pred_idx.append(d)
    return np.asarray(gt_idx, np.int64), np.asarray(pred_idx, np.int64)


def confusion_matrix(
    ground_truth: list[Instances],
    predictions: list[Instances],
    num_classes: int,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
) -> np.ndarray:
    """Counts of (true class, predicted class) over all images, ``(K + 1, K + 1)`` int64 for K = ``num_classes``.

    Rows are the true class, columns the predicted class; index ``k - 1`` is class ``k`` and the last index K
    (``BACKGROUND``) is "no instance". ``m[t, p]``: ground truth of class ``t + 1`` matched (mask IoU ≥
    ``iou_threshold``, matching blind to class) by a prediction of class ``p + 1``; ``m[K, p]``: predictions of
    class ``p + 1`` that match nothing (false positives); ``m[t, K]``: ground truth of class ``t + 1`` that no
    prediction matches (missed); ``m[K, K]`` is always 0. Predictions scoring below ``score_threshold`` are
    dropped first. Row sums ``m[:K].sum(1)`` are the ground-truth counts per class.
    """
    matrix = np.zeros((num_classes + 1, num_classes + 1), np.int64)
    for gt, pred in zip(ground_truth, predictions, strict=True):
        pred = pred.select(pred.scores >= score_threshold)
        gt_idx, pred_idx = match_instances(gt, pred, iou_threshold)
        np.add.at(matrix, (gt.labels[gt_idx] - 1, pred.labels[pred_idx] - 1), 1)
        missed = np.setdiff1d(np.arange(len(gt)), gt_idx)
        spurious = np.setdiff1d(np.arange(len(pred)), pred_idx)
        np.add.at(matrix, (gt.labels[missed] - 1, BACKGROUND), 1)
        np.add.at(matrix, (BACKGROUND, pred.labels[spurious] - 1), 1)
    return matrix
