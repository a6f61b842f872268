"""Import annotated images and slides: ``RAW/train/<sample>/{image,classK}.tif`` and ``RAW/import.json``.

Every tile is read with the slide mode's own warp (:func:`cellseg.slide.reader.read_window`) at the model's
resolution (``data.mpp``), and the nuclei's polygons are scaled by the same factor, so a cohort scanned at 0.19,
0.25 and 0.5 µm/px trains at one scale and predicts at the same. ``import.json`` records, per sample, the region
of its source in level-0 pixels (``x0``, ``y0``, ``width``, ``height``), ``scale`` (written pixels per level-0
pixel), ``mpp`` and the annotation file's sha256, so a model's training data can be traced to the slides.
The whole output is written in a temporary folder and renamed at the end: a failure leaves no partial ``RAW``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cellseg import CellsegError, __version__
from cellseg.annotations import open_annotations
from cellseg.data.io import write_image_tif, write_label_tif
from cellseg.fsutil import atomic_dir
from cellseg.importer.classes import REGION, ClassMap
from cellseg.importer.pairs import Source
from cellseg.importer.rasterise import PaintStats, paint
from cellseg.importer.regions import Tile, tiles_for
from cellseg.slide.reader import SlideError, choose_level, model_size, open_slide, read_window

IMPORT_JSON = "import.json"
MPP_MISMATCH = 0.05
"""Relative difference between the image's and the annotation's µm/px above which import warns."""


class ImportFailure(CellsegError, ValueError):
    """An image and its annotation that cannot be imported; the message names the file."""


@dataclass
class Annotated:
    """One source's annotation, read and placed: nuclei and regions in model-pixel corner coordinates."""

    nuclei: list = field(default_factory=list)  # (geometry, class 1..K, source index)
    regions: list = field(default_factory=list)
    outside: int = 0  # nuclei wholly outside the image
    clipped: int = 0  # nuclei cut at the image's edge
    warnings: list[str] = field(default_factory=list)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _open_image(source: Source, mpp: float | None, annotation_mpp: float | None, default_mpp: float | None):
    """The image as a slide; its µm/px from ``--mpp``, its metadata, the annotation's own, or ``default_mpp``."""
    try:
        return open_slide(source.image, mpp)
    except SlideError:
        fallback = annotation_mpp if annotation_mpp is not None else default_mpp
        if mpp is None and fallback is not None:  # any other fault fails the same way again
            return open_slide(source.image, fallback)
        raise


def read_annotation(source: Source, reader, slide, model_mpp: float, class_map: ClassMap) -> Annotated:
    """``reader``'s nuclei and regions, classified, clipped to the image and scaled to model pixels."""
    from shapely import affinity
    from shapely.geometry import box

    factor = slide.mpp / model_mpp
    frame = box(0, 0, slide.width, slide.height)
    out = Annotated()
    class_map.reset()
    for item in reader:
        k = class_map.index(item.class_name)
        if k is None:
            continue
        geometry = item.geometry
        if not frame.contains(geometry):
            geometry = geometry.intersection(frame)
            if geometry.is_empty or geometry.area <= 0:
                out.outside += k != REGION
                continue
            geometry = _polygonal(geometry)
            out.clipped += k != REGION
        geometry = affinity.scale(geometry, factor, factor, origin=(0, 0))
        if k == REGION:
            out.regions.append(geometry)
        else:
            out.nuclei.append((geometry, k, item.index))
    line = class_map.check(source.annotation)
    if line:
        out.warnings.append(line)
    line = reader.repairs.line(source.annotation)
    if line:
        out.warnings.append(line)
    if reader.mpp and abs(reader.mpp - slide.mpp) > MPP_MISMATCH * slide.mpp:
        out.warnings.append(
            f"warning: {source.annotation}: says {reader.mpp:g} µm/px but {source.image} is {slide.mpp:g} "
            "µm/px; the image's is used (give --mpp to override)"
        )
    if not out.nuclei and out.outside:
        raise ImportFailure(
            f"{source.annotation}: all {out.outside} nuclei lie outside {source.image} "
            f"({slide.width}×{slide.height} px): is it the annotation of another image?"
        )
    if not out.nuclei:  # an annotated area without nuclei is background to learn, not an error
        out.warnings.append(f"warning: {source.annotation}: no nuclei; its tiles are imported as background")
    return out


