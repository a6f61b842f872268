"""Score, mask and centre-peak thresholds tuned on the validation split after training, stored next to the checkpoint.

COCO AP ranks every detection, so it wants all of them; a label map (PQ, AJI, a pathologist's counts) keeps only
those above a score threshold, and the best threshold depends on the model, the data and the epoch. As
StarDist does with its ``thresholds.json``, the ``tune`` stage predicts the validation split once per mask
threshold of ``tune.mask_grid``, scores the label maps at every score threshold of
``tune.score_grid`` and keeps the pair with the highest PQ (the first one on a tie).

The map-guided steps (``cellseg.infer.postproc``) find centre peaks above ``postproc.peak_threshold``, a centre
probability, and how high a trained head's centre probabilities reach depends on the training too (about 0.25
on consep-dev after 6 epochs, where the default 0.5 finds no peak at all). So when a step is on and the model has
the heads, every value of ``tune.peak_grid`` is tried on the same predictions (the model runs once per
mask threshold; only the cheap steps rerun) and the best (score, mask, peak) triple is kept.

``evaluate``, ``submit`` and ``cellseg predict`` then read ``models/thresholds.json`` through
:mod:`cellseg.model.thresholds`:

- ``mask_threshold`` applies everywhere (the masks of the COCO results too);
- ``label_score_threshold`` applies to label maps and PQ-type figures; COCO results keep every detection above
  ``predict.score_threshold``, since dropping low-scored detections can only lower AP;
- ``peak_threshold`` applies to the map-guided steps, and ``postproc.recover_threshold`` keeps its ratio to it
  (:meth:`cellseg.params.PostprocParams.at_peak_threshold`).

**Per-class label-score thresholds** (``tune.class_score_grid``, CoNIC entries do the same): a rare class
scores lower than the common ones, so one threshold for all can leave it without any detection (class 1,
"other", on consep-dev). After the global choice, on the predictions of the chosen mask (and peak) threshold,
each class with at least one validation instance gets the value of ``tune.class_score_grid`` that maximises
its own PQ (``pq_class<k>``, pooled over the split as mPQ⁺ does) while the other classes stay at the global
threshold; a tie keeps the global threshold, then the lower value. A class without validation instance keeps
the global one. The choice is stored as ``label_score_threshold_per_class`` together with the validation
PQ and mPQ⁺ at the global threshold and at the per-class ones (``val_pq_global``, ``val_mpq_plus_global``,
``val_pq``, ``val_mpq_plus``). Every label map (``evaluate``, ``cellseg predict``, the training curves of a
later resume) applies it through ``predict.class_score_thresholds``; COCO results are unaffected.

With ``tune.enabled: false`` the file holds the params' own values, and without a step on or without
heads its ``peak_threshold`` is the params' own, so the pipeline has one path. A file without
``peak_threshold`` (written before it was tuned) keeps the params' peak and recovery thresholds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from cellseg.eval.nuclei_metrics import score_split
from cellseg.eval.score_model import load_labelled
from cellseg.infer.detect import detect_image, postprocess
from cellseg.infer.postproc import refine
from cellseg.infer.predict import predict_image
from cellseg.instances import Instances
from cellseg.model.maskrcnn import CellMaskRCNN
from cellseg.model.thresholds import PEAK_KEY, PER_CLASS_KEY, TUNED_KEYS, per_class_entry, untuned
from cellseg.nuclei import NucleusRule
from cellseg.params import PostprocParams, PredictParams, TuneParams, replace


def tunes_peaks(model: CellMaskRCNN, tune: TuneParams, postproc: PostprocParams | None) -> bool:
    """Whether :func:`tune_thresholds` tries ``tune.peak_grid``: tuning, a step on, a model with heads."""
    return (
        tune.enabled and postproc is not None and postproc.any_step and bool(getattr(model, "has_aux", False))
    )


def tune_thresholds(
    model: CellMaskRCNN,
    files: list[Path],
    params: PredictParams,
    tune: TuneParams,
    device: torch.device,
    num_classes: int,
    postproc: PostprocParams | None = None,
) -> dict:
    """The (score, mask) threshold pair of the grids with the highest validation PQ, and every pair's PQ
    (predictions post-processed with ``postproc`` as ``evaluate`` and ``submit`` do); ``num_classes``: the
    model's classes (per-class thresholds are one per class).

    With :func:`tunes_peaks`, the (score, mask, peak) triple: each mask threshold's predictions are refined
    with every ``tune.peak_grid`` value. Otherwise ``peak_threshold`` is ``postproc``'s own (absent
    without ``postproc``) and the model runs exactly as often as before.
    """
    if not tune.enabled:
        return untuned(params, postproc)
    samples = [load_labelled(path, num_classes) for path in files]
    names = [path.stem for path in files]
    truths = [gt for _, gt in samples]
    tried = []
    kept: dict[tuple[float, float | None], list[Instances]] = {}  # each (mask, peak)'s predictions

    def score_all(predictions: list[Instances], mask_threshold: float, peak: float | None) -> None:
        kept[(mask_threshold, peak)] = predictions
        for score_threshold in tune.score_grid:
            rule = NucleusRule(score_threshold, params.min_kept_fraction)
            metrics = score_split(names, truths, predictions, rule, num_classes).metrics
            row = {"label_score_threshold": score_threshold, "mask_threshold": mask_threshold}
            if peak is not None:
                row[PEAK_KEY] = peak
            tried.append({**row, "pq": metrics["pq"], "f1": metrics["f1"]})

    for mask_threshold in tune.mask_grid:
        run = replace(params, mask_threshold=mask_threshold)
        images = tqdm(samples, desc=f"tune: masks > {mask_threshold}", unit="img", leave=False)
        if not tunes_peaks(model, tune, postproc):
            predictions = [predict_image(model, image, run, device, postproc) for image, _ in images]
            score_all(predictions, mask_threshold, None if postproc is None else postproc.peak_threshold)
            continue
        # The model runs once; each peak threshold reruns only the map-guided steps on the same detections.
        # postprocess(refine(...)) is exactly what predict_image does with those postproc params.
        found = [detect_image(model, image, run, device) for image, _ in images]
        for peak in tune.peak_grid:
            steps = postproc.at_peak_threshold(peak)
            score_all(
                [postprocess(refine(inst, maps, steps), run) for inst, maps in found], mask_threshold, peak
            )
    best = max(tried, key=lambda row: row["pq"])  # max keeps the first of equal rows
    out = {
        "tuned": True,
        **{key: best[key] for key in (*TUNED_KEYS, PEAK_KEY) if key in best},
        "val_pq": best["pq"],
        "val_images": len(files),
        "tried": tried,
    }
    if tune.class_score_grid:
        predictions = kept[(best["mask_threshold"], best.get(PEAK_KEY))]
        global_threshold = best["label_score_threshold"]
        out.update(tune_per_class(names, truths, predictions, global_threshold, params, tune, num_classes))
    return out


def tune_per_class(
    names: list[str],
    truths: list[Instances],
    predictions: list[Instances],
    global_threshold: float,
    params: PredictParams,
    tune: TuneParams,
    num_classes: int,
) -> dict:
    """Per-class label-score thresholds of classes 1..``num_classes`` (the rule in the module docstring) and the
    validation figures at the global and at the per-class thresholds."""

    def metrics(thresholds: list[float]) -> dict:
        rule = NucleusRule(tuple(thresholds), params.min_kept_fraction)
        return score_split(names, truths, predictions, rule, num_classes).metrics

    present = {k for k in range(1, num_classes + 1) if any((gt.labels == k).any() for gt in truths)}
    chosen = [global_threshold] * num_classes
    at_global = metrics(chosen)
    class_tried = []
    for k in sorted(present):
        best_value, best_pq = global_threshold, at_global[f"pq_class{k}"]
        for value in sorted(tune.class_score_grid):
            trial = [global_threshold] * num_classes  # the other classes at the global threshold
            trial[k - 1] = value
            pq = metrics(trial)[f"pq_class{k}"]
            class_tried.append({"class": k, "label_score_threshold": value, "pq_class": pq})
            if pq > best_pq:
                best_value, best_pq = value, pq
        chosen[k - 1] = best_value
    final = metrics(chosen)
    return {
        PER_CLASS_KEY: per_class_entry(chosen),
        "val_pq": final["pq"],
        "val_mpq_plus": final["mpq_plus"],
        "val_pq_global": at_global["pq"],
        "val_mpq_plus_global": at_global["mpq_plus"],
        "class_tried": class_tried,
    }
