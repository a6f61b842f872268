"""Mask images as annotations: an instance label image, or a binary mask split into nuclei.

Many public sets and users' own folders hold masks, not polygons (TNBC: 0/255 PNGs). Each nucleus becomes the
exact union of its pixels' squares, so the importer's pixel-centre fill gives back the very same pixels.

- **Label image** (more than one non-zero value): each distinct id is one nucleus, kept whole even where its
  pixels are not connected.
- **Binary mask** (one non-zero value): nuclei are the 4-connected components, the rule that keeps two nuclei
  touching only at a corner apart. Touching nuclei drawn as one blob merge, and the rule cannot know it; what
  the choice of rule changes is counted and reported (how many components 8-connectivity would join).

Masks carry no classes (``class_name`` None: ``import.default_class`` classifies them) and no resolution.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import shapely
from scipy import ndimage
from skimage.segmentation import relabel_sequential

from cellseg.annotations.shapes import Annotation, AnnotationFile

MASK_SUFFIXES = (".png", ".tif", ".tiff")
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
EIGHT_CONNECTED = ndimage.generate_binary_structure(2, 2)
BINARY_SPLIT = "binary mask read as 4-connected components"
CORNER_TOUCHING = "components touching another only at a corner (8-connectivity would join them)"


def read_mask(path: Path) -> np.ndarray:
    """The mask as a 2-D integer array; an RGB(A) file whose colour channels are equal is read as grey."""
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        array = tifffile.imread(path)
    else:
        from PIL import Image

        with Image.open(path) as image:
            array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        colour = array[..., :3]
        if not (colour == colour[..., :1]).all():
            raise ValueError("a colour image, not a mask (its red, green and blue differ)")
        array = colour[..., 0]
    if array.ndim != 2:
        raise ValueError(f"not a 2-D mask (shape {array.shape})")
    if array.dtype.kind not in "iub":
        raise ValueError(f"mask values must be integers, not {array.dtype}")
    if array.dtype.kind == "i" and array.min() < 0:
        raise ValueError("negative ids in the mask")
    return array


def pixel_shape(mask: np.ndarray, row0: int, col0: int):
    """The exact outline of the ``True`` pixels of ``mask`` (placed at ``row0, col0``): the union of each
    row's runs as boxes in pixel-corner coordinates."""
    boxes = []
    for r, row in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.r_[False, row, False].astype(np.int8)))
        for start, stop in zip(edges[::2], edges[1::2], strict=True):
            boxes.append((col0 + start, row0 + r, col0 + stop, row0 + r + 1))
    return shapely.union_all(shapely.box(*np.asarray(boxes, np.float64).T))


class MaskFile(AnnotationFile):
    """A mask image as a stream of one Annotation per nucleus (object type ``detection``)."""

    format = "mask"

    def _read(self) -> Iterator[Annotation]:
        try:
            mask = read_mask(self.path)
        except ValueError as err:
            raise self.error(str(err)) from None
        except Exception as err:  # PIL and tifffile raise many kinds for a file that is not an image
            raise self.error(f"cannot read as a mask image ({type(err).__name__}: {err})") from None
        values = np.unique(mask)
        values = values[values != 0]
        if len(values) == 1:
            labels, n = ndimage.label(mask != 0, FOUR_CONNECTED)
            _, n8 = ndimage.label(mask != 0, EIGHT_CONNECTED)
            self.repairs.add(BINARY_SPLIT, n)
            self.repairs.add(CORNER_TOUCHING, n - n8)
        else:
            labels = mask
            if labels.max() > labels.size:  # sparse ids: find_objects keeps one slot per id up to the largest
                labels = relabel_sequential(labels)[0]
        for index, found in enumerate(ndimage.find_objects(labels), start=1):
            if found is None:
                continue
            geometry = pixel_shape(labels[found] == index, found[0].start, found[1].start)
            yield Annotation(geometry, None, "detection", False, index)
