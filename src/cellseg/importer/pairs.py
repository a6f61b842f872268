"""Which annotation file belongs to which image.

``IMAGE=ANNOTATION`` names both. ``IMAGE`` alone takes the annotation file beside it whose name is the image's
stem, alone or followed by ``_…`` or ``.…``, with an annotation suffix (``slide.svs`` ->
``slide.xml``, ``slide_nuclei.geojson``, ``slide.annotations.geojson.gz``); an exact stem wins, and a file that
is closer to another image of the folder belongs to that one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cellseg import CellsegError
from cellseg.annotations import ANNOTATION_SUFFIXES
from cellseg.slide.reader import SLIDE_SUFFIXES


class PairError(CellsegError, ValueError):
    """An image without annotation, an annotation without image, or an ambiguous pairing."""


@dataclass(frozen=True)
class Source:
    """One annotated image (or slide) to import."""

    image: Path
    annotation: Path


def annotation_suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in sorted(ANNOTATION_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return None


def annotation_stem(path: Path) -> str:
    """The annotation file's name without its annotation suffix (``a.geojson.gz`` -> ``a``)."""
    return path.name[: len(path.name) - len(annotation_suffix(path) or "")]


def _belongs(stem: str, annotation: Path) -> bool:
    rest = annotation_stem(annotation)
    return rest == stem or rest.startswith(stem + "_") or rest.startswith(stem + ".")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in SLIDE_SUFFIXES and annotation_suffix(path) is None


def annotation_beside(image: Path) -> Path:
    """The annotation file beside ``image`` (see the module's docstring), or a :class:`PairError`."""
    folder = image.parent
    siblings = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    annotations = [p for p in siblings if annotation_suffix(p) and _belongs(image.stem, p)]
    exact = [p for p in annotations if annotation_stem(p) == image.stem]
    if len(exact) == 1:
        return exact[0]
    # an annotation named after a longer stem of another image belongs to that image
    others = [p.stem for p in siblings if _is_image(p) and p != image and p.stem.startswith(image.stem)]
    mine = [p for p in annotations if not any(_belongs(o, p) for o in others)]
    candidates = exact or mine
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise PairError(
            f"{image}: no annotation file beside it (looked for {image.stem}[_…|.…] with "
            f"{', '.join(ANNOTATION_SUFFIXES)}); name it with IMAGE=ANNOTATION"
        )
    names = ", ".join(p.name for p in candidates)
    raise PairError(
        f"{image}: several annotation files could be its own ({names}); name one with IMAGE=ANNOTATION"
    )


def parse_source(arg: str) -> Source:
    """``IMAGE`` or ``IMAGE=ANNOTATION`` (a path that itself holds ``=`` is taken whole when it exists)."""
    if Path(arg).is_file() or "=" not in arg:
        image = Path(arg)
        if not image.is_file():
            raise PairError(f"{image}: no such image")
        return Source(image, annotation_beside(image))
    image, annotation = (Path(p) for p in arg.split("=", 1))
    if not image.is_file():
        raise PairError(f"{image}: no such image")
    if not annotation.is_file():
        raise PairError(f"{annotation}: no such annotation file (for {image})")
    return Source(image, annotation)


def sources_in(folder: Path) -> list[Source]:
    """Every image of ``folder`` with its annotation; an annotation file that no image claims is an error."""
    if not folder.is_dir():
        raise PairError(f"{folder}: not a folder of annotated images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if _is_image(p)]
    if not images:
        raise PairError(f"{folder}: no images ({', '.join(SLIDE_SUFFIXES)})")
    sources = [Source(image, annotation_beside(image)) for image in images]
    claimed = {s.annotation for s in sources}
    orphans = [p.name for p in files if annotation_suffix(p) and p not in claimed]
    if orphans:
        raise PairError(f"{folder}: annotation file(s) with no image: {', '.join(orphans)}")
    return sources


def sources_by_rule(folder: Path, rule: str) -> list[Source]:
    """Every image under ``folder`` (recursively) whose path relative to it matches ``rule``'s ``REGEX``, with the
    annotation at ``REPLACEMENT`` (``re.sub``, relative to ``folder``): annotations kept apart from the images,
    e.g. ``Slide_(\\d+)/(.+)=GT_\\1/\\2`` for masks in a parallel folder. Images that do not match are skipped;
    a matched image whose annotation is missing is an error."""
    if not folder.is_dir():
        raise PairError(f"{folder}: not a folder of annotated images")
    pattern, replacement = rule.split("=", 1)
    regex = re.compile(pattern)
    sources = []
    for image in sorted(p for p in folder.rglob("*") if p.is_file() and _is_image(p)):
        relative = image.relative_to(folder).as_posix()
        if not regex.search(relative):
            continue
        annotation = folder / regex.sub(replacement, relative, count=1)
        if not annotation.is_file():
            raise PairError(f"{image}: no annotation at {annotation} (rule {rule!r})")
        if annotation == image:
            raise PairError(f"{image}: the rule {rule!r} names the image itself as its annotation")
        sources.append(Source(image, annotation))
    if not sources:
        raise PairError(f"{folder}: no image path matches {pattern!r}")
    return sources
