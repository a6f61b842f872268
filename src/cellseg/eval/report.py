"""The ``evaluate`` stage: the best checkpoint on the validation split.

The stage (:func:`evaluate_checkpoint`) writes, all or nothing:

- ``<predictions>/val-results.json``: COCO results (RLE masks, ``bbox`` ``[x, y, w, h]``, score, category
  1..K) and ``<predictions>/val-images.json`` (``[{"id", "name", "height", "width"}]``, ids 1..N in sample-name
  order), so that any COCO tool can re-score them;
- ``<metrics>``: the flat metrics of :func:`cellseg.eval.coco_metrics.evaluate`, the nuclei metrics of
  :mod:`cellseg.eval.nuclei_metrics` (``pq``, ``dq``, ``sq``, ``mpq_plus``, ``aji``, ``aji_plus``, ``dice2``,
  ``precision``, ``recall``, ``f1``, ``pq_class<k>``, ``f1_class<k>``, on label maps at
  ``predict.label_score_threshold`` as tuned, recorded as ``pq_score_threshold``, and the per-class ones as
  ``pq_score_threshold_class<k>`` when tuned per class) plus ``checkpoint_epoch``;
- ``<per_image>``: one CSV row per sample (name, n_true, n_pred, pq, dq, sq, aji, aji_plus, dice2, precision,
  recall, f1);
- ``<plots>/pr/class<k>.csv``, ``<plots>/confusion.csv`` (rendered by ``dvc plots``; its axes name the
  classes) and ``<plots>/overlays/<sample>.png`` of the ``evaluate.n_overlays`` samples of lowest PQ;
- ``<plots>/maps/<sample>.png`` of the same samples: the auxiliary heads' centre and boundary maps beside the
  maps stage's targets (:func:`cellseg.eval.plots.save_map_comparison`). The folder is always written; it stays
  empty for a model without heads (``aux.enabled: false``) or when no maps folder is given.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cellseg import MAP_NAMES
from cellseg.data.io import DataFormatError, list_samples, load_npz
from cellseg.eval.coco_metrics import class_key, confusion_matrix
from cellseg.eval.nuclei_metrics import MATCH_IOU, SplitScores, per_image_csv
from cellseg.eval.plots import save_map_comparison, save_overlay, write_confusion, write_pr_curves
from cellseg.eval.score_model import ScoredSplit, nuclei_scores, score_files
from cellseg.fsutil import atomic_dir, atomic_file, write_json
from cellseg.infer.predict import predict_image, predict_image_maps
from cellseg.infer.prob_maps import ProbMaps
from cellseg.model.bundle import ModelBundle, open_model
from cellseg.params import Params
from cellseg.rle import to_coco_results

RESULTS_FILE, IMAGES_FILE = "val-results.json", "val-images.json"
PR_DIR, CONFUSION_FILE, OVERLAYS_DIR, MAPS_DIR = "pr", "confusion.csv", "overlays", "maps"
"""Inside the plots directory: each is one output of the stage in dvc.yaml, replaced on its own."""

MapPredictor = Callable[[np.ndarray], ProbMaps | None]
"""The heads' maps of one image at its pixels, ``None`` for a model without heads (``predict_image_maps``)."""


# ------------------------------------------------------------------------------------------ the evaluate stage
@dataclass(frozen=True)
class EvalPaths:
    """Inputs and outputs of the ``evaluate`` stage (fixed by dvc.yaml)."""

    checkpoint: Path
    val_dir: Path
    predictions: Path
    metrics: Path
    plots: Path
    per_image: Path | None = None
    """Per-image CSV; by default ``<metrics stem>_per_image.csv`` next to the metrics."""
    maps_dir: Path | None = None
    """The maps stage's targets of the split (``data/maps/val``), drawn against the predicted maps; none: no
    map comparisons."""

    @property
    def per_image_csv(self) -> Path:
        return self.per_image or self.metrics.with_name(f"{self.metrics.stem}_per_image.csv")


def coco_documents(scored: ScoredSplit) -> tuple[list[dict], list[dict]]:
    """``(results, images)``: COCO results rows and the image table; ids are 1..N in sample-name order."""
    results, images = [], []
    order = sorted(range(len(scored.names)), key=lambda i: scored.names[i])
    for image_id, i in enumerate(order, start=1):
        pred = scored.predictions[i]
        images.append({"id": image_id, "name": scored.names[i], "height": pred.height, "width": pred.width})
        results += to_coco_results(pred, image_id)
    return results, images


