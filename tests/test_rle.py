"""COCO RLE from box-local crops must be byte-identical to pycocotools' encoding of the full mask."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from cellseg.instances import Instances
from cellseg.rle import decode, encode_instances, encode_mask, to_coco_ground_truth, to_coco_results


def _instances(height: int, width: int, crops: list[np.ndarray], offsets: list[tuple[int, int]]) -> Instances:
    n = len(crops)
    return Instances(
        height,
        width,
        labels=(np.arange(n) % 4 + 1).astype(np.int64),
        scores=np.linspace(0.9, 0.1, n).astype(np.float32),
        offsets=np.asarray(offsets, np.int64).reshape(n, 2),
        crops=[np.asarray(c, bool) for c in crops],
    )


def _reference(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def _assert_identical(inst: Instances) -> None:
    for rle, full in zip(encode_instances(inst), inst.full_masks(), strict=True):
        assert rle == _reference(full)
        assert isinstance(rle["counts"], str)


H, W = 7, 9
RING = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], bool)
GAPPED = np.array([[1, 0, 0, 1], [0, 0, 0, 0], [1, 0, 0, 1]], bool)  # empty inner row and columns


@pytest.mark.parametrize(
    ("crop", "offset"),
    [
        (RING, (0, 0)),  # top-left corner
        (RING, (H - 3, W - 3)),  # bottom-right corner: a run ends on the last pixel
        (RING, (0, W - 3)),
        (RING, (H - 3, 0)),
        (GAPPED, (2, 3)),
        (np.zeros((3, 4), bool), (1, 1)),  # empty mask: one background run
        (np.ones((1, 1), bool), (0, 0)),  # first pixel: the counts start with a zero-length background run
        (np.ones((1, 1), bool), (H - 1, W - 1)),  # last pixel
        (np.ones((1, 1), bool), (3, 4)),
        (np.ones((H, W), bool), (0, 0)),  # full image: one run across every column
        (np.ones((H, 3), bool), (0, 2)),  # full-height columns: runs join across column boundaries
        (np.array([[1], [0]] * 3 + [[1]], bool), (0, 5)),  # full height, alternating
    ],
)
def test_crop_encoding_matches_pycocotools(crop: np.ndarray, offset: tuple[int, int]) -> None:
    _assert_identical(_instances(H, W, [crop], [offset]))


@st.composite
def _placed_crops(draw: st.DrawFn) -> Instances:
    height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    crops, offsets = [], []
    for _ in range(draw(st.integers(1, 3))):
        h, w = draw(st.integers(1, height)), draw(st.integers(1, width))
        crops.append(draw(hnp.arrays(bool, (h, w))))
        offsets.append((draw(st.integers(0, height - h)), draw(st.integers(0, width - w))))
    return _instances(height, width, crops, offsets)


@settings(max_examples=300, deadline=None)
@given(_placed_crops())
def test_crop_encoding_matches_pycocotools_property(inst: Instances) -> None:
    _assert_identical(inst)


def test_crop_outside_image_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_instances(_instances(H, W, [RING], [(H - 2, 0)]))


def test_encode_mask_and_decode_round_trip() -> None:
    mask = np.random.default_rng(0).random((13, 17)) < 0.4  # C-ordered bool: encode_mask must convert it
    rle = encode_mask(mask)
    assert rle == _reference(mask)
    assert np.array_equal(decode(rle), mask)
    assert decode(rle).dtype == bool
    assert np.array_equal(decode({**rle, "counts": rle["counts"].encode()}), mask)  # bytes counts too


def _scene() -> Instances:
    crops = [RING, GAPPED, np.ones((2, 2), bool)]
    return _instances(H, W, crops, [(0, 0), (4, 5), (5, 0)])


def test_results_rows_are_coco_and_json() -> None:
    inst = _scene()
    rows = json.loads(json.dumps(to_coco_results(inst, image_id=7)))  # survives JSON unchanged
    assert rows == to_coco_results(inst, image_id=7)
    assert [r["category_id"] for r in rows] == [1, 2, 3]
    assert [r["score"] for r in rows] == pytest.approx([0.9, 0.5, 0.1])
    assert {r["image_id"] for r in rows} == {7}
    # [x, y, width, height] of the mask itself: GAPPED at (4, 5) spans 4 columns and 3 rows
    assert rows[1]["bbox"] == [5.0, 4.0, 4.0, 3.0]
    for row in rows:
        assert row["bbox"] == mask_utils.toBbox(row["segmentation"]).tolist()


def test_results_load_against_ground_truth() -> None:
    inst = _scene()
    names = ("tumour", "lymphocyte", "stroma", "other", "necrosis")
    gt = to_coco_ground_truth([(3, "a.tif", inst), (4, "b.tif", Instances(5, 6))], names)
    assert json.loads(json.dumps(gt)) == gt
    assert [a["id"] for a in gt["annotations"]] == [1, 2, 3]  # COCOeval treats id 0 as "unmatched"
    assert [a["area"] for a in gt["annotations"]] == [8, 4, 4]
    assert gt["images"][1] == {"id": 4, "file_name": "b.tif", "height": 5, "width": 6}
    assert gt["categories"] == [{"id": k, "name": name} for k, name in enumerate(names, start=1)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        results = coco.loadRes(to_coco_results(inst, image_id=3))
    for ann in results.dataset["annotations"]:
        assert np.array_equal(coco.annToMask(ann), coco.annToMask(coco.anns[ann["id"]]))


def test_no_instances_give_no_rows() -> None:
    assert encode_instances(Instances(4, 5)) == []
    assert to_coco_results(Instances(4, 5), image_id=1) == []
