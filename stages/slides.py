"""Stage `slides`: the trained model over every slide of a folder (`cellseg slide`), results per slide.

`<out_dir>/<slide stem>/` gets the formats of `slide.outputs` (nuclei.geojson for QuPath, nuclei.csv ...),
thumbnail.png and tissue.png
(README "Whole slides"); settings: `slide.*`, `predict.*` and the tuned thresholds beside the checkpoint.

Usage: python stages/slides.py <checkpoint> <slides_dir> <out_dir>
"""

import argparse
from pathlib import Path

from cellseg import CellsegError
from cellseg.data.io import visible_files
from cellseg.entry import run
from cellseg.slide import command
from cellseg.slide.reader import SLIDE_SUFFIXES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("slides_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.slides_dir.is_dir():
        raise CellsegError(f"{args.slides_dir}: not a folder of slides (set slide.input_dir in params.yaml)")
    slides = visible_files(args.slides_dir, SLIDE_SUFFIXES)
    if not slides:
        raise CellsegError(f"{args.slides_dir}: no slides ({', '.join(SLIDE_SUFFIXES)})")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    command.main(
        [args.checkpoint, *map(str, slides), "--out", str(args.out_dir), "--no-progress"], prog="slides"
    )


if __name__ == "__main__":
    run(main)
