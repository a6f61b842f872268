"""Benchmark: map-guided post-processing against the model's inference on the same 300-cell image.

The image is a dense synthetic tile (``--size`` px square, ``--cells`` nuclei aimed at). Inference is
:func:`cellseg.infer.predict.predict_image` of an untrained model of params.yaml's architecture with its heads (forward,
tiling, box-local paste, threshold and cap; its detections are meaningless, its cost is not). Post-processing is
:func:`cellseg.infer.postproc.refine` with every step on, given what a trained model would give: the image's own cells as
detections, with every 8th cell merged with its nearest neighbour (to split) and every 12th left out (to recover),
and the training targets as the centre and boundary maps. Each time is the best of ``--repeats`` after a warm-up;
wall time is the figure, process CPU time is printed too (on a shared machine it is the steadier of the two).

The centre map is drawn with ``--center-sigma 2`` rather than params.yaml's ``maps.center_sigma`` (the
reference's 5): at sigma 5 the Gaussians of touching small nuclei sum into one peak per cluster (37 peaks for
330 cells on this image), which leaves split and recover almost nothing to do, and would time too little work.

    python -m cellseg.bench.postproc [--size 512] [--cells 330] [--center-sigma 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from cellseg.data.maps import compute_maps
from cellseg.data.synth import ImageSpec, generate
from cellseg.infer.postproc import find_peaks, refine
from cellseg.infer.predict import predict_image
from cellseg.infer.prob_maps import ProbMaps
from cellseg.instances import Instances, crop_to_box
from cellseg.model.maskrcnn import build_model, for_inference
from cellseg.params import load_params

TARGET_SHARE = 0.15


def scene(size: int, cells: int, sigma: float) -> tuple[np.ndarray, Instances, ProbMaps]:
    """``(image, its cells, their target maps)`` of a dense synthetic image."""
    image, labels = generate(ImageSpec("train", "bench-postproc", size, size, cells, (0, 11)))
    center, boundary = compute_maps(labels, sigma)
    return image, Instances.from_label_rows(labels), ProbMaps(center, boundary.astype(np.float32))


def imperfect_detections(truth: Instances, seed: int = 0) -> Instances:
    """The true cells with a detector's typical faults: some merged with a neighbour, some missed."""
    rng = np.random.default_rng(seed)
    boxes = truth.boxes_xyxy()
    centres = np.stack([(boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2], axis=1)
    n = len(truth)
    merged_into = np.arange(n)
    for i in range(0, n, 8):
        distance = np.hypot(*(centres - centres[i]).T)
        distance[i] = np.inf
        merged_into[int(np.argmin(distance))] = i
    missed = np.zeros(n, bool)
    missed[4::12] = True
    masks = truth.full_masks()
    labels, scores, offsets, crops = [], [], [], []
    for i in range(n):
        members = np.flatnonzero(merged_into == i)
        if missed[i] or merged_into[i] != i:
            continue
        offset, crop = crop_to_box(masks[members].any(axis=0))
        offsets.append(offset)
        crops.append(crop)
        labels.append(truth.labels[i])
        scores.append(rng.uniform(0.3, 1.0))
    return Instances(
        truth.height,
        truth.width,
        np.asarray(labels, np.int64),
        np.asarray(scores, np.float32),
        np.asarray(offsets, np.int64).reshape(-1, 2),
        crops,
    )


def best_time(run, repeats: int) -> tuple[float, float, object]:
    """``(best wall s, best process CPU s, result)`` of ``repeats`` calls after a warm-up."""
    result = run()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu), result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="post-processing vs inference time on a 300-cell image")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cells", type=int, default=330)
    parser.add_argument("--center-sigma", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    params = load_params(overrides={"aux.enabled": True, "model.pretrained": "none"})
    steps = dataclasses.replace(params.postproc, split=True, trim=True, recover=True, rescore=True)
    image, truth, maps = scene(args.size, args.cells, args.center_sigma)
    detections = imperfect_detections(truth)
    peaks = find_peaks(maps.center, steps.peak_threshold, steps.peak_min_distance)

    torch.manual_seed(0)
    model = for_inference(build_model(params.model, params.aux, len(params.classes)), "cpu")
    infer_wall, infer_cpu, _ = best_time(
        lambda: predict_image(model, image, params.predict, "cpu"), args.repeats
    )
    post_wall, post_cpu, refined = best_time(lambda: refine(detections, maps, steps), args.repeats)

    print(
        f"image {args.size}×{args.size}, {len(truth)} cells, {len(peaks)} centre peaks (sigma "
        f"{args.center_sigma:g}); {len(detections)} detections given to post-processing (merged pairs, "
        f"missed cells); {torch.get_num_threads()} threads"
    )
    print(f"  after post-processing: {len(refined)} instances (split, trimmed, recovered, rescored)")
    print(f"  inference ({params.model.arch}, untrained, CPU), best of {args.repeats}:")
    print(f"    wall {infer_wall * 1000:8.1f} ms   CPU {infer_cpu * 1000:8.1f} ms")
    print("  post-processing, all 4 steps:")
    print(f"    wall {post_wall * 1000:8.1f} ms   CPU {post_cpu * 1000:8.1f} ms")
    print(f"  CPU-time share: {post_cpu / infer_cpu:.1%}")
    share = post_wall / infer_wall
    print(f"post-processing share of inference: {share:.1%} ({share:.3f}×), target ≤ {TARGET_SHARE:.0%}")


if __name__ == "__main__":
    main()
