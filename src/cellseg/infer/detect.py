"""Detection on images of any size: the model's forward pass, box-local mask pasting and tiling.

Everything between an image and its detections, without the map-guided post-processing: the training loop's
validation, the tune stage and every prediction entry point share it, so every figure comes from the same
detections.

- **Box-local paste.** torchvision pastes each 28×28 mask into a full-size image (N×H×W floats: 1.2 GB for
  300 cells in a 1000×1000 image). Here each mask is resized inside its own (expanded) box, with exactly
  torchvision's geometry (``expand_masks``/``expand_boxes``, bilinear), thresholded and kept as a crop.
- **Tiling.** Images larger than ``tile_size`` are cut into tiles overlapping by ``tile_overlap``;
  ``cellseg.infer.tiling`` merges their detections (cut cells dropped where another tile sees them whole, joined
  where none does; duplicates removed within the overlap bands). No cell is lost or doubled at a seam.
- **Speed.** ``CellMaskRCNN.detect`` runs under ``torch.inference_mode`` (and fp16 autocast on CUDA);
  equal-sized images and tiles share a forward pass; :func:`for_inference` gives CPU models channels-last weights.
- **Maps.** A model with auxiliary heads also gives centre and boundary maps, stitched across tiles.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

from cellseg.infer.prob_maps import ProbMaps, stitch_maps
from cellseg.infer.tiling import merge_tiles, tile_windows
from cellseg.infer.tta import detect_with_flips
from cellseg.instances import Instances
from cellseg.model.maskrcnn import CellMaskRCNN
from cellseg.nuclei import resolve_overlaps
from cellseg.params import PredictParams


def paste_masks(
    mask_probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Threshold each mask at image resolution inside its box: ``(offsets N×2 (y0, x0), crops)``.

    Same pixels as torchvision's ``paste_masks_in_image`` followed by ``> threshold``, without the full image.
    """
    # Small per-instance work: on the CPU it costs no device round trip per instance.
    masks, scale = expand_masks(mask_probs[:, None].float().cpu(), padding=1)
    boxes = expand_boxes(boxes.float().cpu(), scale).to(dtype=torch.int64).tolist()
    offsets, crops = [], []
    for mask, (x0, y0, x1, y1) in zip(masks, boxes, strict=True):
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x1 + 1, width), min(y1 + 1, height)
        crop = resized[cy0 - y0 : max(cy1 - y0, cy0 - y0), cx0 - x0 : max(cx1 - x0, cx0 - x0)] > threshold
        offsets.append((cy0, cx0))
        crops.append(crop.numpy())
    return np.asarray(offsets, np.int64).reshape(-1, 2), crops


def detections_to_instances(
    det: dict[str, torch.Tensor], height: int, width: int, threshold: float
) -> Instances:
    """Turn one image's ``CellMaskRCNN.detect`` output into :class:`Instances`, dropping empty masks."""
    offsets, crops = paste_masks(det["mask_probs"], det["boxes"], height, width, threshold)
    inst = Instances(
        height,
        width,
        labels=det["labels"].cpu().numpy().astype(np.int64),
        scores=det["scores"].float().cpu().numpy(),
        offsets=offsets,
        crops=crops,
    )
    return inst.select(np.array([c.any() for c in inst.crops], bool))


def maps_of(det: dict[str, torch.Tensor]) -> ProbMaps | None:
    """The heads' maps of one ``detect`` output as numpy; ``None`` for a model without heads."""
    if "center" not in det:
        return None
    return ProbMaps(det["center"].float().cpu().numpy(), det["boundary"].float().cpu().numpy())


def _image_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).to(device).float().div_(255.0)


def detect_batch(
    model: CellMaskRCNN, images: list[np.ndarray], device: torch.device, params: PredictParams
) -> list[tuple[Instances, ProbMaps | None]]:
    """Run the model (with ``params.tta_views`` flips) over ``images`` in batches of equal-sized images:
    ``(instances, maps or None)`` each."""
    out: list[tuple[Instances, ProbMaps | None]] = []
    for start in range(0, len(images), params.batch_size):
        chunk = images[start : start + params.batch_size]
        tensors = [_image_tensor(im, device) for im in chunk]
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            dets = detect_with_flips(model, tensors, params.tta_views)  # fp16 convolutions on a GPU
        out += [
            (detections_to_instances(d, im.shape[0], im.shape[1], params.mask_threshold), maps_of(d))
            for d, im in zip(dets, chunk, strict=True)
        ]
    return out


def postprocess(inst: Instances, params: PredictParams) -> Instances:
    """Score threshold, per-image cap (highest scores kept) and optional overlap resolution (the contested-pixel
    rule of :mod:`cellseg.nuclei`, for outputs that keep detections rather than nuclei: COCO results)."""
    keep = np.flatnonzero(inst.scores >= params.score_threshold)
    keep = keep[np.argsort(-inst.scores[keep], kind="stable")][: params.max_per_image]
    inst = inst.select(keep)
    return resolve_overlaps(inst) if params.resolve_overlaps else inst


def is_tiled(image: np.ndarray, params: PredictParams) -> bool:
    return max(image.shape[:2]) > params.tile_size


def detect_image(
    model: CellMaskRCNN, image: np.ndarray, params: PredictParams, device: torch.device | str = "cpu"
) -> tuple[Instances, ProbMaps | None]:
    """One image's detections (tiles merged) and maps, before the map-guided steps and :func:`postprocess`.

    ``postprocess(refine(inst, maps, postproc), params)`` of its result is :func:`predict_image_maps`'s: the
    tune stage runs the model once and tries several ``postproc`` params on the same detections.
    """
    device = torch.device(device)
    if not is_tiled(image, params):
        ((inst, maps),) = detect_batch(model, [image], device, params)
        return inst, maps
    height, width = image.shape[:2]
    windows = tile_windows(height, width, params.tile_size, params.tile_overlap)
    tiles = [image[w.y0 : w.y0 + w.height, w.x0 : w.x0 + w.width] for w in windows]
    found = detect_batch(model, tiles, device, params)
    tile_maps = [(maps, w.y0, w.x0) for (_, maps), w in zip(found, windows, strict=True)]
    maps = stitch_maps(tile_maps, height, width) if tile_maps[0][0] is not None else None
    return merge_tiles([inst for inst, _ in found], windows, height, width), maps


def detect_and_select(
    model: CellMaskRCNN, image: np.ndarray, params: PredictParams, device: torch.device | str = "cpu"
) -> Instances:
    """One image's detections after :func:`postprocess`, without map-guided steps (the training loop's
    validation: post-processing is tuned later on the trained model)."""
    return postprocess(detect_image(model, image, params, device)[0], params)
