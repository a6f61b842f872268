"""Open a slide lazily and read regions of its levels, at the level's pixels or rescaled to a model's µm/px.

One reader, tifffile with its zarr store (``TiffPageSeries.aszarr``): it reads every TIFF-family slide (Aperio
SVS with JPEG or JPEG 2000 tiles, Hamamatsu NDPI, Leica SCN, OME-TIFF, the generic tiled pyramids tifffile and
libvips write) and plain tiled or striped tifs, region by region, from pip wheels alone; png and jpg files are
read whole (they are small by nature). docs/slides.md ("How it works") gives the measurement behind the choice.

The levels are those of the image series (``series[0].levels``); an SVS file's thumbnail, label and macro
pictures are other series, never levels. The resolution comes from the metadata (Aperio ``MPP =``, OME
``PhysicalSizeX``, TIFF resolution tags in cm or inches) or from the caller (``--mpp``), which wins.

Every failure is a :class:`SlideError` whose message names the file: not a slide, no resolution, a level that
cannot be read (truncated or corrupt file, unsupported compression).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cellseg import CellsegError
from cellseg.resolution import mpp_from_tags, parse_mpp_from_description

PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", *PLAIN_IMAGE_SUFFIXES)
"""The files a folder of slides is read for (the TIFF-based formats tifffile opens, and plain images)."""
MPP_RANGE = (0.01, 100.0)
"""A resolution outside this range (µm/px) is not a microscope's (e.g. a TIFF's default 72 dpi)."""


class SlideError(CellsegError):
    """A slide cannot be used: the message names the file and the problem."""


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size and how many level-0 pixels one of its pixels spans."""

    height: int
    width: int
    downsample: float


