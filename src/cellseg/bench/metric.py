"""Benchmark: the mask mAP of :func:`cellseg.eval.coco_metrics.evaluate` against torchmetrics' default way.

Dense synthetic scenes (touching Voronoi cells of four classes) with noisy predictions: every ground-truth mask
shifted by a few pixels, some missed, some relabelled, random scores, plus false-positive discs. Four ways get
the same inputs and settings, and the run fails if any figure differs:

- cellseg's: COCO documents with RLEs encoded from the box-local crops, faster-coco-eval's ``COCOeval_faster``;
- the same documents on pycocotools' ``COCOeval``;
- RLEs encoded from full N×H×W masks, ``COCOeval_faster``;
- torchmetrics' default: ``MeanAveragePrecision(iou_type="segm").update`` with full masks on its pycocotools
  backend (the baseline of the ratios; the reference's metric).

    python -m cellseg.bench.metric [--images 20] [--size 512] [--instances 320] [--max-detections 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from functools import partial

import numpy as np
from scipy import ndimage

from cellseg.eval.coco_metrics import (
    IOU_THRESHOLDS,
    LEADERBOARD_MAX_DETECTIONS,
    RECALL_THRESHOLDS,
    _summaries,
    evaluate,
)
from cellseg.instances import Instances

BENCH_CLASSES = 4
"""The classes of the synthetic scenes scored."""


def voronoi_ground_truth(rng: np.random.Generator, size: tuple[int, int], n_seeds: int) -> Instances:
    """Touching cells: each pixel belongs to its nearest seed; each cell gets a random class."""
    seeds = np.zeros(size, bool)
    seeds[rng.integers(0, size[0], n_seeds), rng.integers(0, size[1], n_seeds)] = True
    ids = np.zeros(size, np.int64)
    ids[seeds] = np.arange(1, seeds.sum() + 1)
    _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    ids = ids[iy, ix]
    classes = rng.integers(1, BENCH_CLASSES + 1, ids.max() + 1)
    rows = [np.where(classes[ids] == k, ids, 0) for k in range(1, BENCH_CLASSES + 1)]
    return Instances.from_label_rows(np.stack(rows))


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
        labels.append(rng.integers(1, BENCH_CLASSES + 1) if rng.random() < p_relabel else gt.labels[i])
    for _ in range(n_false):
        disc = _disc(int(rng.integers(3, 10)))
        offsets.append(
            (rng.integers(0, gt.height - disc.shape[0]), rng.integers(0, gt.width - disc.shape[1]))
        )
        crops.append(disc)
        labels.append(rng.integers(1, BENCH_CLASSES + 1))
    n = len(crops)
    return Instances(
        gt.height,
        gt.width,
        labels=np.asarray(labels, np.int64).reshape(n),
        scores=rng.random(n).astype(np.float32),
        offsets=np.asarray(offsets, np.int64).reshape(n, 2),
        crops=crops,
    )


def torchmetrics_default(
    gts: list[Instances], preds: list[Instances], max_detections: int
) -> dict[str, float]:
    """The same figures through torchmetrics' documented API (full masks, pycocotools backend, COCO thresholds).

    Every benchmark image has ground truth and predictions of several classes, so torchmetrics' departures
    from COCOeval on empty images do not arise; ``macro`` keeps COCO's per-class averaging.
    """
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    caps = sorted([1, LEADERBOARD_MAX_DETECTIONS, max_detections])
    metric = MeanAveragePrecision(
        iou_type="segm",
        backend="pycocotools",
        max_detection_thresholds=caps,
        iou_thresholds=IOU_THRESHOLDS.tolist(),
        rec_thresholds=RECALL_THRESHOLDS.tolist(),
        average="macro",
        extended_summary=True,
    )
    metric.warn_on_many_detections = False

    def as_input(inst: Instances) -> dict[str, torch.Tensor]:
        return {
            "masks": torch.from_numpy(inst.full_masks()),
            "labels": torch.from_numpy(inst.labels.astype(np.int64)),
            "scores": torch.from_numpy(inst.scores.astype(np.float32)),
        }

    for gt, pred in zip(gts, preds, strict=True):
        metric.update([as_input(pred)], [as_input(gt)])
    with contextlib.redirect_stdout(io.StringIO()):
        result = metric.compute()
    k = result["classes"].numpy().reshape(-1) - 1
    shape = (len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), BENCH_CLASSES, 4, len(caps))
    precision, recall = -np.ones(shape), -np.ones(shape[:1] + shape[2:])
    precision[:, :, k], recall[:, k] = result["precision"].numpy(), result["recall"].numpy()
    return _summaries(precision, recall, caps.index(max_detections), caps.index(LEADERBOARD_MAX_DETECTIONS))


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
    ways = {
        "cellseg (crop RLEs, COCOeval_faster)": partial(
            evaluate, num_classes=BENCH_CLASSES, backend="faster_coco_eval"
        ),
        "cellseg (crop RLEs, pycocotools COCOeval)": partial(
            evaluate, num_classes=BENCH_CLASSES, backend="pycocotools"
        ),
        "full-mask RLEs, COCOeval_faster": partial(evaluate, num_classes=BENCH_CLASSES, full_masks=True),
        "torchmetrics default (update, pycocotools)": None,
    }
    times, metrics = {}, {}
    for name, way in ways.items():

        def score(g, p, way=way):
            return (
                torchmetrics_default(g, p, args.max_detections)
                if way is None
                else way(g, p, args.max_detections).metrics
            )

        score(gts[:1], preds[:1])  # warm-up
        start = time.perf_counter()
        metrics[name] = score(gts, preds)
        times[name] = time.perf_counter() - start
    ours, baseline = list(ways)[0], list(ways)[-1]
    differing = sorted(
        {k for m in metrics.values() for k in m if k in metrics[ours] and abs(m[k] - metrics[ours][k]) > 1e-9}
    )
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
