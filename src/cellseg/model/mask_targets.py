"""Mask R-CNN's mask targets without converting every ground-truth mask of an image to float32.

torchvision's ``project_masks_on_boxes`` turns all N masks of an image into an N×H×W float32 tensor before
``roi_align`` picks the few it needs (the sampled positive RoIs: at most 32 of 128 by default). On a dense
512-px crop with 300 cells that is 300 MB per image. Here only the masks the RoIs use are converted; the
targets are identical (same ``roi_align`` on the same masks), and no host sync is added (sizes are known).
"""

from __future__ import annotations

import torch
from torchvision.models.detection import roi_heads

_TORCHVISION = roi_heads.project_masks_on_boxes


def project_masks_on_boxes(gt_masks: torch.Tensor, boxes: torch.Tensor, matched_idxs: torch.Tensor, M: int):
    """``roi_heads.project_masks_on_boxes``, converting ``min(N, RoIs)`` masks instead of N."""
    if len(matched_idxs) < len(gt_masks):
        gt_masks = gt_masks[matched_idxs]
        matched_idxs = torch.arange(len(matched_idxs), device=matched_idxs.device)
    return _TORCHVISION(gt_masks, boxes, matched_idxs, M)


def install() -> None:
    """Make torchvision's ``maskrcnn_loss`` (which looks the function up in its module) use this one."""
    roi_heads.project_masks_on_boxes = project_masks_on_boxes
