"""A slide's pictures: the overview with each nucleus outlined in its class colour, and the tissue mask."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from cellseg.outputs.base import class_colour


def draw_outline(image: np.ndarray, polygon, label: int, scale_y: float, scale_x: float) -> None:
    """Draw a level-0 polygon onto the overview picture (``scale_*``: level-0 px per picture pixel)."""
    points = np.asarray(polygon.exterior.coords)[:, :2] / np.array([scale_x, scale_y])
    points = np.round(points).astype(np.int32)
    if len(np.unique(points, axis=0)) <= 2:
        cx, cy = points.mean(axis=0).round().astype(int)
        if 0 <= cy < image.shape[0] and 0 <= cx < image.shape[1]:
            image[cy, cx] = class_colour(label)
        return
    cv2.polylines(image, [points[:, None, :]], True, class_colour(label), 1, lineType=cv2.LINE_8)


def write_picture(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path)
