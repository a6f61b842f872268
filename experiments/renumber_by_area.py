"""Issue 27's control: a copy of a raw layout whose instance ids are renumbered the way `cellseg import` numbers
them (largest first), pixels unchanged, so training on it separates the effect of instance order from that of
the import's pixels.

    usage: python experiments/renumber_by_area.py RAW OUT
    (the images and the test side are linked, not copied; only the class tifs are rewritten)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tifffile


def renumber_by_area(labels: np.ndarray) -> np.ndarray:
    """Ids 1..n by pixel area, largest first (ties: the lower old id first); 0 stays background."""
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    order = np.lexsort((ids, -areas))
    lookup = np.zeros(int(labels.max()) + 1, labels.dtype)
    lookup[ids[order]] = np.arange(1, len(ids) + 1)
    return lookup[labels]


def main(raw: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=False)
    for side in ("test_release", "test_truth", "test_image_name_to_ids.json"):
        (out / side).symlink_to((raw / side).resolve())
    n = 0
    for sample in sorted(p for p in (raw / "train").iterdir() if p.is_dir()):
        target = out / "train" / sample.name
        target.mkdir(parents=True)
        (target / "image.tif").symlink_to((sample / "image.tif").resolve())
        for class_file in sorted(sample.glob("class*.tif")):
            tifffile.imwrite(target / class_file.name, renumber_by_area(tifffile.imread(class_file)))
            n += 1
    print(f"renumbered {n} class files into {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
