"""The nuclei field's own metrics on label maps: PQ (DQ × SQ), mPQ⁺, AJI, AJI⁺, DICE2 and detection F1.

COCO AP (:mod:`cellseg.eval.coco_metrics`) scores a ranked list of overlapping masks; the nuclei literature (HoVer-Net's
``stats_utils``, StarDist's ``matching``, the CoNIC challenge) scores **label maps**, where every pixel belongs
to at most one nucleus. This module holds those metrics and nothing else (no model code).

**From instances to a label map**: every figure scores the nuclei of :mod:`cellseg.nuclei`, the project's one
rule from detections to nuclei (the rule the hard outputs use); ground truth goes through
:func:`cellseg.nuclei.truth_label_map`. This module only compares label maps.

**Matching**: a true and a predicted nucleus are paired when their IoU is **> 0.5**, which makes the pairing
unique (two nuclei of one label map cannot both overlap a third by more than half). Class-wise figures compare
only the instances of that class, within the same all-class label maps (CoNIC's convention).

**Figures of one image** (undefined, ``None``, when the image has neither truth nor prediction):

- ``dq = TP / (TP + FP/2 + FN/2)``, ``sq`` = mean IoU of the pairs (0 without pair, as HoVer-Net), ``pq = dq·sq``;
- ``precision``, ``recall``, ``f1`` at IoU > 0.5;
- ``aji`` (Kumar et al.): each true nucleus with its highest-IoU intersecting prediction (a prediction may be
  reused), ``Σ inter / (Σ union + unpaired true areas + unused predicted areas)``; ``aji_plus`` (HoVer-Net's
  AJI⁺) pairs one-to-one by maximal total IoU instead, so no prediction is counted twice;
- ``dice2`` (HoVer-Net): ``2 Σ inter / Σ (|t| + |p|)`` over all intersecting pairs (0 when none intersect).

**Over a split** (:func:`score_split`): ``pq``, ``dq``, ``sq``, ``aji``, ``aji_plus``, ``dice2`` are the mean
over images with truth or prediction (HoVer-Net); ``precision``, ``recall``, ``f1`` pool TP/FP/FN over the split;
``mpq_plus`` (CoNIC) pools TP, FP, FN and summed IoU per class over the split, computes PQ per class
(``pq_class<k>``) and averages over classes present (with truth or prediction). Undefined split figures are -1,
as in COCO.

Speed: one sparse contingency table per image from ``np.unique`` over the paired pixel ids; the class-wise and
split figures are filtered sums of it. No per-pair loop touches a mask.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, fields

import numpy as np
from scipy.optimize import linear_sum_assignment

from cellseg.instances import Instances
from cellseg.nuclei import LabelMap, NucleusRule, label_map, truth_label_map

MATCH_IOU = 0.5
"""A prediction matches a nucleus when their mask IoU is strictly above this (HoVer-Net's rule: above 0.5 a
nucleus has at most one match). The one matching threshold of cellseg's own figures: PQ, F1, the confusion
matrix and the overlays (``coco_metrics.match_instances``). COCO AP and its PR curves are COCOeval's own (≥)."""
UNDEFINED = -1.0
"""A split figure without any image (or class) to average over, as COCO writes it."""


# ------------------------------------------------------------------------------------------------- overlaps
@dataclass(frozen=True)
class Overlaps:
    """The sparse contingency table of two label maps: areas and every intersecting (true, pred) pair.

    Indices are 0-based (id - 1). ``true_class`` / ``pred_class`` give the class of each instance.
    """

    true_area: np.ndarray
    pred_area: np.ndarray
    true_class: np.ndarray
    pred_class: np.ndarray
    pair_true: np.ndarray
    pair_pred: np.ndarray
    pair_inter: np.ndarray

    @classmethod
    def of(cls, truth: LabelMap, pred: LabelMap) -> Overlaps:
        if truth.ids.shape != pred.ids.shape:
            raise ValueError(f"label maps differ in shape: {truth.ids.shape} vs {pred.ids.shape}")
        t, p = truth.ids.ravel().astype(np.int64), pred.ids.ravel().astype(np.int64)
        n_true, n_pred = len(truth), len(pred)
        both = (t > 0) & (p > 0)
        keys, inter = np.unique(t[both] * (n_pred + 1) + p[both], return_counts=True)
        return cls(
            np.bincount(t, minlength=n_true + 1)[1:],
            np.bincount(p, minlength=n_pred + 1)[1:],
            np.asarray(truth.classes, np.int64),
            np.asarray(pred.classes, np.int64),
            keys // (n_pred + 1) - 1,
            keys % (n_pred + 1) - 1,
            inter,
        )

    def of_class(self, k: int) -> Overlaps:
        """Only the instances of class ``k`` (and the pairs between them), renumbered."""
        t_keep, p_keep = self.true_class == k, self.pred_class == k
        t_new = np.cumsum(t_keep) - 1
        p_new = np.cumsum(p_keep) - 1
        pairs = t_keep[self.pair_true] & p_keep[self.pair_pred]
        return Overlaps(
            self.true_area[t_keep],
            self.pred_area[p_keep],
            self.true_class[t_keep],
            self.pred_class[p_keep],
            t_new[self.pair_true[pairs]],
            p_new[self.pair_pred[pairs]],
            self.pair_inter[pairs],
        )

    def pair_iou(self) -> np.ndarray:
        union = self.true_area[self.pair_true] + self.pred_area[self.pair_pred] - self.pair_inter
        return self.pair_inter / union


