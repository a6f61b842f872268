"""Output formats as sinks: one protocol, one module per format, one registry.

A sink receives batches of nuclei (:class:`~cellseg.outputs.base.Nuclei`: one image's, or one part of a slide's)
with ``add``, and finishes its file with ``close``: it writes to a temporary path and renames it into place only
then, so a failed run leaves no partial file (``abort`` removes it). A new format is one new module with a
:class:`~cellseg.outputs.base.Sink` class and one entry in :data:`FORMATS`; ``slide.outputs`` (``cellseg slide
--format``) picks among those that serve slides.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from cellseg import CellsegError
from cellseg.outputs.base import Nuclei, Sink, SinkContext
from cellseg.outputs.coco import CocoResultsSink
from cellseg.outputs.csv_table import CsvSink
from cellseg.outputs.geojson import GeoJsonSink, GzipGeoJsonSink
from cellseg.outputs.label_tifs import LabelTifSink
from cellseg.outputs.parquet_table import ParquetSink
from cellseg.outputs.zarr_labels import ZarrLabelSink


@dataclass(frozen=True)
class Format:
    """A registered format: the class that writes it, what it serves and a line for ``--help``."""

    sink: type[Sink]  # its heavy libraries (pyarrow, zarr, shapely) load only when one is opened
    serves: tuple[str, ...]  # "slide": whole slides (level-0 polygons); "images": one image per batch
    help: str


FORMATS: dict[str, Format] = {
    "geojson": Format(GeoJsonSink, ("slide",), "nuclei.geojson: QuPath detections (polygons)"),
    "geojson.gz": Format(GzipGeoJsonSink, ("slide",), "nuclei.geojson.gz: the same, gzipped"),
    "csv": Format(CsvSink, ("slide",), "nuclei.csv: one row per nucleus"),
    "parquet": Format(ParquetSink, ("slide",), "nuclei.parquet: the same table (pyarrow)"),
    "zarr": Format(ZarrLabelSink, ("slide",), "labels.zarr: OME-Zarr uint32 label image"),
    "tifs": Format(LabelTifSink, ("images",), "<image>/class<k>.tif: per-class label maps"),
    "coco": Format(CocoResultsSink, ("images",), "test-results.json + submission.zip: COCO RLE"),
}
"""Every output format, by the name ``--format`` and params.yaml use."""


def formats_for(kind: str) -> list[str]:
    """The names of the formats that serve ``kind`` ("slide" or "images")."""
    return [name for name, fmt in FORMATS.items() if kind in fmt.serves]


def check_formats(names: Sequence[str], kind: str, where: str) -> None:
    """An error naming ``where`` (a params key or a flag) for an empty list, a repeat, or a format that does not
    serve ``kind``."""
    valid = formats_for(kind)
    bad = [n for n in names if n not in valid]
    if not names or bad or len(set(names)) != len(names):
        problem = f"unknown {', '.join(map(repr, bad))}" if bad else "empty or repeated"
        raise CellsegError(f"{where}: {problem}; choose from {', '.join(valid)}")


@contextmanager
def open_sinks(names: Sequence[str], context: SinkContext) -> Iterator[list[Sink]]:
    """The sinks of ``names``, closed (renamed into place) when the block ends, aborted if it raises."""
    sinks: list[Sink] = []
    try:
        for name in names:
            sinks.append(FORMATS[name].sink(context))
        yield sinks
    except BaseException:
        for sink in sinks:
            sink.abort()
        raise
    for done, sink in enumerate(sinks):
        try:
            sink.close()
        except BaseException:
            for rest in sinks[done:]:
                rest.abort()
            raise


__all__ = ["FORMATS", "Format", "Nuclei", "Sink", "SinkContext", "check_formats", "formats_for", "open_sinks"]
