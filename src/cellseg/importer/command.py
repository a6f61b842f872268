"""``cellseg import IMAGE[=ANNOTATION]... --out RAW [--mpp X]``: annotated images into the raw training layout.

Reads ``classes`` and ``import.*`` (and ``data.mpp``, the model's resolution) from the params.yaml of the folder
it runs in, like the other verbs. See docs/import.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cellseg import CellsegError
from cellseg.importer.pairs import parse_source
from cellseg.importer.run import IMPORT_JSON, import_sources
from cellseg.params import load_params


def main(argv: list[str] | None = None, prog: str = "cellseg import") -> None:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Import images or slides with their QuPath GeoJSON or ImageScope XML annotations into the raw "
        "training layout (RAW/train/<sample>/image.tif, classK.tif) and RAW/import.json.",
    )
    parser.add_argument(
        "sources",
        nargs="+",
        metavar="IMAGE[=ANNOTATION]",
        help="an image or slide, and its annotation file (default: the one beside it named after the image)",
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="RAW", help="the raw dataset folder to write"
    )
    parser.add_argument("--mpp", type=float, help="µm/px of the images' level 0 (default: their metadata)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace RAW when it is an earlier import (holds import.json)",
    )
    parser.add_argument("--params", default="params.yaml", help="the params file (default: ./params.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.out.exists():
        if not args.overwrite:
            raise CellsegError(
                f"{args.out}: already exists; choose a new folder, or --overwrite an earlier import"
            )
        if not (args.out / IMPORT_JSON).is_file():
            raise CellsegError(
                f"{args.out}: exists and is not an earlier import (no {IMPORT_JSON}); refusing to replace it"
            )
    params = load_params(args.params)
    sources = [parse_source(arg) for arg in args.sources]
    record = import_sources(sources, args.out, params, mpp=args.mpp, progress=not args.no_progress)
    print(f"wrote {len(record['samples'])} samples to {args.out} (train with -S data.raw_dir={args.out})")
