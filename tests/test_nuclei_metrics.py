"""Nuclei metrics: checked against StarDist's ``matching`` (an independent implementation) on random and real
label maps, and against hand-computed AJI, AJI⁺, DICE2 and mPQ⁺ on small built cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cellseg.data.io import class_files, read_label
from cellseg.eval.nuclei_metrics import UNDEFINED, Overlaps, count, score_split
from cellseg.instances import Instances
from cellseg.nuclei import DEFAULT_MIN_KEPT_FRACTION, NucleusRule, label_map, truth_label_map
from conftest import ROOT

matching = pytest.importorskip("stardist.matching")  # test-only dependency (requirements.txt)
CONSEP_TRUTH = ROOT.parent / "shared" / "datasets" / "consep-dev" / "test_truth"
STARDIST_THRESH = float(np.nextafter(np.float32(0.5), np.float32(1)))
"""StarDist pairs at IoU >= thresh in float32, the field (and we) at IoU > 0.5: the next float32 above 0.5."""


def instances(height: int, width: int, masks: list[tuple[int, np.ndarray, float]]) -> Instances:
    """Instances of full-image ``(class, mask, score)`` entries (crops of the whole image)."""
    return Instances(
        height,
        width,
        labels=np.asarray([c for c, _, _ in masks], np.int64),
        scores=np.asarray([s for _, _, s in masks], np.float32),
        offsets=np.zeros((len(masks), 2), np.int64),
        crops=[m.astype(bool) for _, m, _ in masks],
    )


def box(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


def random_discs(rng: np.random.Generator, n: int, size: int = 128) -> Instances:
    """``n`` overlapping discs of random class and score, as box-local crops: a prediction-like set."""
    labels, scores, offsets, crops = [], [], [], []
    for _ in range(n):
        cy, cx, r = (int(v) for v in (rng.integers(0, size), rng.integers(0, size), rng.integers(3, 10)))
        y0, x0 = max(cy - r, 0), max(cx - r, 0)
        yy, xx = np.mgrid[y0 : min(cy + r + 1, size), x0 : min(cx + r + 1, size)]
        crops.append((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
        offsets.append((y0, x0))
        labels.append(int(rng.integers(1, 5)))
        scores.append(float(rng.random()))
    return Instances(
        size, size, np.asarray(labels), np.asarray(scores, np.float32), np.asarray(offsets), crops
    )


def jitter(inst: Instances, rng: np.random.Generator) -> Instances:
    """Each instance shifted by up to 3 px and randomly dilated or eroded: a plausible prediction of ``inst``."""
    masks = []
    for mask in inst.full_masks():
        mask = np.roll(mask, tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
        op = (ndimage.binary_dilation, ndimage.binary_erosion, lambda m: m)[rng.integers(0, 3)]
        masks.append(op(mask))
    labels = np.where(rng.random(len(inst)) < 0.2, rng.integers(1, 5, len(inst)), inst.labels)
    return instances(
        inst.height,
        inst.width,
        [(int(c), m, float(rng.random())) for c, m in zip(labels, masks, strict=True)],
    )


def _assert_like_stardist(truth_ids: list[np.ndarray], pred_ids: list[np.ndarray], scores) -> None:
    for i, (t, p) in enumerate(zip(truth_ids, pred_ids, strict=True)):
        ref = matching.matching(t, p, thresh=STARDIST_THRESH)
        ours = scores.images[i].all
        assert (ours.tp, ours.fp, ours.fn) == (ref.tp, ref.fp, ref.fn)
        assert ours.pq == pytest.approx(ref.panoptic_quality, rel=1e-6)  # StarDist computes IoU in float32
        assert ours.sq == pytest.approx(ref.mean_matched_score, rel=1e-6)
        assert ours.dq == pytest.approx(
            ref.f1, rel=1e-6
        )  # StarDist computes IoU in float32  # DQ is the F1 of the pairing
        assert (ours.precision, ours.recall, ours.f1) == pytest.approx((ref.precision, ref.recall, ref.f1))
    pooled = matching.matching_dataset(
        truth_ids, pred_ids, thresh=STARDIST_THRESH, by_image=False, show_progress=False
    )
    m = scores.metrics
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx(
        (pooled.precision, pooled.recall, pooled.f1)
    )


def test_matches_stardist_on_random_label_maps() -> None:
    rng = np.random.default_rng(0)
    truths = [random_discs(rng, 40) for _ in range(6)]
    preds = [jitter(t, rng) for t in truths[:5]] + [random_discs(rng, 30)]
    truth_maps = [truth_label_map(t) for t in truths]
    pred_maps = [label_map(p, NucleusRule()) for p in preds]
    scores = score_split([str(i) for i in range(6)], truths, preds, NucleusRule(0.0, 0.0), 4)
    assert sum(img.all.tp for img in scores.images) > 50  # the comparison covers many real pairs
    _assert_like_stardist([t.ids for t in truth_maps], [p.ids for p in pred_maps], scores)


def _consep_tiles(n: int) -> list[tuple[str, Instances]]:
    folders = sorted(p for p in CONSEP_TRUTH.iterdir() if p.is_dir())[:n]
    tiles = []
    for folder in folders:
        rows = np.zeros((4, 256, 256), np.int32)
        for k, name in enumerate(class_files(4)):
            if (folder / name).exists():
                rows[k] = read_label(folder / name, (256, 256))
        tiles.append((folder.name, Instances.from_label_rows(rows)))
    return tiles


@pytest.mark.skipif(
    not CONSEP_TRUTH.is_dir(), reason=f"real tiles not available at {CONSEP_TRUTH} (../shared)"
)
def test_matches_stardist_on_real_nuclei() -> None:
    rng = np.random.default_rng(1)
    tiles = _consep_tiles(8)
    truths = [t for _, t in tiles]
    preds = [jitter(t, rng) for t in truths]
    scores = score_split([name for name, _ in tiles], truths, preds, NucleusRule(0.0, 0.0), 4)
    assert sum(img.all.tp for img in scores.images) > 100
    _assert_like_stardist(
        [truth_label_map(t).ids for t in truths], [label_map(p, NucleusRule()).ids for p in preds], scores
    )


# ------------------------------------------------------------------------------------------ hand-built cases
def test_aji_aji_plus_dice2_and_pq_by_hand() -> None:
    shape = (4, 10)
    # T1 = rows 0-1 × cols 0-4 (10 px), T2 = rows 0-1 × cols 5-9 (10 px)
    truth = instances(
        *shape,
        [(1, box(shape, slice(0, 2), slice(0, 5)), 1.0), (1, box(shape, slice(0, 2), slice(5, 10)), 1.0)],
    )
    # P1 = rows 0-1 × cols 0-7 (16 px); P2 = rows 0-3 × cols 8-9 (8 px)
    pred = instances(
        *shape,
        [(1, box(shape, slice(0, 2), slice(0, 8)), 0.9), (1, box(shape, slice(0, 4), slice(8, 10)), 0.8)],
    )
    c = count(Overlaps.of(truth_label_map(truth), label_map(pred, NucleusRule())))
    # IoU T1-P1 = 10/16 = .625, T2-P1 = 6/20 = .3, T2-P2 = 4/14 = .2857
    # AJI: T1->P1 (10/16), T2->P1 (its best, .3 > .2857: 6/20); P2 unused adds 8: 16 / (16 + 20 + 8) = 16/44
    assert c.aji == pytest.approx(16 / 44)
    # AJI+: one-to-one of maximal total IoU = {T1-P1, T2-P2}: (10 + 4) / (16 + 14) = 14/30
    assert c.aji_plus == pytest.approx(14 / 30)
    # DICE2 over the intersecting pairs: 2 (10 + 6 + 4) / ((10+16) + (10+16) + (10+8)) = 40/70
    assert c.dice2 == pytest.approx(40 / 70)
    # only T1-P1 has IoU > .5: TP 1, FP 1, FN 1 -> DQ .5, SQ .625, PQ .3125
    assert (c.tp, c.fp, c.fn) == (1, 1, 1)
    assert (c.dq, c.sq, c.pq) == pytest.approx((0.5, 0.625, 0.3125))


def test_mpq_plus_pools_per_class_over_the_split_by_hand() -> None:
    shape = (30, 30)
    t2, t3 = box(shape, slice(0, 10), slice(0, 10)), box(shape, slice(15, 25), slice(0, 10))
    image_a = instances(*shape, [(2, t2, 1.0), (3, t3, 1.0)])
    pred_a = instances(  # class 2 at IoU .8 (80/100); the class-3 nucleus found at IoU .9 but called class 2
        *shape,
        [(2, box(shape, slice(0, 10), slice(0, 8)), 0.9), (2, box(shape, slice(15, 25), slice(0, 9)), 0.8)],
    )
    image_b = instances(*shape, [(2, t2, 1.0)])  # missed
    pred_b = instances(
        *shape, [(4, box(shape, slice(20, 30), slice(20, 30)), 0.7)]
    )  # a class-4 false positive
    scores = score_split(
        ["a", "b"], [image_a, image_b], [pred_a, pred_b], NucleusRule(0.5, DEFAULT_MIN_KEPT_FRACTION), 4
    )
    m = scores.metrics
    # class 2 pooled: TP 1 (IoU .8), FP 1 (the mislabelled one), FN 1 (image b) -> .8 / (1 + .5 + .5) = .4
    assert m["pq_class2"] == pytest.approx(0.4)
    assert m["f1_class2"] == pytest.approx(2 * 1 / (2 + 2))
    assert m["pq_class3"] == 0.0 and m["pq_class4"] == 0.0  # FN only / FP only
    assert m["pq_class1"] == UNDEFINED and m["f1_class1"] == UNDEFINED  # no truth, no prediction
    assert m["mpq_plus"] == pytest.approx((0.4 + 0 + 0) / 3)  # over the 3 classes present
    # class-blind: image a TP 2 (IoU .8, .9) -> PQ .85; image b TP 0 -> PQ 0; mean .425
    assert m["pq"] == pytest.approx(0.425)
    assert m["sq"] == pytest.approx((0.85 + 0.0) / 2)


def test_empty_truth_empty_prediction_and_both() -> None:
    shape = (20, 20)
    nucleus = [(1, box(shape, slice(2, 8), slice(2, 8)), 0.9)]
    empty = instances(*shape, [])
    scores = score_split(
        ["no_truth", "no_pred", "neither"],
        [empty, instances(*shape, nucleus), empty],
        [instances(*shape, nucleus), empty, empty],
        NucleusRule(0.5, DEFAULT_MIN_KEPT_FRACTION),
        4,
    )
    rows = {r["name"]: r for r in scores.per_image_rows()}
    for name in ("no_truth", "no_pred"):
        assert rows[name]["pq"] == 0.0 and rows[name]["aji"] == 0.0 and rows[name]["f1"] == 0.0
    assert rows["neither"]["pq"] is None and rows["neither"]["aji"] is None  # left out of the mean
    assert scores.metrics["pq"] == 0.0
    only_empty = score_split(["x"], [empty], [empty], NucleusRule(0.5, DEFAULT_MIN_KEPT_FRACTION), 4).metrics
    assert (
        only_empty["pq"] == UNDEFINED
        and only_empty["mpq_plus"] == UNDEFINED
        and only_empty["f1"] == UNDEFINED
    )


def test_perfect_prediction_scores_one() -> None:
    rng = np.random.default_rng(3)
    truth = label_map(
        random_discs(rng, 30), NucleusRule()
    )  # one region per nucleus, as every predicted label map has
    inst = instances(128, 128, [(int(c), truth.ids == i + 1, 1.0) for i, c in enumerate(truth.classes)])
    m = score_split(["t"], [inst], [inst], NucleusRule(0.5, DEFAULT_MIN_KEPT_FRACTION), 4).metrics
    for key in ("pq", "dq", "sq", "aji", "aji_plus", "dice2", "f1", "mpq_plus"):
        assert m[key] == pytest.approx(1.0), key


# --------------------------------------------------------------------------------------------- label maps
def test_a_split_of_many_tiles_equals_the_sum_of_its_single_images() -> None:
    """Pooling is what it says: 100 random tiles scored as one split give the per-image mean PQ of the tiles
    scored one by one, and mPQ+ from the class counts pooled over them (a speed budget is the benchmark's job:
    `cellseg bench metric`)."""
    rng = np.random.default_rng(4)
    truths = [random_discs(rng, 50, size=256) for _ in range(100)]
    # even tiles predicted exactly (PQ near 1), odd ones by unrelated discs (PQ near 0)
    preds = [t if i % 2 == 0 else random_discs(rng, 50, size=256) for i, t in enumerate(truths)]
    names = [str(i) for i in range(100)]
    split = score_split(names, truths, preds, NucleusRule(0.2, DEFAULT_MIN_KEPT_FRACTION), 4).metrics
    alone = [
        score_split([n], [t], [p], NucleusRule(0.2, DEFAULT_MIN_KEPT_FRACTION), 4).metrics
        for n, t, p in zip(names, truths, preds, strict=True)
    ]
    assert split["pq"] == pytest.approx(np.mean([m["pq"] for m in alone]))
    assert 0.3 < split["pq"] < 0.7
