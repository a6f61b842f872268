"""The rule from detections to nuclei (:mod:`cellseg.nuclei`): ranks, contested pixels, kept fraction, one region
per nucleus, on hand-built cases and real tiles; its instance form and the contested-pixel rule alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from cellseg.instances import Instances
from cellseg.nuclei import NucleusRule, context_margin, label_map, nuclei, resolve_overlaps, truth_label_map
from conftest import tiny_params
from test_nuclei_metrics import CONSEP_TRUTH, _consep_tiles, box, instances, jitter, random_discs


# --------------------------------------------------------------------------------- one region per nucleus
def _pieces(ids: np.ndarray, connectivity: int = 1) -> dict[int, int]:
    """4-connected pieces (``connectivity=2``: 8-connected) of every id of a label map."""
    structure = ndimage.generate_binary_structure(2, connectivity)
    return {int(i): ndimage.label(ids == i, structure=structure)[1] for i in np.unique(ids) if i != 0}


def test_label_map_gives_each_pixel_to_the_best_score_across_classes() -> None:
    shape = (10, 10)
    low = box(shape, slice(0, 10), slice(0, 6))  # 60 px, class 1
    high = box(shape, slice(0, 10), slice(4, 10))  # 60 px, class 3, overlaps cols 4-5
    lm = label_map(instances(*shape, [(1, low, 0.6), (3, high, 0.9)]), NucleusRule())
    assert lm.ids[0, 4] == 1 and lm.classes.tolist() == [3, 1] and lm.source.tolist() == [1, 0]
    assert (lm.ids == 1).sum() == 60 and (lm.ids == 2).sum() == 40


def test_label_map_threshold_ties_and_kept_fraction() -> None:
    shape = (10, 10)
    a = box(shape, slice(0, 10), slice(0, 5))  # 50 px
    b = box(shape, slice(0, 10), slice(2, 6))  # 40 px: keeps only col 5 (10 px, 25 %) under a
    tied = label_map(instances(*shape, [(1, a, 0.5), (2, b, 0.5)]), NucleusRule())
    assert tied.source.tolist() == [0, 1] and (tied.ids == 2).sum() == 10  # ties: first in order wins
    assert (
        len(label_map(instances(*shape, [(1, a, 0.5), (2, b, 0.4)]), NucleusRule(score_threshold=0.45))) == 1
    )
    dropped = label_map(instances(*shape, [(1, a, 0.9), (2, b, 0.4)]), NucleusRule(min_kept_fraction=0.3))
    assert dropped.source.tolist() == [0] and (dropped.ids > 0).sum() == 50  # its 10 px became background
    kept = label_map(instances(*shape, [(1, a, 0.9), (2, b, 0.4)]), NucleusRule(min_kept_fraction=0.25))
    assert kept.source.tolist() == [0, 1]


def test_truth_overlaps_go_to_the_lower_class() -> None:
    rows = np.zeros((4, 10, 10), np.int32)
    rows[0, :5, :5] = 7  # class 1
    rows[1, 3:8, 3:8] = 8  # class 2, overlapping class 1 on 2×2 px
    lm = truth_label_map(Instances.from_label_rows(rows))
    assert lm.classes.tolist() == [1, 2]
    assert (lm.ids == 1).sum() == 25 and (lm.ids == 2).sum() == 21


def test_a_piece_cut_off_by_a_neighbour_goes_to_the_neighbour_it_touches_most() -> None:
    shape = (12, 12)
    low = box(shape, slice(2, 10), slice(0, 12))  # class 2, 0.5: cut in three by the bar
    bar = box(shape, slice(0, 12), slice(4, 6))  # class 3, 0.9: a vertical bar through it
    right = box(shape, slice(2, 10), slice(9, 12))  # class 4, 0.7: overlaps low's right part
    lm = label_map(instances(*shape, [(2, low, 0.5), (3, bar, 0.9), (4, right, 0.7)]), NucleusRule())
    assert lm.source.tolist() == [1, 2, 0]  # ranked: bar (id 1), right (id 2), low (id 3)
    # low keeps cols 0-3 (32 px) and loses cols 6-8 (24 px), which touch the bar along 8 edges and right
    # along 8: the tie goes to the higher-ranked bar
    assert (lm.ids == 3).sum() == 32 and lm.ids[:, :4][2:10].min() == 3
    assert (lm.ids[2:10, 6:9] == 1).all()
    assert all(n == 1 for n in _pieces(lm.ids).values())
    # without the rule, low is in two pieces
    assert (
        _pieces(
            label_map(
                lm_input := instances(*shape, [(2, low, 0.5), (3, bar, 0.9)]), NucleusRule(one_region=False)
            ).ids
        )[2]
        == 2
    )
    assert _pieces(label_map(lm_input, NucleusRule()).ids) == {1: 1, 2: 1}


def test_a_piece_touching_no_other_nucleus_becomes_background() -> None:
    shape = (10, 10)
    a = box(shape, slice(0, 10), slice(0, 10))  # class 1, 0.4
    a[:, 6] = False  # two pieces of its own (cols 0-5 and 7-9), touching nothing else
    lm = label_map(instances(*shape, [(1, a, 0.4)]), NucleusRule())
    assert (lm.ids == 1).sum() == 60 and (lm.ids[:, 7:] == 0).all()
    # the largest piece wins, and the kept fraction is not rechecked (60 of 90 px kept)
    assert len(label_map(instances(*shape, [(1, a, 0.4)]), NucleusRule(min_kept_fraction=0.9))) == 1


def test_truth_label_maps_keep_their_pieces() -> None:
    rows = np.zeros((4, 10, 10), np.int32)
    rows[1, :, :3] = 5
    rows[1, :, 7:] = 5  # one annotated nucleus in two pieces
    lm = truth_label_map(Instances.from_label_rows(rows))
    assert _pieces(lm.ids) == {1: 2}


@pytest.mark.skipif(
    not CONSEP_TRUTH.is_dir(), reason=f"real tiles not available at {CONSEP_TRUTH} (../shared)"
)
def test_no_nucleus_in_several_pieces_on_real_tiles() -> None:
    """Real consep-dev nuclei, jittered into predictions (shifted, grown or shrunk, random scores): higher-scored
    neighbours cut through lower ones (27 of 160 nuclei in several pieces without the rule); with the rule none
    is, under 4- or 8-connectivity, and no nucleus is lost."""
    rng = np.random.default_rng(0)
    before = after = after8 = total = 0
    for _, truth in _consep_tiles(8):
        pred = jitter(truth, rng)
        raw = label_map(pred, NucleusRule(0.0, 0.5, one_region=False))
        kept = label_map(pred, NucleusRule(0.0, 0.5))
        assert np.array_equal(raw.source, kept.source) and ((raw.ids > 0) == (kept.ids > 0)).sum() > 0
        before += sum(n > 1 for n in _pieces(raw.ids).values())
        after += sum(n > 1 for n in _pieces(kept.ids).values())
        after8 += sum(n > 1 for n in _pieces(kept.ids, 2).values())
        total += len(kept)
    print(f"multi-piece nuclei: {before}/{total} before, {after} after")
    assert total > 100 and before > 10 and after == 0 and after8 == 0


# --------------------------------------------------------------------------------- the rule's other forms
def test_nuclei_are_the_label_map_as_disjoint_instances() -> None:
    rng = np.random.default_rng(7)
    detections = random_discs(rng, 40)
    rule = NucleusRule(0.3, 0.5)
    lm = label_map(detections, rule)
    found = nuclei(detections, rule)
    assert len(found) == len(lm) > 5
    painted = np.zeros_like(lm.ids)
    for i, ((y0, x0), crop) in enumerate(zip(found.offsets, found.crops, strict=True), start=1):
        region = painted[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]
        assert not region[crop].any()  # disjoint
        region[crop] = i
    assert np.array_equal(painted, lm.ids)  # the same pixels, ids in rank order
    assert found.labels.tolist() == lm.classes.tolist()
    assert found.scores.tolist() == detections.scores[lm.source].tolist()
    assert np.all(np.diff(found.scores) <= 0)  # highest score first


def test_the_rule_of_the_params_never_keeps_what_the_detector_dropped() -> None:
    predict = tiny_params().predict
    assert NucleusRule.of(predict) == NucleusRule(predict.label_score_threshold, predict.min_kept_fraction)
    low_label = dataclasses.replace(predict, score_threshold=0.4, label_score_threshold=0.3)
    assert NucleusRule.of(low_label).score_threshold == 0.4
    per_class = dataclasses.replace(predict, score_threshold=0.2, class_score_thresholds=[0.1, 0.5, 0.6, 0.7])
    assert NucleusRule.of(per_class).score_threshold == (0.2, 0.5, 0.6, 0.7)
    assert NucleusRule.of(per_class).lowest_threshold == 0.2
    two = NucleusRule((0.1, 0.2))  # per class: one value per class of a two-class model
    third = Instances.from_label_rows(
        np.stack([np.zeros((4, 4), np.int32)] * 2 + [np.eye(4, dtype=np.int32)])
    )
    with pytest.raises(ValueError, match="class 3 has no score threshold: 2 per-class values"):
        two.candidates(third)
    with pytest.raises(ValueError, match="min_kept_fraction"):
        NucleusRule(0.5, 1.5)


def test_resolve_overlaps_is_the_contested_pixel_rule_alone() -> None:
    shape = (20, 20)
    low, high = box(shape, slice(2, 12), slice(2, 12)), box(shape, slice(6, 16), slice(6, 16))
    sliver = box(shape, slice(7, 9), slice(7, 9))  # inside `high`, lower score: nothing left
    inst = instances(*shape, [(1, low, 0.6), (2, high, 0.9), (3, sliver, 0.5)])
    resolved = resolve_overlaps(inst)
    assert resolved.labels.tolist() == [1, 2]  # the emptied one dropped, the others in their order
    assert resolved.crops[1].sum() == 100  # the best keeps all of its pixels
    assert resolved.crops[0].sum() == 100 - 36  # the other loses the shared 6×6
    ids = label_map(inst, NucleusRule(0.0, 0.0, one_region=False)).ids  # step 3 of the full rule
    assert (ids == 1).sum() == 100 and (ids == 2).sum() == 64


def test_context_margin_covers_three_extents() -> None:
    assert context_margin(40) == 121
