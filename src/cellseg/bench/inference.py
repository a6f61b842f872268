"""Benchmark: test-set inference and RLE encoding, ours vs the reference's way, on the CPU.

Reference: a plain torchvision Mask R-CNN (``GeneralizedRCNN.forward``, built from copies of the checkpoint's
modules) called as ``model([img])`` under ``torch.no_grad``. It pastes every 28×28 mask into a full-size float
image, thresholds the ``N×H×W`` stack at 0.5 and encodes each full mask with ``pycocotools.mask.encode``.
Ours: :func:`cellseg.infer.predict.predict_image` (inference mode, box-local paste and threshold) and
:func:`cellseg.rle.encode_instances` (runs computed from the crops), on the model as
:func:`cellseg.model.maskrcnn.for_inference` prepares it (channels-last weights). A third row runs ours on the
unchanged (contiguous) weights, so that the gain of the paste and encoding is told apart from the layout's.

Only images no larger than ``predict.tile_size`` take part: there both ways see the same whole image, and the
run checks that they give the same detections (count, labels, scores, masks). Each image's time is its best of
``--rounds`` runs, which damps noise from other processes; the per-phase table comes from separate
instrumented runs.

    python -m cellseg.bench.inference [checkpoint] [--test-dir data/prepared/test] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.transforms.functional import to_tensor

from cellseg.data.io import load_npz
from cellseg.infer.detect import detections_to_instances, postprocess
from cellseg.infer.predict import predict_image
from cellseg.instances import Instances
from cellseg.model.checkpoint import load_trained_model
from cellseg.model.maskrcnn import CellMaskRCNN
from cellseg.params import PredictParams, load_params
from cellseg.rle import encode_instances

CPU = torch.device("cpu")
PHASES = ("forward", "paste", "threshold", "encode")


class Laps:
    """Wall time of consecutive phases."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - self._last
        self._last = now


def reference_model(model: CellMaskRCNN) -> GeneralizedRCNN:
    """torchvision's own Mask R-CNN forward around copies of ``model``'s transform, backbone and heads.

    Its RoI poolers keep the true strides ours were given (``model.set_roi_scales``), so that no image order can
    spoil its detections.
    """
    parts = copy.deepcopy(model)
    return GeneralizedRCNN(parts.backbone, parts.rpn, parts.roi_heads, parts.transform).eval()


def reference_predict(det: GeneralizedRCNN, image: np.ndarray, threshold: float) -> tuple[dict, list[dict]]:
    """The reference's way, end to end: ``model([img])``, ``masks > 0.5``, one ``mask.encode`` per instance."""
    with torch.no_grad():
        out = det([to_tensor(image)])[0]
    masks = (out["masks"][:, 0] > threshold).numpy()
    rles = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    return out, rles


def reference_phases(det: GeneralizedRCNN, image: np.ndarray, threshold: float) -> dict[str, float]:
    """:func:`reference_predict` split into phases (the same calls as ``GeneralizedRCNN.forward``)."""
    laps = Laps()
    with torch.no_grad():
        tensor = to_tensor(image)
        batch, _ = det.transform([tensor])
        features = det.backbone(batch.tensors)
        proposals, _ = det.rpn(batch, features)
        found, _ = det.roi_heads(features, proposals, batch.image_sizes)
        laps.lap("forward")
        (out,) = det.transform.postprocess(found, batch.image_sizes, [tensor.shape[-2:]])
        laps.lap("paste")
    masks = (out["masks"][:, 0] > threshold).numpy()
    laps.lap("threshold")
    [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in masks]
    laps.lap("encode")
    return laps.times


def ours_predict(
    model: CellMaskRCNN, image: np.ndarray, params: PredictParams
) -> tuple[Instances, list[dict]]:
    inst = predict_image(model, image, params, CPU)
    return inst, encode_instances(inst)


def ours_phases(model: CellMaskRCNN, image: np.ndarray, params: PredictParams) -> dict[str, float]:
    """:func:`ours_predict` split into phases. The mask threshold is applied inside each box during the paste,
    so "threshold" here is the post-processing (score threshold and per-image cap)."""
    laps = Laps()
    (found,) = model.detect([torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)])
    laps.lap("forward")
    inst = detections_to_instances(found, image.shape[0], image.shape[1], params.mask_threshold)
    laps.lap("paste")
    inst = postprocess(inst, params)
    laps.lap("threshold")
    encode_instances(inst)
    laps.lap("encode")
    return laps.times


