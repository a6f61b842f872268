"""Score and mask thresholds tuned on the validation split after training, stored next to the checkpoint.

COCO AP ranks every detection, so it wants all of them; a label map (PQ, AJI, a pathologist's counts) keeps only
those above a score threshold, and the best threshold depends on the model, the data and the epoch. As
StarDist does with its ``thresholds.json``, the ``tune`` stage predicts the validation split once per mask
threshold of ``predict.tune_mask_grid``, scores the label maps at every score threshold of
``predict.tune_score_grid`` and keeps the pair with the highest PQ (the first one on a tie). ``evaluate``,
``submit`` and ``stages/predict.py`` then read ``models/thresholds.json`` through :func:`tuned_predict_params`:

- ``mask_threshold`` applies everywhere (the masks of the COCO results too);
- ``label_score_threshold`` applies to label maps and PQ-type figures; COCO results keep every detection above
  ``predict.score_threshold``, since dropping low-scored detections can only lower AP.

With ``predict.tune_thresholds: false`` the file holds the params' own values, so the pipeline has one path.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tqdm import tqdm

from cellseg.io import DataFormatError
from cellseg.model import CellMaskRCNN
from cellseg.nuclei_metrics import score_split
from cellseg.params import PostprocParams, PredictParams
from cellseg.predict import predict_image
from cellseg.scoring import load_labelled

THRESHOLDS_FILE = "thresholds.json"
TUNED_KEYS = ("label_score_threshold", "mask_threshold")


def untuned(params: PredictParams) -> dict:
    """The thresholds file of a run that does not tune: the params' own values."""
    return {"tuned": False, **{key: getattr(params, key) for key in TUNED_KEYS}}


def tune_thresholds(
    model: CellMaskRCNN,
    files: list[Path],
    params: PredictParams,
    device: torch.device,
    postproc: PostprocParams | None = None,
) -> dict:
    """The (score, mask) threshold pair of the grids with the highest validation PQ, and every pair's PQ
    (predictions post-processed with ``postproc`` as ``evaluate`` and ``submit`` do)."""
    if not params.tune_thresholds:
        return untuned(params)
    samples = [load_labelled(path) for path in files]
    names = [path.stem for path in files]
    truths = [gt for _, gt in samples]
    tried = []
    for mask_threshold in params.tune_mask_grid:
        run = dataclasses.replace(params, mask_threshold=mask_threshold)
        predictions = [
            predict_image(model, image, run, device, postproc)
            for image, _ in tqdm(samples, desc=f"tune: masks > {mask_threshold}", unit="img", leave=False)
        ]
        for score_threshold in params.tune_score_grid:
            metrics = score_split(
                names, truths, predictions, score_threshold, params.min_kept_fraction
            ).metrics
            tried.append(
                {
                    "label_score_threshold": score_threshold,
                    "mask_threshold": mask_threshold,
                    "pq": metrics["pq"],
                    "f1": metrics["f1"],
                }
            )
    best = max(tried, key=lambda row: row["pq"])  # max keeps the first of equal rows
    return {
        "tuned": True,
        "label_score_threshold": best["label_score_threshold"],
        "mask_threshold": best["mask_threshold"],
        "val_pq": best["pq"],
        "val_images": len(files),
        "tried": tried,
    }


def tuned_predict_params(params: PredictParams, thresholds_path: str | Path | None) -> PredictParams:
    """``params`` with the thresholds stored in ``thresholds_path`` (``None``: the params' own values)."""
    if thresholds_path is None:
        return params
    path = Path(thresholds_path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no thresholds file (run the tune stage: dvc repro tune)")
    try:
        stored = json.loads(path.read_text())
        values = {key: float(stored[key]) for key in TUNED_KEYS}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataFormatError(
            f"{path}: not a thresholds file ({err}); rerun the tune stage or delete the file"
        ) from None
    return dataclasses.replace(params, **values)
