"""Issue 31's probe: what colour and scale cost a CoNSeP model on one MoNuSeg image, without retraining it.

The image and its ImageScope annotation are predicted and scored (class-agnostic, at the scale predicted) as they
are, with the image Reinhard-normalised to the training tiles' colours (LAB mean and standard deviation of tissue
pixels), and at other scales (the image resampled as if the model's µm/px were 0.8, 1.25 or 1.5 times its own).
A probe, not a feature: it says which of stain and scale robustness is worth building first.

    usage: python experiments/ood_probe.py CHECKPOINT THRESHOLDS CONSEP_TRAIN MONUSEG_DIR IMAGE_STEM
    (run from the repo root with its params.yaml; prints one line per variant)
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import tifffile
from shapely import affinity

from cellseg.annotations import open_annotations
from cellseg.eval.nuclei_metrics import Overlaps, count
from cellseg.importer.rasterise import paint
from cellseg.infer.predict import predict_image
from cellseg.instances import Instances
from cellseg.model.bundle import open_model
from cellseg.nuclei import label_map, truth_label_map
from cellseg.params import load_params, replace

TISSUE_L = 0.9 * 255  # OpenCV's 8-bit L: brighter pixels are glass
VARIANTS = [("as is", 1.0, False), ("Reinhard", 1.0, True), ("enlarged 1.25x", 0.8, False),
            ("shrunk 1.25x", 1.25, False), ("shrunk 1.5x", 1.5, False)]  # fmt: skip


def lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64)
    tissue = lab[lab[:, 0] < TISSUE_L]
    return tissue.mean(0), tissue.std(0) + 1e-6


def reinhard(rgb: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    mean, std = lab_stats(rgb)
    lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB).astype(np.float64)
    out = (lab - mean) / std * reference[1] + reference[0]
    return cv2.cvtColor(np.clip(np.rint(out), 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def main() -> None:
    checkpoint, thresholds, consep_train, monuseg, stem = sys.argv[1:]
    params = load_params()
    bundle = open_model(checkpoint, params, "cpu", thresholds)
    params = replace(params, predict=bundle.predict, postproc=bundle.postproc)
    tiles = sorted(Path(consep_train).glob("*/image.tif"))[::8]
    reference = lab_stats(np.concatenate([tifffile.imread(p)[..., :3].reshape(-1, 3) for p in tiles])[None])
    image = tifffile.imread(Path(monuseg) / f"{stem}.tif")[..., :3]
    annotation = open_annotations(Path(monuseg) / f"{stem}.xml")
    shapes = [(a.geometry, 1, i) for i, a in enumerate(annotation)]
    image_mpp = annotation.mpp or bundle.mpp
    for label, zoom, normalise in VARIANTS:
        factor = image_mpp / (bundle.mpp * zoom)  # model pixels per image pixel
        size = (round(image.shape[1] * factor), round(image.shape[0] * factor))
        pixels = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        if normalise:
            pixels = reinhard(pixels, reference)
        nuclei = [(affinity.scale(g, factor, factor, origin=(0, 0)), k, i) for g, k, i in shapes]
        truth = Instances.from_label_rows(paint(nuclei, 1, size[1], size[0])[0])
        predicted = predict_image(bundle.network, pixels, params.predict, "cpu", params.postproc)
        c = count(Overlaps.of(truth_label_map(truth), label_map(predicted, bundle.rule)))
        print(f"{stem} {label}: PQ {c.pq:.3f}, found {c.n_pred} of {c.n_true}", flush=True)


if __name__ == "__main__":
    main()
