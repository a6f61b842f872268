"""Benchmark: the mask mAP of :func:`cellseg.metrics.evaluate` on torchmetrics' two COCO backends.

Dense synthetic scenes (touching Voronoi cells of four classes) with noisy predictions: every ground-truth mask
shifted by a few pixels, some missed, some relabelled, random scores, plus false-positive discs. Both backends
get the same inputs and the same settings; the run fails if any figure differs. Both timings include the
full-image masks that torchmetrics needs and their RLE encoding (on the backend's own ``mask.encode``).

    python -m cellseg.bench.metric [--images 20] [--size 512] [--instances 320] [--max-detections 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from cellseg import NUM_CLASSES
from cellseg.instances import Instances
from cellseg.metrics import evaluate


def voronoi_ground_truth(rng: np.random.Generator, size: tuple[int, int], n_seeds: int) -> Instances:
    """Touching cells: each pixel belongs to its nearest seed; each cell gets a random class."""
    seeds = np.zeros(size, bool)
    seeds[rng.integers(0, size[0], n_seeds), rng.integers(0, size[1], n_seeds)] = True
    ids = np.zeros(size, np.int64)
    ids[seeds] = np.arange(1, seeds.sum() + 1)
    _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    ids = ids[iy, ix]
    classes = rng.integers(1, NUM_CLASSES + 1, ids.max() + 1)
    return Instances.from_label_rows(np.stack([np.where(classes[ids] == k, ids, 0) for k in range(1, 5)]))


def _disc(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return yy**2 + xx**2 <= radius**2


def noisy_predictions(
    rng: np.random.Generator,
    gt: Instances,
    shift: int = 2,
    p_miss: float = 0.05,
    p_relabel: float = 0.1,
    n_false: int = 30,
) -> Instances:
    """``gt`` shifted by up to ``shift`` pixels, a fraction missed or relabelled, plus ``n_false`` spurious discs."""
    offsets, crops, labels = [], [], []
    for i in np.flatnonzero(rng.random(len(gt)) >= p_miss):
        crop = gt.crops[i]
        y0, x0 = gt.offsets[i] + rng.integers(-shift, shift + 1, 2)
        offsets.append((np.clip(y0, 0, gt.height - crop.shape[0]), np.clip(x0, 0, gt.width - crop.shape[1])))
        crops.append(crop)
        labels.append(rng.integers(1, NUM_CLASSES + 1) if rng.random() < p_relabel else gt.labels[i])
    for _ in range(n_false):
        disc = _disc(int(rng.integers(3, 10)))
        offsets.append(
            (rng.integers(0, gt.height - disc.shape[0]), rng.integers(0, gt.width - disc.shape[1]))
        )
        crops.append(disc)
        labels.append(rng.integers(1, NUM_CLASSES + 1))
    n = len(crops)
    return Instances(
        gt.height,
        gt.width,
        labels=np.asarray(labels, np.int64).reshape(n),
        scores=rng.random(n).astype(np.float32),
        offsets=np.asarray(offsets, np.int64).reshape(n, 2),
        crops=crops,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="mask mAP: faster_coco_eval vs pycocotools backend")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument(
        "--instances", type=int, default=320, help="Voronoi seeds (ground-truth cells) per image"
    )
    parser.add_argument("--max-detections", type=int, default=1000)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    gts = [voronoi_ground_truth(rng, (args.size, args.size), args.instances) for _ in range(args.images)]
    preds = [noisy_predictions(rng, gt) for gt in gts]
    times, metrics = {}, {}
    for backend in ("faster_coco_eval", "pycocotools"):
        evaluate(gts[:1], preds[:1], args.max_detections, backend=backend)  # warm-up: imports, first calls
        start = time.perf_counter()
        metrics[backend] = evaluate(gts, preds, args.max_detections, backend=backend).metrics
        times[backend] = time.perf_counter() - start
    fast, slow = metrics["faster_coco_eval"], metrics["pycocotools"]
    differing = [k for k in fast if abs(fast[k] - slow[k]) > 1e-9]
    n_gt, n_pred = [len(g) for g in gts], [len(p) for p in preds]
    print(
        f"{args.images} images {args.size}x{args.size}, ground truth {min(n_gt)}-{max(n_gt)} per image, "
        f"predictions {min(n_pred)}-{max(n_pred)} per image, max_detections {args.max_detections}"
    )
    print(f"map {fast['map']:.6f}  map_50 {fast['map_50']:.6f}  map_50_at_100 {fast['map_50_at_100']:.6f}")
    print(f"identical figures on both backends: {not differing}")
    print(f"faster_coco_eval: {times['faster_coco_eval']:6.2f} s")
    print(f"pycocotools:      {times['pycocotools']:6.2f} s")
    print(f"speed-up: {times['pycocotools'] / times['faster_coco_eval']:.2f}x")
    if differing:
        raise SystemExit(f"figures differ: {differing}")


if __name__ == "__main__":
    main()