# ------------------------------------------------------------------------------------------ counts of an image
@dataclass(frozen=True)
class Counts:
    """The additive counts behind every figure; figures are ``None`` where undefined (nothing to compare)."""

    n_true: int = 0
    n_pred: int = 0
    tp: int = 0
    iou_sum: float = 0.0
    aji_inter: int = 0
    aji_union: int = 0
    aji_plus_inter: int = 0
    aji_plus_union: int = 0
    dice_inter: int = 0
    dice_total: int = 0

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_true - self.tp

    @property
    def defined(self) -> bool:
        return self.n_true + self.n_pred > 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Counts)))

    def _ratio(self, num: float, den: float) -> float | None:
        if not self.defined:
            return None
        return float(num / den) if den > 0 else 0.0

    @property
    def dq(self) -> float | None:
        return self._ratio(self.tp, self.tp + 0.5 * self.fp + 0.5 * self.fn)

    @property
    def sq(self) -> float | None:
        return self._ratio(self.iou_sum, self.tp)

    @property
    def pq(self) -> float | None:
        return self._ratio(self.iou_sum, self.tp + 0.5 * self.fp + 0.5 * self.fn)

    @property
    def precision(self) -> float | None:
        return self._ratio(self.tp, self.n_pred)

    @property
    def recall(self) -> float | None:
        return self._ratio(self.tp, self.n_true)

    @property
    def f1(self) -> float | None:
        return self._ratio(2 * self.tp, self.n_true + self.n_pred)

    @property
    def aji(self) -> float | None:
        return self._ratio(self.aji_inter, self.aji_union)

    @property
    def aji_plus(self) -> float | None:
        return self._ratio(self.aji_plus_inter, self.aji_plus_union)

    @property
    def dice2(self) -> float | None:
        return self._ratio(2 * self.dice_inter, self.dice_total)

    def figures(self) -> dict[str, float | None]:
        names = ("pq", "dq", "sq", "aji", "aji_plus", "dice2", "precision", "recall", "f1")
        return {name: getattr(self, name) for name in names}


def count(ov: Overlaps) -> Counts:
    """Every count of one image (or one class of it) from its contingency table."""
    iou = ov.pair_iou()
    matched = iou > MATCH_IOU
    union = ov.true_area[ov.pair_true] + ov.pred_area[ov.pair_pred] - ov.pair_inter
    aji_inter, aji_union, used_pred, paired_true = _aji_pairs(ov, iou, union)
    unpaired = ov.true_area.sum() - ov.true_area[paired_true].sum()
    unused = ov.pred_area.sum() - ov.pred_area[used_pred].sum()
    plus_inter, plus_union, plus_true, plus_pred = _aji_plus_pairs(ov, iou, union)
    plus_rest = ov.true_area.sum() - ov.true_area[plus_true].sum() + ov.pred_area.sum()
    plus_rest -= ov.pred_area[plus_pred].sum()
    return Counts(
        n_true=len(ov.true_area),
        n_pred=len(ov.pred_area),
        tp=int(matched.sum()),
        iou_sum=float(iou[matched].sum()),
        aji_inter=int(aji_inter),
        aji_union=int(aji_union + unpaired + unused),
        aji_plus_inter=int(plus_inter),
        aji_plus_union=int(plus_union + plus_rest),
        dice_inter=int(ov.pair_inter.sum()),
        dice_total=int((ov.true_area[ov.pair_true] + ov.pred_area[ov.pair_pred]).sum()),
    )


def _aji_pairs(ov: Overlaps, iou: np.ndarray, union: np.ndarray) -> tuple:
    """Each true nucleus with its highest-IoU intersecting prediction (ties: the lowest id), as HoVer-Net."""
    if not len(iou):
        return 0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((ov.pair_pred, -iou, ov.pair_true))  # by true, best IoU first, then lowest pred
    first = order[np.r_[True, ov.pair_true[order][1:] != ov.pair_true[order][:-1]]]
    return ov.pair_inter[first].sum(), union[first].sum(), np.unique(ov.pair_pred[first]), ov.pair_true[first]


