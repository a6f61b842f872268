"""Map-guided post-processing on constructed maps with a known answer, map stitching and the maps' way out."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellseg import DEFAULT_CLASSES
from cellseg.data.maps import compute_maps
from cellseg.eval.plots import save_map_comparison
from cellseg.infer.folder import predict_folder
from cellseg.infer.postproc import find_peaks, refine
from cellseg.infer.predict import predict_image_maps
from cellseg.infer.prob_maps import ProbMaps, stitch_maps
from cellseg.instances import Instances
from cellseg.params import ParamsError
from conftest import disk_labels, tiny_params

SHAPE = (64, 96)
LEFT, RIGHT, FAR = (32, 30), (32, 50), (30, 78)  # LEFT and RIGHT touch (radius 10, 20 px apart)
RADIUS = 10


def _params(**steps):
    """postproc params of the repo's params.yaml with the given steps switched (all others off)."""
    base = tiny_params().postproc
    return dataclasses.replace(
        base, **{"split": False, "trim": False, "recover": False, "rescore": False, **steps}
    )


def _disc(centre: tuple[int, int]) -> np.ndarray:
    return disk_labels(SHAPE, [centre], RADIUS, first_id=1) > 0


def _truth_maps(centres: list[tuple[int, int]]) -> ProbMaps:
    """The training targets of discs at ``centres`` (class1, one id each) used as perfect predicted maps."""
    rows = np.zeros((4, *SHAPE), np.int32)
    rows[0] = disk_labels(SHAPE, centres, RADIUS, first_id=1).astype(np.int32)
    center, boundary = compute_maps(rows, sigma=5.0)
    return ProbMaps(center, boundary.astype(np.float32))


