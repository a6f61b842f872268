"""Scoring a model on prepared, labelled samples: shared by the training loop and the ``evaluate`` stage.

Predictions come from :func:`cellseg.predict.predict_image` (the submission's own path) and are scored by
:func:`cellseg.metrics.evaluate` at the dense cap ``predict.max_per_image``, and by the nuclei metrics
(:func:`nuclei_scores`) on label maps at ``predict.label_score_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cellseg.instances import Instances
from cellseg.io import DataFormatError, load_npz
from cellseg.metrics import Evaluation, evaluate
from cellseg.model import CellMaskRCNN
from cellseg.nuclei_metrics import SplitScores, score_split
from cellseg.params import Params, PostprocParams, PredictParams
from cellseg.predict import predict_image


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
    model: CellMaskRCNN,
    files: list[Path],
    params: Params,
    device: torch.device,
    desc: str = "evaluate",
    postproc: PostprocParams | None = None,
) -> ScoredSplit:
    """Predict every sample of ``files`` and score the predictions against their labels.

    ``postproc`` adds the map-guided steps (the evaluate stage); the training loop scores the raw detections,
    so that post-processing can be tuned on a trained model without training again.
    """
    model.eval()
    ground_truth, predictions = [], []
    for path in tqdm(files, desc=desc, unit="img", leave=False):
        image, gt = load_labelled(path)
        ground_truth.append(gt)
        predictions.append(predict_image(model, image, params.predict, device, postproc))
    evaluation = evaluate(ground_truth, predictions, max_detections=params.predict.max_per_image)
    return ScoredSplit([p.stem for p in files], ground_truth, predictions, evaluation)


def score_predictions(
    names: list[str], ground_truth: list[Instances], predictions: list[Instances], max_detections: int
) -> ScoredSplit:
    """A :class:`ScoredSplit` of predictions made elsewhere (or crafted), scored as :func:`score_files` does."""
    return ScoredSplit(names, ground_truth, predictions, evaluate(ground_truth, predictions, max_detections))


def nuclei_scores(scored: ScoredSplit, params: PredictParams) -> SplitScores:
    """PQ, mPQ⁺, AJI, DICE2, F1 … of a scored split (:mod:`cellseg.nuclei_metrics`), on label maps at
    ``params.label_score_threshold`` (the tuned one, where the caller applied ``models/thresholds.json``)."""
    return score_split(
        scored.names,
        scored.ground_truth,
        scored.predictions,
        params.label_score_threshold,
        params.min_kept_fraction,
    )
