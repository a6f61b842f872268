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


def load_labelled(path: Path) -> tuple:
    """``(image, ground-truth Instances)`` of a prepared sample."""
    arrays = load_npz(path)
    if "labels" not in arrays or "image" not in arrays:
        raise DataFormatError(f"{path}: needs 'image' and 'labels' arrays (rerun the prepare stage)")
    return arrays["image"], Instances.from_label_rows(arrays["labels"])


def score_files(
    predict: Callable[[np.ndarray], Instances], files: list[Path], max_detections: int, desc: str = "evaluate"
) -> ScoredSplit:
    """Predict every sample of ``files`` with ``predict(image)`` and score the predictions against their labels
    (COCO AP at ``max_detections`` per image and class)."""
    ground_truth, predictions = [], []
    for path in tqdm(files, desc=desc, unit="img", leave=False):
        image, gt = load_labelled(path)
        ground_truth.append(gt)
        predictions.append(predict(image))
    return score_predictions([p.stem for p in files], ground_truth, predictions, max_detections)


def score_predictions(
    names: list[str], ground_truth: list[Instances], predictions: list[Instances], max_detections: int
) -> ScoredSplit:
    """A :class:`ScoredSplit` of predictions made elsewhere (or crafted), scored as :func:`score_files` does."""
    return ScoredSplit(names, ground_truth, predictions, evaluate(ground_truth, predictions, max_detections))


def nuclei_scores(scored: ScoredSplit, params: PredictParams) -> SplitScores:
    """PQ, mPQ⁺, AJI, DICE2, F1 … of a scored split (:mod:`cellseg.eval.nuclei_metrics`), on label maps at
    ``params.label_thresholds`` (the tuned ones, where the caller applied ``models/thresholds.json``)."""
    return score_split(scored.names, scored.ground_truth, scored.predictions, NucleusRule.of(params))
