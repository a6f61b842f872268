"""The one rule from a model's detections to nuclei: what every hard output and every PQ figure uses.

Detections overlap and include duplicates and fragments; nuclei do not. Evaluation and tuning (PQ, AJI, F1 …),
``cellseg score``, ``cellseg predict``'s label maps and ``cellseg slide``'s polygons all turn detections into
nuclei here, with a :class:`NucleusRule` built from the model's tuned thresholds (:meth:`NucleusRule.of`), so the
same model gives the same nuclei whichever command writes them. The rule (:func:`label_map`):

1. detections scoring below their class's threshold are dropped (one value for every class, or one per class:
   the tune stage's per-class label-score thresholds);
2. the rest are ranked by score, highest first, ties by their order in the :class:`Instances`;
3. **contested pixels**: each pixel goes to the highest-ranked detection covering it, across all classes;
4. **kept fraction**: a detection that keeps less than ``min_kept_fraction`` of its own mask after step 3 is
   dropped and its remaining pixels become background (they are not handed down to lower-ranked detections:
   this is what stops slivers and fragments of overlapping detections from counting as nuclei);
5. **one region per nucleus** (``one_region``): a kept detection whose pixels fall into several 4-connected
   pieces (a higher-ranked neighbour cut through it) keeps its largest piece (the first in raster order on a
   tie); every other piece goes to the kept nucleus whose largest piece it touches along the most pixel edges
   (4-neighbours; the higher-ranked one on a tie), which stays connected since the piece touches it, or to the
   background when it touches none. Applied once, on the state after step 4, so the result has no multi-piece
   nucleus under 4- or 8-connectivity. The kept fraction of step 4 is not rechecked;
6. the kept nuclei are numbered 1..n in rank order; ``classes[i - 1]`` is the class of id ``i``.

**Locality.** A nucleus's outcome depends only on the detections within about three nucleus diameters of it
(step 3 and 4: those overlapping it; step 5: its neighbours' pieces), which is what lets ``cellseg slide``
apply the rule to a slide window by window and get the nuclei of the slide as one image
(:func:`context_margin`).

Ground truth goes through the same function (:func:`truth_label_map`) with every score 1.0, nothing dropped for its
kept fraction and no piece moved (the annotation is what it is): where raw class files overlap, the pixel goes to
the instance that comes first in :meth:`Instances.from_label_rows` order (the lower class, then the lower id).

:func:`resolve_overlaps` is step 3 alone (``predict.resolve_overlaps``, for COCO results that must not overlap).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cellseg.instances import Instances

DEFAULT_MIN_KEPT_FRACTION = 0.5
"""The kept fraction where no params say otherwise (``predict.min_kept_fraction``'s default, ``cellseg score``): a
detection that lost more than half of its mask to better-scored ones is a duplicate or a fragment. Not tuned."""


@dataclass(frozen=True)
class NucleusRule:
    """How detections become nuclei: the score threshold (one, or one per class, class 1 first), the kept
    fraction, and whether a nucleus is reduced to one region."""

    score_threshold: float | tuple[float, ...] = 0.0
    min_kept_fraction: float = 0.0
    one_region: bool = True

    def __post_init__(self) -> None:
        if np.ndim(self.score_threshold):  # a list from params or JSON: a tuple, so the rule stays hashable
            object.__setattr__(self, "score_threshold", tuple(float(t) for t in self.score_threshold))
        if not 0.0 <= self.min_kept_fraction <= 1.0:
            raise ValueError(f"min_kept_fraction must be within [0, 1], got {self.min_kept_fraction}")
        if np.ndim(self.score_threshold) and not len(self.score_threshold):
            raise ValueError("per-class score thresholds need one value per class, got none")

    @classmethod
    def of(cls, predict) -> NucleusRule:
        """The rule of ``predict`` params (:class:`cellseg.params.PredictParams`, with the tuned thresholds
        applied): its label thresholds, never below ``score_threshold`` (what the detector already dropped)."""
        floor = predict.score_threshold
        label = predict.label_thresholds
        if np.ndim(label):
            return cls(tuple(max(floor, float(t)) for t in label), predict.min_kept_fraction)
        return cls(max(floor, float(label)), predict.min_kept_fraction)

    @property
    def lowest_threshold(self) -> float:
        """No detection scoring below this can become a nucleus (whatever its class)."""
        return float(np.min(self.score_threshold))

    def thresholds_of(self, inst: Instances) -> np.ndarray:
        """Each detection's score threshold: the one value, or its class's entry."""
        if np.ndim(self.score_threshold) == 0:
            return np.full(len(inst), float(self.score_threshold))
        per_class = np.asarray(self.score_threshold, dtype=np.float64)
        if not len(inst):
            return np.zeros(0)
        labels = np.asarray(inst.labels, np.int64)
        if labels.min() < 1 or labels.max() > len(per_class):
            raise ValueError(
                f"class {int(labels.max())} has no score threshold: {len(per_class)} per-class values "
                "(one per class of the model)"
            )
        return per_class[labels - 1]

    def candidates(self, inst: Instances) -> np.ndarray:
        """Which detections pass step 1 (a boolean mask)."""
        return inst.scores >= self.thresholds_of(inst)


@dataclass(frozen=True)
class LabelMap:
    """One image's nuclei: ``ids`` (H×W int32, 0 = background, 1..n) and ``classes`` (n,) of id ``i`` at ``i - 1``.

    ``source[i - 1]`` is the index in the :class:`Instances` the map was made from.
    """

    ids: np.ndarray
    classes: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.classes)

    def instances(self, scores: np.ndarray) -> Instances:
        """The nuclei as (disjoint) :class:`Instances` in id order; ``scores``: those of the source detections."""
        height, width = self.ids.shape
        offsets, crops = [], []
        boxes = ndimage.find_objects(self.ids, max_label=len(self))
        for i, box in enumerate(boxes, start=1):
            if box is None:  # not from label_map, which keeps every id's largest piece
                offsets.append((0, 0))
                crops.append(np.zeros((0, 0), bool))
                continue
            offsets.append((box[0].start, box[1].start))
            crops.append(self.ids[box] == i)
        return Instances(
            height,
            width,
            labels=self.classes.astype(np.int64),
            scores=np.asarray(scores, np.float32)[self.source],
            offsets=np.asarray(offsets, np.int64).reshape(-1, 2),
            crops=crops,
        )


def label_map(inst: Instances, rule: NucleusRule) -> LabelMap:
    """The label map of ``inst`` (see the module docstring): linear in image area plus total mask area."""
    candidates = np.flatnonzero(rule.candidates(inst))
    ranked = candidates[np.argsort(-inst.scores[candidates], kind="stable")]
    owner = _owners(inst, ranked)
    own_area = np.asarray([int(inst.crops[i].sum()) for i in ranked], np.int64)
    kept_area = np.bincount(owner, minlength=len(ranked) + 1)[: len(ranked)]
    keep = (kept_area > 0) & (kept_area >= rule.min_kept_fraction * own_area)
    new_id = np.zeros(len(ranked) + 1, np.int32)  # rank -> id; dropped ranks and "nobody" -> 0
    new_id[np.flatnonzero(keep)] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    source = ranked[keep]
    ids = new_id[owner].reshape(inst.height, inst.width)
    if rule.one_region:
        ids = one_region_per_id(ids)
    return LabelMap(ids, inst.labels[source].astype(np.int64), source.astype(np.int64))


def _owners(inst: Instances, ranked: np.ndarray) -> np.ndarray:
    """Step 3: per pixel (flat), the rank of the best detection covering it; ``len(ranked)`` for nobody."""
    pixels, ranks = [], []
    for rank, i in enumerate(ranked):
        crop, (y0, x0) = inst.crops[i], inst.offsets[i]
        ys, xs = np.nonzero(crop)
        pixels.append((ys + y0) * inst.width + xs + x0)
        ranks.append(np.full(len(ys), rank, np.int64))
    owner = np.full(inst.height * inst.width, len(ranked), np.int64)
    if pixels:
        np.minimum.at(owner, np.concatenate(pixels), np.concatenate(ranks))
    return owner


def nuclei(inst: Instances, rule: NucleusRule) -> Instances:
    """The nuclei of ``inst`` by ``rule``, as disjoint :class:`Instances` in rank order (highest score first)."""
    return label_map(inst, rule).instances(inst.scores)


def resolve_overlaps(inst: Instances) -> Instances:
    """Step 3 alone: each pixel claimed by several detections goes to the highest-scoring one (the first on a
    tie); detections left empty are dropped, the others keep their order."""
    ranked = np.argsort(-inst.scores, kind="stable")
    owner = _owners(inst, ranked).reshape(inst.height, inst.width)
    rank_of = np.empty(len(inst), np.int64)
    rank_of[ranked] = np.arange(len(inst))
    crops = []
    for i, ((y0, x0), crop) in enumerate(zip(inst.offsets, inst.crops, strict=True)):
        crops.append(crop & (owner[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] == rank_of[i]))
    resolved = Instances(inst.height, inst.width, inst.labels, inst.scores, inst.offsets, crops)
    return resolved.select(np.array([c.any() for c in crops], bool))


_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connectivity


def one_region_per_id(ids: np.ndarray) -> np.ndarray:
    """``ids`` with every id reduced to one 4-connected region (step 5 of the module docstring).

    Ids are assumed ranked (a lower id wins a tie). Cost: one ``find_objects`` pass plus a labelling of each
    id's bounding box; the contact counts look only at each cut-off piece's box, one pixel wider.
    """
    out = ids.copy()
    pieces: list[tuple[tuple[slice, slice], np.ndarray]] = []  # (box, piece mask in the box), in id order
    for index, box in enumerate(ndimage.find_objects(ids)):
        if box is None:
            continue
        mask = ids[box] == index + 1
        regions, n = ndimage.label(mask, structure=_CROSS)
        if n < 2:
            continue
        sizes = np.bincount(regions.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1  # argmax: the first on a tie
        for region in range(1, n + 1):
            if region != largest:
                piece = regions == region
                out[box][piece] = 0  # background until a neighbour takes it
                pieces.append((box, piece))
    if not pieces:
        return out
    trimmed = out.copy()  # every id's largest piece, nothing else: what a cut-off piece may join
    height, width = ids.shape
    for box, piece in pieces:
        y0, x0 = max(box[0].start - 1, 0), max(box[1].start - 1, 0)
        y1, x1 = min(box[0].stop + 1, height), min(box[1].stop + 1, width)
        grown = np.zeros((y1 - y0, x1 - x0), bool)
        grown[box[0].start - y0 : box[0].stop - y0, box[1].start - x0 : box[1].stop - x0] = piece
        window = trimmed[y0:y1, x0:x1]
        # every pixel edge from the piece to a neighbour pixel: the neighbour's id, once per edge
        touching = [
            window[1:, :][grown[:-1, :] & ~grown[1:, :]],
            window[:-1, :][grown[1:, :] & ~grown[:-1, :]],
            window[:, 1:][grown[:, :-1] & ~grown[:, 1:]],
            window[:, :-1][grown[:, 1:] & ~grown[:, :-1]],
        ]
        neighbours = np.concatenate(touching)
        neighbours = neighbours[neighbours > 0]
        if len(neighbours):
            counts = np.bincount(neighbours)
            out[box][piece] = int(np.argmax(counts))  # most edges; the lowest id (highest rank) on a tie
    return out


def truth_label_map(inst: Instances) -> LabelMap:
    """Ground truth as a label map: overlaps go to the first instance (lower class, then lower id)."""
    ordered = Instances(
        inst.height, inst.width, inst.labels, np.ones(len(inst), np.float32), inst.offsets, inst.crops
    )
    return label_map(ordered, NucleusRule(0.0, 0.0, one_region=False))


def context_margin(max_extent: int) -> int:
    """How far (pixels) beyond a window the detections must be known for the rule to decide every nucleus whose
    detection lies in the window exactly as on the whole image: three of the largest detection's extents
    (overlapping detections, their neighbours' pieces, and those neighbours' own overlaps), plus one pixel."""
    return 3 * int(max_extent) + 1
