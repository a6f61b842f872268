"""COCO run-length encoding of instance masks, and COCO results / ground-truth documents.

A COCO RLE runs over the image in column-major (Fortran) order, alternating background and foreground runs and
starting with background. :func:`encode_instances` computes those runs from each instance's box-local crop and
its offset, so encoding a dense 2500×2000 image never allocates a full-image mask per instance; pycocotools
only compresses the counts. The result is byte-identical to ``pycocotools.mask.encode`` of the full mask.

``counts`` is returned as ``str`` (pycocotools gives ``bytes``), so every document here is JSON-serialisable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

from cellseg.instances import Instances


def _str_counts(rle: dict) -> dict:
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def crop_counts(crop: np.ndarray, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """Uncompressed COCO counts of ``crop`` placed at ``(y0, x0)`` in a ``height × width`` image.

    Each crop column is padded with background above and below; a change between neighbours is a run boundary
    at linear position ``(x0 + j) * height + y0 + k``. A run that ends at the bottom of one column and goes on
    at the top of the next one (a crop spanning the full height) gives the same position twice, which cancels.
    """
    h, w = crop.shape
    if y0 < 0 or x0 < 0 or y0 + h > height or x0 + w > width:
        raise ValueError(f"crop {h}x{w} at ({y0}, {x0}) exceeds the {height}x{width} image")
    padded = np.zeros((w, h + 2), bool)
    padded[:, 1:-1] = crop.T
    cols, ks = np.nonzero(padded[:, 1:] != padded[:, :-1])
    positions = (x0 + cols) * height + y0 + ks
    repeated = np.flatnonzero(positions[1:] == positions[:-1])
    positions = np.delete(positions, np.concatenate([repeated, repeated + 1]))
    total = height * width
    positions = positions[positions < total]  # a run reaching the last pixel has no closing boundary
    return np.diff(positions, prepend=0, append=total)


def encode_instances(inst: Instances) -> list[dict]:
    """Compressed RLE ``{"size": [h, w], "counts": str}`` of every instance, at full image size."""
    rles = []
    for crop, (y0, x0) in zip(inst.crops, inst.offsets, strict=True):
        counts = crop_counts(np.asarray(crop, bool), int(y0), int(x0), inst.height, inst.width)
        uncompressed = {"size": [inst.height, inst.width], "counts": counts.tolist()}
        rles.append(_str_counts(mask_utils.frPyObjects(uncompressed, inst.height, inst.width)))
    return rles


def encode_mask(mask: np.ndarray) -> dict:
    """Compressed RLE of one full ``H×W`` mask (pycocotools needs Fortran-ordered uint8)."""
    if mask.ndim != 2:
        raise ValueError(f"expected an H×W mask, got shape {mask.shape}")
    return _str_counts(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8))))


def decode(rle: dict) -> np.ndarray:
    """The ``H×W`` boolean mask of a compressed RLE (``counts`` as str or bytes)."""
    return mask_utils.decode(rle).astype(bool)


def _xywh(inst: Instances) -> list[list[float]]:
    """COCO boxes ``[x, y, width, height]`` (not ``[x1, y1, x2, y2]``), tight around each mask."""
    boxes = inst.boxes_xyxy().astype(np.float64)
    boxes[:, 2:] -= boxes[:, :2]
    return boxes.tolist()


def to_coco_results(inst: Instances, image_id: int) -> list[dict]:
    """COCO results rows of one image's predictions, as the leaderboard expects them."""
    rles, boxes = encode_instances(inst), _xywh(inst)
    return [
        {
            "image_id": int(image_id),
            "category_id": int(label),
            "segmentation": rle,
            "score": float(score),
            "bbox": box,
        }
        for label, score, rle, box in zip(inst.labels, inst.scores, rles, boxes, strict=True)
    ]


def to_coco_ground_truth(images: list[tuple[int, str, Instances]], class_names: Sequence[str]) -> dict:
    """A COCO ground-truth dataset of ``(image_id, file_name, instances)``, to score results with COCOeval;
    its categories are ``class_names`` (category ``k`` is ``class_names[k - 1]``).

    Annotation ids start at 1: COCOeval marks "unmatched" with id 0, so an annotation with id 0 is never matched.
    """
    dataset = {
        "images": [],
        "annotations": [],
        "categories": [{"id": k, "name": name} for k, name in enumerate(class_names, start=1)],
    }
    for image_id, file_name, inst in images:
        dataset["images"].append(
            {"id": int(image_id), "file_name": file_name, "height": inst.height, "width": inst.width}
        )
        for label, rle, box, area in zip(
            inst.labels, encode_instances(inst), _xywh(inst), inst.areas(), strict=True
        ):
            dataset["annotations"].append(
                {
                    "id": len(dataset["annotations"]) + 1,
                    "image_id": int(image_id),
                    "category_id": int(label),
                    "segmentation": rle,
                    "area": int(area),
                    "bbox": box,
                    "iscrowd": 0,
                }
            )
    return dataset