def _polygonal(geometry):
    from shapely.geometry import MultiPolygon

    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    parts = [g for g in getattr(geometry, "geoms", []) if g.geom_type == "Polygon"]
    return MultiPolygon(parts) if len(parts) > 1 else parts[0]


def _regions(source: Source, annotated: Annotated, height: int, width: int, max_mpx: float) -> list:
    from shapely.geometry import box

    if annotated.regions:
        return annotated.regions
    mpx = height * width / 1e6
    if mpx > max_mpx:
        raise ImportFailure(
            f"{source.annotation}: no annotated region (a class of import.region_classes) and {source.image} is "
            f"{mpx:.1f} Mpx at data.mpp, more than import.max_region_mpx ({max_mpx:g}): a whole slide is rarely "
            "fully annotated; draw the regions where every nucleus was drawn, or raise import.max_region_mpx"
        )
    return [box(0, 0, width, height)]


def _tile_nuclei(tree, nuclei: list, tile: Tile) -> list:
    from shapely import affinity

    hits = tree.query(tile.box(), predicate="intersects")
    return [
        (affinity.translate(nuclei[i][0], -tile.x0, -tile.y0), nuclei[i][1], nuclei[i][2])
        for i in sorted(hits)
    ]


@dataclass
class SourceReport:
    """What importing one source did, for ``import.json`` and the summary line."""

    samples: list[dict]
    imported: int
    annotated: int
    stats: PaintStats
    tiles_left_out: int
    warnings: list[str]


def sample_names(sources: list[Source]) -> dict[Source, str]:
    """Each source's sample prefix: the image's stem, or the annotation's where images share a stem (a folder of
    ``<sample>/image.tif`` with one annotation file each)."""
    from cellseg.importer.pairs import annotation_stem

    for name in (lambda s: s.image.stem, lambda s: annotation_stem(s.annotation)):
        stems = Counter(name(s) for s in sources)
        if max(stems.values()) == 1:
            return {s: name(s) for s in sources}
    twice = sorted(stem for stem, n in Counter(s.image.stem for s in sources).items() if n > 1)
    raise ImportFailure(
        f"images with the same name and annotations with the same name would give the same samples: "
        f"{', '.join(twice)}"
    )


