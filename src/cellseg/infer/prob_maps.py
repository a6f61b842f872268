"""The auxiliary heads' centre and boundary probabilities of one image, and their stitching across tiles.

A data type of its own, so that detection (which returns maps) does not depend on the post-processing that
uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ProbMaps:
    """The heads' centre and boundary probabilities of one image (float32 ``H×W`` in [0, 1])."""

    center: np.ndarray
    boundary: np.ndarray

    def __post_init__(self) -> None:
        if self.center.ndim != 2 or self.center.shape != self.boundary.shape:
            raise ValueError(
                f"centre and boundary maps must be 2-D and of one shape; got {self.center.shape} "
                f"and {self.boundary.shape}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return self.center.shape


def stitch_maps(parts: Sequence[tuple[ProbMaps, int, int]], height: int, width: int) -> ProbMaps:
    """One image's maps from tiles ``(maps, y0, x0)``, overlaps averaged; pixels no tile covers are 0."""
    total = np.zeros((2, height, width), np.float32)
    count = np.zeros((height, width), np.float32)
    for maps, y0, x0 in parts:
        h, w = maps.shape
        window = (slice(None), slice(y0, y0 + h), slice(x0, x0 + w))
        total[window] += np.stack([maps.center, maps.boundary])
        count[window[1:]] += 1
    total /= np.maximum(count, 1)
    return ProbMaps(total[0], total[1])
