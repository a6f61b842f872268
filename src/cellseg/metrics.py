"""Mask mAP in the COCO way (torchmetrics on the faster-coco-eval backend), PR curves and a confusion matrix.

Every figure is read from COCOeval's accumulated ``precision`` array (``T×R×K×A×M``: IoU thresholds × 101 recall
thresholds × classes × area ranges all/small/medium/large × max-detection caps) and averaged the way
``COCOeval.summarize`` does (mean over the entries > -1), because ``summarize`` itself cannot be trusted here:

- pycocotools' ``summarize`` hard-codes maxDets=100 for ``stats[0]`` and uses the last cap for the others, so
  torchmetrics on that backend reports ``map`` at 100 next to ``map_50`` at the last cap (``map=-1`` when 100 is
  not a cap at all); faster-coco-eval reports all of them at the last cap.
- The cap is per image **and per class** (``useCats=1``): the leaderboard, which scores AP50 with COCOeval's
  default ``maxDets=[1, 10, 100]``, counts the 100 best-scored masks of each class in each image.

Where torchmetrics departs from COCOeval, :func:`evaluate` undoes it:

- ``average="micro"`` pools all classes into one (and one 100-detection cap per image): we pass ``"macro"``.
- Its default IoU and recall thresholds are float32-rounded (0.55 becomes 0.55000001), which moves matches that
  sit exactly on a threshold: we pass COCO's float64 thresholds.
- It drops an image from the ground truth when it has no instance, so false positives on it would not count:
  such an image gets an empty crowd region, which matches nothing and is ignored, but keeps the image in.
  Likewise, a prediction set with no mask at all gets one empty zero-score mask so COCOeval scores 0, not -1.

Undefined figures (a class or size range without ground truth) are -1, as in COCO.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchmetrics.detection import MeanAveragePrecision

from cellseg import NUM_CLASSES
from cellseg.instances import Instances
from cellseg.rle import encode_instances, encode_mask

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
LEADERBOARD_MAX_DETECTIONS = 100
AREA_RANGES = ("all", "small", "medium", "large")
_T50, _T75 = (int(np.argmin(np.abs(IOU_THRESHOLDS - t))) for t in (0.5, 0.75))
BACKGROUND = NUM_CLASSES
"""Index of the "no instance" row/column of :func:`confusion_matrix` (classes 1..4 are indices 0..3)."""


@dataclass(frozen=True)
class Evaluation:
    """The flat, JSON-friendly ``metrics`` and the PR curves that plots need, from one COCO evaluation.

    ``pr_curves[k]`` is the precision of class ``k + 1`` at each of ``RECALL_THRESHOLDS`` (IoU 0.5, all areas,
    dense cap); a class without ground truth has a row of -1.
    """

    metrics: dict[str, float | int]
    pr_curves: np.ndarray


class _CropMeanAveragePrecision(MeanAveragePrecision):
    """torchmetrics' segm mAP fed from box-local crops instead of full-image mask tensors.

    ``MeanAveragePrecision.update`` takes N×H×W boolean masks per image and RLE-encodes each of them, which
    dominates the metric's run time and needs N×H×W bytes (1.5 GB for 300 cells in a 2500×2000 image). Its
    state per image is a tuple of ``((h, w), counts)`` RLEs; :meth:`add_image` builds exactly that from the
    crops (``rle.encode_instances``, byte-identical to pycocotools' encoding), so ``compute`` — the COCO
    evaluation on the faster-coco-eval or pycocotools backend — is unchanged. The tests compare every figure with
    pycocotools' own COCOeval.
    """

    def add_image(self, prediction: _Masks, target: _Masks) -> None:
        self._update_count += 1  # what torchmetrics' update wrapper records, so compute knows it has data
        self._computed = None
        self.detection_mask.append(prediction.rles)
        self.detection_labels.append(torch.from_numpy(prediction.labels))
        self.detection_scores.append(torch.from_numpy(prediction.scores))
        self.groundtruth_mask.append(target.rles)
        self.groundtruth_labels.append(torch.from_numpy(target.labels))
        self.groundtruth_crowds.append(torch.from_numpy(target.crowd))
        self.groundtruth_area.append(torch.zeros(len(target.labels)))  # 0: area is computed from the mask


@dataclass(frozen=True)
class _Masks:
    """One image's instances in torchmetrics' state format."""

    rles: tuple
    labels: np.ndarray
    scores: np.ndarray
    crowd: np.ndarray
    source: Instances | None = None

    @classmethod
    def of(cls, inst: Instances) -> _Masks:
        rles = tuple(((inst.height, inst.width), r["counts"].encode()) for r in encode_instances(inst))
        n = len(inst)
        labels, scores = inst.labels.astype(np.int64), inst.scores.astype(np.float32)
        return cls(rles, labels, scores, np.zeros(n, np.int64), inst)

    def as_update_input(self) -> dict[str, torch.Tensor]:
        """``MeanAveragePrecision.update``'s own input (full N×H×W masks): the path torchmetrics documents."""
        if self.source is not None:
            masks = self.source.full_masks()
        else:
            masks = np.stack([mask_utils.decode({"size": list(size), "counts": c}) for size, c in self.rles])
        return {
            "masks": torch.from_numpy(masks.astype(bool)),
            "labels": torch.from_numpy(self.labels),
            "scores": torch.from_numpy(self.scores),
            "iscrowd": torch.from_numpy(self.crowd),
        }

    @classmethod
    def empty_mask(cls, height: int, width: int, label: int, score: float, crowd: int) -> _Masks:
        rle = encode_mask(np.zeros((height, width), bool))
        return cls(
            (((height, width), rle["counts"].encode()),),
            np.array([label], np.int64),
            np.array([score], np.float32),
            np.array([crowd], np.int64),
        )


def _target(inst: Instances, n_predictions: int) -> _Masks:
    if len(inst) == 0 and n_predictions > 0:  # keep the image in: an empty crowd region matches nothing
        return _Masks.empty_mask(inst.height, inst.width, label=1, score=1.0, crowd=1)
    return _Masks.of(inst)


def _placeholder_prediction(inst: Instances) -> _Masks:
    """One empty, zero-score mask of a ground-truth class of ``inst``: a false positive that changes no AP."""
    label = int(inst.labels[0]) if len(inst) else 1
    return _Masks.empty_mask(inst.height, inst.width, label=label, score=0.0, crowd=0)


def _coco_arrays(
    ground_truth: list[Instances],
    predictions: list[Instances],
    caps: list[int],
    backend: str,
    full_masks: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's ``precision`` (T×R×K×A×M) and ``recall`` (T×K×A×M) with K = classes 1..4 (-1 where absent)."""
    metric = _CropMeanAveragePrecision(
        iou_type="segm",
        sync_on_compute=False,  # scored on one process; under torchrun the other ranks are not taking part
        backend=backend,
        max_detection_thresholds=caps,
        iou_thresholds=IOU_THRESHOLDS.tolist(),
        rec_thresholds=RECALL_THRESHOLDS.tolist(),
        average="macro",
        extended_summary=True,
    )
    metric.warn_on_many_detections = False  # it counts all classes together, but COCO's cap is per class
    any_prediction = any(len(p) for p in predictions)
    for i, (gt, pred) in enumerate(zip(ground_truth, predictions, strict=True)):
        pred_masks = _Masks.of(pred) if any_prediction or i > 0 else _placeholder_prediction(gt)
        target = _target(gt, len(pred_masks.labels))
        if full_masks:
            metric.update([pred_masks.as_update_input()], [target.as_update_input()])
        else:
            metric.add_image(pred_masks, target)
    with contextlib.redirect_stdout(io.StringIO()):
        result = metric.compute()
    shape = (len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), NUM_CLASSES, len(AREA_RANGES), len(caps))
    precision, recall = -np.ones(shape), -np.ones(shape[:1] + shape[2:])
    if "precision" in result:  # absent when no image has ground truth
        k = result["classes"].numpy().reshape(-1) - 1
        precision[:, :, k] = result["precision"].numpy()
        recall[:, k] = result["recall"].numpy()
    return precision, recall


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
    for k in range(NUM_CLASSES):
        out[f"map_class{k + 1}"] = _mean(precision[:, :, k, 0, dense])
        out[f"ap50_class{k + 1}"] = _mean(precision[_T50, :, k, 0, dense])
    out["mar"] = _mean(recall[..., 0, dense])
    return out


def evaluate(
    ground_truth: list[Instances],
    predictions: list[Instances],
    max_detections: int,
    backend: str = "faster_coco_eval",
    full_masks: bool = False,
) -> Evaluation:
    """COCO mask metrics at the dense cap ``max_detections`` and at the leaderboard's 100, per image and class.

    ``metrics`` keys: ``map``, ``map_50``, ``map_75``, ``map_small|medium|large``, ``map_class1..4``,
    ``ap50_class1..4`` and ``mar`` (all at the dense cap); ``map_at_100`` and ``map_50_at_100`` (at most 100
    detections per image and class: the leaderboard's AP50); counts and the cap. ``mar`` has no cap in its name
    so that experiments with different caps stay comparable in ``dvc metrics diff``. ``backend`` is
    torchmetrics' COCO backend; "pycocotools" gives the same numbers, slower (``cellseg.bench.metric``).
    ``full_masks`` feeds torchmetrics through its documented ``update`` with N×H×W masks instead of crop RLEs:
    same numbers, the benchmark's baseline.
    """
    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(predictions)} prediction images")
    for gt, pred in zip(ground_truth, predictions, strict=True):
        if (gt.height, gt.width) != (pred.height, pred.width):
            raise ValueError(
                f"image size {gt.height}x{gt.width} but predictions for {pred.height}x{pred.width}"
            )
        if not all(np.isin(inst.labels, np.arange(1, NUM_CLASSES + 1)).all() for inst in (gt, pred)):
            raise ValueError(f"labels must be class ids 1..{NUM_CLASSES}")
    if max_detections < 1:
        raise ValueError(f"max_detections must be at least 1, got {max_detections}")
    caps = sorted([1, LEADERBOARD_MAX_DETECTIONS, int(max_detections)])  # torchmetrics wants exactly three
    precision, recall = _coco_arrays(ground_truth, predictions, caps, backend, full_masks)
    metrics: dict[str, float | int] = _summaries(
        precision, recall, caps.index(max_detections), caps.index(LEADERBOARD_MAX_DETECTIONS)
    )
    metrics |= {
        "n_images": len(ground_truth),
        "n_ground_truth": sum(len(gt) for gt in ground_truth),
        "n_predictions": sum(len(p) for p in predictions),
        "max_detections": int(max_detections),
    }
    return Evaluation(metrics, precision[_T50, :, :, 0, caps.index(max_detections)].T.copy())


