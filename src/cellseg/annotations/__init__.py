"""Annotation files pathologists export, read as a stream of valid shapely shapes with their class names.

QuPath GeoJSON (0.2, 0.3, 0.4+, and cellseg's own ``nuclei.geojson``), Aperio ImageScope XML, and mask images
(an instance label image or a binary mask: ``masks``, only when named explicitly); everything in
level-0 pixel-corner coordinates. What reading had to repair or leave out is counted
(``AnnotationFile.repairs``) for one warning line per file; what cannot be read at all raises
:class:`AnnotationError` naming the file. Rasterising, tiling and importing are the importer's, not this
package's.
"""

from __future__ import annotations

from pathlib import Path

from cellseg.annotations.imagescope import ImageScopeFile
from cellseg.annotations.masks import MASK_SUFFIXES, MaskFile
from cellseg.annotations.qupath import GeoJsonFile
from cellseg.annotations.shapes import Annotation, AnnotationError, AnnotationFile, Repairs

__all__ = [
    "ANNOTATION_SUFFIXES",
    "MASK_SUFFIXES",
    "Annotation",
    "AnnotationError",
    "AnnotationFile",
    "Repairs",
    "open_annotations",
]

ANNOTATION_SUFFIXES = (".geojson", ".geojson.gz", ".json", ".xml")
"""The suffixes of annotation files found beside an image. Mask images (``MASK_SUFFIXES``) look like images,
so they are read only when a pair names them (``IMAGE=MASK``)."""


def open_annotations(path: str | Path) -> AnnotationFile:
    """The file's reader, chosen by suffix (.geojson, .geojson.gz, .json: GeoJSON; .xml: ImageScope; .png,
    .tif, .tiff: a mask image)."""
    path = Path(path)
    name = path.name.lower()
    suffix = next((s for s in ANNOTATION_SUFFIXES + MASK_SUFFIXES if name.endswith(s)), None)
    if suffix is None:
        raise AnnotationError(
            f"{path}: not an annotation file I can read (suffix {''.join(path.suffixes) or 'none'}); "
            f"expected one of {', '.join(ANNOTATION_SUFFIXES + MASK_SUFFIXES)}"
        )
    if not path.is_file():
        raise AnnotationError(f"{path}: no such file" if not path.exists() else f"{path}: is not a file")
    if suffix in MASK_SUFFIXES:
        return MaskFile(path)
    return ImageScopeFile(path) if suffix == ".xml" else GeoJsonFile(path)