def _aji_plus_pairs(ov: Overlaps, iou: np.ndarray, union: np.ndarray) -> tuple:
    """One-to-one pairs of maximal total IoU among intersecting nuclei (linear assignment, as HoVer-Net)."""
    if not len(iou):
        return 0, 0, np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows, row_of = np.unique(ov.pair_true, return_inverse=True)  # only the nuclei that intersect something
    cols, col_of = np.unique(ov.pair_pred, return_inverse=True)
    dense = np.zeros((len(rows), len(cols)))
    dense[row_of, col_of] = iou
    r, c = linear_sum_assignment(-dense)
    ok = dense[r, c] > 0
    r, c = r[ok], c[ok]
    pair_index = np.full((len(rows), len(cols)), -1, np.int64)
    pair_index[row_of, col_of] = np.arange(len(iou))
    chosen = pair_index[r, c]
    return ov.pair_inter[chosen].sum(), union[chosen].sum(), rows[r], cols[c]


# --------------------------------------------------------------------------------------------- image and split
@dataclass(frozen=True)
class ImageCounts:
    """All-class counts of one image and the class-wise ones (``per_class[k - 1]`` for class ``k``)."""

    all: Counts
    per_class: tuple[Counts, ...]


def score_image(truth: LabelMap, pred: LabelMap, num_classes: int) -> ImageCounts:
    """The counts of one image, all classes together and for each of classes 1..``num_classes``."""
    ov = Overlaps.of(truth, pred)
    return ImageCounts(count(ov), tuple(count(ov.of_class(k)) for k in range(1, num_classes + 1)))


def _mean(values: list[float | None]) -> float:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else UNDEFINED


def _value(v: float | None) -> float:
    return UNDEFINED if v is None else float(v)


@dataclass(frozen=True)
class SplitScores:
    """Per-image counts of a split (of ``num_classes`` classes); :attr:`metrics` are its flat, JSON-friendly
    figures."""

    names: list[str]
    images: list[ImageCounts]
    num_classes: int

    def class_counts(self) -> list[Counts]:
        """Counts of each class pooled over the split (index ``k - 1`` for class ``k``): mPQ⁺'s terms."""
        return [sum((img.per_class[k] for img in self.images), Counts()) for k in range(self.num_classes)]

    @property
    def metrics(self) -> dict[str, float]:
        per_image = [img.all.figures() for img in self.images]
        out = {
            key: _mean([f[key] for f in per_image]) for key in ("pq", "dq", "sq", "aji", "aji_plus", "dice2")
        }
        pooled = sum((img.all for img in self.images), Counts())
        out |= {key: _value(getattr(pooled, key)) for key in ("precision", "recall", "f1")}
        class_counts = self.class_counts()
        for k, c in enumerate(class_counts, start=1):
            out[f"pq_class{k}"] = _value(c.pq)
            out[f"f1_class{k}"] = _value(c.f1)
        out["mpq_plus"] = _mean([c.pq for c in class_counts])
        return out

    def per_image_rows(self) -> list[dict]:
        """``name, n_true, n_pred, pq, dq, sq, aji, aji_plus, dice2, precision, recall, f1`` (None: undefined)."""
        return [
            {"name": name, "n_true": img.all.n_true, "n_pred": img.all.n_pred, **img.all.figures()}
            for name, img in zip(self.names, self.images, strict=True)
        ]


def per_image_csv(rows: list[dict]) -> str:
    """:meth:`SplitScores.per_image_rows` as CSV text (figures to 6 decimals; an undefined one is empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["name"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: f"{v:.6f}" if isinstance(v, float) else ("" if v is None else v) for k, v in row.items()}
        )
    return buffer.getvalue()


def score_split(
    names: list[str],
    ground_truth: list[Instances],
    predictions: list[Instances],
    rule: NucleusRule,
    num_classes: int,
) -> SplitScores:
    """Every image's truth and predictions as label maps (the predictions' nuclei by ``rule``), scored, with
    per-class figures for classes 1..``num_classes``."""
    if not len(names) == len(ground_truth) == len(predictions):
        raise ValueError(f"{len(names)} names, {len(ground_truth)} truths, {len(predictions)} predictions")
    images = []
    for gt, pred in zip(ground_truth, predictions, strict=True):
        if (gt.height, gt.width) != (pred.height, pred.width):
            raise ValueError(
                f"image size {gt.height}x{gt.width} but predictions for {pred.height}x{pred.width}"
            )
        for inst in (gt, pred):
            if len(inst) and not 1 <= int(inst.labels.min()) <= int(inst.labels.max()) <= num_classes:
                raise ValueError(f"labels must be class ids 1..{num_classes}")
        images.append(score_image(truth_label_map(gt), label_map(pred, rule), num_classes))
    return SplitScores(list(names), images, num_classes)
