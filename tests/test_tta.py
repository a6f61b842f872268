"""Flip test-time augmentation: exact un-flipping, merging of the views, seam safety with tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellseg.infer.tta import merge_views
from conftest import tiny_params
from test_predict import Oracle, ground_truth, mask_ious, paint_cells, predict_image

TILE, OVERLAP = 64, 24


def _dets(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict[str, torch.Tensor]:
    n = len(boxes)
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "mask_probs": torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 28, 28).clone(),
    }


def test_merge_keeps_one_detection_per_nucleus_scored_by_agreement() -> None:
    a = _dets([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.6], [2, 3])
    b = _dets([[1, 0, 10, 11], [20, 20, 30, 30]], [0.7, 0.8], [1, 2])  # first: same nucleus, other class
    merged = merge_views([a, b])
    # nucleus 1: both views (0.9, 0.7) -> 0.8, led by view a (class 2); the others: one view each -> halved
    assert merged["scores"].tolist() == pytest.approx([0.8, 0.4, 0.3])
    assert merged["labels"].tolist() == [2, 2, 3]
    assert merged["boxes"][0].tolist() == [0, 0, 10, 10]
    assert merged["mask_probs"].shape == (3, 28, 28)


def test_merge_of_empty_views_is_empty() -> None:
    merged = merge_views([_dets([], [], []), _dets([], [], [])])
    assert merged["boxes"].shape == (0, 4) and merged["mask_probs"].shape == (0, 28, 28)


@pytest.mark.parametrize("views", [2, 4])
def test_flip_views_give_the_same_cells_and_stay_seam_safe(views: int) -> None:
    """The oracle finds every cell in every flipped view: un-flipped and merged, each cell appears exactly
    once with the untransformed mask and score, also across tile seams."""
    size = 3 * TILE
    image, ids = paint_cells(np.random.default_rng(3), (size, size + 20), 70, (5, 8.5))
    gt = ground_truth(ids)
    base = tiny_params(predict__tile_size=TILE, predict__tile_overlap=OVERLAP, predict__max_per_image=1000)
    plain = predict_image(Oracle(), image, base.predict)
    flipped = predict_image(
        Oracle(),
        image,
        tiny_params(
            predict__tile_size=TILE,
            predict__tile_overlap=OVERLAP,
            predict__max_per_image=1000,
            predict__tta_views=views,
        ).predict,
    )
    iou = mask_ious(gt, flipped)
    assert len(flipped) == len(gt) == len(plain)
    assert ((iou >= 0.9).sum(axis=1) == 1).all()
    np.testing.assert_allclose(np.sort(flipped.scores), np.sort(plain.scores), rtol=1e-6)