def _instances(masks: list[np.ndarray], labels: list[int], scores: list[float]) -> Instances:
    offsets, crops = [], []
    for mask in masks:
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        offsets.append((rows[0], cols[0]))
        crops.append(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    return Instances(
        *SHAPE,
        labels=np.asarray(labels, np.int64),
        scores=np.asarray(scores, np.float32),
        offsets=np.asarray(offsets, np.int64).reshape(-1, 2),
        crops=crops,
    )


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _best_ious(inst: Instances, truths: list[np.ndarray]) -> list[float]:
    masks = inst.full_masks()
    return [max(_iou(m, t) for m in masks) for t in truths]


# ----------------------------------------------------------------------------------------------------- split
def test_two_touching_discs_with_two_centre_peaks_are_split_into_two() -> None:
    maps = _truth_maps([LEFT, RIGHT])
    assert len(find_peaks(maps.center, 0.5, 3)) == 2
    merged = _instances([_disc(LEFT) | _disc(RIGHT)], [3], [0.8])
    out = refine(merged, maps, _params(split=True))
    assert len(out) == 2
    assert list(out.labels) == [3, 3] and np.allclose(out.scores, 0.8)
    assert min(_best_ious(out, [_disc(LEFT), _disc(RIGHT)])) > 0.9
    assert not (out.full_masks()[0] & out.full_masks()[1]).any()


def test_a_mask_with_one_peak_is_not_split() -> None:
    maps = _truth_maps([LEFT, RIGHT])
    single = _instances([_disc(LEFT)], [1], [0.8])
    out = refine(single, maps, _params(split=True))
    assert len(out) == 1 and np.array_equal(out.full_masks()[0], _disc(LEFT))


def test_a_split_part_below_min_area_keeps_the_mask_whole() -> None:
    maps = _truth_maps([LEFT, RIGHT])
    merged = _instances([_disc(LEFT) | _disc(RIGHT)], [1], [0.8])
    out = refine(merged, maps, dataclasses.replace(_params(split=True), min_area=400))  # a disc is ~317 px
    assert len(out) == 1


# --------------------------------------------------------------------------------------------------- recover
def test_a_strong_peak_without_a_detection_is_recovered() -> None:
    maps = _truth_maps([LEFT, RIGHT, FAR])
    found = _instances([_disc(LEFT), _disc(RIGHT)], [4, 4], [0.9, 0.8])
    out = refine(found, maps, _params(recover=True))
    assert len(out) == 3
    new = out.select([2])
    assert _iou(new.full_masks()[0], _disc(FAR)) > 0.9
    assert new.labels[0] == 4  # the vote of its neighbours
    params = _params(recover=True)
    evidence = min(1.0, maps.center[FAR] / params.peak_threshold)  # a clear peak is full evidence
    assert new.scores[0] == pytest.approx(params.recover_score * evidence, abs=1e-6)
    assert np.array_equal(out.full_masks()[:2], found.full_masks())  # the detections are untouched


def test_recovery_without_detections_uses_the_fallback_class() -> None:
    maps = _truth_maps([FAR])
    out = refine(_instances([], [], []), maps, _params(recover=True))
    assert len(out) == 1 and out.labels[0] == _params().recover_class


def test_a_covered_or_weak_peak_is_not_recovered() -> None:
    maps = _truth_maps([LEFT, RIGHT, FAR])
    found = _instances([_disc(LEFT), _disc(RIGHT), _disc(FAR)], [1, 1, 1], [0.9, 0.8, 0.7])
    assert len(refine(found, maps, _params(recover=True))) == 3
    weak = ProbMaps(maps.center * 0.6, maps.boundary)  # peaks 0.6: centres (> 0.5), but below 0.7
    strict = _params(recover=True, recover_threshold=0.7)
    assert len(refine(found.select([0, 1]), weak, strict)) == 2
    assert len(refine(found.select([0, 1]), weak, _params(recover=True))) == 3  # ratio 1: every peak counts


# --------------------------------------------------------------------------------------------------- rescore
def test_rescoring_raises_a_detection_on_a_centre_and_lowers_one_without() -> None:
    maps = _truth_maps([LEFT])
    empty_area = _disc((32, 80))  # no cell there: the centre map is ~0
    found = _instances([_disc(LEFT), empty_area], [1, 1], [0.5, 0.5])
    out = refine(found, maps, _params(rescore=True))
    w = _params().rescore_weight
    assert out.scores[0] > 0.5 and out.scores[1] < 0.5
    evidence = min(1.0, maps.center[_disc(LEFT)].max() / _params().peak_threshold)
    assert out.scores[0] == pytest.approx((1 - w) * 0.5 + w * evidence, abs=1e-6)


def test_centre_evidence_follows_the_peak_threshold_not_the_raw_probability() -> None:
    """A trained head's centre probabilities sit far below 1; with a peak threshold tuned to them, a clear
    peak still counts fully, and half the threshold counts half."""
    maps = _truth_maps([LEFT])
    weak = ProbMaps(maps.center * 0.25, maps.boundary)  # peak 0.25, as a briefly trained head gives
    found = _instances([_disc(LEFT)], [1], [0.5])
    w = _params().rescore_weight
    full = refine(found, weak, _params(rescore=True, peak_threshold=0.2))
    assert full.scores[0] == pytest.approx((1 - w) * 0.5 + w * 1.0, abs=1e-6)
    half = refine(found, weak, _params(rescore=True, peak_threshold=0.5))
    assert half.scores[0] == pytest.approx((1 - w) * 0.5 + w * 0.5, abs=1e-3)


# ------------------------------------------------------------------------------------------------------ trim
def test_trimming_gives_boundary_pixels_to_the_nearer_centre() -> None:
    maps = _truth_maps([LEFT, RIGHT])
    left, right = _disc(LEFT), _disc(RIGHT)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    bleeding = left | (right & (xx <= 43))  # LEFT's mask runs 3 px into RIGHT
    found = _instances([bleeding, right], [1, 2], [0.9, 0.8])
    on_right_boundary = right & (maps.boundary > 0.5)
    assert (bleeding & on_right_boundary).sum() > 0
    out = refine(found, maps, _params(trim=True))
    assert len(out) == 2
    trimmed = out.full_masks()
    assert not (trimmed[0] & on_right_boundary).any()
    assert _iou(trimmed[0], left) > _iou(bleeding, left)
    assert np.array_equal(trimmed[1], right)  # its own pixels stay (the moved ones were already in it)
    assert list(out.labels) == [1, 2]


# ----------------------------------------------------------------------------------------------- no-op cases
def _some_detections() -> Instances:
    return _instances([_disc(LEFT) | _disc(RIGHT), _disc(FAR)], [1, 2], [0.7, 0.4])


def test_empty_maps_change_nothing() -> None:
    found = _some_detections()
    zeros = ProbMaps(np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.float32))
    out = refine(found, zeros, _params(split=True, trim=True, recover=True))
    assert np.array_equal(out.full_masks(), found.full_masks())
    assert np.array_equal(out.labels, found.labels) and np.array_equal(out.scores, found.scores)


def test_without_maps_or_steps_refine_is_a_no_op() -> None:
    found = _some_detections()
    assert refine(found, None, _params(split=True, trim=True, recover=True, rescore=True)) is found
    assert refine(found, _truth_maps([LEFT, RIGHT]), _params()) is found


