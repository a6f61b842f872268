"""Benchmark: the mask mAP of :func:`cellseg.metrics.evaluate` against torchmetrics' default way.

Dense synthetic scenes (touching Voronoi cells of four classes) with noisy predictions: every ground-truth mask
shifted by a few pixels, some missed, some relabelled, random scores, plus false-positive discs. Three ways get
the same inputs and settings, and the run fails if any figure differs:

- cellseg's: RLEs encoded from the box-local crops go straight into torchmetrics' state, faster-coco-eval backend;
- torchmetrics' documented ``update`` (full N×H×W masks, encoded inside) on the faster-coco-eval backend;
- torchmetrics' default: ``update`` on the pycocotools backend (the baseline of the ratios).

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
    parser = argparse.ArgumentParser(description="mask mAP: cellseg's way vs torchmetrics' default")
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
    ways = {  # name: (backend, full_masks)
        "cellseg (crop RLEs, faster_coco_eval)": ("faster_coco_eval", False),
        "torchmetrics update, faster_coco_eval": ("faster_coco_eval", True),
        "torchmetrics default (update, pycocotools)": ("pycocotools", True),
    }
    times, metrics = {}, {}
    for name, (backend, full_masks) in ways.items():
        evaluate(gts[:1], preds[:1], args.max_detections, backend=backend, full_masks=full_masks)  # warm-up
        start = time.perf_counter()
        metrics[name] = evaluate(
            gts, preds, args.max_detections, backend=backend, full_masks=full_masks
        ).metrics
        times[name] = time.perf_counter() - start
    ours, baseline = list(ways)[0], list(ways)[-1]
    differing = sorted({k for m in metrics.values() for k in m if abs(m[k] - metrics[ours][k]) > 1e-9})
    n_gt, n_pred = [len(g) for g in gts], [len(p) for p in preds]
    print(
        f"{args.images} images {args.size}x{args.size}, ground truth {min(n_gt)}-{max(n_gt)} per image, "
        f"predictions {min(n_pred)}-{max(n_pred)} per image, max_detections {args.max_detections}"
    )
    m = metrics[ours]
    print(f"map {m['map']:.6f}  map_50 {m['map_50']:.6f}  map_50_at_100 {m['map_50_at_100']:.6f}")
    print(f"identical figures all ways: {not differing}")
    for name, seconds in times.items():
        print(f"{name:45s} {seconds:6.2f} s  ({times[baseline] / seconds:.2f}x vs torchmetrics default)")
    print(f"speed-up of cellseg's metric over torchmetrics' default: {times[baseline] / times[ours]:.2f}x")
    if differing:
        raise SystemExit(f"figures differ: {differing}")


if __name__ == "__main__":
    main()
