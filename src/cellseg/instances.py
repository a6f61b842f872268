"""The instance set of one image, as box-local mask crops.

A dense 1000×1000 image with 300 cells would need 300 MB as full-image boolean masks; stored as crops inside
each instance's bounding box it needs about 1 MB. Ground truth (from the prepared label rows) and predictions
(from the model) share this one representation, so RLE encoding, metrics and plots all read the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential


def crop_to_box(mask: np.ndarray, y0: int = 0, x0: int = 0) -> tuple[tuple[int, int], np.ndarray] | None:
    """``((y, x), crop)``: ``mask`` (placed at ``(y0, x0)``) cut to the bounding box of its pixels; ``None`` when
    it has none. The one way a full or partial mask becomes an instance crop."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    crop = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    return (y0 + int(rows[0]), x0 + int(cols[0])), np.ascontiguousarray(crop)


@dataclass
class Instances:
    """N instances of an image of ``height × width`` pixels.

    Instance ``i`` covers ``crops[i]`` (bool, h_i × w_i) placed with its top-left corner at ``offsets[i]``
    (y0, x0). ``labels`` are class ids 1..K; ``scores`` are 1.0 for ground truth.
    """

    height: int
    width: int
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    crops: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.crops)
        if not (len(self.labels) == len(self.scores) == len(self.offsets) == n):
            raise ValueError("labels, scores, offsets and crops must have the same length")

    def __len__(self) -> int:
        return len(self.crops)

    @classmethod
    def from_label_rows(cls, labels: np.ndarray) -> Instances:
        """Ground truth from prepared label rows (``4×H×W``; row k holds the ids of class k+1).

        Each distinct non-zero id of a row is one instance, whether or not its pixels are connected, so touching
        cells stay separate. Linear in the image area: one ``find_objects`` pass per row. ``find_objects`` returns
        one slot per id up to the largest, so a row with ids far above its pixel count is renumbered first.
        """
        _, height, width = labels.shape
        out_labels, offsets, crops = [], [], []
        for k, row in enumerate(labels):
            if row.size and row.max() > row.size:
                row = relabel_sequential(row)[0]  # ids 1..n in id order; 0 stays background
            slices = ndimage.find_objects(row)
            for instance_id, sl in enumerate(slices, start=1):
                if sl is None:
                    continue
                crops.append(row[sl] == instance_id)
                offsets.append((sl[0].start, sl[1].start))
                out_labels.append(k + 1)
        n = len(crops)
        return cls(
            height,
            width,
            labels=np.asarray(out_labels, np.int64),
            scores=np.ones(n, np.float32),
            offsets=np.asarray(offsets, np.int64).reshape(n, 2),
            crops=crops,
        )

    def boxes_xyxy(self) -> np.ndarray:
        """Tight boxes around each crop's pixels, ``(N, 4)`` float32 ``[x1, y1, x2, y2]`` (x2, y2 exclusive)."""
        boxes = np.zeros((len(self), 4), np.float32)
        for i, (crop, (y0, x0)) in enumerate(zip(self.crops, self.offsets, strict=True)):
            rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
            if len(rows):
                boxes[i] = (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)
        return boxes

    def areas(self) -> np.ndarray:
        return np.asarray([int(c.sum()) for c in self.crops], np.int64)

    def full_masks(self) -> np.ndarray:
        """All masks at image size, ``(N, H, W)`` bool. Costs N×H×W bytes: use only where a library needs it."""
        masks = np.zeros((len(self), self.height, self.width), bool)
        for i, (crop, (y0, x0)) in enumerate(zip(self.crops, self.offsets, strict=True)):
            masks[i, y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
        return masks

    def select(self, keep: np.ndarray) -> Instances:
        """The subset given by a boolean mask or an index array, in that order."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, np.int64)
        return Instances(
            self.height,
            self.width,
            labels=self.labels[idx],
            scores=self.scores[idx],
            offsets=self.offsets[idx].reshape(len(idx), 2),
            crops=[self.crops[i] for i in idx],
        )
