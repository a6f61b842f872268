"""Inference on any image size: box-local paste, tiling and seam merging, post-processing, batching.

Tiling is checked against an oracle detector: every cell of the test image is painted in a colour that encodes
its id, so the oracle "detects" exactly the cells (or parts of cells) visible in whatever image or tile it is
given, with the 28×28 mask probabilities a perfect Mask R-CNN would output. Whatever is lost, doubled or cut
at a seam is then the tiling's doing, not the model's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import expand_boxes, paste_masks_in_image

from cellseg.data.io import load_npz
from cellseg.infer.detect import paste_masks, postprocess
from cellseg.infer.predict import predict_image, predict_images
from cellseg.infer.tiling import tile_starts
from cellseg.instances import Instances
from cellseg.model.checkpoint import load_trained_model
from cellseg.rle import decode, encode_instances
from conftest import tiny_params

MASK = 28


# ------------------------------------------------------------------------------------------------ the oracle
def paint_cells(
    rng: np.random.Generator, size: tuple[int, int], n: int, radii: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """``(image, ids)``: ``n`` non-overlapping ellipses (they may touch), cell ``i`` painted as ``(i, 0, 255)``."""
    height, width = size
    yy, xx = np.mgrid[:height, :width]
    ids = np.zeros(size, np.int64)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < n:
        r = rng.uniform(*radii)
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)  # cells may be cut by the image border
        if any(np.hypot(cy - y, cx - x) < r + q for y, x, q in placed):
            continue
        stretch = rng.uniform(0.75, 1.0)
        cell = ((yy - cy) / r) ** 2 + ((xx - cx) / (r * stretch)) ** 2 <= 1.0
        if cell.sum() < 20:  # mostly outside the image
            continue
        placed.append((cy, cx, r))
        ids[cell] = len(placed)
    image = np.zeros((*size, 3), np.uint8)
    image[..., 0] = ids
    image[..., 2] = np.where(ids > 0, 255, 0)
    return image, ids


def ground_truth(ids: np.ndarray) -> Instances:
    """The painted cells as instances; cell ``i`` gets class ``i % 4 + 1``."""
    rows = np.stack([np.where((ids > 0) & (ids % 4 + 1 == k), ids, 0) for k in range(1, 5)])
    return Instances.from_label_rows(rows.astype(np.int32))


def oracle_mask_probs(mask: np.ndarray, box: torch.Tensor) -> np.ndarray:
    """28×28 probabilities that torchvision's paste turns back into ``mask``: each cell of the grid samples the
    pixel that the paste (box expanded by 30/28, bilinear resize) maps it onto."""
    x0, y0, x1, y1 = expand_boxes(box[None], (MASK + 2) / MASK).long()[0].tolist()
    grid = np.arange(MASK) + 1.5  # centres of the inner 28 cells of the padded 30-grid
    px = np.rint(x0 - 0.5 + grid * (x1 - x0 + 1) / (MASK + 2)).astype(int)
    py = np.rint(y0 - 0.5 + grid * (y1 - y0 + 1) / (MASK + 2)).astype(int)
    inside_x, inside_y = (px >= 0) & (px < mask.shape[1]), (py >= 0) & (py < mask.shape[0])
    probs = np.zeros((MASK, MASK), np.float32)
    probs[np.ix_(inside_y, inside_x)] = mask[np.ix_(py[inside_y], px[inside_x])]
    return probs


class Oracle:
    """``CellMaskRCNN.detect``'s interface; finds the painted cells visible in each image it is given."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def eval(self) -> Oracle:
        return self

    def detect(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        self.batches.append([tuple(im.shape[-2:]) for im in images])
        return [self._detect_one(im) for im in images]

    @staticmethod
    def _detect_one(image: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = (image * 255).round().long().numpy()
        ids = np.where(pixels[2] == 255, pixels[0], 0)
        boxes, labels, scores, probs = [], [], [], []
        for cell in np.unique(ids[ids > 0]):
            mask = ids == cell
            ys, xs = np.nonzero(mask)
            box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            boxes.append(box)
            labels.append(cell % 4 + 1)
            scores.append(0.5 + 0.4 * ((cell * 37) % 101) / 101)  # distinct, fixed per cell
            probs.append(oracle_mask_probs(mask, box))
        n = len(boxes)
        return {
            "boxes": torch.stack(boxes) if n else torch.zeros((0, 4)),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "mask_probs": torch.from_numpy(np.stack(probs)) if n else torch.zeros((0, MASK, MASK)),
        }


def mask_ious(a: Instances, b: Instances) -> np.ndarray:
    """``len(a) × len(b)`` mask IoU."""
    fa = a.full_masks().reshape(len(a), -1).astype(np.float32)
    fb = b.full_masks().reshape(len(b), -1).astype(np.float32)
    inter = fa @ fb.T
    return inter / np.maximum(fa.sum(1)[:, None] + fb.sum(1)[None, :] - inter, 1)


def recall(gt: Instances, pred: Instances, iou: float) -> float:
    return float((mask_ious(gt, pred).max(axis=1) >= iou).mean())


def full(height: int, width: int, offsets: np.ndarray, crops: list[np.ndarray]) -> np.ndarray:
    out = np.zeros((len(crops), height, width), bool)
    for i, ((y0, x0), crop) in enumerate(zip(offsets, crops, strict=True)):
        out[i, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return out


# ----------------------------------------------------------------------------------------------------- tiling
TILE, OVERLAP = 64, 24  # cells below are at most 17 px wide: whole in some tile, as the overlap requires


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(256, 64, 24), (64, 64, 8), (65, 64, 8), (1000, 512, 64)]
)
def test_tiles_cover_the_image_with_the_overlap(length: int, tile: int, overlap: int) -> None:
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_oracle_reproduces_cells_untiled() -> None:
    image, ids = paint_cells(np.random.default_rng(1), (90, 110), 12, (5, 8))
    params = tiny_params(predict__tile_size=1024, predict__tile_overlap=24)
    pred = predict_image(Oracle(), image, params.predict)
    assert mask_ious(ground_truth(ids), pred).max(axis=1).min() > 0.99


def test_tiled_prediction_keeps_every_cell_once_with_its_full_mask() -> None:
    """An image 4× the tile size: every cell, including those straddling seams, appears exactly once."""
    size = 4 * TILE
    image, ids = paint_cells(np.random.default_rng(0), (size, size), 120, (5, 8.5))
    gt = ground_truth(ids)
    edges = {e for s in tile_starts(size, TILE, OVERLAP) for e in (s, s + TILE)} - {0, size}
    boxes = gt.boxes_xyxy()
    straddling = [any(b[0] < e < b[2] or b[1] < e < b[3] for e in edges) for b in boxes]
    assert sum(straddling) > 40  # the test means something: many cells cross a tile edge

    oracle = Oracle()
    params = tiny_params(predict__tile_size=TILE, predict__tile_overlap=OVERLAP, predict__max_per_image=1000)
    tiled = predict_image(oracle, image, params.predict)
    assert len(oracle.batches) > 1 and max(len(b) for b in oracle.batches) == params.predict.batch_size
    assert {s for b in oracle.batches for s in b} == {(TILE, TILE)}

    iou = mask_ious(gt, tiled)
    matches = (iou >= 0.9).sum(axis=1)
    assert (matches == 1).all(), f"cells found {sorted(set(matches))} times"
    assert len(tiled) == len(gt)  # nothing doubled or made up
    assert (tiled.labels[iou.argmax(axis=1)] == gt.labels).all()

    untiled = predict_image(Oracle(), image, dataclasses.replace(params.predict, tile_size=4096))
    assert recall(gt, tiled, 0.5) >= recall(gt, untiled, 0.5)
    assert recall(gt, tiled, 0.9) >= recall(gt, untiled, 0.9)


def test_predict_images_batches_equal_sizes_and_keeps_order() -> None:
    rng = np.random.default_rng(2)
    shapes = [(40, 50), (40, 50), (40, 50), (30, 30), (150, 140), (40, 50)]
    images = [paint_cells(rng, s, 3, (4, 6))[0] for s in shapes]
    params = tiny_params(predict__tile_size=64, predict__tile_overlap=24).predict
    oracle = Oracle()
    batched = list(predict_images(oracle, images, params))
    assert oracle.batches[0] == [(40, 50)] * 3 and oracle.batches[1] == [(30, 30)]
    for image, got in zip(images, batched, strict=True):
        alone = predict_image(Oracle(), image, params)
        assert (got.height, got.width) == image.shape[:2]
        np.testing.assert_array_equal(got.scores, alone.scores)
        np.testing.assert_array_equal(got.offsets, alone.offsets)


# ------------------------------------------------------------------------------------------------------ paste
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_paste_masks_matches_torchvision(threshold: float) -> None:
    """Same pixels as ``paste_masks_in_image(...) > threshold``, boxes partly outside the image included.

    (torchvision fails on a box wholly outside; the model's boxes are clipped to the image.)"""
    gen = torch.Generator().manual_seed(0)
    height, width, n = 50, 70, 80
    corner = torch.rand(n, 2, generator=gen) * torch.tensor([width + 14.0, height + 14.0]) - 15
    boxes = torch.cat([corner, corner + torch.rand(n, 2, generator=gen) * 35 + 0.2], dim=1)
    boxes = boxes[(boxes[:, 2] > 0) & (boxes[:, 3] > 0)]  # each box overlaps the image
    boxes[:2] = torch.tensor([[width - 3.0, 3, width + 20, 9], [0.2, 0.3, 0.9, 0.8]])
    n = len(boxes)
    probs = torch.rand(n, MASK, MASK, generator=gen)
    reference = paste_masks_in_image(probs[:, None], boxes, (height, width), padding=1)[:, 0] > threshold
    offsets, crops = paste_masks(probs, boxes, height, width, threshold)
    np.testing.assert_array_equal(full(height, width, offsets, crops), reference.numpy())


# -------------------------------------------------------------------------------------------- post-processing
def _squares(scores: list[float]) -> Instances:
    """Overlapping 10×10 squares shifted by 4 px, one per score."""
    n = len(scores)
    return Instances(
        40,
        60,
        labels=np.arange(n, dtype=np.int64) % 4 + 1,
        scores=np.asarray(scores, np.float32),
        offsets=np.asarray([(4 * i % 30, 4 * i) for i in range(n)], np.int64).reshape(n, 2),
        crops=[np.ones((10, 10), bool) for _ in range(n)],
    )


def _predict_params(**changes):
    return dataclasses.replace(tiny_params().predict, **changes)


def test_postprocess_score_threshold_and_cap() -> None:
    inst = _squares([0.3, 0.9, 0.04, 0.6, 0.8, 0.1])
    kept = postprocess(inst, _predict_params(score_threshold=0.2, max_per_image=3, resolve_overlaps=False))
    np.testing.assert_allclose(kept.scores, [0.9, 0.8, 0.6])
    kept = postprocess(inst, _predict_params(score_threshold=0.05, max_per_image=100, resolve_overlaps=False))
    np.testing.assert_allclose(kept.scores, [0.9, 0.8, 0.6, 0.3, 0.1])


def test_resolve_overlaps_gives_each_pixel_to_the_best_instance() -> None:
    inst = _squares([0.3, 0.9, 0.5, 0.7, 0.2, 0.95, 0.4])
    inst.crops[6] = np.zeros((10, 10), bool)
    inst.crops[6][4:6, 4:6] = True  # lies wholly under higher-scoring neighbours: vanishes
    inst.offsets[6] = inst.offsets[5]
    resolved = postprocess(inst, _predict_params(score_threshold=0.05, resolve_overlaps=True))
    before, after = inst.full_masks(), resolved.full_masks()
    assert after.sum(axis=0).max() == 1  # each pixel in at most one instance
    np.testing.assert_array_equal(after.any(axis=0), before.any(axis=0))  # no pixel lost
    best = np.where(before, inst.scores[:, None, None], -1).max(axis=0)
    owner = np.where(after, resolved.scores[:, None, None], -1).max(axis=0)
    np.testing.assert_array_equal(owner, best)
    assert 0.4 not in resolved.scores.round(2)


# ----------------------------------------------------------------------------------------- the real model
def _eager(model):
    """The trained model with every score threshold at 0: it is then known to detect (each RPN proposal gives
    a box of some class with a softmax score above 0), so the checks below always have detections to check."""
    model.roi_heads.score_thresh = 0.0
    return model


@pytest.fixture(scope="module")
def tiny_model(tiny_project):
    model, _ = load_trained_model(tiny_project["models"] / "best.pt", torch.device("cpu"))
    return _eager(model)


def _eager_params(tiny_project):
    return dataclasses.replace(tiny_project["params"].predict, score_threshold=0.0)


def _check_resolution(inst: Instances, height: int, width: int) -> None:
    assert (inst.height, inst.width) == (height, width)
    assert len(inst) > 0, "the eager model detects in every image"
    for (y0, x0), crop in zip(inst.offsets, inst.crops, strict=True):
        assert 0 <= y0 and y0 + crop.shape[0] <= height and 0 <= x0 and x0 + crop.shape[1] <= width
    rles = encode_instances(inst)
    assert len(rles) == len(inst)
    for rle in rles:
        assert decode(rle).shape == (height, width)


def test_real_model_tiled_prediction_at_original_resolution(tiny_model, tiny_project) -> None:
    sample = load_npz(next((tiny_project["prepared"] / "train").glob("*.npz")))["image"]
    image = np.tile(sample, (3, 3, 1))[:300, :260]
    params = _eager_params(tiny_project)
    assert max(image.shape[:2]) > params.tile_size
    inst = predict_image(tiny_model, image, params)
    _check_resolution(inst, 300, 260)
    boxes = inst.boxes_xyxy()  # the last tiles detect too: boxes beyond the first tile, in both directions
    assert (boxes[:, 0] >= 260 - params.tile_size).any() and (boxes[:, 1] >= 300 - params.tile_size).any()


def test_real_model_tiny_image(tiny_model, tiny_project) -> None:
    image = np.random.default_rng(0).integers(0, 256, (33, 35, 3), dtype=np.uint8)
    _check_resolution(predict_image(tiny_model, image, _eager_params(tiny_project)), 33, 35)


def test_a_tiny_first_image_does_not_spoil_later_detections(tiny_project) -> None:
    """torchvision's RoI pooler guesses its level scales from the first batch it sees; a 33-px image would
    make it guess wrong for good (see ``model.set_roi_scales``)."""
    checkpoint, params = tiny_project["models"] / "best.pt", _eager_params(tiny_project)
    image = load_npz(next((tiny_project["prepared"] / "train").glob("*.npz")))["image"][:96, :96]
    tiny = np.random.default_rng(0).integers(0, 256, (33, 35, 3), dtype=np.uint8)
    fresh, _ = load_trained_model(checkpoint, torch.device("cpu"))
    expected = predict_image(_eager(fresh), image, params)
    primed, _ = load_trained_model(checkpoint, torch.device("cpu"))
    predict_image(_eager(primed), tiny, params)
    got = predict_image(primed, image, params)
    assert len(expected) >= 10  # something to compare
    np.testing.assert_array_equal(got.scores, expected.scores)
    np.testing.assert_array_equal(got.labels, expected.labels)
    np.testing.assert_array_equal(got.offsets, expected.offsets)
