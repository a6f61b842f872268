"""Evaluation plots: the CSV files that ``dvc plots`` renders, and overlay PNGs for a human eye.

DVC draws the precision–recall curves and the confusion matrix itself (so ``dvc plots diff`` can put two
experiments side by side); here they are only data files. The overlays are pictures, drawn with matplotlib's
object API on an Agg canvas (no pyplot global state, safe in any process).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from skimage.measure import find_contours

from cellseg.eval.coco_metrics import RECALL_THRESHOLDS, class_key, match_instances
from cellseg.instances import Instances

BACKGROUND_NAME = "background"
"""The confusion matrix's name for "no instance": a missed cell (predicted) or a false positive (actual)."""

CLASS_COLOURS = ("#00e5ff", "#ffea00", "#76ff03", "#ff4081")
"""Classes 1..4: bright hues that stand out on pink/purple H&E; classes 5.. take matplotlib's tab20 in order."""
LEGEND_ALL_CLASSES_UP_TO = 8
"""With more classes than this, an overlay's legend names only the classes drawn in it."""


def class_colour(k: int) -> str:
    """The overlays' colour of class ``k`` (1-based): :data:`CLASS_COLOURS`, then tab20, cycling."""
    if k <= len(CLASS_COLOURS):
        return CLASS_COLOURS[k - 1]
    tab20 = colormaps["tab20"].colors
    return to_hex(tab20[(k - len(CLASS_COLOURS) - 1) % len(tab20)])


TRUE_POSITIVE, WRONG_CLASS, FALSE_POSITIVE, MISSED = (
    "true positive",
    "wrong class",
    "false positive",
    "missed (ground truth)",
)
OUTCOME_COLOURS = {
    TRUE_POSITIVE: "#00e676",
    WRONG_CLASS: "#d500f9",
    FALSE_POSITIVE: "#ff1744",
    MISSED: "#ffea00",
}
"""Predictions by outcome, and missed ground truth (drawn dashed)."""
PANEL_INCHES = 5.0
LINE_WIDTH = 1.0


# ------------------------------------------------------------------------------------------------- CSV plots
def write_pr_curves(folder: Path, pr_curves: np.ndarray) -> None:
    """Write ``<folder>/class<k>.csv`` (``recall,precision``) for every class (numbered as the metric keys, so
    the file names do not change with the class names; dvc.yaml's plot names the files).

    The rows are COCO's interpolated precision at the 101 recall thresholds (IoU 0.5, dense cap), so the mean
    of a file's precision column is that class's AP50 in eval.json. A class without ground truth has no curve
    (COCO leaves it undefined, -1): its file holds the header only, so DVC draws no line for it yet a plot
    that names every file still loads.
    """
    for k, precision in enumerate(pr_curves, start=1):
        rows = [] if (precision < 0).all() else zip(RECALL_THRESHOLDS, precision, strict=True)
        lines = ["recall,precision"] + [f"{r:.2f},{p:.10g}" for r, p in rows]
        (folder / f"{class_key(k)}.csv").write_text("\n".join(lines) + "\n")


def confusion_rows(matrix: np.ndarray, class_names: tuple[str, ...]) -> list[tuple[str, str]]:
    """One ``(actual, predicted)`` pair per counted instance of a :func:`cellseg.eval.coco_metrics.confusion_matrix`,
    the classes by name (``class_names``, class 1 first).

    DVC's ``confusion`` template counts rows, so a cell holding ``n`` becomes ``n`` identical rows.
    """
    if matrix.shape != (len(class_names) + 1,) * 2:
        raise ValueError(f"a confusion matrix of shape {matrix.shape} for {len(class_names)} classes")
    names = (*class_names, BACKGROUND_NAME)  # metrics.BACKGROUND is the last index
    return [
        (names[t], names[p])
        for t in range(len(names))
        for p in range(len(names))
        for _ in range(int(matrix[t, p]))
    ]