def import_source(
    source: Source,
    prefix: str,
    train_dir: Path,
    params,
    class_map: ClassMap,
    mpp: float | None,
    progress: bool,
    default_mpp: float | None = None,
) -> SourceReport:
    """Cut ``source`` into samples ``<prefix>_0000``, ... under ``train_dir``; ``mpp`` overrides the image's
    µm/px, ``default_mpp`` stands in where neither the image nor its annotation records one."""
    from shapely import STRtree
    from tqdm import tqdm

    reader = open_annotations(source.annotation)
    slide = _open_image(source, mpp, reader.mpp, default_mpp)
    try:
        model_mpp = params.data.mpp
        annotated = read_annotation(source, reader, slide, model_mpp, class_map)
        height, width = model_size(slide, model_mpp)
        regions = _regions(source, annotated, height, width, params.import_.max_region_mpx)
        tiles, left_out = tiles_for(regions, height, width, params.import_.tile_size)
        if not tiles:
            raise ImportFailure(
                f"{source.annotation}: no tile of up to {params.import_.tile_size} px fits inside its regions "
                f"at {model_mpp:g} µm/px (a tile is kept when a region covers 99% of it)"
            )
        warnings = list(annotated.warnings)
        if slide.mpp > model_mpp * (1 + MPP_MISMATCH):
            warnings.append(
                f"warning: {source.image}: {slide.mpp:g} µm/px is coarser than the model's {model_mpp:g}: "
                f"upsampled {slide.mpp / model_mpp:.2f}x"
            )
        level = choose_level(slide, model_mpp)
        level0_per_model = model_mpp / slide.mpp
        digest = sha256(source.annotation)
        tree = STRtree([n[0] for n in annotated.nuclei])
        n_classes = len(class_map.classes)
        samples, stats, seen = [], PaintStats(), set()
        for t, tile in enumerate(
            tqdm(tiles, desc=f"import {source.image.name}", unit="tile", disable=not progress)
        ):
            labels, sources, tile_stats = paint(
                _tile_nuclei(tree, annotated.nuclei, tile), n_classes, tile.height, tile.width
            )
            stats.add(tile_stats)
            seen.update(sources)
            name = f"{prefix}_{t:04d}"
            folder = train_dir / name
            folder.mkdir(parents=True)
            pixels = read_window(slide, level, model_mpp, tile.y0, tile.x0, tile.height, tile.width)
            write_image_tif(folder / "image.tif", pixels)
            for k in range(n_classes):
                if labels[k].any():
                    write_label_tif(folder / f"class{k + 1}.tif", labels[k])
            samples.append(
                {
                    "sample": name,
                    "image": str(source.image),
                    "annotation": str(source.annotation),
                    "annotation_sha256": digest,
                    "x0": round(tile.x0 * level0_per_model, 4),
                    "y0": round(tile.y0 * level0_per_model, 4),
                    "width": round(tile.width * level0_per_model, 4),
                    "height": round(tile.height * level0_per_model, 4),
                    "scale": slide.mpp / model_mpp,
                    "mpp": model_mpp,
                    "nuclei": len(sources),
                }
            )
        if annotated.clipped:
            warnings.append(
                f"warning: {source.annotation}: {annotated.clipped} nuclei cut at the image's edge"
            )
        if annotated.outside:
            warnings.append(
                f"warning: {source.annotation}: {annotated.outside} nuclei outside the image, left out"
            )
        missed = len(annotated.nuclei) - len(seen)
        if missed:
            warnings.append(
                f"warning: {source.annotation}: {missed} of {len(annotated.nuclei)} nuclei are in no tile "
                "(outside the regions, or too small to cover a pixel centre at data.mpp)"
            )
        if stats.overlapping_nuclei:
            warnings.append(
                f"warning: {source.annotation}: {stats.overlapping_nuclei} nuclei overlap another of their "
                f"class ({stats.contested_pixels} pixels); each contested pixel went to the smaller nucleus"
            )
        return SourceReport(samples, len(seen), len(annotated.nuclei), stats, left_out, warnings)
    finally:
        slide.close()


def import_sources(
    sources: list[Source],
    out_dir: Path,
    params,
    mpp: float | None = None,
    progress: bool = True,
    class_map: ClassMap | None = None,
    default_mpp: float | None = None,
) -> dict:
    """Import every source into ``out_dir`` (replaced as a whole when everything succeeded); ``class_map``
    replaces the one of ``params`` (``classes`` and ``import.*``); ``mpp`` and ``default_mpp`` as
    :func:`import_source` takes them."""
    names = sample_names(sources)
    class_map = class_map or ClassMap.of(params)
    record = {
        "cellseg_version": __version__,
        "classes": list(class_map.classes),
        "mpp": params.data.mpp,
        "tile_size": params.import_.tile_size,
        "samples": [],
    }
    with atomic_dir(out_dir) as tmp:
        for source in sources:
            report = import_source(
                source, names[source], tmp / "train", params, class_map, mpp, progress, default_mpp
            )
            for line in report.warnings:
                print(line, file=sys.stderr)
            record["samples"] += report.samples
            print(
                f"{source.image.name} + {source.annotation.name}: {report.imported} of {report.annotated} nuclei "
                f"in {len(report.samples)} tiles at {params.data.mpp:g} µm/px"
                + (f" ({report.tiles_left_out} tiles outside the regions)" if report.tiles_left_out else "")
            )
        (tmp / IMPORT_JSON).write_text(json.dumps(record, indent=1) + "\n")
    return record
