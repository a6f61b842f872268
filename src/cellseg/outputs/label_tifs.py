"""Per-class instance label maps, written the way the training annotations are: ``<image>/class<k>.tif``.

Each batch is one image's nuclei (disjoint, :mod:`cellseg.nuclei`). Per class present, a float64 ``H×W`` label
image in which each non-zero value is one nucleus, with one id counter across the classes of the image (class 1
holds the first ids; within a class, by score), as in the raw training data. A class without nuclei has no file,
and each image's folder appears complete (written aside, then renamed).
"""

from __future__ import annotations

import numpy as np

from cellseg.data.io import class_file, write_label_tif
from cellseg.fsutil import atomic_dir
from cellseg.instances import Instances
from cellseg.outputs.base import Nuclei, SinkContext


def class_label_maps(nuclei: Instances) -> dict[int, np.ndarray]:
    """Per class present, the float64 label image of ``nuclei`` (disjoint, in rank order)."""
    by_class = np.argsort(nuclei.labels, kind="stable")  # stable: rank order within a class
    new_id = np.zeros(len(nuclei), np.float64)
    new_id[by_class] = np.arange(1, len(nuclei) + 1)
    maps: dict[int, np.ndarray] = {}
    for i, ((y0, x0), crop) in enumerate(zip(nuclei.offsets, nuclei.crops, strict=True)):
        k = int(nuclei.labels[i])
        if k not in maps:
            maps[k] = np.zeros((nuclei.height, nuclei.width), np.float64)
        region = maps[k][y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]
        region[crop] = new_id[i]
    return dict(sorted(maps.items()))


class LabelTifSink:
    """``<folder>/<image>/class<k>.tif`` per image; only those folders are replaced."""

    def __init__(self, context: SinkContext) -> None:
        self.folder = context.folder
        self.written: dict[str, dict[int, np.ndarray]] = {}

    def add(self, nuclei: Nuclei) -> None:
        if nuclei.image is None:
            raise ValueError("label tifs need the image's name (Nuclei.image)")
        maps = class_label_maps(nuclei.instances)
        with atomic_dir(self.folder / nuclei.image) as tmp:
            for k, labels in maps.items():
                write_label_tif(tmp / class_file(k), labels)
        self.written[nuclei.image] = maps

    def close(self) -> None:
        """Nothing left to do: each image's folder was renamed into place as it was written."""

    def abort(self) -> None:
        """The folders already written are complete; the one being written was never renamed."""