def write_confusion(path: Path, matrix: np.ndarray, class_names: tuple[str, ...]) -> None:
    """``actual,predicted`` rows of every matched, missed and spurious instance (CSV: a name with a comma is
    quoted)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("actual", "predicted"))
    writer.writerows(confusion_rows(matrix, class_names))
    path.write_text(buffer.getvalue())


# -------------------------------------------------------------------------------------------------- overlays
@dataclass(frozen=True)
class Outcome:
    """Which predictions and ground-truth instances matched (mask IoU ≥ threshold, matching blind to class)."""

    predictions: list[str]
    """TRUE_POSITIVE, WRONG_CLASS or FALSE_POSITIVE per prediction."""
    missed: np.ndarray
    """Indices of the ground truth that no prediction matched."""

    def counts(self) -> dict[str, int]:
        return {key: self.predictions.count(key) for key in OUTCOME_COLOURS} | {MISSED: len(self.missed)}


def match_outcome(gt: Instances, pred: Instances, iou_threshold: float) -> Outcome:
    """Label each prediction TP / wrong class / FP and list the missed ground truth, as the confusion matrix does."""
    gt_idx, pred_idx = match_instances(gt, pred, iou_threshold)
    outcomes = [FALSE_POSITIVE] * len(pred)
    for g, d in zip(gt_idx, pred_idx, strict=True):
        outcomes[d] = TRUE_POSITIVE if gt.labels[g] == pred.labels[d] else WRONG_CLASS
    return Outcome(outcomes, np.setdiff1d(np.arange(len(gt)), gt_idx))


def instance_contours(inst: Instances, indices: np.ndarray | None = None) -> list[list[np.ndarray]]:
    """Outline(s) of each instance as ``(x, y)`` vertex arrays in image pixel coordinates."""
    indices = np.arange(len(inst)) if indices is None else indices
    outlines = []
    for i in indices:
        (y0, x0), crop = inst.offsets[i], inst.crops[i]
        padded = np.pad(crop.astype(np.float32), 1)  # closes outlines that touch the crop's edge
        outlines.append([c[:, ::-1] + (x0 - 1, y0 - 1) for c in find_contours(padded, 0.5)])
    return outlines


def _draw(axes, outlines: list[list[np.ndarray]], colours: list[str], style: str = "solid") -> None:
    segments = [c for cs in outlines for c in cs]
    segment_colours = [colour for cs, colour in zip(outlines, colours, strict=True) for _ in cs]
    if segments:
        axes.add_collection(
            LineCollection(segments, colors=segment_colours, linewidths=LINE_WIDTH, linestyles=style)
        )


def _legend(axes, entries: dict[str, str], dashed: tuple[str, ...] = ()) -> None:
    """Below the panel, so that it hides no cell."""
    handles = [
        Line2D([], [], color=colour, lw=2, ls="--" if name in dashed else "-", label=name)
        for name, colour in entries.items()
    ]
    axes.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False
    )


def _figure(height: int, width: int) -> tuple[Figure, np.ndarray]:
    aspect = float(np.clip(height / width, 0.3, 3.0))
    figure = Figure(figsize=(3 * PANEL_INCHES, PANEL_INCHES * aspect + 1.3), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, 3, sharex=True, sharey=True)


def save_overlay(
    path: Path,
    image: np.ndarray,
    gt: Instances,
    pred: Instances,
    title: str,
    score_threshold: float,
    iou_threshold: float,
    class_names: tuple[str, ...],
) -> dict[str, int]:
    """Ground truth | predictions | outcome, contours on the image, the classes by name (``class_names``, class 1
    first); returns the outcome counts.

    Only predictions scoring at least ``score_threshold`` are drawn and matched, as in the confusion matrix.
    The outcome panel colours each prediction TP (matched, right class), wrong class or FP, and draws missed
    ground truth dashed.
    """
    shown = pred.select(pred.scores >= score_threshold)
    outcome = match_outcome(gt, shown, iou_threshold)
    counts = outcome.counts()
    figure, (ax_gt, ax_pred, ax_out) = _figure(gt.height, gt.width)
    drawn = set(gt.labels.tolist()) | set(shown.labels.tolist())
    class_entries = {
        name: class_colour(k)
        for k, name in enumerate(class_names, start=1)
        if len(class_names) <= LEGEND_ALL_CLASSES_UP_TO or k in drawn
    }
    for axes in (ax_gt, ax_pred, ax_out):
        axes.imshow(image)
        axes.set_axis_off()
    _draw(ax_gt, instance_contours(gt), [class_colour(int(k)) for k in gt.labels])
    _draw(ax_pred, instance_contours(shown), [class_colour(int(k)) for k in shown.labels])
    _draw(ax_out, instance_contours(shown), [OUTCOME_COLOURS[k] for k in outcome.predictions])
    _draw(
        ax_out,
        instance_contours(gt, outcome.missed),
        [OUTCOME_COLOURS[MISSED]] * len(outcome.missed),
        style="dashed",
    )
    ax_gt.set_title(f"ground truth\n{len(gt)} instances", fontsize=9)
    ax_pred.set_title(
        f"predictions with score ≥ {score_threshold:g}\n{len(shown)} of {len(pred)}", fontsize=9
    )
    ax_out.set_title(
        f"outcome at mask IoU ≥ {iou_threshold:g}\n"
        + ", ".join(f"{k.split(' (')[0]} {v}" for k, v in counts.items()),
        fontsize=9,
    )
    _legend(ax_gt, class_entries)
    _legend(ax_pred, class_entries)
    _legend(ax_out, OUTCOME_COLOURS, dashed=(MISSED,))
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=_dpi(gt.width))
    return counts


def _dpi(width: int) -> int:
    """One output pixel per image pixel up to 800-px-wide images (panels are 5 in); small ones are enlarged."""
    return int(np.clip(width / PANEL_INCHES, 80, 160))


# ------------------------------------------------------------------------------------------------------ maps
def save_map_comparison(
    path: Path,
    image: np.ndarray,
    predicted: tuple[np.ndarray, np.ndarray],
    target: tuple[np.ndarray, np.ndarray],
    title: str,
) -> None:
    """Image | predicted vs target centre | predicted vs target boundary, to see where the heads err.

    ``predicted`` and ``target`` are ``(centre, boundary)`` maps of the image's size with values in [0, 1].
    """
    figure = Figure(figsize=(5 * 3.2, 3.2 * float(np.clip(image.shape[0] / image.shape[1], 0.3, 3.0)) + 0.8))
    figure.set_layout_engine("constrained")
    FigureCanvasAgg(figure)
    panels = (
        ("image", image, {}),
        ("centre: predicted", predicted[0], {"cmap": "magma", "vmin": 0.0, "vmax": 1.0}),
        ("centre: target", target[0], {"cmap": "magma", "vmin": 0.0, "vmax": 1.0}),
        ("boundary: predicted", predicted[1], {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}),
        ("boundary: target", target[1], {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}),
    )
    for axes, (name, data, style) in zip(figure.subplots(1, 5), panels, strict=True):
        if data.shape[:2] != image.shape[:2]:
            raise ValueError(f"{name} map has shape {data.shape[:2]}, the image {image.shape[:2]}")
        axes.imshow(data, interpolation="nearest", **style)
        axes.set_title(name, fontsize=9)
        axes.set_axis_off()
    figure.suptitle(title, fontsize=10)
    figure.savefig(path, dpi=_dpi(image.shape[1]))