def write_evaluation(
    scored: ScoredSplit,
    files: list[Path],
    paths: EvalPaths,
    params: Params,
    extra: dict | None = None,
    predict_maps: MapPredictor | None = None,
    class_names: tuple[str, ...] | None = None,
) -> dict:
    """Write the predictions, metrics and plots of ``scored`` (``files`` are its samples, for the overlays).

    ``class_names``: the model's, shown in the confusion matrix and the overlays (default: ``class1..classK``).

    ``predict_maps`` gives the heads' maps of an image: with ``paths.maps_dir``, the overlaid samples' maps
    are predicted again (only those few) and drawn against their targets in ``<plots>/maps``.

    Everything is computed and drawn into temporary siblings of the outputs first; they replace the outputs
    only when all of it succeeded, so a failure leaves the previous outputs (or none) in place. Only the
    stage's own outputs are replaced: DVC keeps a ``.gitignore`` in the plots directory. Returns the metrics.
    """
    if [p.stem for p in files] != scored.names:
        raise ValueError("files must be the scored samples, in the same order")
    names = class_names or numbered_classes(scored.num_classes)
    if len(names) != scored.num_classes:
        raise ValueError(f"{len(names)} class names for {scored.num_classes} classes")
    results, images = coco_documents(scored)
    threshold = params.evaluate.confusion_score_threshold
    matrix = confusion_matrix(
        scored.ground_truth, scored.predictions, scored.num_classes, MATCH_IOU, threshold
    )
    nuclei = nuclei_scores(scored, params.predict)
    metrics = {
        **scored.metrics,
        **nuclei.metrics,
        "pq_score_threshold": params.predict.label_score_threshold,
        **{
            f"pq_score_threshold_class{k}": value
            for k, value in enumerate(params.predict.class_score_thresholds, start=1)
        },
        "mask_threshold": params.predict.mask_threshold,
        **(extra or {}),
    }
    with ExitStack() as outputs:
        predictions_tmp = outputs.enter_context(atomic_dir(paths.predictions))
        write_json(predictions_tmp / RESULTS_FILE, results)
        write_json(predictions_tmp / IMAGES_FILE, images)
        write_pr_curves(outputs.enter_context(atomic_dir(paths.plots / PR_DIR)), scored.evaluation.pr_curves)
        write_confusion(outputs.enter_context(atomic_file(paths.plots / CONFUSION_FILE)), matrix, names)
        overlays = outputs.enter_context(atomic_dir(paths.plots / OVERLAYS_DIR))
        write_overlays(overlays, scored, nuclei, files, params, names)
        maps = outputs.enter_context(atomic_dir(paths.plots / MAPS_DIR))
        if predict_maps is not None and paths.maps_dir is not None:
            write_map_comparisons(maps, scored, nuclei, files, params, paths.maps_dir, predict_maps)
        outputs.enter_context(atomic_file(paths.per_image_csv)).write_text(
            per_image_csv(nuclei.per_image_rows())
        )
        write_json(paths.metrics, metrics)
    return metrics


def numbered_classes(num_classes: int) -> tuple[str, ...]:
    """``class1 .. class<num_classes>``: the names of classes known only by number."""
    return tuple(class_key(k) for k in range(1, num_classes + 1))


def worst_by_pq(nuclei: SplitScores, n: int) -> list[int]:
    """Indices of the ``n`` samples of lowest PQ, worst first (ties by name); samples without PQ come last."""
    pq = [img.all.pq for img in nuclei.images]
    order = sorted(range(len(pq)), key=lambda i: (pq[i] is None, pq[i] or 0.0, nuclei.names[i]))
    return order[:n]


def write_overlays(
    folder: Path,
    scored: ScoredSplit,
    nuclei: SplitScores,
    files: list[Path],
    params: Params,
    class_names: tuple[str, ...],
) -> None:
    """Overlay PNGs of the ``evaluate.n_overlays`` samples of lowest PQ, titled with their PQ."""
    for rank, i in enumerate(worst_by_pq(nuclei, params.evaluate.n_overlays), start=1):
        image = load_npz(files[i])["image"]  # its ground truth is already in ``scored``
        save_overlay(
            folder / f"{scored.names[i]}.png",
            image,
            scored.ground_truth[i],
            scored.predictions[i],
            f"{scored.names[i]}: {_rank_text(nuclei, i, rank)}",
            params.evaluate.confusion_score_threshold,
            MATCH_IOU,
            class_names,
        )


def write_map_comparisons(
    folder: Path,
    scored: ScoredSplit,
    nuclei: SplitScores,
    files: list[Path],
    params: Params,
    maps_dir: Path,
    predict_maps: MapPredictor,
) -> None:
    """Predicted vs target centre and boundary maps of the samples that get overlays; none without heads."""
    for rank, i in enumerate(worst_by_pq(nuclei, params.evaluate.n_overlays), start=1):
        image = load_npz(files[i])["image"]
        predicted = predict_maps(image)
        if predicted is None:  # no heads: the same for every image
            return
        target = load_target_maps(Path(maps_dir) / files[i].name, image.shape[:2])
        save_map_comparison(
            folder / f"{scored.names[i]}.png",
            image,
            (predicted.center, predicted.boundary),
            (target.center, target.boundary),
            f"{scored.names[i]}, predicted vs target maps: {_rank_text(nuclei, i, rank)}",
        )