class Slide:
    """An open slide: its levels, the level-0 resolution (µm/px), and region reads (``read_region``)."""

    def __init__(self, path: Path, levels: list[Level], mpp: float, arrays: list, handle=None) -> None:
        self.path = path
        self.levels = levels
        self.mpp = mpp
        self._arrays = arrays  # per level: something sliceable as [y0:y1, x0:x1] (zarr array or ndarray)
        self._handle = handle

    @property
    def height(self) -> int:
        return self.levels[0].height

    @property
    def width(self) -> int:
        return self.levels[0].width

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.levels[level].downsample

    def read_region(self, level: int, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """``uint8 height×width×3`` pixels of ``level`` from (y0, x0); the region must lie inside the level."""
        lv = self.levels[level]
        if not (
            0 <= y0
            and 0 <= x0
            and height > 0
            and width > 0
            and y0 + height <= lv.height
            and x0 + width <= lv.width
        ):
            raise ValueError(
                f"region {(y0, x0, height, width)} outside level {level} ({lv.height}×{lv.width})"
            )
        try:
            with _quiet("tifffile"):
                region = np.asarray(self._arrays[level][y0 : y0 + height, x0 : x0 + width])
        except Exception as err:  # codec errors, truncated files: anything the decoder raises
            raise SlideError(
                f"{self.path}: level {level} cannot be read at y={y0}, x={x0} "
                f"({type(err).__name__}: {err}); the file may be truncated or corrupt"
            ) from None
        return _to_rgb(region, self.path)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _to_rgb(region: np.ndarray, path: Path) -> np.ndarray:
    if region.dtype != np.uint8:
        raise SlideError(f"{path}: pixels are {region.dtype}, not 8-bit RGB (brightfield slides are uint8)")
    if region.ndim == 2:
        return np.repeat(region[..., None], 3, axis=2)
    if region.ndim == 3 and region.shape[2] in (3, 4):
        return np.ascontiguousarray(region[..., :3])
    raise SlideError(f"{path}: pixels of shape {region.shape} are not RGB")


def plausible_mpp(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp) or not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        return None
    return mpp


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open ``path`` lazily. ``mpp`` (µm/px of level 0) overrides the metadata; without either: an error."""
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    if mpp is not None and plausible_mpp(mpp) is None:
        raise SlideError(f"{path}: --mpp {mpp} is not a resolution in µm/px ({MPP_RANGE[0]}..{MPP_RANGE[1]})")
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        return _open_plain(path, mpp)
    return _open_tiff(path, mpp)


def _open_plain(path: Path, mpp: float | None) -> Slide:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            array = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... for bad files
        raise SlideError(f"{path}: not a slide or image ({type(err).__name__}: {err})") from None
    if mpp is None:
        raise SlideError(
            f"{path}: no resolution metadata (µm/px) in a {path.suffix} file; give it with --mpp"
        )
    level = Level(array.shape[0], array.shape[1], 1.0)
    return Slide(path, [level], mpp, [array])


def _open_tiff(path: Path, mpp: float | None) -> Slide:
    import tifffile
    import zarr

    try:
        with _quiet("tifffile"):  # a damaged file's warnings: the SlideError below says it in one line
            tif = tifffile.TiffFile(path)
            tif.series  # noqa: B018 (parsed here, under the quiet logger)
    except Exception as err:
        raise SlideError(
            f"{path}: not a slide (tifffile cannot open it: {type(err).__name__}: {err})"
        ) from None
    try:
        if not tif.series:
            raise SlideError(f"{path}: not a slide (a TIFF without images)")
        series = tif.series[0]
        axes = series.axes
        if axes not in ("YXS", "YX", "YXC"):
            raise SlideError(f"{path}: image axes {axes!r} are not a brightfield RGB slide (YXS)")
        base = series.levels[0]
        h0, w0 = int(base.shape[0]), int(base.shape[1])
        levels, arrays = [], []
        for index, level in enumerate(series.levels):
            h, w = int(level.shape[0]), int(level.shape[1])
            if h < 1 or w < 1:
                continue
            try:
                arrays.append(zarr.open(series.aszarr(level=index), mode="r"))
            except Exception as err:
                raise SlideError(
                    f"{path}: level {index} cannot be read ({type(err).__name__}: {err})"
                ) from None
            levels.append(Level(h, w, (h0 / h + w0 / w) / 2.0))
        if mpp is None:
            page = series.levels[0].keyframe
            found = plausible_mpp(parse_mpp_from_description(page.description or ""))
            if found is None and tif.is_ome and tif.ome_metadata:
                found = plausible_mpp(parse_mpp_from_description(tif.ome_metadata))
            if found is None:
                found = plausible_mpp(mpp_from_tags(page))
            if found is None:
                raise SlideError(f"{path}: no resolution (µm/px) in its metadata; give it with --mpp")
            mpp = found
    except SlideError:
        tif.close()
        raise
    except Exception as err:  # a damaged file can fail anywhere in tifffile's parsing
        tif.close()
        raise SlideError(f"{path}: not a readable slide ({type(err).__name__}: {err})") from None
    return Slide(path, levels, float(mpp), arrays, handle=tif)


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.lru_cache(maxsize=4)
def _cached(path: str, mpp: float | None, mtime_ns: int, size: int) -> Slide:
    return open_slide(path, mpp)


def open_slide_cached(path: str | Path, mpp: float | None = None) -> Slide:
    """:func:`open_slide`, kept open per process (a Dask worker reads many blocks of one slide)."""
    stat = os.stat(path)
    return _cached(str(path), mpp, stat.st_mtime_ns, stat.st_size)


def choose_level(slide: Slide, target_mpp: float, tolerance: float = 0.01) -> int:
    """The coarsest level not coarser than ``target_mpp`` (within ``tolerance``); level 0 if all are coarser.

    Reading the level closest to the training resolution from above keeps reads small; the region is then
    resized to exactly ``target_mpp`` (:func:`read_window`), which only ever shrinks (or keeps) its pixels
    unless the slide itself is coarser than the model.
    """
    best = 0
    for index in range(len(slide.levels)):
        if slide.level_mpp(index) <= target_mpp * (1 + tolerance) and slide.level_mpp(
            index
        ) >= slide.level_mpp(best):
            best = index
    return best


def model_size(slide: Slide, target_mpp: float) -> tuple[int, int]:
    """The slide's size in pixels of ``target_mpp`` (the model's pixels)."""
    ratio = slide.mpp / target_mpp
    return max(int(math.floor(slide.height * ratio)), 1), max(int(math.floor(slide.width * ratio)), 1)


def read_window(
    slide: Slide, level: int, target_mpp: float, y0: int, x0: int, height: int, width: int
) -> np.ndarray:
    """Pixels of the window (y0, x0, height, width) in model pixels (``target_mpp``), read from ``level``.

    Pixel centres map exactly: model pixel ``u`` samples the level at ``(u + 0.5)·s − 0.5`` with
    ``s = target_mpp / level_mpp`` (bilinear), so two overlapping windows see identical pixels where they overlap
    and the blocks' seams agree. Only the region the window needs (plus one pixel) is read.
    """
    lv = slide.levels[level]
    s = target_mpp / slide.level_mpp(level)
    if abs(s - 1.0) < 1e-9:
        h, w = min(height, lv.height - y0), min(width, lv.width - x0)
        region = slide.read_region(level, y0, x0, h, w)
        if (h, w) != (height, width):
            region = np.pad(region, ((0, height - h), (0, width - w), (0, 0)), mode="edge")
        return region

    def span(start: int, length: int, limit: int) -> tuple[int, int]:
        lo = int(math.floor((start + 0.5) * s - 0.5)) - 1
        hi = int(math.ceil((start + length - 0.5) * s - 0.5)) + 2
        lo, hi = min(max(lo, 0), limit - 1), min(max(hi, 1), limit)
        return lo, max(hi, lo + 1)

    ly0, ly1 = span(y0, height, lv.height)
    lx0, lx1 = span(x0, width, lv.width)
    region = slide.read_region(level, ly0, lx0, ly1 - ly0, lx1 - lx0)
    matrix = np.array(
        [[s, 0.0, (x0 + 0.5) * s - 0.5 - lx0], [0.0, s, (y0 + 0.5) * s - 0.5 - ly0]], np.float64
    )
    return cv2.warpAffine(
        region,
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
