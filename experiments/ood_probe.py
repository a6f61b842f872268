"""Issue 31's probe: what colour and scale cost a CoNSeP model out of domain, without retraining it.

Each out-of-domain set of a params file is scored as the ood stage scores it (cellseg.ood.score.score_set), and
again (a) with every image Reinhard-normalised to the training tiles' colours (LAB mean and standard deviation of
tissue pixels, per image), (b) at other scales: the image shrunk or enlarged before prediction (scored at that
scale). A probe, not a feature: it says which of stain and scale robustness is worth building first.

    usage: python experiments/ood_probe.py PARAMS_YAML CHECKPOINT THRESHOLDS CONSEP_TRAIN SET [SET ...]
    (run from the repo root; prints one line per set and variant)
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import tifffile

import cellseg.infer.predict as predict_module
from cellseg.model.bundle import open_model
from cellseg.ood.score import score_set
from cellseg.params import load_params, replace

TISSUE_L = 0.9 * 255  # OpenCV's 8-bit L: brighter pixels are glass


def lab_stats(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB).reshape(-1, 3).astype(np.float64)
    tissue = lab[lab[:, 0] < TISSUE_L]
    tissue = tissue if len(tissue) > 100 else lab
    return tissue.mean(0), tissue.std(0) + 1e-6


def reinhard_to(reference: tuple[np.ndarray, np.ndarray]):
    def normalise(rgb: np.ndarray) -> np.ndarray:
        mean, std = lab_stats(rgb)
        lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB).astype(np.float64)
        out = (lab - mean) / std * reference[1] + reference[0]
        return cv2.cvtColor(np.clip(np.rint(out), 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)

    return normalise


class AtScale:
    """The model as the probe presents it: the same network, a pretended training resolution."""

    def __init__(self, bundle, mpp: float) -> None:
        self._bundle, self.mpp = bundle, mpp

    def __getattr__(self, name):
        return getattr(self._bundle, name)


def main() -> None:
    params_file, checkpoint, thresholds, consep_train, *sets = sys.argv[1:]
    params = load_params(params_file)
    bundle = open_model(checkpoint, params, "cpu", thresholds)
    params = replace(params, predict=bundle.predict, postproc=bundle.postproc)
    tiles = sorted(Path(consep_train).glob("*/image.tif"))
    pixels = np.concatenate([tifffile.imread(p)[..., :3].reshape(-1, 3) for p in tiles[::8]])[None]
    reference = lab_stats(pixels)
    real_predict = predict_module.predict_image
    variants = [("as is", 1.0, None), ("reinhard", 1.0, reinhard_to(reference)), ("shrunk 1.25x", 1.25, None),
                ("shrunk 1.5x", 1.5, None), ("reinhard + 1.25x", 1.25, reinhard_to(reference))]  # fmt: skip
    for name in sets:
        for label, zoom, normalise in variants:

            def predict(model, image, *args, _n=normalise, **kwargs):
                return real_predict(model, _n(image) if _n else image, *args, **kwargs)

            predict_module.predict_image = predict
            result = score_set(name, params.evaluate.ood[name], AtScale(bundle, bundle.mpp * zoom), params, "cpu",
                               progress=False)  # fmt: skip
            s = result["summary"]
            print(f"{name} {label}: PQ {s['pq']:.3f} F1 {s['f1']:.3f} found {s['n_found']} / {s['n_true']}, "
                  f"worst {s['worst_pq_50plus']:.3f}, below 0.30: {s['images_50plus_below_0.30']}", flush=True)  # fmt: skip
        predict_module.predict_image = real_predict


if __name__ == "__main__":
    main()
