"""Scoring a model on prepared samples: shared by the training loop and the ``evaluate`` stage.

Predictions come from :func:`cellseg.predict.predict_image` (the same path as the submission) and are scored by
:func:`cellseg.metrics.evaluate` at the dense cap ``predict.max_per_image``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cellseg.instances import Instances
from cellseg.io import DataFormatError, load_npz
from cellseg.metrics import Evaluation, evaluate
from cellseg.model import CellMaskRCNN, build_model
from cellseg.params import AuxParams, ModelParams, Params
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
    model: CellMaskRCNN, files: list[Path], params: Params, device: torch.device, desc: str = "evaluate"
) -> ScoredSplit:
    """Predict every sample of ``files`` and score the predictions against their labels."""
    model.eval()
    ground_truth, predictions = [], []
    for path in tqdm(files, desc=desc, unit="img", leave=False):
        image, gt = load_labelled(path)
        ground_truth.append(gt)
        predictions.append(predict_image(model, image, params.predict, device))
    evaluation = evaluate(ground_truth, predictions, max_detections=params.predict.max_per_image)
    return ScoredSplit([p.stem for p in files], ground_truth, predictions, evaluation)


def load_trained_model(checkpoint: str | Path, device: torch.device) -> tuple[CellMaskRCNN, dict]:
    """Rebuild the model a checkpoint was trained with (its own model/aux params) and load its weights."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint}: no checkpoint (run the train stage first)")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    trained = state["params"]
    model_params = ModelParams(**{**trained["model"], "pretrained": "none"})  # weights come from the file
    model = build_model(model_params, AuxParams(**trained["aux"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state