def match_instances(gt: Instances, pred: Instances, iou_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Class-agnostic greedy matching, best score first: ``(gt_index, pred_index)`` of the matched pairs.

    Each prediction takes the still unmatched ground truth of highest mask IoU ≥ ``iou_threshold``, as COCOeval
    does. ``pycocotools.mask.iou`` compares boxes first and skips the masks of pairs whose boxes do not overlap.
    """
    if len(gt) == 0 or len(pred) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ious = np.asarray(mask_utils.iou(encode_instances(pred), encode_instances(gt), [0] * len(gt)))
    free = np.ones(len(gt), bool)
    gt_idx, pred_idx = [], []
    for d in np.argsort(-pred.scores, kind="stable"):
        candidates = np.where(free & (ious[d] >= iou_threshold), ious[d], -1.0)
        g = int(np.argmax(candidates))
        if candidates[g] >= 0:
            free[g] = False
            gt_idx.append(g)
            pred_idx.append(d)
    return np.asarray(gt_idx, np.int64), np.asarray(pred_idx, np.int64)


def confusion_matrix(
    ground_truth: list[Instances],
    predictions: list[Instances],
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
) -> np.ndarray:
    """Counts of (true class, predicted class) over all images, ``(5, 5)`` int64.

    Rows are the true class, columns the predicted class; index ``k - 1`` is class ``k`` and index 4
    (``BACKGROUND``) is "no instance". ``m[t, p]``: ground truth of class ``t + 1`` matched (mask IoU ≥
    ``iou_threshold``, matching blind to class) by a prediction of class ``p + 1``; ``m[4, p]``: predictions of
    class ``p + 1`` that match nothing (false positives); ``m[t, 4]``: ground truth of class ``t + 1`` that no
    prediction matches (missed); ``m[4, 4]`` is always 0. Predictions scoring below ``score_threshold`` are
    dropped first. Row sums ``m[:4].sum(1)`` are the ground-truth counts per class.
    """
    matrix = np.zeros((NUM_CLASSES + 1, NUM_CLASSES + 1), np.int64)
    for gt, pred in zip(ground_truth, predictions, strict=True):
        pred = pred.select(pred.scores >= score_threshold)
        gt_idx, pred_idx = match_instances(gt, pred, iou_threshold)
        np.add.at(matrix, (gt.labels[gt_idx] - 1, pred.labels[pred_idx] - 1), 1)
        missed = np.setdiff1d(np.arange(len(gt)), gt_idx)
        spurious = np.setdiff1d(np.arange(len(pred)), pred_idx)
        np.add.at(matrix, (gt.labels[missed] - 1, BACKGROUND), 1)
        np.add.at(matrix, (BACKGROUND, pred.labels[spurious] - 1), 1)
    return matrix
