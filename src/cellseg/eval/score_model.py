"""Scoring a model on prepared, labelled samples: shared by the training loop and the ``evaluate`` stage.

The caller passes the prediction function (the training loop: raw detections, ``detect_and_select``; the
evaluate stage: with map-guided post-processing, ``predict_image``), so that scoring does not pull inference
code into training. Predictions are scored by :func:`cellseg.eval.coco_metrics.evaluate` at the dense cap
``predict.max_per_image``, and by the nuclei metrics (:func:`nuclei_scores`) on label maps at
``predict.label_score_threshold``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cellseg.data.io import DataFormatError, load_npz
from cellseg.eval.coco_metrics import Evaluation, evaluate
from cellseg.eval.nuclei_metrics import SplitScores, score_split
from cellseg.instances import Instances
from cellseg.nuclei import NucleusRule
from cellseg.params import PredictParams


@dataclass
class ScoredSplit:
    """Ground truth and predictions of some samples, with their evaluation."""

    names: list[str]
    ground_truth: list[Instances]
    predictions: list[Instances]
    evaluation: Evaluation

    @property
    def metrics(self) -> dict:
        return self.evaluation.metrics

    @property
    def num_classes(self) -> int:
        return self.evaluation.num_classes


def load_labelled(path: Path, num_classes: int) -> tuple:
    """``(image, ground-truth Instances)`` of a prepared sample, whose labels must have one row per class of a
    model of ``num_classes`` classes."""
    arrays = load_npz(path)
    if "labels" not in arrays or "image" not in arrays:
        raise DataFormatError(f"{path}: needs 'image' and 'labels' arrays (rerun the prepare stage)")
    labels = arrays["labels"]
    if labels.ndim != 3 or labels.shape[0] != num_classes:
        raise DataFormatError(
            f"{path}: labels of {labels.shape[0] if labels.ndim == 3 else '?'} classes (shape {labels.shape}), "
            f"but the model has {num_classes}: the data was prepared with other `classes` than the model's "
            "(rerun the prepare stage, or use the matching model)"
        )
    return arrays["image"], Instances.from_label_rows(labels)


def score_files(
    predict: Callable[[np.ndarray], Instances],
    files: list[Path],
    max_detections: int,
    num_classes: int,
    desc: str = "evaluate",
) -> ScoredSplit:
    """Predict every sample of ``files`` with ``predict(image)`` and score the predictions against their labels
    (COCO AP at ``max_detections`` per image and class, classes 1..``num_classes``)."""
    ground_truth, predictions = [], []
    for path in tqdm(files, desc=desc, unit="img", leave=False):
        image, gt = load_labelled(path, num_classes)
        ground_truth.append(gt)
        predictions.append(predict(image))
    return score_predictions([p.stem for p in files], ground_truth, predictions, max_detections, num_classes)


def score_predictions(
    names: list[str],
    ground_truth: list[Instances],
    predictions: list[Instances],
    max_detections: int,
    num_classes: int,
) -> ScoredSplit:
    """A :class:`ScoredSplit` of predictions made elsewhere (or crafted), scored as :func:`score_files` does."""
    evaluation = evaluate(ground_truth, predictions, max_detections, num_classes)
    return ScoredSplit(names, ground_truth, predictions, evaluation)


def nuclei_scores(scored: ScoredSplit, params: PredictParams) -> SplitScores:
    """PQ, mPQ⁺, AJI, DICE2, F1 … of a scored split (:mod:`cellseg.eval.nuclei_metrics`), on label maps at
    ``params.label_thresholds`` (the tuned ones, where the caller applied ``models/thresholds.json``)."""
    rule = NucleusRule.of(params)
    return score_split(scored.names, scored.ground_truth, scored.predictions, rule, scored.num_classes)