def best_times(fn: Callable[[np.ndarray], object], images: list[np.ndarray], rounds: int) -> np.ndarray:
    """Per image, the fastest of ``rounds`` runs (after one warm-up run of every image)."""
    best = np.full(len(images), np.inf)
    for r in range(rounds + 1):
        for i, image in enumerate(images):
            start = time.perf_counter()
            fn(image)
            if r:
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def best_phases(fn: Callable[[np.ndarray], dict[str, float]], images: list[np.ndarray], rounds: int) -> dict:
    """Per phase, the sum over images of each image's fastest run of that phase."""
    runs = [[fn(image) for image in images] for _ in range(rounds)]
    return {p: sum(min(run[i].get(p, 0.0) for run in runs) for i in range(len(images))) for p in PHASES}


def compare(ours: Instances, ref: dict, threshold: float) -> dict[str, float]:
    """How far the two ways' detections of one image differ (both are sorted by decreasing score).

    Ours drops detections whose thresholded mask is empty, so the reference's are compared without them.
    """
    ref_masks = (ref["masks"][:, 0] > threshold).numpy()
    kept = ref_masks.any(axis=(1, 2))
    ref_masks, labels, scores = ref_masks[kept], ref["labels"].numpy()[kept], ref["scores"].numpy()[kept]
    out = {"count_ours": len(ours), "count_ref": len(scores), "same_count": len(ours) == len(scores)}
    if not out["same_count"] or not len(ours):
        return out
    mine = ours.full_masks()
    inter, union = (mine & ref_masks).sum(axis=(1, 2)), (mine | ref_masks).sum(axis=(1, 2))
    out["same_labels"] = bool((ours.labels == labels).all())
    out["max_score_diff"] = float(np.abs(ours.scores - scores).max())
    out["min_mask_iou"] = float((inter / np.maximum(union, 1)).min())
    return out


def load_images(test_dir: Path, tile_size: int) -> list[np.ndarray]:
    files = sorted(test_dir.glob("*.npz"))
    if not files:
        raise SystemExit(f"{test_dir}: no prepared test images (*.npz); run the prepare stage")
    images = [load_npz(f)["image"] for f in files]
    small = [im for im in images if max(im.shape[:2]) <= tile_size]
    print(f"{len(small)} of {len(images)} test images are no larger than the tile size ({tile_size} px)")
    return small


def report(name: str, total: float, n: int, phases: dict[str, float], base: float | None) -> None:
    ratio = f"  ×{base / total:.2f} vs reference" if base else ""
    cells = "  ".join(f"{p} {1000 * phases[p]:7.1f}" for p in PHASES)
    print(f"{name:<26} {n / total:6.2f} img/s{ratio}")
    print(f"{'':<26} ms over all images: {cells}  (sum {1000 * sum(phases.values()):.1f})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="test-set inference + RLE: ours vs torchvision's way (CPU)")
    parser.add_argument("checkpoint", nargs="?", default="models/best.pt")
    parser.add_argument("--test-dir", type=Path, default=Path("data/prepared/test"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = load_params().predict
    images = load_images(args.test_dir, params.tile_size)
    model, _ = load_trained_model(args.checkpoint, CPU)
    fast = model  # load_trained_model prepares it with maskrcnn.for_inference (channels-last on the CPU)
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)  # torchvision's default layout
    det = reference_model(plain)
    threshold = params.mask_threshold

    checks = [
        compare(predict_image(fast, im, params), reference_predict(det, im, threshold)[0], threshold)
        for im in images
    ]
    print(f"{args.checkpoint}, {args.threads} threads, best of {args.rounds} rounds")
    print(f"instances per image: {[c['count_ours'] for c in checks]}")
    same = all(c["same_count"] and c.get("same_labels", True) for c in checks)
    score_diff = max(c.get("max_score_diff", 0.0) for c in checks)
    min_iou = min(c.get("min_mask_iou", 1.0) for c in checks)
    print(
        f"same detections: counts and labels {same}, max |score diff| {score_diff:.1e}, min mask IoU {min_iou:.4f}"
    )
    if not same or score_diff > 1e-3 or min_iou < 0.99:
        raise SystemExit(
            "the two ways give different detections: the timings would not compare like with like"
        )
    ways = {
        "reference (torchvision)": (
            lambda im: reference_predict(det, im, threshold),
            lambda im: reference_phases(det, im, threshold),
        ),
        "ours, contiguous weights": (
            lambda im: ours_predict(plain, im, params),
            lambda im: ours_phases(plain, im, params),
        ),
        "ours (for_inference)": (
            lambda im: ours_predict(fast, im, params),
            lambda im: ours_phases(fast, im, params),
        ),
    }
    base = None
    for name, (run, phased) in ways.items():
        total = best_times(run, images, args.rounds).sum()
        report(name, total, len(images), best_phases(phased, images, args.rounds), base)
        base = base or total


if __name__ == "__main__":
    main()
