"""What every output format shares: the batch of nuclei a sink is given, the sink protocol, and the temporary
file that becomes the output only when it is complete."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np

from cellseg import DEFAULT_CLASSES
from cellseg.instances import Instances

CLASS_COLOURS = {1: (230, 25, 75), 2: (60, 180, 75), 3: (0, 130, 200), 4: (245, 130, 48)}
"""The colours (RGB) of classes 1..4, in every picture and in QuPath's classification; :func:`class_colour`
gives every class's."""
TAB20 = (
    (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44),
    (152, 223, 138), (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213),
    (140, 86, 75), (196, 156, 148), (227, 119, 194), (247, 182, 210), (127, 127, 127),
    (199, 199, 199), (188, 189, 34), (219, 219, 141), (23, 190, 207), (158, 218, 229),
)  # fmt: skip
"""matplotlib's tab20 palette (RGB), in order: the colours of classes 5, 6, … (cycling)."""


def class_colour(k: int) -> tuple[int, int, int]:
    """The colour (RGB) of class ``k`` (1-based): :data:`CLASS_COLOURS` for 1..4, then :data:`TAB20`, cycling."""
    return CLASS_COLOURS[k] if k in CLASS_COLOURS else TAB20[(k - len(CLASS_COLOURS) - 1) % len(TAB20)]


@dataclass(frozen=True)
class SinkContext:
    """What a sink needs to know before the first nucleus: where to write and what the pixels mean."""

    folder: Path
    stem: str = ""  # the slide's or run's name (GeoJSON feature ids derive from it)
    mpp: float | None = None  # µm per output pixel
    height: int = 0  # output pixels (level 0 of a slide); formats that need the extent (label images)
    width: int = 0
    class_names: tuple[str, ...] = DEFAULT_CLASSES  # the model's (ModelBundle.class_names), class 1 first


@dataclass
class Nuclei:
    """A batch of nuclei for the sinks: one image's, or one part of a slide's.

    ``instances`` are in model pixels with offsets in the frame of the whole image or slide (model pixels);
    ``scale`` output pixels per model pixel (a slide's level 0; 1 for an image). ``ids`` number the nuclei
    uniquely within one output. ``image``/``image_id`` name the image of per-image formats.
    """

    instances: Instances
    ids: np.ndarray
    scale: float = 1.0
    image: str | None = None
    image_id: int | None = None
    _areas: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.instances)

    @cached_property
    def polygons(self) -> list:
        """Each nucleus's outline as a valid shapely polygon in output pixels (computed once, for every sink)."""
        from cellseg.outputs.polygons import to_level0

        return [
            to_level0(crop, (int(o[0]), int(o[1])), self.scale)
            for crop, o in zip(self.instances.crops, self.instances.offsets, strict=True)
        ]

    @cached_property
    def mask_pixels(self) -> np.ndarray:
        """Each nucleus's area in model pixels (its mask's pixel count)."""
        return self.instances.areas()

    @property
    def areas_px(self) -> np.ndarray:
        """Each nucleus's area in output pixels (model pixels × scale²)."""
        return self.mask_pixels * self.scale * self.scale


class Sink(Protocol):
    """One output format."""

    def __init__(self, context: SinkContext) -> None: ...

    def add(self, nuclei: Nuclei) -> None:
        """Write a batch."""

    def close(self) -> None:
        """Finish and move the output into place."""

    def abort(self) -> None:
        """Remove what was written (the run failed)."""


class TempOutput:
    """An output file or folder written at a hidden temporary path beside ``final`` and renamed onto it by
    :meth:`commit` (replacing an earlier one), or removed by :meth:`discard`."""

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        self.discard()

    def commit(self) -> Path:
        if self.final.is_dir() and not self.final.is_symlink():
            shutil.rmtree(self.final)
        os.replace(self.path, self.final)
        return self.final

    def discard(self) -> None:
        if self.path.is_dir() and not self.path.is_symlink():
            shutil.rmtree(self.path, ignore_errors=True)
        elif self.path.exists() or self.path.is_symlink():
            self.path.unlink()
