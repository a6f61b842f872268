"""Stage `import`: the annotated images and slides of `import.input_dir` into the raw training layout.

Each image of the folder is imported with the annotation file beside it (QuPath GeoJSON or ImageScope XML), as
`cellseg import` does. The default input is the synthetic slide and its annotation (stage `synth_slides`), so the
demo exercises the importer; training reads `data.raw_dir`, which can point at the output
(`dvc exp run -S data.raw_dir=data/imported`).

Usage: python stages/import_annotations.py <input_dir> <raw_out>
"""

import argparse
from pathlib import Path

from cellseg.entry import run
from cellseg.importer.pairs import sources_in
from cellseg.importer.run import import_sources
from cellseg.params import load_params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    params = load_params()
    record = import_sources(sources_in(args.input_dir), args.out_dir, params, progress=False)
    print(f"wrote {len(record['samples'])} samples to {args.out_dir}")


if __name__ == "__main__":
    run(main)