def load_target_maps(path: Path, shape: tuple[int, int]) -> ProbMaps:
    """The maps stage's centre and boundary of one sample as float32 maps, checked to be of the image's size.

    The maps stage draws them on the prepared image's pixels, where ``predict_image_maps`` gives the heads'
    maps too, so no resampling is needed; a size mismatch means the maps are stale.
    """
    arrays = load_npz(path)
    for key in MAP_NAMES:
        if key not in arrays or arrays[key].shape != tuple(shape):
            found = arrays[key].shape if key in arrays else "missing"
            raise DataFormatError(
                f"{path}: '{key}' map {found}, the image is {tuple(shape)} (rerun the maps stage)"
            )
    return ProbMaps(*(arrays[key].astype(np.float32) for key in MAP_NAMES))


def _rank_text(nuclei: SplitScores, i: int, rank: int) -> str:
    """Sample ``i``'s PQ and its rank among the worst, for the titles of its pictures."""
    pq = nuclei.images[i].all.pq
    quality = "no nuclei, none predicted" if pq is None else f"PQ {pq:.3f}"
    return f"{quality} (worst {rank} of {len(nuclei.names)} by PQ)"


def evaluate_checkpoint(
    paths: EvalPaths, params: Params, device: torch.device, bundle: ModelBundle | None = None
) -> dict:
    """The ``evaluate`` stage: predict the validation split with the checkpoint, score it, write every output.

    ``bundle``: the checkpoint already opened (with its tuned thresholds, which ``params`` then carry); by
    default it is opened here with ``params``' own thresholds."""
    files = list_samples(paths.val_dir)
    if bundle is None:
        bundle = open_model(paths.checkpoint, params, device, thresholds=None)
    model, state = bundle.network, bundle.state
    scored = score_files(
        lambda image: predict_image(model, image, params.predict, device, params.postproc),
        files,
        params.predict.max_per_image,
        bundle.num_classes,
        desc="evaluate val",
    )

    def predict_maps(image: np.ndarray) -> ProbMaps | None:
        return predict_image_maps(model, image, params.predict, device)[1] if model.has_aux else None

    extra = {"checkpoint_epoch": int(state["epoch"]) + 1}
    return write_evaluation(scored, files, paths, params, extra, predict_maps, bundle.class_names)


def summary(metrics: dict, class_names: tuple[str, ...]) -> str:
    """A few human lines: the dense and the leaderboard-equivalent figures, and AP50 per class (by name)."""

    def fmt(value: float) -> str:
        return f"{value:.4f}" if value >= 0 else "n/a"

    ap50 = [metrics[f"ap50_{class_key(k)}"] for k in range(1, len(class_names) + 1)]
    per_class = "  ".join(f"{name} {fmt(value)}" for name, value in zip(class_names, ap50, strict=True))
    if any(value < 0 for value in ap50):
        per_class += "  (n/a: no ground truth)"
    return "\n".join(
        [
            f"evaluate: {metrics['n_images']} images, {metrics['n_ground_truth']} ground-truth instances, "
            f"{metrics['n_predictions']} predictions (checkpoint epoch {metrics.get('checkpoint_epoch', '?')})",
            f"  map {fmt(metrics['map'])}  map_50 {fmt(metrics['map_50'])}  map_75 {fmt(metrics['map_75'])}"
            f"  (at most {metrics['max_detections']} detections per image and class)",
            f"  map_50_at_100 {fmt(metrics['map_50_at_100'])}  (leaderboard-equivalent: at most 100)",
            f"  AP50 per class: {per_class}",
            *_nuclei_summary(metrics, fmt, class_names),
        ]
    )


def _nuclei_summary(metrics: dict, fmt, class_names: tuple[str, ...]) -> list[str]:
    if "pq" not in metrics:
        return []
    per_class = "  ".join(
        f"{name} {fmt(metrics[f'pq_{class_key(k)}'])}" for k, name in enumerate(class_names, start=1)
    )
    return [
        f"  pq {fmt(metrics['pq'])} (dq {fmt(metrics['dq'])}, sq {fmt(metrics['sq'])})  mpq_plus "
        f"{fmt(metrics['mpq_plus'])}  aji {fmt(metrics['aji'])}  aji_plus {fmt(metrics['aji_plus'])}  "
        f"dice2 {fmt(metrics['dice2'])}  (label maps at score >= {metrics['pq_score_threshold']:g})",
        f"  f1 {fmt(metrics['f1'])} (precision {fmt(metrics['precision'])}, recall {fmt(metrics['recall'])})"
        f"  at mask IoU > 0.5",
        f"  PQ per class: {per_class}",
    ]
