"""The ImageScope fixture imported at 0.25 µm/px against the challenge's own masks (issue 27's check): each
region filled with skimage.draw.polygon on its vertices at level 0 (as MoNuSAC did), warped to 0.25 µm/px as the
slide mode warps pixels, and matched to the imported nucleus it overlaps most.

  usage: python experiments/import_fixture_iou.py [SHARED]   (run from the repo root; prints the IoU figures)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import yaml
from skimage.draw import polygon as draw_polygon

from cellseg.data.io import list_train_samples, read_train_sample


def main() -> None:
    shared = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared")
    svs, xml = shared / "fixtures/slides/A9K0_2.svs", shared / "fixtures/slides/A9K0_2.xml"
    with tempfile.TemporaryDirectory() as tmp:
        params = yaml.safe_load(Path("params.yaml").read_text())
        params["import"]["tile_size"] = 1024
        params["import"]["class_map"] = {"Epithelial": "class1", "Lymphocyte": "class2"}
        Path(tmp, "params.yaml").write_text(yaml.safe_dump(params))
        subprocess.run(["cellseg", "import", str(svs), "--out", f"{tmp}/raw", "--params", f"{tmp}/params.yaml",
                        "--no-progress"], check=True)  # fmt: skip
        (sample,) = list_train_samples(f"{tmp}/raw", 4)
        _, labels = read_train_sample(sample)
        scale = json.loads(Path(tmp, "raw", "import.json").read_text())["samples"][0]["scale"]
    h, w = labels.shape[1:]
    s = 1 / scale
    matrix = np.array([[s, 0, 0.5 * s - 0.5], [0, s, 0.5 * s - 0.5]])
    ious = []
    for region in ET.parse(xml).getroot().iter("Region"):
        xy = np.array([[float(v.get("X")), float(v.get("Y"))] for v in region.iter("Vertex")])
        mask0 = np.zeros((763, 756), np.float32)
        mask0[draw_polygon(xy[:, 1], xy[:, 0], shape=mask0.shape)] = 1
        small = cv2.warpAffine(mask0, matrix, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP) > 0.5
        ids = np.concatenate([labels[k][small] for k in range(4)])
        ids = ids[ids > 0]
        if not small.any() or len(ids) == 0:
            ious.append(0.0)
            continue
        best = np.bincount(ids).argmax()
        mine = (labels == best).any(axis=0)
        ious.append(np.count_nonzero(mine & small) / np.count_nonzero(mine | small))
    ious = np.array(ious)
    n = int(sum(len(np.unique(labels[k])) - 1 for k in range(4)))
    print(f"A9K0_2 at 0.25 µm/px: {n} nuclei imported of {len(ious)} regions; IoU with the challenge's masks "
          f"> 0.5 for {np.mean(ious > 0.5):.4f}, median {np.median(ious):.3f}, mean {ious.mean():.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
