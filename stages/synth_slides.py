"""Stage `synth_slides`: one synthetic pyramidal slide and its annotation (the `slides` and `import` stages' input).

Synthetic H&E tissue (the demo generator's images as a mosaic) on glass, written by tifffile as a tiled, compressed
pyramid tagged with the training resolution (`data.mpp`), the layout of generic pyramidal TIFFs; beside it
`demo_slide.geojson`, its nuclei as a pathologist's QuPath export (hand-drawn annotations and the region where
every nucleus was drawn). Real slides go in a folder tracked with `dvc add` and `slide.input_dir` (and
`import.input_dir`) points at it.

Usage: python stages/synth_slides.py <out_dir>
"""

import argparse

from cellseg.data.synth import SYNTH_CLASSES
from cellseg.entry import run
from cellseg.fsutil import atomic_dir
from cellseg.params import load_params
from cellseg.slide.synthetic import tissue_mosaic, write_annotation, write_slide

SIDE, TISSUE = 1024, 512  # small: the stage runs in every `dvc repro` (and in the pipeline tests)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    params = load_params()
    tissue, truth = tissue_mosaic(TISSUE, 2, seed=params.synth.seed)
    at = (SIDE - TISSUE) // 2
    with atomic_dir(args.out_dir) as tmp:
        write_slide(
            tmp / "demo_slide.tif", SIDE, SIDE, params.data.mpp, [(at, at, tissue)], levels=3, tile=256
        )
        names = tuple(f"class{k}" for k in range(1, SYNTH_CLASSES + 1))  # the generator's classes
        write_annotation(
            tmp / "demo_slide.geojson", truth, (at, at), names, (at, at, at + TISSUE, at + TISSUE)
        )
    print(
        f"wrote {args.out_dir}/demo_slide.tif ({SIDE}x{SIDE} px) and demo_slide.geojson ({len(truth)} nuclei)"
    )


if __name__ == "__main__":
    run(main)
