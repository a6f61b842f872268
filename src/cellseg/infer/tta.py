"""Flip test-time augmentation: detect on flipped copies of an image and merge the views' detections.

Nuclei have no preferred orientation, so a flipped image is as valid an input as the original, and a nucleus
that the model finds in every view is more likely real than one it finds in a single view. Each view's
detections are flipped back (boxes and their box-local 28×28 mask probabilities flip exactly), then merged:

- detections of different views overlapping at box IoU > :data:`MERGE_IOU` are one nucleus, whatever their
  classes; the highest-scoring one leads and keeps its box, class and mask;
- its score becomes the mean over the views of each view's best score in the cluster (0 for a view that
  missed it), so agreement between views ranks a detection higher than a lucky single view.

It runs per image (or tile) before tiling's seam handling, so a tiled image stays seam-safe.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

from cellseg import MAP_NAMES

FLIPS: tuple[tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))
"""(horizontal, vertical) flips of the views, in order: ``predict.tta_views`` takes the first 1, 2 or 4."""
MERGE_IOU = 0.5
"""Image-level outputs of ``detect`` (the heads' probability maps): un-flipped and averaged over the views."""


def _flip_image(image: Tensor, horizontal: bool, vertical: bool) -> Tensor:
    dims = [d for d, on in ((-1, horizontal), (-2, vertical)) if on]
    return image.flip(dims) if dims else image


def _unflip(det: dict[str, Tensor], height: int, width: int, horizontal: bool, vertical: bool) -> dict:
    """A view's detections in the original image's frame."""
    boxes, probs = det["boxes"].clone(), det["mask_probs"]
    maps = {key: det[key] for key in MAP_NAMES if key in det}
    if horizontal:
        boxes[:, [0, 2]] = width - det["boxes"][:, [2, 0]]
        probs = probs.flip(-1)
        maps = {key: value.flip(-1) for key, value in maps.items()}
    if vertical:
        boxes[:, [1, 3]] = height - det["boxes"][:, [3, 1]]
        probs = probs.flip(-2)
        maps = {key: value.flip(-2) for key, value in maps.items()}
    return {**det, "boxes": boxes, "mask_probs": probs, **maps}


def merge_views(views: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """One detection per cluster of overlapping detections across views (see the module docstring)."""
    n_views = len(views)
    maps = {key: torch.stack([v[key] for v in views]).mean(dim=0) for key in MAP_NAMES if key in views[0]}
    merged = {key: torch.cat([v[key] for v in views]) for key in views[0] if key not in MAP_NAMES}
    n = len(merged["scores"])
    if n_views == 1 or n == 0:
        return {**views[0], **maps}
    view_of = torch.cat([torch.full((len(v["scores"]),), i, dtype=torch.long) for i, v in enumerate(views)])
    overlaps = box_iou(merged["boxes"].float(), merged["boxes"].float()) > MERGE_IOU
    order = torch.argsort(merged["scores"], descending=True, stable=True).tolist()
    assigned = torch.zeros(n, dtype=torch.bool)
    leaders, scores = [], []
    for i in order:
        if assigned[i]:
            continue
        members = overlaps[i] & ~assigned
        assigned |= members
        best = torch.zeros(n_views, dtype=merged["scores"].dtype)
        best.scatter_reduce_(0, view_of[members], merged["scores"][members], reduce="amax")
        leaders.append(i)
        scores.append(best.sum() / n_views)
    keep = torch.as_tensor(leaders, dtype=torch.long)
    out = {key: value[keep] for key, value in merged.items()}
    out["scores"] = torch.stack(scores).to(merged["scores"].dtype)
    order = torch.argsort(out["scores"], descending=True, stable=True)
    return {**{key: value[order] for key, value in out.items()}, **maps}


def detect_with_flips(model, images: list[Tensor], n_views: int) -> list[dict[str, Tensor]]:
    """``model.detect(images)`` averaged over the first ``n_views`` flips (1 = no augmentation)."""
    if n_views == 1:
        return model.detect(images)
    per_view = []
    for horizontal, vertical in FLIPS[:n_views]:
        dets = model.detect([_flip_image(im, horizontal, vertical) for im in images])
        per_view.append(
            [
                _unflip({k: v.cpu() for k, v in d.items()}, im.shape[-2], im.shape[-1], horizontal, vertical)
                for d, im in zip(dets, images, strict=True)
            ]
        )
    return [merge_views([view[i] for view in per_view]) for i in range(len(images))]