def test_maps_of_another_size_are_refused() -> None:
    with pytest.raises(ValueError, match="maps of shape"):
        refine(
            _some_detections(),
            _truth_maps([LEFT]).__class__(np.zeros((5, 5)), np.zeros((5, 5))),
            _params(rescore=True),
        )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("postproc.peak_threshold", 1.5),
        ("postproc.recover_class", 0),
        ("postproc.recover_class", 5),  # `classes` has four names
        ("postproc.rescore_weight", -0.1),
    ],
)
def test_bad_postproc_params_name_the_key(key: str, value: object) -> None:
    with pytest.raises(ParamsError, match=key):
        tiny_params(**{key.replace(".", "__"): value})


# -------------------------------------------------------------------------------------------------- stitching
def test_stitching_averages_overlaps() -> None:
    a = ProbMaps(np.full((4, 6), 0.2, np.float32), np.full((4, 6), 0.4, np.float32))
    b = ProbMaps(np.full((4, 6), 0.6, np.float32), np.zeros((4, 6), np.float32))
    mean = stitch_maps([(a, 0, 0), (b, 0, 4)], 5, 10)
    assert mean.center[0, 0] == pytest.approx(0.2) and mean.center[0, 9] == pytest.approx(0.6)
    assert mean.center[0, 4] == pytest.approx(0.4) and mean.boundary[0, 5] == pytest.approx(0.2)
    assert mean.center[4, 0] == 0.0  # row 4 is in no tile


class MapEcho:
    """``detect`` stand-in: no detections; its centre map is the green channel, its boundary map the blue."""

    has_aux = True

    def eval(self) -> MapEcho:
        return self

    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [
            {
                "boxes": torch.zeros((0, 4)),
                "labels": torch.zeros(0, dtype=torch.int64),
                "scores": torch.zeros(0),
                "mask_probs": torch.zeros((0, 28, 28)),
                "center": im[1].clone(),
                "boundary": im[2].clone(),
            }
            for im in images
        ]


def _echo_image(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("size", [(60, 50), (150, 130)], ids=["untiled", "tiled"])
def test_predicted_maps_sit_on_the_input_pixels_tiled_or_not(size: tuple[int, int]) -> None:
    params = tiny_params(predict__tile_size=64, predict__tile_overlap=16).predict
    image = _echo_image(*size)
    _, maps = predict_image_maps(MapEcho(), image, params)
    assert maps.shape == size
    np.testing.assert_allclose(maps.center, image[..., 1] / 255.0, atol=1e-6)
    np.testing.assert_allclose(maps.boundary, image[..., 2] / 255.0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_predict_folder_writes_the_maps_beside_the_labels(tmp_path: Path, fmt: str) -> None:
    (tmp_path / "in").mkdir()
    image = _echo_image(40, 50)
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    predict_folder(
        MapEcho(),
        tmp_path / "in",
        tmp_path / "out",
        tiny_params().predict,
        torch.device("cpu"),
        None,
        fmt,
        class_names=DEFAULT_CLASSES,
    )
    folder = tmp_path / "out" / "a"
    if fmt == "png":
        assert sorted(p.name for p in folder.iterdir()) == ["boundary.png", "center.png"]
        assert np.array_equal(np.asarray(Image.open(folder / "center.png")), image[..., 1])
    else:
        assert sorted(p.name for p in folder.iterdir()) == ["maps.npz"]
        with np.load(folder / "maps.npz") as arrays:
            np.testing.assert_allclose(arrays["boundary"], image[..., 2] / 255.0, atol=1e-6)


def test_writing_maps_needs_a_model_with_heads(tmp_path: Path) -> None:
    from cellseg import CellsegError

    class Plain(MapEcho):
        has_aux = False

    (tmp_path / "in").mkdir()
    Image.fromarray(_echo_image(20, 20)).save(tmp_path / "in" / "a.png")
    with pytest.raises(CellsegError, match="auxiliary heads"):
        predict_folder(
            Plain(),
            tmp_path / "in",
            tmp_path / "out",
            tiny_params().predict,
            torch.device("cpu"),
            None,
            "png",
            class_names=DEFAULT_CLASSES,
        )


def test_map_comparison_picture(tmp_path: Path) -> None:
    maps = _truth_maps([LEFT, RIGHT])
    image = np.zeros((*SHAPE, 3), np.uint8)
    save_map_comparison(
        tmp_path / "m.png", image, (maps.center, maps.boundary), (maps.center, maps.boundary), "t"
    )
    assert Image.open(tmp_path / "m.png").size[0] > 100
    with pytest.raises(ValueError, match="shape"):
        save_map_comparison(
            tmp_path / "n.png", image, (maps.center[:5], maps.boundary), (maps.center, maps.boundary), "t"
        )
