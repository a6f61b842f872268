"""Where the tissue is: a low-resolution picture of the slide and Otsu's threshold on its saturation.

As CLAM and TIAToolbox do: glass is white or grey (low saturation), stained tissue is coloured. The picture is
read from the smallest level at least ``max_side`` pixels wide, chunk by chunk and shrunk on the fly, so it never
needs a whole large level in memory. Otsu's threshold is clipped to ``[min_saturation, max_saturation]``: the
lower bound keeps an empty slide empty (Otsu would split the glass's noise), the upper bound keeps a slide that is
all tissue whole (Otsu would split the tissue into nuclei and stroma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from skimage.filters import threshold_otsu

from cellseg.slide.reader import Slide

CHUNK = 2048
"""Level pixels read at a time when shrinking a level for the overview."""


@dataclass
class Overview:
    """A small RGB picture of the whole slide and its tissue mask; ``scale_y``/``scale_x``: level-0 px per pixel."""

    image: np.ndarray
    mask: np.ndarray
    scale_y: float
    scale_x: float
    threshold: float

    def tissue_fraction(self, y0: float, x0: float, y1: float, x1: float) -> float:
        """Share of tissue pixels in a level-0 rectangle (0 when it is outside the picture)."""
        r0, c0 = int(math.floor(y0 / self.scale_y)), int(math.floor(x0 / self.scale_x))
        r1, c1 = int(math.ceil(y1 / self.scale_y)), int(math.ceil(x1 / self.scale_x))
        part = self.mask[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)]
        return float(part.mean()) if part.size else 0.0

    def tissue_area_um2(self, mpp: float) -> float:
        return float(self.mask.sum()) * self.scale_y * self.scale_x * mpp * mpp


def overview_image(slide: Slide, max_side: int) -> tuple[np.ndarray, float, float]:
    """The slide shrunk to at most ``max_side`` pixels a side: ``(rgb, level-0 px per pixel in y, in x)``."""
    level = 0  # the coarsest level still at least max_side a side (level 0 when the slide is smaller)
    for index, lv in enumerate(slide.levels):
        if max(lv.height, lv.width) >= max_side:
            level = index
    lv = slide.levels[level]
    k = max(1, math.ceil(max(lv.height, lv.width) / max_side))
    out_h, out_w = math.ceil(lv.height / k), math.ceil(lv.width / k)
    out = np.zeros((out_h, out_w, 3), np.uint8)
    step = max(k, (CHUNK // k) * k)
    for y0 in range(0, lv.height, step):
        for x0 in range(0, lv.width, step):
            h, w = min(step, lv.height - y0), min(step, lv.width - x0)
            region = slide.read_region(level, y0, x0, h, w)
            oh, ow = math.ceil(h / k), math.ceil(w / k)
            small = region if k == 1 else cv2.resize(region, (ow, oh), interpolation=cv2.INTER_AREA)
            out[y0 // k : y0 // k + oh, x0 // k : x0 // k + ow] = small
    return out, slide.height / out_h, slide.width / out_w


def tissue_mask(image: np.ndarray, min_saturation: int, max_saturation: int) -> tuple[np.ndarray, float]:
    """Tissue pixels of an RGB picture and the saturation threshold used (0..255)."""
    saturation = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)[..., 1]
    saturation = cv2.medianBlur(saturation, 5) if min(saturation.shape) >= 5 else saturation
    if saturation.size and saturation.min() != saturation.max():
        otsu = float(threshold_otsu(saturation))
    else:
        otsu = float(max_saturation)
    threshold = float(np.clip(otsu, min_saturation, max_saturation))
    mask = saturation > threshold
    if min(mask.shape) >= 5:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    return mask, threshold


def detect_tissue(slide: Slide, max_side: int, min_saturation: int, max_saturation: int) -> Overview:
    image, sy, sx = overview_image(slide, max_side)
    mask, threshold = tissue_mask(image, min_saturation, max_saturation)
    return Overview(image, mask, sy, sx, threshold)
